// DecodeBatcher on the CPU backend: threads generating at once through one batcher get the
// same replies as generating alone, their steps really are joined, and a bad step fails
// alone.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/decode_batcher.h"
#include "lm2/runtime/generate.h"
#include "lm2/runtime/model_files.h"
#include "lm2/runtime/tokenizer.h"
#include "support/paths.h"

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
  // Generates a reply to `text` on a fresh state; with `batcher`, through it.
  std::vector<int32_t> Reply(const std::string& text, const SamplingOptions& so, DecodeBatcher* batcher) {
    auto state = model->NewState();
    REQUIRE(state.ok());
    auto prompt = tokenizer->RenderUserTurn(text, /*first_turn=*/true);
    REQUIRE(prompt.ok());
    Sampler sampler(so);
    GenerateOptions o;
    o.max_tokens = 10;
    o.batcher = batcher;
    auto r = Generate(*model, **state, *tokenizer, sampler, *prompt, o);
    REQUIRE(r.ok());
    return r->tokens;
  }
};

}  // namespace

TEST_CASE("DecodeBatcher: threads at once get the replies they get alone, in shared steps", "[generate]") {
  Fixture f;
  const std::vector<std::string> messages = {"Mary went to the kitchen.", "Where is the ball?", "John is here.",
                                             "The cat sleeps."};
  SamplingOptions sampled;
  sampled.temperature = 0.8f;
  sampled.top_k = 20;
  sampled.seed = 7;
  for (const SamplingOptions& so : {SamplingOptions{}, sampled}) {  // greedy steps, then steps with logits
    INFO("temperature " << so.temperature);
    std::vector<std::vector<int32_t>> alone;
    for (const auto& m : messages) alone.push_back(f.Reply(m, so, nullptr));
    DecodeBatcherOptions bo;
    bo.gather = static_cast<int64_t>(messages.size());  // the first steps wait for each other
    bo.gather_wait = std::chrono::seconds(5);
    DecodeBatcher batcher(*f.model, bo);
    std::vector<std::vector<int32_t>> together(messages.size());
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < messages.size(); ++i) {
      threads.emplace_back([&, i] { together[i] = f.Reply(messages[i], so, &batcher); });
    }
    for (auto& t : threads) t.join();
    for (std::size_t i = 0; i < messages.size(); ++i) CHECK(together[i] == alone[i]);
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
  auto good = f.model->NewState();
  auto bad = f.model->NewState();
  REQUIRE((good.ok() && bad.ok()));
  int32_t next_good = -1, next_bad = -1;
  lm2::Status st_good, st_bad;
  std::thread a([&] { st_good = batcher.Step(**good, 5, &next_good, nullptr); });
  std::thread b([&] { st_bad = batcher.Step(**bad, static_cast<int32_t>(f.model->config().vocab_size), &next_bad, nullptr); });
  a.join();
  b.join();
  CHECK(st_good.ok());
  CHECK(st_bad.code() == lm2::StatusCode::kInvalidArgument);
  CHECK((*good)->context_length() == 1);
  CHECK((*bad)->context_length() == 0);
  std::vector<float> row;
  REQUIRE(f.model->Forward(**bad, std::vector<int32_t>{5}, LogitsMode::kLast, &row).ok());
  CHECK(next_good == static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  CHECK(batcher.Step(**good, 5, nullptr, nullptr).code() == lm2::StatusCode::kInvalidArgument);
  std::vector<float> logits;
  CHECK(batcher.Step(**good, 5, &next_good, &logits).code() == lm2::StatusCode::kInvalidArgument);
}
