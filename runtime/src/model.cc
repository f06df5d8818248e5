#include "lm2/runtime/model.h"

#include <algorithm>
#include <string>

namespace lm2::runtime {

Status Model::CheckBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                         const std::vector<float>* logits) const {
  if (states.empty() || states.size() != tokens.size()) {
    return Status::InvalidArgument("ForwardBatch: " + std::to_string(states.size()) + " states and " +
                                   std::to_string(tokens.size()) + " tokens (need one token per state, at least one)");
  }
  if (logits == nullptr) return Status::InvalidArgument("ForwardBatch: no output vector for the logits");
  std::vector<const SequenceState*> seen(states.begin(), states.end());
  std::sort(seen.begin(), seen.end());
  if (seen.front() == nullptr) return Status::InvalidArgument("ForwardBatch: a null state");
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) {
    return Status::InvalidArgument("ForwardBatch: a state appears twice");
  }
  for (const SequenceState* s : seen) {
    if (!OwnsState(*s)) return Status::InvalidArgument("ForwardBatch: a state belongs to another model");
  }
  const ModelConfig& cfg = config();
  for (std::size_t i = 0; i < states.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= cfg.vocab_size) {
      return Status::InvalidArgument("ForwardBatch: token id " + std::to_string(tokens[i]) + " (state " +
                                     std::to_string(i) + ") outside the vocabulary of " +
                                     std::to_string(cfg.vocab_size));
    }
    if (states[i]->context_length() + 1 > cfg.max_position_embeddings) {
      return Status::OutOfRange("ForwardBatch: state " + std::to_string(i) + " has a full context (" +
                                std::to_string(cfg.max_position_embeddings) + " positions)");
    }
  }
  return Status::Ok();
}

Status Model::ForwardBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                           std::vector<float>* logits) const {
  LM2_RETURN_IF_ERROR(CheckBatch(states, tokens, logits));
  const auto V = static_cast<std::size_t>(config().vocab_size);
  logits->resize(states.size() * V);
  std::vector<float> row;
  for (std::size_t i = 0; i < states.size(); ++i) {
    LM2_RETURN_IF_ERROR(Forward(*states[i], tokens.subspan(i, 1), LogitsMode::kLast, &row));
    std::copy(row.begin(), row.end(), logits->begin() + static_cast<std::ptrdiff_t>(i * V));
  }
  return Status::Ok();
}

}  // namespace lm2::runtime
