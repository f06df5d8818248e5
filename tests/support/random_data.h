// Test support for op tests: random inputs with a printed seed (so a failure can be
// replayed), the reference math in double, and the relative error of a float result
// against a double reference.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// Causal grouped-query attention in double: q [T, H*D] over a cache k, v [S, Hkv*D] whose
// last T rows are the queries' own positions (query t sees positions <= S - T + t).
inline std::vector<double> CausalAttentionReference(const std::vector<float>& q, const std::vector<float>& k,
                                                    const std::vector<float>& v, int64_t T, int64_t S, int64_t H,
                                                    int64_t Hkv, int64_t D) {
  std::vector<double> want(static_cast<std::size_t>(T * H * D), 0.0);
  auto at = [](int64_t i) { return static_cast<std::size_t>(i); };
  for (int64_t h = 0; h < H; ++h) {
    const int64_t kv = h / (H / Hkv);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t visible = S - T + t + 1;
      std::vector<double> s(at(visible));
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (int64_t c = 0; c < D; ++c) dot += static_cast<double>(q[at((t * H + h) * D + c)]) * k[at((j * Hkv + kv) * D + c)];
        s[at(j)] = dot / std::sqrt(static_cast<double>(D));
      }
      SoftmaxRows(s, 1, at(visible));
      for (int64_t j = 0; j < visible; ++j) {
        for (int64_t c = 0; c < D; ++c) want[at((t * H + h) * D + c)] += s[at(j)] * v[at((j * Hkv + kv) * D + c)];
      }
    }
  }
  return want;
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
