#include "lm2/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace lm2::runtime {

Status ValidateSamplingOptions(const SamplingOptions& o) {
  if (!(o.temperature >= 0.0f) || !std::isfinite(o.temperature)) {
    return Status::InvalidArgument("temperature must be a finite number >= 0");
  }
  if (o.top_k < 0) return Status::InvalidArgument("top_k must be >= 0");
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) return Status::InvalidArgument("top_p must be in (0, 1]");
  if (!(o.repetition_penalty > 0.0f) || !std::isfinite(o.repetition_penalty)) {
    return Status::InvalidArgument("repetition_penalty must be a finite number > 0");
  }
  return Status::Ok();
}

Status ValidateTokenRule(const TokenRule& r) {
  LM2_RETURN_IF_ERROR(ValidateSamplingOptions(
      SamplingOptions{.temperature = r.temperature, .top_k = r.top_k, .top_p = r.top_p,
                      .repetition_penalty = r.repetition_penalty}));
  if (!(r.draw >= 0.0 && r.draw < 1.0)) return Status::InvalidArgument("a token rule's draw must be in [0, 1)");
  return Status::Ok();
}

void AppendDistinctIds(std::span<const int32_t> history, std::vector<int32_t>& out) {
  const auto from = static_cast<std::ptrdiff_t>(out.size());
  out.insert(out.end(), history.begin(), history.end());
  std::sort(out.begin() + from, out.end());
  out.erase(std::unique(out.begin() + from, out.end()), out.end());
}

namespace {

// The index std::max_element gives over v: the first of equal maxima (-0 equal to +0); NaN
// never compares greater, so one at the front is kept and any later one is passed over
// (0 for an empty v). The elements go to kLanes running maxima (element i to lane i mod
// kLanes), so that the loop carries no dependency from one element to the next:
// std::max_element's does (each step compares with the element its iterator last kept),
// 436 µs for 128,256 logits at -O2 on the CPU machine against 71 µs this way.
std::size_t ArgmaxFirst(std::span<const float> v) {
  const std::size_t n = v.size();
  if (n == 0 || std::isnan(v[0])) return 0;
  constexpr std::size_t kLanes = 16;  // 8 lanes took 121 µs, 32 took 131, 64 took 104
  float best[kLanes];
  std::size_t at[kLanes];  // n: nothing above -inf in the lane yet
  std::fill(best, best + kLanes, -INFINITY);
  std::fill(at, at + kLanes, n);
  std::size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (std::size_t l = 0; l < kLanes; ++l) {
      const float x = v[i + l];
      const bool greater = x > best[l];
      best[l] = greater ? x : best[l];
      at[l] = greater ? i + l : at[l];
    }
  }
  for (std::size_t l = 0; i + l < n; ++l) {
    if (v[i + l] > best[l]) {
      best[l] = v[i + l];
      at[l] = i + l;
    }
  }
  // The lanes' largest value, the first index among equal ones; none above -inf: every
  // number is -inf, v[0] among them.
  std::size_t pick = n;
  for (std::size_t l = 0; l < kLanes; ++l) {
    if (at[l] == n) continue;
    if (pick == n || best[l] > v[pick] || (best[l] == v[pick] && at[l] < pick)) pick = at[l];
  }
  return pick == n ? 0 : pick;
}

}  // namespace

int32_t PickToken(std::span<const float> logits, const TokenRule& rule, PickScratch& scratch) {
  const auto V = static_cast<int32_t>(logits.size());
  if (rule.argmax_only()) return static_cast<int32_t>(ArgmaxFirst(logits));
  std::vector<float>& work = scratch.logits;
  work.assign(logits.begin(), logits.end());
  if (rule.repetition_penalty != 1.0f) {
    std::vector<int32_t>& seen = scratch.seen;
    seen.clear();
    AppendDistinctIds(rule.history, seen);
    for (int32_t id : seen) {
      if (id < 0 || id >= V) continue;
      float& l = work[static_cast<std::size_t>(id)];
      l = l > 0.0f ? l / rule.repetition_penalty : l * rule.repetition_penalty;
    }
  }
  if (rule.temperature == 0.0f) return static_cast<int32_t>(ArgmaxFirst(work));
  std::vector<int32_t>& order = scratch.order;
  order.resize(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  // By logit, descending; ties by id: a strict total order, so every sort of it agrees.
  const auto by_logit = [&work](int32_t a, int32_t b) {
    const float la = work[static_cast<std::size_t>(a)], lb = work[static_cast<std::size_t>(b)];
    return la > lb || (la == lb && a < b);
  };
  const auto weight = [&](int32_t id, float max_logit) {
    return std::exp(static_cast<double>((work[static_cast<std::size_t>(id)] - max_logit) / rule.temperature));
  };
  std::vector<double>& w = scratch.weights;
  double total = 0.0;
  std::size_t cut = order.size();  // candidates the pick may land on: order[0, cut), weights w
  if (rule.sorts() && rule.top_k > 0 && static_cast<std::size_t>(rule.top_k) < order.size()) {
    // Top-k: the k best in order, then (top-p) the cut among them.
    cut = static_cast<std::size_t>(rule.top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(cut), order.end(), by_logit);
    const float max_logit = work[static_cast<std::size_t>(order[0])];
    w.resize(cut);
    for (std::size_t i = 0; i < cut; ++i) total += (w[i] = weight(order[i], max_logit));
    if (rule.top_p < 1.0f) {
      const double target = static_cast<double>(rule.top_p) * total;
      double mass = 0.0;
      for (std::size_t i = 0; i < cut; ++i) {
        mass += w[i];
        if (mass >= target) {
          cut = i + 1;
          total = mass;
          break;
        }
      }
    }
  } else if (rule.sorts()) {
    // Top-p over the whole vocabulary: the total in id order, then sorted prefixes of 256,
    // 1024, ... candidates (nth_element, then a sort of the prefix) until one reaches top_p
    // of it. A prefix of the sorted order is the same whichever way it is found, and a
    // language model's top-p set is usually a few dozen tokens: no full sort of V logits.
    const float max_logit = work[ArgmaxFirst(work)];
    for (int32_t id : order) total += weight(id, max_logit);
    const double target = static_cast<double>(rule.top_p) * total;
    bool reached = false;
    for (std::size_t m = std::min<std::size_t>(256, order.size()); !reached; m = std::min(4 * m, order.size())) {
      if (m < order.size()) {
        std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(m - 1), order.end(), by_logit);
      }
      std::sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(m), by_logit);
      w.resize(m);
      double mass = 0.0;
      for (std::size_t i = 0; i < m && !reached; ++i) {
        mass += (w[i] = weight(order[i], max_logit));
        if (mass >= target) {
          cut = i + 1;
          total = mass;
          reached = true;
        }
      }
      if (!reached && m == order.size()) {  // all sorted, and rounding kept the mass under the target
        cut = m;
        total = mass;
        reached = true;
      }
    }
  } else {
    // Temperature alone: every token, in id order.
    const float max_logit = work[ArgmaxFirst(work)];
    w.resize(order.size());
    for (std::size_t i = 0; i < order.size(); ++i) total += (w[i] = weight(order[i], max_logit));
  }
  const double r = rule.draw * total;
  double run = 0.0;
  for (std::size_t i = 0; i < cut; ++i) {
    run += w[i];
    if (run >= r) return order[i];
  }
  return order[cut - 1];
}

Sampler::Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}

TokenRule Sampler::Rule(std::span<const int32_t> history) {
  TokenRule rule{.temperature = options_.temperature, .top_k = options_.top_k, .top_p = options_.top_p,
                 .repetition_penalty = options_.repetition_penalty, .history = history};
  if (options_.temperature != 0.0f) {
    // generate_canonical may round up to 1.0 in some standard libraries (LWG 2524).
    rule.draw = std::min(std::generate_canonical<double, 53>(rng_), std::nextafter(1.0, 0.0));
  }
  return rule;
}

int32_t Sampler::Sample(std::span<const float> logits, std::span<const int32_t> history) {
  return PickToken(logits, Rule(history), scratch_);
}

}  // namespace lm2::runtime
