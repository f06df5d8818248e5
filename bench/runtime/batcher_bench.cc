// DecodeBatcher's own cost: conversations on their own threads stepping through a batcher
// over a stand-in model whose batched step takes a fixed time and computes nothing, so all
// that separates the rate from the ideal (B steps per step time) is the batcher: the
// threads' wake-ups after a batch, their way back with the next steps, and the gathering
// thread's wait for them.
//
//   lm2_batcher_bench [--sessions 8,32,64] [--steps 200] [--base-us 1100] [--per-session-us 100]
//                     [--host-us 0] [--wait-us 2000] [--repeat 3]
//
// A batched step of B sessions takes base + B x per-session µs (the defaults approximate
// the CUDA backend's decode step at the paper's shape on an H200: 2.3 / 4.3 / 7.5 ms at
// 8 / 32 / 64 sessions); the step waits by sleeping, as a host thread waiting on the GPU
// gives its core away. --host-us: work each thread does between its steps (what Generate
// does with a token: the stop checks and the caller's callback), spun. --wait-us:
// DecodeBatcherOptions::wait_for_decoding. Prints, per session count, the best of
// --repeat runs: tokens/s, the ratio to the ideal, the share of the time the model's calls
// took (the sleeps overshoot their ends by tens of µs, which counts as the model's), the
// batches' mean size and the mean gap between one batched call's end and the next one's
// start.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lm2/runtime/decode_batcher.h"
#include "lm2/runtime/model.h"

namespace {

using Clock = std::chrono::steady_clock;
using lm2::Status;
using lm2::runtime::DecodeBatcher;
using lm2::runtime::DecodeBatcherOptions;
using lm2::runtime::LogitsMode;
using lm2::runtime::Model;
using lm2::runtime::ModelConfig;
using lm2::runtime::SequenceState;
using lm2::runtime::TokenRule;

class NullState final : public SequenceState {
 public:
  int64_t context_length() const override { return 0; }
  bool segment_open() const override { return true; }
  int64_t segment_tokens() const override { return 0; }
};

// A model whose batched step sleeps base + B x per_session and picks token + 1. It records
// when each call started and ended (calls never overlap: the batcher runs one at a time).
class TimedModel final : public Model {
 public:
  TimedModel(std::chrono::microseconds base, std::chrono::microseconds per_session)
      : base_(base), per_session_(per_session) {
    config_.vocab_size = 1 << 20;
  }
  const ModelConfig& config() const override { return config_; }
  const std::string& fingerprint() const override { return fingerprint_; }
  std::string backend_name() const override { return "timed"; }
  bool OwnsState(const SequenceState&) const override { return true; }
  lm2::Result<std::unique_ptr<SequenceState>> NewState() const override {
    return std::unique_ptr<SequenceState>(std::make_unique<NullState>());
  }
  Status Forward(SequenceState&, std::span<const int32_t>, LogitsMode, std::vector<float>*) const override {
    return Status::Unimplemented("TimedModel: decode steps only");
  }
  bool BatchesSteps() const override { return true; }
  Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                            std::span<const TokenRule>, std::vector<int32_t>* next) const override {
    const auto start = Clock::now();
    std::this_thread::sleep_until(start + base_ + per_session_ * static_cast<int64_t>(states.size()));
    next->resize(tokens.size());
    for (std::size_t i = 0; i < tokens.size(); ++i) (*next)[i] = static_cast<int32_t>((tokens[i] + 1) % config_.vocab_size);
    calls_.push_back({start, Clock::now()});
    return Status::Ok();
  }
  Status EndSegment(SequenceState&) const override { return Status::Ok(); }
  void ResetContext(SequenceState&) const override {}
  Status ImportMemory(SequenceState&, const lm2::MemoryState&) const override {
    return Status::Unimplemented("TimedModel: no memory");
  }

  // The calls' total time (s).
  double BusySeconds() const {
    double sum = 0.0;
    for (const auto& [start, end] : calls_) sum += std::chrono::duration<double>(end - start).count();
    return sum;
  }
  // Mean time from one call's end to the next one's start (µs).
  double MeanGapUs() const {
    if (calls_.size() < 2) return 0.0;
    double sum = 0.0;
    for (std::size_t i = 1; i < calls_.size(); ++i) {
      sum += std::chrono::duration<double, std::micro>(calls_[i].first - calls_[i - 1].second).count();
    }
    return sum / static_cast<double>(calls_.size() - 1);
  }
  std::chrono::microseconds StepTime(int64_t sessions) const { return base_ + per_session_ * sessions; }

 protected:
  Status ExportBanks(const SequenceState&, lm2::MemoryState&) const override {
    return Status::Unimplemented("TimedModel: no memory");
  }

 private:
  ModelConfig config_;
  std::string fingerprint_ = "timed";
  std::chrono::microseconds base_, per_session_;
  mutable std::vector<std::pair<Clock::time_point, Clock::time_point>> calls_;
};

struct Run {
  double tokens_per_s = 0, busy = 0, mean_batch = 0, gap_us = 0, gather_us = 0;
  int64_t timed_out = 0;
};

Run RunOnce(int64_t sessions, int64_t steps, std::chrono::microseconds base, std::chrono::microseconds per_session,
            std::chrono::microseconds host, std::chrono::microseconds wait) {
  const TimedModel model(base, per_session);
  DecodeBatcherOptions options;
  options.wait_for_decoding = wait;
  DecodeBatcher batcher(model, options);
  std::vector<std::unique_ptr<SequenceState>> states;
  for (int64_t s = 0; s < sessions; ++s) states.push_back(std::make_unique<NullState>());
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int64_t s = 0; s < sessions; ++s) {
    threads.emplace_back([&, s] {
      SequenceState& state = *states[static_cast<std::size_t>(s)];
      int32_t token = static_cast<int32_t>(s);
      for (int64_t i = 0; i < steps; ++i) {
        if (!batcher.Step(state, token, TokenRule{}, &token).ok()) ++failed;
        const auto until = Clock::now() + host;
        while (Clock::now() < until) {
        }
      }
      batcher.Leave(state);
    });
  }
  for (auto& t : threads) t.join();
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  if (failed.load() != 0) {
    std::fprintf(stderr, "lm2_batcher_bench: %d steps failed\n", failed.load());
    std::exit(1);
  }
  const DecodeBatcher::Stats stats = batcher.stats();
  Run r;
  r.tokens_per_s = static_cast<double>(sessions * steps) / took;
  r.mean_batch = static_cast<double>(stats.steps) / static_cast<double>(std::max<int64_t>(stats.batches, 1));
  r.gap_us = model.MeanGapUs();
  r.busy = model.BusySeconds() / took;
  r.gather_us = std::chrono::duration<double, std::micro>(stats.gathering).count() /
                static_cast<double>(std::max<int64_t>(stats.batches, 1));
  r.timed_out = stats.waits_timed_out;
  return r;
}

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoll(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> sessions = {8, 32, 64};
  int64_t steps = 200, repeat = 3;
  std::chrono::microseconds base{1100}, per_session{100}, host{0}, wait = DecodeBatcherOptions{}.wait_for_decoding;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "lm2_batcher_bench: %s needs a value\n", k.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    try {
      if (k == "--sessions") sessions = ParseList(v);
      else if (k == "--steps") steps = std::stoll(v);
      else if (k == "--base-us") base = std::chrono::microseconds(std::stoll(v));
      else if (k == "--per-session-us") per_session = std::chrono::microseconds(std::stoll(v));
      else if (k == "--host-us") host = std::chrono::microseconds(std::stoll(v));
      else if (k == "--wait-us") wait = std::chrono::microseconds(std::stoll(v));
      else if (k == "--repeat") repeat = std::stoll(v);
      else {
        std::fprintf(stderr, "lm2_batcher_bench: unknown option %s\n", k.c_str());
        return 2;
      }
    } catch (const std::exception&) {
      std::fprintf(stderr, "lm2_batcher_bench: %s: not a number: %s\n", k.c_str(), v.c_str());
      return 2;
    }
  }
  const bool sessions_ok =
      !sessions.empty() && std::all_of(sessions.begin(), sessions.end(), [](int64_t b) { return b >= 1; });
  if (!sessions_ok || steps < 1 || repeat < 1 || base.count() < 0 || per_session.count() < 0 || host.count() < 0 ||
      wait.count() < 0) {
    std::fprintf(stderr, "lm2_batcher_bench: --sessions, --steps and --repeat must be at least 1, the times at least 0\n");
    return 2;
  }
  std::printf("DecodeBatcher over a timed stand-in model: a step of B sessions takes %lld + B x %lld us; %lld steps "
              "a thread, %lld us of host work between steps, wait_for_decoding %lld us; %u hardware threads\n",
              static_cast<long long>(base.count()), static_cast<long long>(per_session.count()),
              static_cast<long long>(steps), static_cast<long long>(host.count()), static_cast<long long>(wait.count()),
              std::thread::hardware_concurrency());
  for (const int64_t b : sessions) {
    Run best;
    for (int64_t r = 0; r < repeat; ++r) {
      const Run run = RunOnce(b, steps, base, per_session, host, wait);
      if (run.tokens_per_s > best.tokens_per_s) best = run;
    }
    const TimedModel model(base, per_session);
    const double ideal = static_cast<double>(b) / std::chrono::duration<double>(model.StepTime(b)).count();
    std::printf("sessions %lld: %.1f tokens/s, %.1f%% of the ideal %.1f (one batch of %lld a step); the model busy "
                "%.1f%% of the time, batches of %.2f on average, %.1f us between batches (%.1f of them waiting for "
                "the steps; %lld waits ran to the limit)\n",
                static_cast<long long>(b), best.tokens_per_s, 100.0 * best.tokens_per_s / ideal, ideal,
                static_cast<long long>(b), 100.0 * best.busy, best.mean_batch, best.gap_us, best.gather_us,
                static_cast<long long>(best.timed_out));
  }
  return 0;
}
