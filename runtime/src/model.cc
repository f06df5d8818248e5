#include "lm2/runtime/model.h"

#include <algorithm>
#include <string>

namespace lm2::runtime {

Status Model::CheckForward(int64_t context_length, std::span<const int32_t> tokens, LogitsMode mode,
                          const std::vector<float>* logits) const {
  const ModelConfig& cfg = config();
  const auto T = static_cast<int64_t>(tokens.size());
  if (context_length + T > cfg.max_position_embeddings) {
    return Status::OutOfRange("context of " + std::to_string(context_length + T) +
                              " positions exceeds max_position_embeddings=" +
                              std::to_string(cfg.max_position_embeddings));
  }
  for (int32_t id : tokens) {
    if (id < 0 || id >= cfg.vocab_size) {
      return Status::InvalidArgument("token id " + std::to_string(id) + " outside the vocabulary of " +
                                     std::to_string(cfg.vocab_size));
    }
  }
  if (mode != LogitsMode::kNone && logits == nullptr) {
    return Status::InvalidArgument("Forward: logits requested but no output vector given");
  }
  return Status::Ok();
}

Status Model::CheckBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                         const void* output) const {
  if (states.empty() || states.size() != tokens.size()) {
    return Status::InvalidArgument("ForwardBatch: " + std::to_string(states.size()) + " states and " +
                                   std::to_string(tokens.size()) + " tokens (need one token per state, at least one)");
  }
  if (output == nullptr) return Status::InvalidArgument("ForwardBatch: no output vector");
  std::vector<const SequenceState*> seen(states.begin(), states.end());
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) {
    return Status::InvalidArgument("ForwardBatch: a state appears twice");
  }
  for (std::size_t i = 0; i < states.size(); ++i) {
    const SequenceState* s = states[i];
    if (s == nullptr) return Status::InvalidArgument("ForwardBatch: a null state");
    if (!OwnsState(*s)) return Status::InvalidArgument("ForwardBatch: a state belongs to another model");
    Status st = CheckForward(s->context_length(), tokens.subspan(i, 1), LogitsMode::kNone, nullptr);
    if (!st.ok()) return Status(st.code(), "ForwardBatch: state " + std::to_string(i) + ": " + std::string(st.message()));
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

Status Model::CheckSampleBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                               std::span<const TokenRule> rules, const std::vector<int32_t>* next) const {
  LM2_RETURN_IF_ERROR(CheckBatch(states, tokens, next));
  if (rules.size() != states.size()) {
    return Status::InvalidArgument("ForwardBatchSample: " + std::to_string(rules.size()) + " rules for " +
                                   std::to_string(states.size()) + " states");
  }
  for (std::size_t i = 0; i < rules.size(); ++i) {
    Status st = ValidateTokenRule(rules[i]);
    if (!st.ok()) return Status(st.code(), "ForwardBatchSample: rule " + std::to_string(i) + ": " + std::string(st.message()));
  }
  return Status::Ok();
}

Status Model::ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                 std::span<const TokenRule> rules, std::vector<int32_t>* next) const {
  LM2_RETURN_IF_ERROR(CheckSampleBatch(states, tokens, rules, next));
  std::vector<float> logits;
  LM2_RETURN_IF_ERROR(ForwardBatch(states, tokens, &logits));
  const auto V = static_cast<std::size_t>(config().vocab_size);
  next->resize(states.size());
  PickScratch scratch;
  for (std::size_t i = 0; i < states.size(); ++i) {
    (*next)[i] = PickToken(std::span<const float>(logits).subspan(i * V, V), rules[i], scratch);
  }
  return Status::Ok();
}

Status Model::ForwardBatchGreedy(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                 std::vector<int32_t>* next) const {
  const std::vector<TokenRule> greedy(states.size());
  return ForwardBatchSample(states, tokens, greedy, next);
}

Result<MemoryState> Model::ExportMemory(const SequenceState& state) const {
  MemoryState out;
  LM2_RETURN_IF_ERROR(ExportMemoryInto(state, out));
  return out;
}

Status Model::ExportMemoryInto(const SequenceState& state, MemoryState& out) const {
  Status s = ExportBanks(state, out);
  if (!s.ok()) out = MemoryState();
  return s;
}

void Model::ShapeExport(MemoryState& out) const {
  const ModelConfig& cfg = config();
  out.model_fingerprint = fingerprint();
  out.layers.resize(cfg.memory_layers.size());
  for (std::size_t k = 0; k < out.layers.size(); ++k) {
    MemoryLayer& ml = out.layers[k];
    ml.layer = static_cast<int32_t>(cfg.memory_layers[k]);
    ml.slots = cfg.memory_slots;
    ml.dim = cfg.hidden_size;
    ml.data.resize(static_cast<std::size_t>(cfg.memory_slots * cfg.hidden_size));
  }
}

Status Model::CheckImport(const MemoryState& memory) const {
  if (memory.model_fingerprint != fingerprint()) {
    return Status::FailedPrecondition("memory bank was computed by another model (fingerprint " +
                                      memory.model_fingerprint.substr(0, 16) + "..., this model " +
                                      fingerprint().substr(0, 16) + "...)");
  }
  const ModelConfig& cfg = config();
  const std::vector<int64_t>& expected = cfg.memory_layers;
  if (memory.layers.size() != expected.size()) {
    return Status::InvalidArgument("memory has " + std::to_string(memory.layers.size()) + " layers, the model " +
                                   std::to_string(expected.size()));
  }
  for (std::size_t k = 0; k < expected.size(); ++k) {
    const MemoryLayer& ml = memory.layers[k];
    if (ml.layer != expected[k] || ml.slots != cfg.memory_slots || ml.dim != cfg.hidden_size ||
        ml.data.size() != static_cast<std::size_t>(cfg.memory_slots * cfg.hidden_size)) {
      return Status::InvalidArgument("memory layer " + std::to_string(k) + " does not match the model (layer " +
                                     std::to_string(ml.layer) + ", " + std::to_string(ml.slots) + "x" +
                                     std::to_string(ml.dim) + ")");
    }
  }
  return Status::Ok();
}

std::vector<float> Model::ReadMassPerSlot(const float* mass) const {
  const auto N = static_cast<std::size_t>(config().memory_slots);
  const auto heads = static_cast<std::size_t>(config().memory_heads);
  std::vector<float> per_slot(N, 0.0f);
  for (std::size_t j = 0; j < heads; ++j) {
    for (std::size_t n = 0; n < N; ++n) per_slot[n] += mass[j * N + n];
  }
  return per_slot;
}

}  // namespace lm2::runtime
