// Model and SequenceState: the backend-independent execution interface.
//
// A Model is a loaded set of weights on one backend (CPU now, CUDA later): shared,
// read-only after load, and safe to use from many threads at once, each with its own
// SequenceState. A SequenceState is everything one conversation owns: the KV cache, the
// memory bank of every memory layer, the open segment's write sums and its position. The
// session layer above keeps one per session; nothing in a Model changes when it runs.
//
// The execution model follows docs/lm2-spec.md:
//   state = model.NewState();
//   model.Forward(*state, prompt_tokens, ...)   // opens a segment if none is open
//   model.Forward(*state, {next_token}, ...)    // ... decode, same segment
//   model.EndSegment(*state);                   // the memory write (eq. 4-6)
//   model.ResetContext(*state);                 // optional: empty the KV cache
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lm2/core/memory_state.h"
#include "lm2/core/status.h"
#include "lm2/runtime/model_config.h"
#include "lm2/runtime/sampler.h"

namespace lm2::runtime {

// Per-conversation state, created by Model::NewState and usable only with that Model.
// Not thread-safe: one thread drives a state at a time. Moves are not supported; own it
// through the unique_ptr.
class SequenceState {
 public:
  virtual ~SequenceState() = default;
  // Positions held in the KV cache (tokens since the last ResetContext).
  virtual int64_t context_length() const = 0;
  // True between the first Forward of a segment and EndSegment.
  virtual bool segment_open() const = 0;
  // Tokens run in the open segment (0 when none is open).
  virtual int64_t segment_tokens() const = 0;
};

// Which logits Forward returns.
enum class LogitsMode {
  kNone,  // none (prefill whose logits nobody needs)
  kLast,  // the last token's: [V]
  kAll,   // every token's: [T, V], row-major
};

class Model {
 public:
  virtual ~Model() = default;

  virtual const ModelConfig& config() const = 0;
  // The model's fingerprint (ModelFiles::Fingerprint), stamped on exported memory.
  virtual const std::string& fingerprint() const = 0;
  // "cpu", "cuda:0", ...
  virtual std::string backend_name() const = 0;

  // True when `state` came from this model's NewState (only such states can be used with it).
  virtual bool OwnsState(const SequenceState& state) const = 0;

  // A fresh state: empty context, every memory bank at its initial value (identity rows or
  // the model's learned init).
  virtual Result<std::unique_ptr<SequenceState>> NewState() const = 0;

  // Runs `tokens` as the next tokens of the open segment (opening one if none is open:
  // the memory K/V of the current bank are computed then). Errors: OutOfRange when the
  // context would exceed max_position_embeddings (the state is unchanged), InvalidArgument
  // for a token id outside the vocabulary or a state from another model.
  virtual Status Forward(SequenceState& state, std::span<const int32_t> tokens, LogitsMode mode,
                         std::vector<float>* logits) const = 0;

  // One decode step of several conversations at once: states[i] runs tokens[i] as the next
  // token of its segment (opening one if none is open), and `logits` becomes [B, V], row i
  // for states[i]. The states must be distinct states of this model. A backend may run the
  // step as one forward over all of them (the CUDA backend does: each weight is read once
  // per step, not once per conversation); the default calls Forward on each in turn.
  // Input errors (sizes, a repeated or foreign state, a token outside the vocabulary, a
  // full context) are reported before any state changes.
  virtual Status ForwardBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                              std::vector<float>* logits) const;

  // Whether ForwardBatch runs its states as one forward (each weight read once per step), so
  // that joining concurrent conversations' decode steps pays (DecodeBatcher): the CUDA
  // backend. False for the default, which runs them in turn.
  virtual bool BatchesSteps() const { return false; }

  // ForwardBatch that picks each row's next token instead of returning logits: next becomes
  // [B], next[i] the token rules[i] picks from states[i]'s logits (PickToken, sampler.h), and
  // the logits stay where they were computed. The CUDA backend picks on the device and
  // copies B ids to the host instead of B x V logits (greedy rows' argmax inside the step;
  // sampled rows by a sort on the device). Default: ForwardBatch, then PickToken per row on
  // the host. The same input checks as ForwardBatch, and each rule's (ValidateTokenRule).
  virtual Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                    std::span<const TokenRule> rules, std::vector<int32_t>* next) const;

  // ForwardBatchSample with every rule greedy: next[i] is the argmax of states[i]'s logits
  // (std::max_element's choice: the first of equal maxima).
  Status ForwardBatchGreedy(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                            std::vector<int32_t>* next) const;

  // Applies the memory write of the open segment and closes it. A segment that ran no
  // tokens leaves memory unchanged. No-op when no segment is open.
  virtual Status EndSegment(SequenceState& state) const = 0;

  // Drops the KV cache; positions restart at 0. Memory and the open segment's write sums
  // are kept.
  virtual void ResetContext(SequenceState& state) const = 0;

  // Copies the memory banks out (per memory layer N x d fp32) with the model fingerprint.
  // FailedPrecondition while a segment is open (its write is not applied yet).
  // (ExportMemoryInto into a new MemoryState.)
  Result<MemoryState> ExportMemory(const SequenceState& state) const;
  // ExportMemory into `out`, reusing its buffers: a layer whose vector already holds N x d
  // values is overwritten in place. For callers that export again and again (a chat
  // session after every turn): a bank-sized vector in fresh host memory costs its first
  // touch (page faults: on the machines measured more than the copy itself), a reused one
  // does not. On error `out` is left empty.
  Status ExportMemoryInto(const SequenceState& state, MemoryState& out) const;
  // Replaces the state's memory banks. FailedPrecondition for another model's fingerprint
  // or while a segment is open; InvalidArgument for layers or shapes that do not match.
  virtual Status ImportMemory(SequenceState& state, const MemoryState& memory) const = 0;

  // Read attention mass of the open segment so far, per memory layer (in memory_layers
  // order) and slot: sum over the segment's tokens and the memory heads of A_j[t, slot]
  // (eq. 2), so each layer's values sum to tokens x memory_heads. Which slots the segment
  // read, and (through the write's Aᵀ routing) where it will write. FailedPrecondition
  // when no segment is open. Default: Unimplemented (a backend that does not expose it).
  virtual Result<std::vector<std::vector<float>>> SegmentReadMass(const SequenceState& state) const {
    (void)state;
    return Status::Unimplemented("SegmentReadMass: not supported by the " + backend_name() + " backend");
  }

 protected:
  // The input checks every backend shares, before any work (so a refused call changes
  // nothing). Forward's: the tokens fit after `context_length` positions (OutOfRange), each
  // is in the vocabulary, logits asked for have an output vector (InvalidArgument).
  Status CheckForward(int64_t context_length, std::span<const int32_t> tokens, LogitsMode mode,
                      const std::vector<float>* logits) const;
  // ForwardBatch's: equal sizes, at least one state, each a state of this model and none
  // twice, then Forward's checks for each state's one token; `output` (the logits or the
  // next-token vector) must not be null.
  Status CheckBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                    const void* output) const;
  // ForwardBatchSample's: CheckBatch's, one valid rule per state.
  Status CheckSampleBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                          std::span<const TokenRule> rules, const std::vector<int32_t>* next) const;
  // ImportMemory's: this model's fingerprint (FailedPrecondition), its memory layers and
  // shapes (InvalidArgument).
  Status CheckImport(const MemoryState& memory) const;
  // ExportMemoryInto's work, after the backend's own checks: ShapeExport(out), then each
  // layer's data filled. (The caller empties `out` when it fails.)
  virtual Status ExportBanks(const SequenceState& state, MemoryState& out) const = 0;
  // `out` made this model's export shape: its fingerprint, one layer per memory layer (in
  // order) with N x d values; vectors of that size keep their memory (and, until
  // overwritten, their contents), others are resized.
  void ShapeExport(MemoryState& out) const;
  // SegmentReadMass's reduction: one memory layer's masses [memory_heads, memory_slots]
  // summed over the heads, per slot.
  std::vector<float> ReadMassPerSlot(const float* mass) const;
};

}  // namespace lm2::runtime
