// Generate: run a prompt and sample a reply, streaming text through a callback.
//
// Runs inside the state's open segment (opening one if needed) and leaves it open: the
// caller decides when the segment ends (the session layer ends it after the reply, so
// message + reply form one memory segment). Stateless function; everything it changes is
// in `state` and `sampler`.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/decode_batcher.h"
#include "lm2/runtime/model.h"
#include "lm2/runtime/sampler.h"
#include "lm2/runtime/tokenizer.h"

namespace lm2::runtime {

enum class StopReason {
  kStopToken,    // EOS or a template stop piece (e.g. <|end|>) was generated
  kStopString,   // one of GenerateOptions::stop_strings appeared in the text
  kMaxTokens,    // max_tokens were generated
  kContextFull,  // the context reached max_position_embeddings
};
std::string_view StopReasonName(StopReason reason);

struct GenerateOptions {
  int32_t max_tokens = 256;                 // upper bound on generated tokens (>= 1)
  std::vector<std::string> stop_strings;    // text that ends the reply (not included); none by default
  // A prompt that does not fit the remaining context: false (default) fails with
  // OutOfRange; true processes it in memory segments of memory_segment_tokens (or half the
  // context when that is 0), ending each segment and emptying the context between them,
  // so the earlier parts reach the reply through memory only.
  bool split_long_prompt = false;
  const std::atomic<bool>* cancel = nullptr;  // set to true from any thread to stop early
  // Decode steps go through this batcher, joined with other threads' steps into one batched
  // forward (continuous batching; the SDK passes its engine's on the GPU). Null: each step
  // runs by itself. Results are the model's batched ones (docs/runtime.md). Generate leaves
  // the batcher (DecodeBatcher::Leave) when its decoding ends.
  DecodeBatcher* batcher = nullptr;
  // A model call of Generate's own (the prompt's forwards and segment ends, a decode step
  // without a batcher, the reply's last token's forward) answered ResourceExhausted runs
  // again while this returns true (it released memory): a backend refuses such a call with
  // the state unchanged (the CUDA backend checks its memory before it changes a state). The
  // SDK's engine releases an idle session's state. A batcher's steps retry through its own
  // hook (DecodeBatcherOptions::on_out_of_memory). Empty: no retry.
  std::function<bool()> on_out_of_memory;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids, a final stop token included (it is fed to the model)
  std::string text;             // the reply's text, without the stop token or stop string
  StopReason stop = StopReason::kMaxTokens;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

// Text as it becomes final: never a part of a stop string, never half a character.
using TextCallback = std::function<void(std::string_view text)>;

// Errors: InvalidArgument (bad options, empty prompt), OutOfRange (prompt too long and
// split_long_prompt off), Cancelled (the cancel flag was set; the state holds a partial
// segment the caller should discard), and whatever Model::Forward returns.
Result<GenerateResult> Generate(const Model& model, SequenceState& state, const Tokenizer& tokenizer,
                                Sampler& sampler, std::span<const int32_t> prompt,
                                const GenerateOptions& options, const TextCallback& on_text = {});

}  // namespace lm2::runtime
