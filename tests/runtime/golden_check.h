// Test support: a whole model (any backend) against the float64 golden files of one test
// model, with Catch2 checks. Shared by the CPU and CUDA model tests.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
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

// ExportMemoryInto against ExportMemory on `state` (no segment open): into a bank of the
// export's shape (its values poisoned), each layer's vector keeps its memory and gets the
// exported values; into a misshapen bank (another fingerprint, a layer of another index and
// size, an extra layer), the export's shape and values.
inline void CheckExportInto(const runtime::Model& model, const runtime::SequenceState& state) {
  auto want = model.ExportMemory(state);
  INFO(want.status().ToString());
  REQUIRE(want.ok());
  MemoryState kept = want->Clone();
  std::vector<const float*> where;
  for (MemoryLayer& l : kept.layers) {
    std::fill(l.data.begin(), l.data.end(), std::nanf(""));
    where.push_back(l.data.data());
  }
  REQUIRE(model.ExportMemoryInto(state, kept).ok());
  REQUIRE(kept.layers.size() == want->layers.size());
  for (std::size_t k = 0; k < kept.layers.size(); ++k) {
    CHECK(kept.layers[k].data.data() == where[k]);  // reused, not reallocated
    CHECK(kept.layers[k].data == want->layers[k].data);
  }
  MemoryState odd = want->Clone();
  odd.model_fingerprint = "another model";
  if (!odd.layers.empty()) {
    odd.layers[0].layer = 99;
    odd.layers[0].data.resize(3);
  }
  odd.layers.push_back(MemoryLayer{7, 1, 1, {1.0f}});
  REQUIRE(model.ExportMemoryInto(state, odd).ok());
  CHECK(odd.model_fingerprint == want->model_fingerprint);
  REQUIRE(odd.layers.size() == want->layers.size());
  for (std::size_t k = 0; k < odd.layers.size(); ++k) {
    CHECK(odd.layers[k].layer == want->layers[k].layer);
    CHECK(odd.layers[k].slots == want->layers[k].slots);
    CHECK(odd.layers[k].dim == want->layers[k].dim);
    CHECK(odd.layers[k].data == want->layers[k].data);
  }
}

// A prompt on three states of `model`, read as kAll, kLast and kNone. A backend's last layer
// computes its attention output, output gate and FFN only for the rows a call reads (the
// last, or none), so kLast's logits must be kAll's last row up to the rounding of the
// kernels a single row takes (returned: the relative error, which the caller bounds), and
// the three states must go on bit-identically: every row's K/V cache and write sums were
// made either way. Checked by `steps` decode steps on all three (the same logits, bit for
// bit) and the banks at the segment's end.
inline double CheckRowsRead(const runtime::Model& model, const std::vector<int32_t>& prompt, int steps) {
  using runtime::LogitsMode;
  auto a = NewState(model), b = NewState(model), c = NewState(model);
  std::vector<float> all, last, none;
  REQUIRE(model.Forward(*a, prompt, LogitsMode::kAll, &all).ok());
  REQUIRE(model.Forward(*b, prompt, LogitsMode::kLast, &last).ok());
  REQUIRE(model.Forward(*c, prompt, LogitsMode::kNone, nullptr).ok());
  const std::size_t V = last.size();
  REQUIRE(all.size() == prompt.size() * V);
  const std::vector<double> ref(all.end() - static_cast<std::ptrdiff_t>(V), all.end());
  const double error = RelativeError(last.data(), ref.data(), V);
  int32_t next = static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
  for (int i = 0; i < steps; ++i) {
    INFO("decode step " << i);
    const std::vector<int32_t> token = {next};
    REQUIRE(model.Forward(*a, token, LogitsMode::kLast, &all).ok());
    REQUIRE(model.Forward(*b, token, LogitsMode::kLast, &last).ok());
    REQUIRE(model.Forward(*c, token, LogitsMode::kLast, &none).ok());
    CHECK(all == last);
    CHECK(all == none);
    next = static_cast<int32_t>(std::max_element(all.begin(), all.end()) - all.begin());
  }
  for (auto* s : {a.get(), b.get(), c.get()}) REQUIRE(model.EndSegment(*s).ok());
  auto ma = model.ExportMemory(*a), mb = model.ExportMemory(*b), mc = model.ExportMemory(*c);
  REQUIRE((ma.ok() && mb.ok() && mc.ok()));
  REQUIRE((ma->layers.size() == mb->layers.size() && ma->layers.size() == mc->layers.size()));
  for (std::size_t l = 0; l < ma->layers.size(); ++l) {
    INFO("memory layer " << ma->layers[l].layer);
    CHECK(ma->layers[l].data == mb->layers[l].data);
    CHECK(ma->layers[l].data == mc->layers[l].data);
  }
  return error;
}

}  // namespace lm2::testing
