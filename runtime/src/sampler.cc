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

Sampler::Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}

int32_t Sampler::Sample(std::span<const float> logits, std::span<const int32_t> history) {
  const auto V = static_cast<int32_t>(logits.size());
  work_.assign(logits.begin(), logits.end());
  if (options_.repetition_penalty != 1.0f) {
    for (int32_t id : history) {
      if (id < 0 || id >= V) continue;
      float& l = work_[static_cast<std::size_t>(id)];
      l = l > 0.0f ? l / options_.repetition_penalty : l * options_.repetition_penalty;
    }
  }
  if (options_.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(work_.begin(), work_.end()) - work_.begin());
  }
  // Candidates sorted by logit (descending; ties by id so results do not depend on the
  // sort's stability), cut by top-k, then softmax at the temperature, then cut by top-p.
  order_.resize(static_cast<std::size_t>(V));
  std::iota(order_.begin(), order_.end(), 0);
  const auto by_logit = [this](int32_t a, int32_t b) {
    const float la = work_[static_cast<std::size_t>(a)], lb = work_[static_cast<std::size_t>(b)];
    return la > lb || (la == lb && a < b);
  };
  std::size_t keep = order_.size();
  if (options_.top_k > 0) keep = std::min(keep, static_cast<std::size_t>(options_.top_k));
  if (keep < order_.size() || options_.top_p < 1.0f) {
    std::partial_sort(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(keep), order_.end(), by_logit);
  }
  order_.resize(keep);
  float max_logit = -INFINITY;  // order_ is unsorted when neither top-k nor top-p cut
  for (int32_t id : order_) max_logit = std::max(max_logit, work_[static_cast<std::size_t>(id)]);
  std::vector<double> probs(keep);
  double total = 0.0;
  for (std::size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(static_cast<double>((work_[static_cast<std::size_t>(order_[i])] - max_logit) /
                                            options_.temperature));
    total += probs[i];
  }
  if (options_.top_p < 1.0f) {
    double mass = 0.0;
    std::size_t cut = keep;
    for (std::size_t i = 0; i < keep; ++i) {
      mass += probs[i] / total;
      if (mass >= static_cast<double>(options_.top_p)) {
        cut = i + 1;
        break;
      }
    }
    probs.resize(cut);
    total = std::accumulate(probs.begin(), probs.end(), 0.0);
  }
  std::uniform_real_distribution<double> uniform(0.0, total);
  double r = uniform(rng_);
  for (std::size_t i = 0; i < probs.size(); ++i) {
    r -= probs[i];
    if (r <= 0.0) return order_[i];
  }
  return order_[probs.size() - 1];
}

}  // namespace lm2::runtime
