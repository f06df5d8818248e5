// Test support: the float64 golden files of tests/data/golden (format: lm2ref.testdata).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "lm2/core/status.h"
#include "support/paths.h"

namespace lm2::testing {

struct Golden {
  std::string model;                    // metadata "model"
  std::string context;                  // "keep" | "reset"
  std::vector<int32_t> tokens;          // [T]
  std::vector<int64_t> segment_lengths; // [K]
  int64_t vocab = 0;
  std::vector<double> logits;           // [T, V]
  // (segment k, layer l) -> bank [N, d] after segment k
  std::map<std::pair<int64_t, int64_t>, std::vector<double>> memory;
};

Result<Golden> LoadGolden(const std::string& path);

// ||a - b|| / ||b||.
double RelativeError(const float* a, const double* b, std::size_t n);

}  // namespace lm2::testing
