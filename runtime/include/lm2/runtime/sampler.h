// Sampler: picks the next token from logits. Greedy, temperature, top-k, top-p (nucleus),
// repetition penalty, seeded.
//
// A Sampler is per-session state (its RNG advances with every sample, so a session's
// sampled continuation is reproducible from its seed); not thread-safe. Cost: O(V log V)
// when top-k/top-p are active (a partial sort of the candidates), O(V) otherwise.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "lm2/core/status.h"

namespace lm2::runtime {

struct SamplingOptions {
  float temperature = 0.0f;         // 0: greedy (argmax); > 0 divides the logits
  int32_t top_k = 0;                // 0: off; else keep the k most likely tokens
  float top_p = 1.0f;               // 1: off; else keep the smallest set with mass >= top_p
  float repetition_penalty = 1.0f;  // 1: off; > 1 discourages tokens already in the history
  uint64_t seed = 0;                // RNG seed
};

// InvalidArgument for negative temperature or top_k, top_p outside (0, 1], penalty <= 0.
Status ValidateSamplingOptions(const SamplingOptions& options);

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);

  // The next token for `logits` [V]. `history` (tokens already in the conversation) feeds
  // the repetition penalty: a seen token's logit is divided by the penalty when positive
  // and multiplied when negative (CTRL-style). `logits` is not modified.
  int32_t Sample(std::span<const float> logits, std::span<const int32_t> history);

  const SamplingOptions& options() const { return options_; }

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  std::vector<float> work_;       // penalised logits
  std::vector<int32_t> order_;    // candidate ids
};

}  // namespace lm2::runtime
