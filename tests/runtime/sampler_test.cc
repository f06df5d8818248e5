#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <vector>

#include "lm2/runtime/sampler.h"

using lm2::runtime::Sampler;
using lm2::runtime::SamplingOptions;
using lm2::runtime::ValidateSamplingOptions;

namespace {
std::map<int32_t, int> Histogram(SamplingOptions o, const std::vector<float>& logits, int n,
                                 const std::vector<int32_t>& history = {}) {
  Sampler s(o);
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) ++h[s.Sample(logits, history)];
  return h;
}
}  // namespace

TEST_CASE("Sampler: greedy is the argmax and ignores the seed", "[sampler]") {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
  SamplingOptions o;
  for (uint64_t seed : {0u, 1u, 99u}) {
    o.seed = seed;
    Sampler s(o);
    CHECK(s.Sample(logits, {}) == 1);
  }
}

TEST_CASE("Sampler: repetition penalty demotes seen tokens", "[sampler]") {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
  SamplingOptions o;
  o.repetition_penalty = 1.5f;
  Sampler s(o);
  CHECK(s.Sample(logits, std::vector<int32_t>{1}) == 3);  // 2.0 / 1.5 < 1.9
  const std::vector<float> neg = {-0.5f, -0.6f};
  CHECK(s.Sample(neg, std::vector<int32_t>{0}) == 1);  // -0.5 * 1.5 < -0.6
}

TEST_CASE("Sampler: top-k and top-p restrict the candidates", "[sampler]") {
  const std::vector<float> logits = {3.0f, 2.9f, 2.8f, -5.0f, 0.0f};
  SamplingOptions o;
  o.temperature = 1.0f;
  o.top_k = 2;
  auto h = Histogram(o, logits, 2000);
  CHECK(h.size() == 2);
  CHECK(h.count(0) == 1);
  CHECK(h.count(1) == 1);
  o.top_k = 0;
  o.top_p = 0.5f;  // token 0 alone holds ~35%: tokens 0 and 1 make the smallest set >= 0.5
  h = Histogram(o, logits, 2000);
  CHECK(h.size() == 2);
  o.top_p = 1.0f;
  h = Histogram(o, logits, 4000);
  CHECK(h.size() >= 4);  // every token with real mass shows up
}

TEST_CASE("Sampler: frequencies follow the softmax at the temperature; seeds reproduce", "[sampler]") {
  const std::vector<float> logits = {0.0f, std::log(3.0f)};  // p = 1/4, 3/4 at T = 1
  SamplingOptions o;
  o.temperature = 1.0f;
  o.seed = 7;
  auto h = Histogram(o, logits, 20000);
  CHECK(std::abs(h[1] / 20000.0 - 0.75) < 0.02);
  o.temperature = 0.5f;  // p ∝ 1, 9: 0.9
  h = Histogram(o, logits, 20000);
  CHECK(std::abs(h[1] / 20000.0 - 0.9) < 0.02);
  Sampler a(o), b(o);
  for (int i = 0; i < 100; ++i) CHECK(a.Sample(logits, {}) == b.Sample(logits, {}));
}

TEST_CASE("Sampler: invalid options are refused", "[sampler]") {
  SamplingOptions o;
  CHECK(ValidateSamplingOptions(o).ok());
  o.temperature = -1.0f;
  CHECK(ValidateSamplingOptions(o).IsInvalidArgument());
  o = {};
  o.top_p = 0.0f;
  CHECK(ValidateSamplingOptions(o).IsInvalidArgument());
  o = {};
  o.top_k = -3;
  CHECK(ValidateSamplingOptions(o).IsInvalidArgument());
  o = {};
  o.repetition_penalty = 0.0f;
  CHECK(ValidateSamplingOptions(o).IsInvalidArgument());
}
