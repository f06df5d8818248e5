#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
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

TEST_CASE("PickToken: the rule's steps, one by one", "[sampler]") {
  using lm2::runtime::PickScratch;
  using lm2::runtime::PickToken;
  using lm2::runtime::TokenRule;
  PickScratch scratch;
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, -1.0f};
  // Greedy: the first of equal maxima.
  CHECK(PickToken(logits, TokenRule{}, scratch) == 1);
  // The penalty counts each distinct token once: 3.0 / 1.3 = 2.31 still beats 2.0; applied
  // twice (1.78) it would not.
  const std::vector<int32_t> twice = {1, 1, 3, 3};
  CHECK(PickToken(logits, TokenRule{.repetition_penalty = 1.3f, .history = twice}, scratch) == 1);
  const std::vector<float> neg = {-1.0f, -1.1f};
  const std::vector<int32_t> zero_thrice = {0, 0, 0};  // -1.05 once; -1.16 if thrice
  CHECK(PickToken(neg, TokenRule{.repetition_penalty = 1.05f, .history = zero_thrice}, scratch) == 0);
  // Without top-k / top-p the candidates are in id order: draw 0 takes the first with any
  // weight, a draw just under 1 the last.
  CHECK(PickToken(logits, TokenRule{.temperature = 1.0f, .draw = 0.0}, scratch) == 0);
  CHECK(PickToken(logits, TokenRule{.temperature = 1.0f, .draw = std::nextafter(1.0, 0.0)}, scratch) == 4);
  // Sorted (ties by id): 1, 3, 2, 0, 4. Top-k 2 keeps the tied pair, equal halves.
  CHECK(PickToken(logits, TokenRule{.temperature = 1.0f, .top_k = 2, .draw = 0.49}, scratch) == 1);
  CHECK(PickToken(logits, TokenRule{.temperature = 1.0f, .top_k = 2, .draw = 0.51}, scratch) == 3);
  // Top-p: weights e^0, e^0, e^-1, e^-2, e^-4 (total 2.52): 0.7 of it is reached at the
  // second candidate, so a draw of 0.99 still lands there.
  CHECK(PickToken(logits, TokenRule{.temperature = 1.0f, .top_p = 0.7f, .draw = 0.99}, scratch) == 3);
  CHECK(PickToken(logits, TokenRule{.temperature = 1.0f, .top_p = 0.9f, .draw = 0.99}, scratch) == 2);
  // Rules are validated.
  CHECK(lm2::runtime::ValidateTokenRule(TokenRule{.temperature = 1.0f, .draw = 0.5}).ok());
  CHECK(lm2::runtime::ValidateTokenRule(TokenRule{.draw = 1.0}).IsInvalidArgument());
  CHECK(lm2::runtime::ValidateTokenRule(TokenRule{.draw = -0.1}).IsInvalidArgument());
  CHECK(lm2::runtime::ValidateTokenRule(TokenRule{.top_k = -1}).IsInvalidArgument());
}

// The greedy pick runs its own scan (16 running maxima) instead of std::max_element, whose
// choice it must keep exactly: the first of equal maxima, -0 equal to +0, a NaN in front kept
// and any later one passed over.
TEST_CASE("PickToken: the greedy pick is std::max_element's, NaN, infinities and zeros included", "[sampler]") {
  using lm2::runtime::PickScratch;
  using lm2::runtime::PickToken;
  using lm2::runtime::TokenRule;
  PickScratch scratch;
  const auto want = [](const std::vector<float>& v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
  };
  const auto seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> kind(0, 9);
  const float specials[] = {NAN, -INFINITY, INFINITY, -0.0f, 0.0f};
  // Lengths around the lane count and its multiples, and a vocabulary's; values from a small
  // set so that ties, zeros of both signs, infinities and NaNs meet in every position.
  const std::size_t lengths[] = {1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100, 128256};
  for (std::size_t len : lengths) {
    for (int trial = 0; trial < (len > 1000 ? 20 : 300); ++trial) {
      std::vector<float> v(len);
      for (float& x : v) {
        const int k = kind(rng);
        x = k < 5 ? specials[k] : static_cast<float>(kind(rng) - 5);
      }
      INFO("length " << len << ", trial " << trial);
      REQUIRE(PickToken(v, TokenRule{}, scratch) == want(v));
      // The penalty's path (temperature 0) picks from its own copy: with no history, the same.
      REQUIRE(PickToken(v, TokenRule{.repetition_penalty = 1.1f}, scratch) == want(v));
    }
  }
  // Logits as a model makes them, and the same with every value -inf but one late maximum.
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(128256);
  for (float& x : logits) x = normal(rng);
  CHECK(PickToken(logits, TokenRule{}, scratch) == want(logits));
  std::vector<float> one_late(128256, -INFINITY);
  one_late[128250] = -5.0f;
  CHECK(PickToken(one_late, TokenRule{}, scratch) == 128250);
  CHECK(PickToken(std::vector<float>(7, -INFINITY), TokenRule{}, scratch) == 0);
}

TEST_CASE("Sampler: Sample is PickToken of Rule; only sampled tokens draw", "[sampler]") {
  const std::vector<float> logits = {0.3f, 1.0f, 0.9f, -2.0f, 0.5f};
  SamplingOptions o;
  o.temperature = 0.8f;
  o.top_p = 0.9f;
  o.seed = 11;
  Sampler a(o), b(o);
  lm2::runtime::PickScratch scratch;
  for (int i = 0; i < 50; ++i) {
    const auto rule = b.Rule({});
    CHECK(rule.draw >= 0.0);
    CHECK(rule.draw < 1.0);
    CHECK(a.Sample(logits, {}) == lm2::runtime::PickToken(logits, rule, scratch));
  }
  Sampler greedy(SamplingOptions{});
  CHECK(greedy.Rule({}).draw == 0.0);
  CHECK(greedy.Rule({}).argmax_only());
}

TEST_CASE("PickToken: top-p over a large vocabulary picks what a full sort picks", "[sampler]") {
  using lm2::runtime::PickScratch;
  using lm2::runtime::PickToken;
  using lm2::runtime::TokenRule;
  // The reference: every candidate sorted (logit descending, ties by id), the total in id
  // order as PickToken states, the cut and the pick by running weights.
  const auto reference = [](const std::vector<float>& l, const TokenRule& r) {
    std::vector<int32_t> order(l.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return l[static_cast<std::size_t>(a)] > l[static_cast<std::size_t>(b)] ||
             (l[static_cast<std::size_t>(a)] == l[static_cast<std::size_t>(b)] && a < b);
    });
    const float mx = l[static_cast<std::size_t>(order[0])];
    const auto w = [&](int32_t id) { return std::exp(static_cast<double>((l[static_cast<std::size_t>(id)] - mx) / r.temperature)); };
    double total = 0.0;
    for (std::size_t i = 0; i < l.size(); ++i) total += w(static_cast<int32_t>(i));
    double mass = 0.0;
    std::size_t cut = order.size();
    for (std::size_t i = 0; i < order.size(); ++i) {
      mass += w(order[i]);
      if (mass >= static_cast<double>(r.top_p) * total) {
        cut = i + 1;
        total = mass;
        break;
      }
    }
    double run = 0.0;
    for (std::size_t i = 0; i < cut; ++i) {
      run += w(order[i]);
      if (run >= r.draw * total) return order[i];
    }
    return order[cut - 1];
  };
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  PickScratch scratch;
  // Peaked logits (a long tail: the top-p set is small) and flat ones (most of the vocabulary,
  // past the first sorted prefixes), with ties.
  for (int shape = 0; shape < 2; ++shape) {
    std::vector<float> l(20000);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (std::size_t i = 0; i < l.size(); ++i) {
      l[i] = shape == 0 ? -1.5f * std::log(static_cast<float>(1 + (i * 7919) % l.size())) : normal(rng);
      if (i % 50 == 0) l[i] = std::round(l[i]);  // some exact ties
    }
    for (float top_p : {0.1f, 0.5f, 0.9f, 0.95f, 0.999f}) {
      for (int trial = 0; trial < 20; ++trial) {
        const TokenRule r{.temperature = 0.8f, .top_p = top_p, .draw = uniform(rng)};
        INFO("shape " << shape << " top_p " << top_p << " draw " << r.draw);
        CHECK(PickToken(l, r, scratch) == reference(l, r));
      }
    }
  }
}

TEST_CASE("AppendDistinctIds appends each id once, ascending, after what is there", "[sampler]") {
  std::vector<int32_t> out = {99};
  lm2::runtime::AppendDistinctIds(std::vector<int32_t>{7, 3, 7, -1, 3, 500}, out);
  CHECK(out == std::vector<int32_t>{99, -1, 3, 7, 500});
  lm2::runtime::AppendDistinctIds({}, out);
  CHECK(out.size() == 5);
}
