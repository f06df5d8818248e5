// Sampler: picks the next token from logits. Greedy, temperature, top-k, top-p (nucleus),
// repetition penalty, seeded.
//
// A Sampler is per-session state (its RNG advances with every sampled token, so a session's
// sampled continuation is reproducible from its seed); not thread-safe. Sampling is split in
// two so that the choice can be made where the logits are: Sampler::Rule makes the random
// draw on the host and returns a TokenRule; PickToken (host) or the model
// (Model::ForwardBatchSample; the CUDA backend picks on the device) applies it to the logits.
// Cost of PickToken: O(V) for temperature alone; O(V log k) with top-k (a partial sort);
// with top-p alone, O(V) plus sorting a prefix grown by 4x from 256 candidates until it
// holds the cut: a few dozen candidates for a language model's peaked distribution, the
// whole vocabulary for a flat one (128,256 logits here: 2.0 ms peaked, 17.5 ms flat; a full
// sort took 21 ms either way).
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

// One token's choice with its random draw made: everything PickToken needs besides the logits.
//
// The rule, for logits l[V]:
//  1. Repetition penalty: each distinct token of `history` has its logit divided by the
//     penalty when positive and multiplied when negative (CTRL-style), once.
//  2. temperature == 0: the first index of the largest logit (greedy; `draw` is unused).
//  3. Otherwise the candidates are every token, in id order, unless top-k or top-p is on:
//     then they are sorted by logit, descending, ties by id, and cut to the first top_k.
//     Weights w = exp((l - max) / temperature) (the subtraction and division in float, the
//     exponential in double). With top-p, the candidates are cut after the first whose
//     running mass reaches top_p of their total.
//  4. The pick is the first candidate whose running weight reaches draw x (total weight).
struct TokenRule {
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  double draw = 0.0;                 // uniform in [0, 1)
  std::span<const int32_t> history = {};  // tokens the penalty applies to (may repeat; each counts once)

  // The pick is the argmax of the raw logits.
  bool argmax_only() const { return temperature == 0.0f && repetition_penalty == 1.0f; }
  // Step 3 sorts the candidates.
  bool sorts() const { return temperature != 0.0f && (top_k > 0 || top_p < 1.0f); }
};

// InvalidArgument for what ValidateSamplingOptions refuses, or a draw outside [0, 1).
Status ValidateTokenRule(const TokenRule& rule);

// Reusable buffers for PickToken (one per thread).
struct PickScratch {
  std::vector<float> logits;     // penalised logits
  std::vector<int32_t> order;    // candidate ids
  std::vector<int32_t> seen;     // distinct history ids
  std::vector<double> weights;   // candidates' weights
};

// The distinct ids of `history`, ascending, appended to `out`: what the repetition penalty
// applies to, each once (ids outside the vocabulary included; the penalty skips them).
void AppendDistinctIds(std::span<const int32_t> history, std::vector<int32_t>& out);

// The token `rule` picks from `logits` [V] (the rule above). `logits` is not modified.
int32_t PickToken(std::span<const float> logits, const TokenRule& rule, PickScratch& scratch);

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);

  // The rule for the next token: the options with `history`, and a fresh uniform draw from
  // the RNG when temperature > 0 (greedy draws nothing). `history` must outlive the rule.
  TokenRule Rule(std::span<const int32_t> history);

  // PickToken(logits, Rule(history)).
  int32_t Sample(std::span<const float> logits, std::span<const int32_t> history);

  const SamplingOptions& options() const { return options_; }

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  PickScratch scratch_;
};

}  // namespace lm2::runtime
