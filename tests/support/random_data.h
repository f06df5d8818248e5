// Test support for op tests: random inputs with a printed seed (so a failure can be
// replayed), the reference math in double, and the relative error of a float result
// against a double reference.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace lm2::testing {

// One generator per test executable, seeded from the OS; the seed is printed once.
inline std::mt19937& Rng() {
  static std::mt19937 rng = [] {
    const unsigned seed = std::random_device{}();
    std::printf("random seed %u\n", seed);
    return std::mt19937(seed);
  }();
  return rng;
}

// n values from N(0, scale²).
inline std::vector<float> RandomVector(std::size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(Rng());
  return v;
}

// The reference math of the op tests, in double.
inline double Sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// In-place softmax of each of `rows` rows of `cols` values.
inline void SoftmaxRows(std::vector<double>& s, std::size_t rows, std::size_t cols) {
  for (std::size_t r = 0; r < rows; ++r) {
    double mx = -1e300, sum = 0;
    for (std::size_t c = 0; c < cols; ++c) mx = std::max(mx, s[r * cols + c]);
    for (std::size_t c = 0; c < cols; ++c) sum += (s[r * cols + c] = std::exp(s[r * cols + c] - mx));
    for (std::size_t c = 0; c < cols; ++c) s[r * cols + c] /= sum;
  }
}

// ‖got − want‖ / ‖want‖; NaN (so any `< bound` check fails) if an output was skipped and
// still holds its NaN poison.
inline double RelErr(const std::vector<float>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

}  // namespace lm2::testing
