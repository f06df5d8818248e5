// DecodeBatcher: continuous batching of decode steps across threads.
//
// Conversations generating on different threads each call Step with their next token and
// the rule that picks the token after it; the batcher runs the steps that are waiting
// together as one Model::ForwardBatchSample, so on the GPU every weight is read once for all
// of them instead of once per conversation. A step that arrives while a batch runs joins
// the next one. When a batch ends, its threads take their results and come back with their
// next steps a little apart: the thread that starts the next batch waits for the steps of
// the conversations still decoding (those that stepped in the last two batches and have
// not called Leave), for at most a quarter of the last batch's time
// (DecodeBatcherOptions::wait_for_decoding). Without that wait, concurrent conversations
// split into two groups that take turns, each batch half of them (on an H200 at the
// paper's shape, 8 threads ran batches of 4.0 on average, at 44-50% of the tokens/s of
// one batch of 8; with it 7.9, and since a4832f8's like-for-like bench 93% at 8 sessions,
// 91-92% at 32 and 64: docs/benchmarks.md). The last batch's first
// state stays first while it steps, since a model may keep resources per leading state
// (the CUDA backend's batch scratch and captured step).
//
// Threading: Step is safe to call from any number of threads at once, each with its own
// state (a state must not be in two Steps at once). The calling threads take turns running
// the batches (the first to find no batch running runs the next one), so the batcher needs
// no thread of its own. Cost: a lock and a wait per step; results are those of the model's
// batched calls (bit-identical to decoding alone on the CUDA backend within
// its GEMV row limit, CudaOptions::gemv_max_rows).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/model.h"

namespace lm2::runtime {

struct DecodeBatcherOptions {
  int64_t max_batch = 64;  // most steps in one batched call (>= 1). Default: 64
  // The thread that starts a batch waits up to gather_wait for `gather` steps to be waiting
  // before it runs (tests, or trading latency for throughput). Default: 1 and 0, i.e. no
  // such wait (only wait_for_decoding's, below).
  int64_t gather = 1;
  std::chrono::microseconds gather_wait{0};
  // The thread that starts a batch waits for the next steps of the conversations still
  // decoding, for at most this long and at most a quarter of the last batch's run time
  // (the wait then costs a stalled conversation's companions at most a fifth of their
  // rate). Zero: no such wait. Default: 2 ms
  std::chrono::microseconds wait_for_decoding{2000};
  // Called, on the thread running a batch and outside the batcher's lock, when the batched
  // call fails with ResourceExhausted (a backend out of device memory, which refuses a
  // call before it changes any state: cuda_backend.h): returns whether it released memory,
  // and the batch is then run again, until the call succeeds, fails otherwise, or this
  // returns false. Empty: no retry (the steps get the error). The SDK engine releases idle
  // sessions' states (docs/sdk.md).
  std::function<bool()> on_out_of_memory;
};

class DecodeBatcher {
 public:
  // `model` must outlive the batcher. InvalidArgument-worthy options are clamped (max_batch
  // and gather to at least 1, gather to at most max_batch).
  explicit DecodeBatcher(const Model& model, const DecodeBatcherOptions& options = {});

  // Runs `token` as the next token of `state`'s open segment in a batched step and returns
  // once it is done, with `next` the token `rule` picks from the step's logits. Errors are
  // those of Model::ForwardBatchSample for this state alone: a step the batched call refuses
  // (a full context, a token outside the vocabulary, a bad rule) is retried by itself, so
  // one bad step does not fail the others.
  Status Step(SequenceState& state, int32_t token, const TokenRule& rule, int32_t* next);

  // `state` takes no further steps for now (its reply ended): batches stop waiting for it.
  // Generate calls it when its decoding ends. Safe from any thread; a state not seen is a
  // no-op. A state that steps again is waited for again.
  void Leave(const SequenceState& state);

  struct Stats {
    int64_t batches = 0;  // batched calls run
    int64_t steps = 0;    // steps served
    int64_t largest = 0;  // most steps in one batched call
    // Where the running threads' time went: in the model's batched calls, and waiting for
    // steps before them (the waits of DecodeBatcherOptions); waits for the conversations
    // still decoding that ran to their limit.
    std::chrono::nanoseconds running{0};
    std::chrono::nanoseconds gathering{0};
    int64_t waits_timed_out = 0;
    int64_t out_of_memory_retries = 0;  // batched calls run again after on_out_of_memory
  };
  Stats stats() const;

 private:
  struct Request {
    SequenceState* state;
    int32_t token;
    const TokenRule* rule;
    int32_t* next;
    Status status;
    bool done = false;
  };

  // Runs `batch` (outside the lock) as one call and sets each request's status and output;
  // each request alone if the call is refused; again after on_out_of_memory released
  // memory if it ran out.
  void Run(const std::vector<Request*>& batch);

  // Whether the next batch has what it waits for: a step from every conversation that
  // stepped in the last two batches and has not left, or max_batch steps. Forgets the
  // conversations seen only before those batches. Under mu_.
  bool DecodingAllWaiting();

  const Model& model_;
  DecodeBatcherOptions options_;
  mutable std::mutex mu_;
  // Where the thread gathering a batch waits for steps (each step and Leave wake it alone:
  // with one variable for both, every arriving step woke every waiting thread), and where
  // steps wait for a batch to end.
  std::condition_variable arrived_;
  std::condition_variable finished_;
  std::deque<Request*> waiting_;
  bool running_ = false;
  Stats stats_;
  // Each conversation that stepped and has not left: the number of the last batch it was in.
  std::unordered_map<const SequenceState*, int64_t> decoding_;
  std::chrono::steady_clock::duration last_run_{};  // how long the last batch's call took
  const SequenceState* lead_ = nullptr;  // the last batch's first state (until it leaves)
};

}  // namespace lm2::runtime
