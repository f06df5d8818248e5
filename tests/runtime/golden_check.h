// Test support: a whole model (any backend) against the float64 golden files of one test
// model, with Catch2 checks. Shared by the CPU and CUDA model tests.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "golden.h"
#include "lm2/runtime/model.h"

namespace lm2::testing {

inline std::unique_ptr<runtime::SequenceState> NewState(const runtime::Model& m) {
  auto s = m.NewState();
  INFO(s.status().ToString());
  REQUIRE(s.ok());
  return std::move(s).value();
}

inline std::vector<int32_t> Slice(const std::vector<int32_t>& v, std::size_t begin, std::size_t n) {
  return {v.begin() + static_cast<std::ptrdiff_t>(begin), v.begin() + static_cast<std::ptrdiff_t>(begin + n)};
}

// Runs every golden case of test model `name` (keep3, reset3, empty-segment) on `model`,
// segment by segment, checking the logits within `logits_tolerance` and the bank after
// each segment within `bank_tolerance` (relative errors). Returns the worst of each.
inline std::pair<double, double> CheckGoldenCases(const runtime::Model& model, const std::string& name,
                                                  double logits_tolerance, double bank_tolerance) {
  double worst_logits = 0, worst_bank = 0;
  const auto& cfg = model.config();
  for (const char* case_name : {"keep3", "reset3", "empty-segment"}) {
    INFO(name << "/" << case_name);
    auto golden = LoadGolden(SourceDir() + "/tests/data/golden/" + name + "/" + case_name + ".safetensors");
    REQUIRE(golden.ok());
    const Golden& g = *golden;
    REQUIRE(g.vocab == cfg.vocab_size);
    auto state = NewState(model);
    std::size_t offset = 0;
    for (std::size_t k = 0; k < g.segment_lengths.size(); ++k) {
      const auto n = static_cast<std::size_t>(g.segment_lengths[k]);
      if (g.context == "reset") model.ResetContext(*state);
      std::vector<float> logits;
      REQUIRE(model.Forward(*state, Slice(g.tokens, offset, n), runtime::LogitsMode::kAll, &logits).ok());
      REQUIRE(logits.size() == n * static_cast<std::size_t>(cfg.vocab_size));
      if (n > 0) {
        const double err =
            RelativeError(logits.data(), g.logits.data() + offset * static_cast<std::size_t>(g.vocab), logits.size());
        INFO("segment " << k << " logits rel err " << err);
        CHECK(err <= logits_tolerance);
        worst_logits = std::max(worst_logits, err);
      }
      REQUIRE(model.EndSegment(*state).ok());
      auto memory = model.ExportMemory(*state);
      REQUIRE(memory.ok());
      REQUIRE(memory->layers.size() == cfg.memory_layers.size());
      for (const auto& layer : memory->layers) {
        const auto& want = g.memory.at({static_cast<int64_t>(k), layer.layer});
        REQUIRE(want.size() == layer.data.size());
        const double err = RelativeError(layer.data.data(), want.data(), want.size());
        INFO("segment " << k << " layer " << layer.layer << " memory rel err " << err);
        CHECK(err <= bank_tolerance);
        worst_bank = std::max(worst_bank, err);
      }
      offset += n;
    }
  }
  return {worst_logits, worst_bank};
}

}  // namespace lm2::testing
