// MemoryState: the session-facing state of an LM2 model's memory, as a plain value.
//
// The runtime exports and imports it; persistence stores it; neither knows the other.
// Per memory layer an N x d fp32 tensor (row-major, slot-major), plus the fingerprint of
// the model that computed it: a bank is only meaningful for that model.
//
// Ownership: owns its data. Copying a bank can mean hundreds of MiB, so copies are
// explicit (Clone()); moves are cheap. Not thread-safe for concurrent mutation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lm2 {

struct MemoryLayer {
  int32_t layer = 0;        // index of the decoder layer this bank belongs to
  int64_t slots = 0;        // N
  int64_t dim = 0;          // d
  std::vector<float> data;  // N * d values, row i = slot i

  std::size_t size() const { return data.size(); }
};

struct MemoryState {
  std::string model_fingerprint;    // ModelFiles::Fingerprint() of the computing model
  std::vector<MemoryLayer> layers;  // in increasing layer order

  MemoryState() = default;
  MemoryState(MemoryState&&) noexcept = default;
  MemoryState& operator=(MemoryState&&) noexcept = default;
  MemoryState(const MemoryState&) = delete;
  MemoryState& operator=(const MemoryState&) = delete;

  MemoryState Clone() const {
    MemoryState out;
    out.model_fingerprint = model_fingerprint;
    out.layers = layers;
    return out;
  }
  // Total number of fp32 values across layers.
  std::size_t TotalValues() const {
    std::size_t n = 0;
    for (const auto& l : layers) n += l.data.size();
    return n;
  }
};

}  // namespace lm2
