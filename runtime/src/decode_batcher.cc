#include "lm2/runtime/decode_batcher.h"

#include <algorithm>

#include "out_of_memory.h"

namespace lm2::runtime {

DecodeBatcher::DecodeBatcher(const Model& model, const DecodeBatcherOptions& options)
    : model_(model), options_(options) {
  options_.max_batch = std::max<int64_t>(1, options_.max_batch);
  options_.gather = std::clamp<int64_t>(options_.gather, 1, options_.max_batch);
}

Status DecodeBatcher::Step(SequenceState& state, int32_t token, const TokenRule& rule, int32_t* next) {
  if (next == nullptr) return Status::InvalidArgument("DecodeBatcher::Step: no output");
  Request req{&state, token, &rule, next, Status::Ok()};
  std::unique_lock<std::mutex> lock(mu_);
  waiting_.push_back(&req);
  arrived_.notify_one();  // the thread gathering a batch may be waiting for this step
  while (!req.done) {
    if (running_) {
      finished_.wait(lock);
      continue;
    }
    // No batch is running: this thread runs the next one (which may or may not hold its own
    // step, if more than max_batch were waiting ahead of it).
    running_ = true;
    const auto gather_start = std::chrono::steady_clock::now();
    if (options_.gather > 1) {
      arrived_.wait_for(lock, options_.gather_wait,
                        [&] { return static_cast<int64_t>(waiting_.size()) >= options_.gather; });
    }
    // The other conversations' threads are taking the last batch's results: wait a little
    // for their next steps (Leave, or a step, wakes this wait).
    if (const auto wait = std::min<std::chrono::steady_clock::duration>(options_.wait_for_decoding, last_run_ / 4);
        wait > std::chrono::steady_clock::duration::zero()) {
      if (!arrived_.wait_for(lock, wait, [&] { return DecodingAllWaiting(); })) ++stats_.waits_timed_out;
    }
    // The last batch's first state first again while it steps: a model may keep resources
    // per leading state (the CUDA backend's batch scratch and captured step).
    if (auto lead = std::find_if(waiting_.begin(), waiting_.end(), [&](const Request* r) { return r->state == lead_; });
        lead != waiting_.end()) {
      std::rotate(waiting_.begin(), lead, lead + 1);
    }
    std::vector<Request*> batch;
    while (!waiting_.empty() && static_cast<int64_t>(batch.size()) < options_.max_batch) {
      batch.push_back(waiting_.front());
      waiting_.pop_front();
      decoding_[batch.back()->state] = stats_.batches;
    }
    lead_ = batch.front()->state;
    lock.unlock();
    const auto started = std::chrono::steady_clock::now();
    Run(batch);
    const auto took = std::chrono::steady_clock::now() - started;
    lock.lock();
    last_run_ = took;
    stats_.running += took;
    stats_.gathering += started - gather_start;
    for (Request* r : batch) r->done = true;
    ++stats_.batches;
    stats_.steps += static_cast<int64_t>(batch.size());
    stats_.largest = std::max(stats_.largest, static_cast<int64_t>(batch.size()));
    running_ = false;
    finished_.notify_all();
  }
  return req.status;
}

void DecodeBatcher::Leave(const SequenceState& state) {
  std::lock_guard<std::mutex> lock(mu_);
  if (lead_ == &state) lead_ = nullptr;
  if (decoding_.erase(&state) != 0) arrived_.notify_one();
}

bool DecodeBatcher::DecodingAllWaiting() {
  std::erase_if(decoding_, [&](const auto& entry) { return entry.second < stats_.batches - 2; });
  if (static_cast<int64_t>(waiting_.size()) >= options_.max_batch) return true;
  std::size_t present = 0;
  for (const Request* r : waiting_) present += decoding_.count(r->state);
  return present == decoding_.size();
}

DecodeBatcher::Stats DecodeBatcher::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void DecodeBatcher::Run(const std::vector<Request*>& batch) {
  std::vector<SequenceState*> states;
  std::vector<int32_t> tokens;
  std::vector<TokenRule> rules;
  for (const Request* r : batch) {
    states.push_back(r->state);
    tokens.push_back(r->token);
    rules.push_back(*r->rule);
  }
  std::vector<int32_t> next;
  // Out of memory: the call changed nothing; whatever the hook releases may let it run.
  Status st = internal::RetryOutOfMemory(
      options_.on_out_of_memory, [&] { return model_.ForwardBatchSample(states, tokens, rules, &next); },
      [&] {
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.out_of_memory_retries;
      });
  // Input errors are found before any state changes: then each step runs alone and gets its
  // own answer. Anything else (a device fault) belongs to the whole batch.
  const bool refused = st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kOutOfRange;
  if (!st.ok() && refused && batch.size() > 1) {
    for (Request* r : batch) Run({r});
    return;
  }
  for (std::size_t i = 0; i < batch.size(); ++i) {
    batch[i]->status = st;
    if (st.ok()) *batch[i]->next = next[i];
  }
}

}  // namespace lm2::runtime
