// The CPU backend against the float64 golden files and the execution invariants.
#include <catch2/catch.hpp>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "golden_check.h"
#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/model_files.h"

using lm2::runtime::LoadCpuModel;
using lm2::runtime::LogitsMode;
using lm2::runtime::Model;
using lm2::runtime::ModelFiles;
using lm2::runtime::SequenceState;
using lm2::runtime::TokenRule;
using lm2::testing::NewState;
using lm2::testing::Slice;
using lm2::testing::RelativeError;
using lm2::testing::SourceDir;

namespace {

const std::vector<std::string> kModels = {"tiny-lm2", "tiny-partial", "tiny-vanilla"};
constexpr double kTolerance = 1e-4;  // docs/lm2-spec.md: CPU fp32 vs float64 reference

std::unique_ptr<Model> Load(const std::string& name) {
  auto files = ModelFiles::Open(SourceDir() + "/tests/data/models/" + name);
  REQUIRE(files.ok());
  auto model = LoadCpuModel(std::shared_ptr<const ModelFiles>(std::move(files).value()));
  REQUIRE(model.ok());
  return std::move(model).value();
}

}  // namespace

TEST_CASE("CPU backend matches the float64 golden files", "[cpu][golden]") {
  for (const auto& name : kModels) {
    auto model = Load(name);
    lm2::testing::CheckGoldenCases(*model, name, kTolerance, kTolerance);
  }
}

TEST_CASE("Token-at-a-time decode equals full-prompt prefill", "[cpu]") {
  for (const auto& name : kModels) {
    INFO(name);
    auto model = Load(name);
    const std::vector<int32_t> tokens = {5, 17, 300, 42, 99, 7, 256, 11, 400, 8};
    auto a = NewState(*model);
    std::vector<float> prefill;
    REQUIRE(model->Forward(*a, tokens, LogitsMode::kAll, &prefill).ok());
    auto b = NewState(*model);
    std::vector<float> step, stepped;
    for (int32_t t : tokens) {
      REQUIRE(model->Forward(*b, std::vector<int32_t>{t}, LogitsMode::kLast, &step).ok());
      stepped.insert(stepped.end(), step.begin(), step.end());
    }
    REQUIRE(stepped.size() == prefill.size());
    std::vector<double> ref(prefill.begin(), prefill.end());
    CHECK(RelativeError(stepped.data(), ref.data(), ref.size()) < 1e-5);
    // The streamed write sums give the same bank either way.
    REQUIRE(model->EndSegment(*a).ok());
    REQUIRE(model->EndSegment(*b).ok());
    auto ma = model->ExportMemory(*a);
    auto mb = model->ExportMemory(*b);
    REQUIRE((ma.ok() && mb.ok()));
    for (std::size_t l = 0; l < ma->layers.size(); ++l) {
      std::vector<double> ref_bank(ma->layers[l].data.begin(), ma->layers[l].data.end());
      CHECK(RelativeError(mb->layers[l].data.data(), ref_bank.data(), ref_bank.size()) < 1e-5);
    }
  }
}

TEST_CASE("A prompt's last layer computes only the rows read; the state is the same", "[cpu]") {
  std::vector<int32_t> prompt(40);
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 37 + 11) % 500);
  for (const auto& name : kModels) {
    INFO(name);
    auto model = Load(name);
    // kLast's row takes a matrix-vector product where kAll's rows take sgemm: the same sums
    // in another order (a wrong row or a skipped attention would be off by far more).
    const double error = lm2::testing::CheckRowsRead(*model, prompt, 4);
    INFO("kLast against kAll's last row: " << error);
    CHECK(error < 1e-5);
  }
}

TEST_CASE("Export and import of memory mid-conversation continues exactly", "[cpu]") {
  auto model = Load("tiny-lm2");
  const std::vector<int32_t> seg1 = {9, 8, 7, 6, 5}, seg2 = {100, 200, 300}, seg3 = {44, 55, 66, 77};
  // Never stopping: three segments, context reset before the third.
  auto a = NewState(*model);
  std::vector<float> la;
  REQUIRE(model->Forward(*a, seg1, LogitsMode::kNone, nullptr).ok());
  REQUIRE(model->EndSegment(*a).ok());
  REQUIRE(model->Forward(*a, seg2, LogitsMode::kNone, nullptr).ok());
  REQUIRE(model->EndSegment(*a).ok());
  model->ResetContext(*a);
  REQUIRE(model->Forward(*a, seg3, LogitsMode::kAll, &la).ok());
  // Stopping after two segments: export, import into a fresh state (as a restored
  // session, empty context), continue.
  auto b = NewState(*model);
  REQUIRE(model->Forward(*b, seg1, LogitsMode::kNone, nullptr).ok());
  REQUIRE(model->EndSegment(*b).ok());
  REQUIRE(model->Forward(*b, seg2, LogitsMode::kNone, nullptr).ok());
  // Export is refused while the segment's write is pending.
  CHECK(model->ExportMemory(*b).status().code() == lm2::StatusCode::kFailedPrecondition);
  REQUIRE(model->EndSegment(*b).ok());
  auto saved = model->ExportMemory(*b);
  REQUIRE(saved.ok());
  auto c = NewState(*model);
  REQUIRE(model->ImportMemory(*c, *saved).ok());
  std::vector<float> lc;
  REQUIRE(model->Forward(*c, seg3, LogitsMode::kAll, &lc).ok());
  CHECK(lc == la);  // bit-identical
  // Without the import the logits differ: memory carries the earlier segments.
  auto d = NewState(*model);
  std::vector<float> ld;
  REQUIRE(model->Forward(*d, seg3, LogitsMode::kAll, &ld).ok());
  CHECK(ld != la);
}

TEST_CASE("Bad input gets a clear status and leaves the state usable", "[cpu]") {
  auto model = Load("tiny-lm2");
  const auto& cfg = model->config();
  auto s = NewState(*model);
  std::vector<float> logits;
  CHECK(model->Forward(*s, std::vector<int32_t>{static_cast<int32_t>(cfg.vocab_size)}, LogitsMode::kLast, &logits)
            .code() == lm2::StatusCode::kInvalidArgument);
  CHECK(model->Forward(*s, std::vector<int32_t>{-1}, LogitsMode::kLast, &logits).code() ==
        lm2::StatusCode::kInvalidArgument);
  std::vector<int32_t> too_long(static_cast<std::size_t>(cfg.max_position_embeddings) + 1, 5);
  CHECK(model->Forward(*s, too_long, LogitsMode::kLast, &logits).code() == lm2::StatusCode::kOutOfRange);
  CHECK(s->context_length() == 0);
  REQUIRE(model->Forward(*s, std::vector<int32_t>{5, 6}, LogitsMode::kLast, &logits).ok());
  CHECK(s->context_length() == 2);
  CHECK(s->segment_tokens() == 2);
  REQUIRE(model->EndSegment(*s).ok());

  // A bank from another model (the fingerprint differs) is refused.
  auto other = Load("tiny-partial");
  auto other_state = NewState(*other);
  auto foreign = other->ExportMemory(*other_state);
  REQUIRE(foreign.ok());
  CHECK(model->ImportMemory(*s, *foreign).code() == lm2::StatusCode::kFailedPrecondition);
  // A state of another model is refused.
  CHECK(model->Forward(*other_state, std::vector<int32_t>{5}, LogitsMode::kLast, &logits).code() ==
        lm2::StatusCode::kInvalidArgument);
  // A bank with the right fingerprint but the wrong shape is refused.
  auto mine = model->ExportMemory(*s);
  REQUIRE(mine.ok());
  lm2::MemoryState bad = mine->Clone();
  bad.layers[0].data.pop_back();
  CHECK(model->ImportMemory(*s, bad).code() == lm2::StatusCode::kInvalidArgument);
  bad = mine->Clone();
  bad.layers.pop_back();
  CHECK(model->ImportMemory(*s, bad).code() == lm2::StatusCode::kInvalidArgument);
}

TEST_CASE("ExportMemoryInto reuses the caller's bank and empties it when refused", "[cpu]") {
  for (const auto& name : kModels) {
    INFO(name);
    auto model = Load(name);
    auto s = NewState(*model);
    REQUIRE(model->Forward(*s, std::vector<int32_t>{5, 6, 7}, LogitsMode::kNone, nullptr).ok());
    REQUIRE(model->EndSegment(*s).ok());
    lm2::testing::CheckExportInto(*model, *s);
    auto kept = model->ExportMemory(*s);
    REQUIRE(kept.ok());
    REQUIRE(model->Forward(*s, std::vector<int32_t>{8}, LogitsMode::kNone, nullptr).ok());
    CHECK(model->ExportMemoryInto(*s, *kept).code() == lm2::StatusCode::kFailedPrecondition);
    CHECK(kept->layers.empty());
    CHECK(kept->model_fingerprint.empty());
  }
}

TEST_CASE("An empty segment leaves memory unchanged", "[cpu]") {
  auto model = Load("tiny-lm2");
  auto s = NewState(*model);
  REQUIRE(model->Forward(*s, std::vector<int32_t>{5, 6, 7}, LogitsMode::kNone, nullptr).ok());
  REQUIRE(model->EndSegment(*s).ok());
  auto before = model->ExportMemory(*s);
  REQUIRE(before.ok());
  REQUIRE(model->Forward(*s, std::vector<int32_t>{}, LogitsMode::kNone, nullptr).ok());
  CHECK(s->segment_open());
  REQUIRE(model->EndSegment(*s).ok());
  auto after = model->ExportMemory(*s);
  REQUIRE(after.ok());
  for (std::size_t l = 0; l < before->layers.size(); ++l) CHECK(before->layers[l].data == after->layers[l].data);
}

TEST_CASE("Many states run one shared model from several threads", "[cpu]") {
  auto model = Load("tiny-lm2");
  constexpr int kThreads = 4;
  const auto run = [&](int seed, std::vector<float>* out) {
    auto s = model->NewState();
    REQUIRE(s.ok());
    std::vector<int32_t> tokens;
    for (int i = 0; i < 24; ++i) tokens.push_back(4 + (seed * 131 + i * 17) % 500);
    std::vector<float> logits;
    for (int seg = 0; seg < 3; ++seg) {
      const std::vector<int32_t> part(tokens.begin() + seg * 8, tokens.begin() + seg * 8 + 8);
      REQUIRE(model->Forward(**s, part, LogitsMode::kAll, &logits).ok());
      out->insert(out->end(), logits.begin(), logits.end());
      REQUIRE(model->EndSegment(**s).ok());
    }
    auto memory = model->ExportMemory(**s);
    REQUIRE(memory.ok());
    for (const auto& l : memory->layers) out->insert(out->end(), l.data.begin(), l.data.end());
  };
  std::vector<std::vector<float>> sequential(kThreads), concurrent(kThreads);
  for (int i = 0; i < kThreads; ++i) run(i, &sequential[static_cast<std::size_t>(i)]);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) threads.emplace_back(run, i, &concurrent[static_cast<std::size_t>(i)]);
  for (auto& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) CHECK(concurrent[static_cast<std::size_t>(i)] == sequential[static_cast<std::size_t>(i)]);
  CHECK(sequential[0] != sequential[1]);
}

TEST_CASE("ForwardBatch runs each state's next token; bad input changes no state", "[cpu]") {
  auto model = Load("tiny-lm2");
  const int64_t V = model->config().vocab_size;
  std::vector<std::unique_ptr<SequenceState>> batch_states, single_states;
  std::vector<float> logits, row;
  for (int i = 0; i < 3; ++i) {
    const std::vector<int32_t> prompt(static_cast<std::size_t>(2 + 3 * i), 7 + i);
    batch_states.push_back(NewState(*model));
    single_states.push_back(NewState(*model));
    REQUIRE(model->Forward(*batch_states.back(), prompt, LogitsMode::kNone, nullptr).ok());
    REQUIRE(model->Forward(*single_states.back(), prompt, LogitsMode::kNone, nullptr).ok());
  }
  std::vector<SequenceState*> ptrs = {batch_states[0].get(), batch_states[1].get(), batch_states[2].get()};
  const std::vector<int32_t> tokens = {11, 300, 42};
  REQUIRE(model->ForwardBatch(ptrs, tokens, &logits).ok());
  REQUIRE(logits.size() == 3 * static_cast<std::size_t>(V));
  for (std::size_t i = 0; i < 3; ++i) {
    REQUIRE(model->Forward(*single_states[i], std::vector<int32_t>{tokens[i]}, LogitsMode::kLast, &row).ok());
    CHECK(std::equal(row.begin(), row.end(), logits.begin() + static_cast<std::ptrdiff_t>(i) * V));
    CHECK(batch_states[i]->context_length() == single_states[i]->context_length());
  }
  // The greedy form: each state's argmax, the first of equal maxima (std::max_element).
  std::vector<int32_t> next;
  const std::vector<int32_t> more = {5, 6, 7};
  REQUIRE(model->ForwardBatchGreedy(ptrs, more, &next).ok());
  REQUIRE(next.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    REQUIRE(model->Forward(*single_states[i], std::vector<int32_t>{more[i]}, LogitsMode::kLast, &row).ok());
    CHECK(next[i] == static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  CHECK(model->ForwardBatchGreedy(ptrs, more, nullptr).code() == lm2::StatusCode::kInvalidArgument);
  // The sampling form: each row's PickToken under its own rule.
  const std::vector<int32_t> history = {3, 3, 9};
  const std::vector<TokenRule> rules = {
      TokenRule{.temperature = 0.9f, .top_k = 5, .draw = 0.3},
      TokenRule{.repetition_penalty = 1.3f, .history = history},
      TokenRule{.temperature = 1.1f, .top_p = 0.8f, .repetition_penalty = 1.2f, .draw = 0.7, .history = history}};
  const std::vector<int32_t> again = {8, 9, 10};
  REQUIRE(model->ForwardBatchSample(ptrs, again, rules, &next).ok());
  lm2::runtime::PickScratch scratch;
  for (std::size_t i = 0; i < 3; ++i) {
    REQUIRE(model->Forward(*single_states[i], std::vector<int32_t>{again[i]}, LogitsMode::kLast, &row).ok());
    CHECK(next[i] == lm2::runtime::PickToken(row, rules[i], scratch));
  }
  // Bad rules are refused before anything runs.
  const auto at = batch_states[0]->context_length();
  CHECK(model->ForwardBatchSample(ptrs, again, std::span(rules).first(2), &next).code() ==
        lm2::StatusCode::kInvalidArgument);
  std::vector<TokenRule> bad = rules;
  bad[2].draw = 1.0;
  CHECK(model->ForwardBatchSample(ptrs, again, bad, &next).code() == lm2::StatusCode::kInvalidArgument);
  bad[2].draw = 0.5;
  bad[2].top_p = 0.0f;
  CHECK(model->ForwardBatchSample(ptrs, again, bad, &next).code() == lm2::StatusCode::kInvalidArgument);
  CHECK(batch_states[0]->context_length() == at);
  // Refusals leave every state where it was.
  auto other = Load("tiny-lm2");
  auto foreign = NewState(*other);
  const auto before = batch_states[0]->context_length();
  std::vector<SequenceState*> twice = {ptrs[0], ptrs[0]};
  CHECK(model->ForwardBatch(twice, std::vector<int32_t>{1, 2}, &logits).code() == lm2::StatusCode::kInvalidArgument);
  std::vector<SequenceState*> mixed = {ptrs[0], foreign.get()};
  CHECK(model->ForwardBatch(mixed, std::vector<int32_t>{1, 2}, &logits).code() == lm2::StatusCode::kInvalidArgument);
  CHECK(model->ForwardBatch(ptrs, std::vector<int32_t>{1, 2}, &logits).code() == lm2::StatusCode::kInvalidArgument);
  CHECK(model->ForwardBatch(ptrs, std::vector<int32_t>{1, 2, static_cast<int32_t>(V)}, &logits).code() ==
        lm2::StatusCode::kInvalidArgument);
  CHECK(model->ForwardBatch(ptrs, tokens, nullptr).code() == lm2::StatusCode::kInvalidArgument);
  CHECK(batch_states[0]->context_length() == before);
}
