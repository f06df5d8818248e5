// ForwardingModel: a Model that passes every call to another one, for wrappers that change
// or observe a few calls (timing a DecodeBatcher's batched calls, slowing them in a test)
// and override only those.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lm2/runtime/model.h"

namespace lm2::runtime {

class ForwardingModel : public Model {
 public:
  // `inner` must outlive this model; its states are this model's.
  explicit ForwardingModel(const Model& inner) : inner_(inner) {}

  const ModelConfig& config() const override { return inner_.config(); }
  const std::string& fingerprint() const override { return inner_.fingerprint(); }
  std::string backend_name() const override { return inner_.backend_name(); }
  bool OwnsState(const SequenceState& state) const override { return inner_.OwnsState(state); }
  Result<std::unique_ptr<SequenceState>> NewState() const override { return inner_.NewState(); }
  Status Forward(SequenceState& state, std::span<const int32_t> tokens, LogitsMode mode,
                 std::vector<float>* logits) const override {
    return inner_.Forward(state, tokens, mode, logits);
  }
  Status ForwardBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                      std::vector<float>* logits) const override {
    return inner_.ForwardBatch(states, tokens, logits);
  }
  bool BatchesSteps() const override { return inner_.BatchesSteps(); }
  Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                            std::span<const TokenRule> rules, std::vector<int32_t>* next) const override {
    return inner_.ForwardBatchSample(states, tokens, rules, next);
  }
  Status EndSegment(SequenceState& state) const override { return inner_.EndSegment(state); }
  void ResetContext(SequenceState& state) const override { inner_.ResetContext(state); }
  Status ImportMemory(SequenceState& state, const MemoryState& memory) const override {
    return inner_.ImportMemory(state, memory);
  }
  Result<std::vector<std::vector<float>>> SegmentReadMass(const SequenceState& state) const override {
    return inner_.SegmentReadMass(state);
  }

 protected:
  Status ExportBanks(const SequenceState& state, MemoryState& out) const override {
    return inner_.ExportMemoryInto(state, out);
  }
  const Model& inner() const { return inner_; }

 private:
  const Model& inner_;
};

}  // namespace lm2::runtime
