// DecodeBatcher: continuous batching of decode steps across threads.
//
// Conversations generating on different threads each call Step with their next token and
// the rule that picks the token after it; the batcher runs the steps that are waiting
// together as one Model::ForwardBatchSample, so on the GPU every weight is read once for all
// of them instead of once per conversation. A step that arrives while a batch
// runs joins the next one; nothing waits for a batch to fill unless the options ask it to.
//
// Threading: Step is safe to call from any number of threads at once, each with its own
// state (a state must not be in two Steps at once). The calling threads take turns running
// the batches (the first to find no batch running runs the next one), so the batcher needs
// no thread of its own. Cost: one mutex and condition variable per step; results are those
// of the model's batched calls (bit-identical to decoding alone on the CUDA backend within
// its GEMV row limit, CudaOptions::gemv_max_rows).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/model.h"

namespace lm2::runtime {

struct DecodeBatcherOptions {
  int64_t max_batch = 64;  // most steps in one batched call (>= 1). Default: 64
  // The thread that starts a batch waits up to gather_wait for `gather` steps to be waiting
  // before it runs (tests, or trading latency for throughput). Default: 1 and 0, i.e. run
  // at once with whatever is waiting.
  int64_t gather = 1;
  std::chrono::microseconds gather_wait{0};
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

  struct Stats {
    int64_t batches = 0;  // batched calls run
    int64_t steps = 0;    // steps served
    int64_t largest = 0;  // most steps in one batched call
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
  // each request alone if the call is refused.
  void Run(const std::vector<Request*>& batch) const;

  const Model& model_;
  DecodeBatcherOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Request*> waiting_;
  bool running_ = false;
  Stats stats_;
};

}  // namespace lm2::runtime
