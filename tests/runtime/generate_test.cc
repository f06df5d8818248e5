#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "golden.h"
#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/decode_batcher.h"
#include "lm2/runtime/forwarding_model.h"
#include "lm2/runtime/generate.h"
#include "lm2/runtime/model_files.h"

using namespace lm2::runtime;

namespace {

struct Fixture {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  Fixture() {
    const std::string dir = lm2::testing::SourceDir() + "/tests/data/models/tiny-lm2";
    auto files = ModelFiles::Open(dir);
    REQUIRE(files.ok());
    auto m = LoadCpuModel(std::shared_ptr<const ModelFiles>(std::move(files).value()));
    REQUIRE(m.ok());
    model = std::move(m).value();
    auto t = Tokenizer::Open(dir);
    REQUIRE(t.ok());
    tokenizer = std::move(t).value();
  }
  std::unique_ptr<SequenceState> State() {
    auto s = model->NewState();
    REQUIRE(s.ok());
    return std::move(s).value();
  }
  std::vector<int32_t> Prompt(const std::string& text) {
    auto ids = tokenizer->RenderUserTurn(text, /*first_turn=*/true);
    REQUIRE(ids.ok());
    return *ids;
  }
  lm2::Result<GenerateResult> Run(SequenceState& s, const std::vector<int32_t>& prompt, const GenerateOptions& o,
                             std::string* streamed = nullptr, SamplingOptions so = {}) {
    Sampler sampler(so);
    return Generate(*model, s, *tokenizer, sampler, prompt, o, [&](std::string_view t) {
      if (streamed != nullptr) streamed->append(t);
    });
  }
};

}  // namespace

TEST_CASE("Generate: greedy equals the argmax of the model, token by token", "[generate]") {
  Fixture f;
  auto prompt = f.Prompt("Mary went to the kitchen.");
  auto s = f.State();
  GenerateOptions o;
  o.max_tokens = 12;
  std::string streamed;
  auto r = f.Run(*s, prompt, o, &streamed);
  REQUIRE(r.ok());
  REQUIRE(!r->tokens.empty());
  // The same by hand.
  auto s2 = f.State();
  std::vector<float> logits;
  REQUIRE(f.model->Forward(*s2, prompt, LogitsMode::kLast, &logits).ok());
  for (int32_t t : r->tokens) {
    const auto argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    CHECK(argmax == t);
    REQUIRE(f.model->Forward(*s2, std::vector<int32_t>{t}, LogitsMode::kLast, &logits).ok());
  }
  CHECK(s->context_length() == static_cast<int64_t>(prompt.size() + r->tokens.size()));
  CHECK(s->segment_open());  // the caller ends the segment
  CHECK(streamed == r->text);
  if (r->stop == StopReason::kMaxTokens) CHECK(r->tokens.size() == 12);
  CHECK(r->prompt_tokens == static_cast<int64_t>(prompt.size()));
}

TEST_CASE("Generate: stop strings cut the text and are never streamed", "[generate]") {
  Fixture f;
  auto prompt = f.Prompt("Where is the milk?");
  GenerateOptions o;
  o.max_tokens = 40;
  auto s = f.State();
  auto full = f.Run(*s, prompt, o);
  REQUIRE(full.ok());
  REQUIRE(full->text.size() > 6);
  // A stop string taken from the middle of the greedy reply.
  const std::string stop = full->text.substr(full->text.size() / 2, 3);
  const std::size_t cut = full->text.find(stop);
  o.stop_strings = {stop};
  auto s2 = f.State();
  std::string streamed;
  auto r = f.Run(*s2, prompt, o, &streamed);
  REQUIRE(r.ok());
  CHECK(r->stop == StopReason::kStopString);
  CHECK(r->text == full->text.substr(0, cut));
  CHECK(streamed == r->text);
}

TEST_CASE("Generate: seeded sampling reproduces; cancellation; bad options", "[generate]") {
  Fixture f;
  auto prompt = f.Prompt("Hello");
  GenerateOptions o;
  o.max_tokens = 16;
  SamplingOptions so;
  so.temperature = 1.0f;
  so.top_p = 0.9f;
  so.seed = 42;
  auto a = f.State();
  auto b = f.State();
  auto ra = f.Run(*a, prompt, o, nullptr, so);
  auto rb = f.Run(*b, prompt, o, nullptr, so);
  REQUIRE((ra.ok() && rb.ok()));
  CHECK(ra->tokens == rb->tokens);

  std::atomic<bool> cancel{true};
  o.cancel = &cancel;
  auto c = f.State();
  CHECK(f.Run(*c, prompt, o).status().code() == lm2::StatusCode::kCancelled);
  o.cancel = nullptr;
  o.max_tokens = 0;
  CHECK(f.Run(*c, prompt, o).status().IsInvalidArgument());
  o.max_tokens = 4;
  CHECK(f.Run(*c, {}, o).status().IsInvalidArgument());
  so.top_p = 2.0f;
  CHECK(f.Run(*c, prompt, o, nullptr, so).status().IsInvalidArgument());
}

TEST_CASE("Generate: context limits", "[generate]") {
  Fixture f;
  const int64_t max_ctx = f.model->config().max_position_embeddings;
  GenerateOptions o;
  o.max_tokens = 50;
  // A prompt that leaves room for 3 tokens: generation stops at the context's end.
  std::vector<int32_t> prompt(static_cast<std::size_t>(max_ctx - 3), 42);
  auto s = f.State();
  auto r = f.Run(*s, prompt, o);
  REQUIRE(r.ok());
  CHECK(r->stop == StopReason::kContextFull);
  CHECK(r->tokens.size() == 3);
  CHECK(s->context_length() == max_ctx);
  // A prompt longer than the context: a clear status, or segments when asked.
  std::vector<int32_t> long_prompt(static_cast<std::size_t>(max_ctx + 40), 42);
  auto s2 = f.State();
  CHECK(f.Run(*s2, long_prompt, o).status().code() == lm2::StatusCode::kOutOfRange);
  CHECK(s2->context_length() == 0);
  o.split_long_prompt = true;
  o.max_tokens = 4;
  auto r2 = f.Run(*s2, long_prompt, o);
  REQUIRE(r2.ok());
  CHECK(s2->context_length() < max_ctx);
  CHECK(r2->tokens.size() == 4);
}

TEST_CASE("DecodeBatcher: threads at once get the replies they get alone, in shared steps", "[generate]") {
  Fixture f;
  // A reply of 10 tokens on `state`; with `batcher`, through it. Runs on worker threads, so
  // no Catch assertions inside (Catch is not thread-safe): the result is checked after.
  auto reply = [&f](SequenceState& state, const std::vector<int32_t>& prompt, const SamplingOptions& so,
                    DecodeBatcher* batcher) {
    GenerateOptions o;
    o.max_tokens = 10;
    o.batcher = batcher;
    return f.Run(state, prompt, o, nullptr, so);
  };
  const std::vector<std::string> messages = {"Mary went to the kitchen.", "Where is the ball?", "John is here.",
                                             "The cat sleeps."};
  SamplingOptions sampled;
  sampled.temperature = 0.8f;
  sampled.top_k = 20;
  sampled.seed = 7;
  for (const SamplingOptions& so : {SamplingOptions{}, sampled}) {  // greedy steps, then sampled ones
    INFO("temperature " << so.temperature);
    std::vector<std::vector<int32_t>> alone;
    std::vector<std::vector<int32_t>> prompts;
    std::vector<std::unique_ptr<SequenceState>> states;
    for (const auto& m : messages) {
      prompts.push_back(f.Prompt(m));
      auto s = f.State();
      auto r = reply(*s, prompts.back(), so, nullptr);
      REQUIRE(r.ok());
      alone.push_back(r->tokens);
      states.push_back(f.State());
    }
    DecodeBatcherOptions bo;
    bo.gather = static_cast<int64_t>(messages.size());  // the first steps wait for each other
    bo.gather_wait = std::chrono::seconds(5);
    DecodeBatcher batcher(*f.model, bo);
    std::vector<lm2::Result<GenerateResult>> together(messages.size(), lm2::Status::Internal("not run"));
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < messages.size(); ++i) {
      threads.emplace_back([&, i] { together[i] = reply(*states[i], prompts[i], so, &batcher); });
    }
    for (auto& t : threads) t.join();
    for (std::size_t i = 0; i < messages.size(); ++i) {
      REQUIRE(together[i].ok());
      CHECK(together[i]->tokens == alone[i]);
    }
    const auto stats = batcher.stats();
    CHECK(stats.largest == static_cast<int64_t>(messages.size()));
    CHECK(stats.batches < stats.steps);
  }
}

TEST_CASE("DecodeBatcher: a refused step fails alone, and bad arguments are refused", "[generate]") {
  Fixture f;
  DecodeBatcherOptions bo;
  bo.gather = 2;
  bo.gather_wait = std::chrono::seconds(5);
  DecodeBatcher batcher(*f.model, bo);
  auto good = f.State();
  auto bad = f.State();
  int32_t next_good = -1, next_bad = -1;
  lm2::Status st_good, st_bad;
  const TokenRule greedy;
  std::thread a([&] { st_good = batcher.Step(*good, 5, greedy, &next_good); });
  std::thread b([&] { st_bad = batcher.Step(*bad, static_cast<int32_t>(f.model->config().vocab_size), greedy, &next_bad); });
  a.join();
  b.join();
  CHECK(st_good.ok());
  CHECK(st_bad.code() == lm2::StatusCode::kInvalidArgument);
  CHECK(good->context_length() == 1);
  CHECK(bad->context_length() == 0);
  std::vector<float> row;
  REQUIRE(f.model->Forward(*bad, std::vector<int32_t>{5}, LogitsMode::kLast, &row).ok());
  CHECK(next_good == static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  CHECK(batcher.Step(*good, 5, greedy, nullptr).code() == lm2::StatusCode::kInvalidArgument);
  TokenRule bad_rule;
  bad_rule.top_p = 2.0f;
  CHECK(batcher.Step(*good, 5, bad_rule, &next_good).code() == lm2::StatusCode::kInvalidArgument);
  CHECK(good->context_length() == 1);
}

namespace {

// The fixture's model, each batched step taking `delay` longer: long enough that the
// threads of a batch are back with their next steps well before the next batch would wait
// no longer for them.
class SlowModel final : public lm2::runtime::ForwardingModel {
 public:
  SlowModel(const Model& inner, std::chrono::milliseconds delay) : ForwardingModel(inner), delay_(delay) {}
  lm2::Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                 std::span<const TokenRule> rules, std::vector<int32_t>* next) const override {
    std::this_thread::sleep_for(delay_);
    if (!states.empty()) leads_.push_back(states.front());  // one batch at a time: no lock
    return inner().ForwardBatchSample(states, tokens, rules, next);
  }
  // The first state of each batched call, in order.
  const std::vector<const SequenceState*>& leads() const { return leads_; }

 private:
  std::chrono::milliseconds delay_;
  mutable std::vector<const SequenceState*> leads_;
};

}  // namespace

namespace {

// The fixture's model, its batched calls refused with ResourceExhausted (changing nothing,
// as the CUDA backend's are) while `refusals` lasts.
class FullModel final : public lm2::runtime::ForwardingModel {
 public:
  explicit FullModel(const Model& inner) : ForwardingModel(inner) {}
  lm2::Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                 std::span<const TokenRule> rules, std::vector<int32_t>* next) const override {
    if (refusals > 0) {
      --refusals;
      return lm2::Status::ResourceExhausted("device full");
    }
    return inner().ForwardBatchSample(states, tokens, rules, next);
  }
  mutable int refusals = 0;
};

}  // namespace

namespace {

// The fixture's model with every other call refused with ResourceExhausted, changing
// nothing (as the CUDA backend refuses a call it has no memory for): each call of
// Generate's is refused once, then runs.
class EveryOtherRefused final : public lm2::runtime::ForwardingModel {
 public:
  explicit EveryOtherRefused(const Model& inner) : ForwardingModel(inner) {}
  lm2::Status Forward(SequenceState& state, std::span<const int32_t> tokens, LogitsMode mode,
                      std::vector<float>* logits) const override {
    return Refuse() ? Full() : inner().Forward(state, tokens, mode, logits);
  }
  lm2::Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                 std::span<const TokenRule> rules, std::vector<int32_t>* next) const override {
    return Refuse() ? Full() : inner().ForwardBatchSample(states, tokens, rules, next);
  }
  lm2::Status EndSegment(SequenceState& state) const override { return Refuse() ? Full() : inner().EndSegment(state); }
  // From the next call on: refused, then run, and so on.
  void Reset() const {
    refused_last_ = false;
    refused = 0;
  }
  mutable int refused = 0;

 private:
  bool Refuse() const {
    refused_last_ = !refused_last_;
    if (refused_last_) ++refused;
    return refused_last_;
  }
  static lm2::Status Full() { return lm2::Status::ResourceExhausted("device full"); }
  mutable bool refused_last_ = false;
};

}  // namespace

// Generate's own calls (the prompt's forwards and segment ends, its steps without a
// batcher, the last token's forward) run again while on_out_of_memory releases memory, and
// give the tokens they give with memory to spare; without the hook, or when it has nothing
// left, Generate answers ResourceExhausted.
TEST_CASE("Generate: a call refused for memory runs again while on_out_of_memory releases some", "[generate]") {
  Fixture f;
  const EveryOtherRefused refusing(*f.model);
  const auto run = [&](const Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& o,
                       SequenceState& state) {
    Sampler sampler(SamplingOptions{});
    return Generate(model, state, *f.tokenizer, sampler, prompt, o, {});
  };
  const int64_t max_ctx = f.model->config().max_position_embeddings;
  const std::vector<int32_t> long_prompt(static_cast<std::size_t>(max_ctx + 40), 42);
  for (const auto& prompt : {f.Prompt("Mary went to the kitchen."), long_prompt}) {
    INFO("prompt of " << prompt.size() << " tokens");
    GenerateOptions o;
    o.max_tokens = 8;
    o.split_long_prompt = true;  // the long one: segments ended in between
    auto alone = f.State();
    auto want = run(*f.model, prompt, o, *alone);
    REQUIRE(want.ok());
    int released = 0;
    o.on_out_of_memory = [&] {
      ++released;
      return true;
    };
    refusing.Reset();
    auto s = f.State();
    auto got = run(refusing, prompt, o, *s);
    INFO(got.status().ToString());
    REQUIRE(got.ok());
    CHECK(got->tokens == want->tokens);
    CHECK(got->text == want->text);
    CHECK(s->context_length() == alone->context_length());
    CHECK(released == refusing.refused);
    // Each call refused once: the prefill (and the long prompt's segments), every step, the
    // last token's forward.
    CHECK(released >= static_cast<int>(want->tokens.size()) + 1);
  }
  // No hook, or one with nothing to release: the first refusal is the answer.
  GenerateOptions o;
  o.max_tokens = 8;
  for (const bool hook : {false, true}) {
    if (hook) o.on_out_of_memory = [] { return false; };
    refusing.Reset();
    auto s = f.State();
    auto r = run(refusing, f.Prompt("Mary went to the kitchen."), o, *s);
    CHECK(r.status().code() == lm2::StatusCode::kResourceExhausted);
    CHECK(s->context_length() == 0);
  }
}

// A batch that runs out of memory is run again for as long as on_out_of_memory releases
// some (the SDK's engine releases idle sessions' states), and the steps get the same tokens
// as without the refusals; without the hook, or when it has nothing left, the steps get
// the error and their states are as before.
TEST_CASE("DecodeBatcher: a batch out of memory runs again while on_out_of_memory releases some", "[generate]") {
  Fixture f;
  FullModel full(*f.model);
  auto s = f.State();
  auto twin = f.State();
  int32_t want = 0, got = 0;
  {
    DecodeBatcher plain(*f.model);
    REQUIRE(plain.Step(*twin, 5, TokenRule{}, &want).ok());
  }
  int released = 0, may_release = 3;
  DecodeBatcherOptions bo;
  bo.on_out_of_memory = [&] {
    if (released == may_release) return false;
    ++released;
    return true;
  };
  {
    DecodeBatcher batcher(full, bo);
    full.refusals = 2;
    REQUIRE(batcher.Step(*s, 5, TokenRule{}, &got).ok());
    CHECK(got == want);
    CHECK(released == 2);
    CHECK(batcher.stats().out_of_memory_retries == 2);
    CHECK(s->context_length() == twin->context_length());
    // More refusals than the hook can answer: the step gets the error, its state unchanged.
    full.refusals = 10;
    released = 0;
    const lm2::Status st = batcher.Step(*s, got, TokenRule{}, &got);
    CHECK(st.code() == lm2::StatusCode::kResourceExhausted);
    CHECK(released == may_release);
    CHECK(s->context_length() == twin->context_length());
  }
  DecodeBatcher no_hook(full);  // the default: no retry
  full.refusals = 1;
  CHECK(no_hook.Step(*s, got, TokenRule{}, &got).code() == lm2::StatusCode::kResourceExhausted);
  CHECK(s->context_length() == twin->context_length());
}

// Two pairs of threads start a step apart, so each pair's steps arrive while the other's
// batch runs. Without the batcher's wait for the conversations still decoding the pairs
// take turns (batches of 2, twice as many batches); with it they merge after a few steps,
// and the batches keep their first state while it steps (without that, 4-8 lead changes
// here, against at most 3).
TEST_CASE("DecodeBatcher: conversations that start apart end up in the same batches", "[generate]") {
  Fixture f;
  constexpr int kThreads = 4, kSteps = 10;
  // A quarter of a call (the batcher's bound on its wait) is 10 ms: the wait covers this gap.
  constexpr auto kBetweenSteps = std::chrono::milliseconds(4);
  for (const bool wait : {true, false}) {
    const SlowModel slow(*f.model, std::chrono::milliseconds(40));
    DecodeBatcherOptions bo;
    bo.wait_for_decoding = wait ? std::chrono::microseconds(std::chrono::seconds(1)) : std::chrono::microseconds(0);
    DecodeBatcher batcher(slow, bo);
    std::vector<std::unique_ptr<SequenceState>> states;
    for (int i = 0; i < kThreads; ++i) states.push_back(f.State());
    std::vector<lm2::Status> status(kThreads);
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; ++i) {
      if (i == kThreads / 2) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // inside the first batch
      threads.emplace_back([&, i] {
        int32_t token = 5 + i;
        for (int s = 0; s < kSteps && status[static_cast<std::size_t>(i)].ok(); ++s) {
          status[static_cast<std::size_t>(i)] = batcher.Step(*states[static_cast<std::size_t>(i)], token, TokenRule{}, &token);
          // What a chat does with each token (detokenise, stream it) takes the conversation's
          // thread a while before its next step. Without it, the thread that ran a batch would
          // race the other pair's woken threads to the next one, a race that a busy machine
          // sometimes lets it win (then the pairs merge without the wait).
          std::this_thread::sleep_for(kBetweenSteps);
        }
        batcher.Leave(*states[static_cast<std::size_t>(i)]);
      });
    }
    for (auto& t : threads) t.join();
    for (const auto& s : status) CHECK(s.ok());
    const auto stats = batcher.stats();
    INFO("wait " << wait << ": " << stats.steps << " steps in " << stats.batches << " batches");
    CHECK(stats.steps == kThreads * kSteps);
    // Where the running threads' time went: every call slept 40 ms; no wait for steps ran to
    // its limit (a second), and each was bounded by a quarter of the call before it.
    CHECK(stats.running >= std::chrono::milliseconds(40) * stats.batches);
    CHECK(stats.waits_timed_out == 0);
    CHECK(stats.gathering <= stats.running / 4 + std::chrono::milliseconds(1));
    if (wait) {
      // The first batch holds the first pair; the pairs merge at the latest in the third.
      CHECK(stats.batches <= kSteps + 2);
      CHECK(stats.largest == kThreads);
      // A batch's first state stays first while it steps: the lead changes only when the
      // leading conversation leaves.
      int changes = 0;
      for (std::size_t b = 1; b < slow.leads().size(); ++b) changes += slow.leads()[b] != slow.leads()[b - 1];
      INFO("lead changes " << changes);
      CHECK(changes <= kThreads - 1);
    } else {
      CHECK(stats.batches >= 2 * kSteps - 2);  // what the wait is for: the pairs take turns
    }
  }
}
