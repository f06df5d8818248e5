// Each CPU op against a plain double-precision loop written from docs/lm2-spec.md, on
// fresh random inputs with the outputs poisoned (NaN) beforehand, so an op that skips an
// element fails. The CUDA kernels will be tested against these same ops.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "cpu/cpu_ops.h"
#include "support/random_data.h"

using namespace lm2::runtime::cpu;

namespace {

using lm2::testing::RelErr;

std::vector<float> Random(std::size_t n, float scale = 1.0f) { return lm2::testing::RandomVector(n, scale); }

std::vector<float> Poisoned(std::size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

using lm2::testing::Sig;
using lm2::testing::SoftmaxRows;

constexpr double kTol = 1e-5;

}  // namespace

TEST_CASE("Linear and AddBias", "[ops]") {
  const int64_t rows = 7, in = 33, out = 19;
  auto x = Random(rows * in), w = Random(out * in), b = Random(out);
  auto y = Poisoned(rows * out);
  Linear(x.data(), rows, in, w.data(), out, y.data());
  AddBias(y.data(), rows, out, b.data());
  std::vector<double> want(rows * out);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b[o];
      for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[r * in + i]) * w[o * in + i];
      want[r * out + o] = acc;
    }
  CHECK(RelErr(y, want) < kTol);
  // accumulate adds to what is there
  Linear(x.data(), rows, in, w.data(), out, y.data(), /*accumulate=*/true);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) want[r * out + o] = 2 * want[r * out + o] - b[o];
  CHECK(RelErr(y, want) < kTol);
}

TEST_CASE("RmsNorm", "[ops]") {
  const int64_t rows = 5, d = 96;
  auto x = Random(rows * d, 3.0f), w = Random(d);
  auto y = Poisoned(rows * d);
  RmsNorm(x.data(), w.data(), rows, d, 1e-5f, y.data());
  std::vector<double> want(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[r * d + i]) * x[r * d + i];
    const double s = 1.0 / std::sqrt(ss / d + 1e-5);
    for (int64_t i = 0; i < d; ++i) want[r * d + i] = x[r * d + i] * s * w[i];
  }
  CHECK(RelErr(y, want) < kTol);
}

TEST_CASE("Rope rotates pairs (i, i + D/2)", "[ops]") {
  const int64_t rows = 6, heads = 3, D = 16;
  auto x = Random(rows * heads * D);
  std::vector<int64_t> pos = {0, 1, 5, 17, 200, 4095};
  auto y = x;
  Rope(y.data(), rows, heads, D, pos.data(), 10000.0);
  std::vector<double> want(x.size());
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double ang = static_cast<double>(pos[t]) * std::pow(10000.0, -2.0 * static_cast<double>(i) / D);
        const std::size_t a = (t * heads + h) * D + i, b = a + D / 2;
        want[a] = x[a] * std::cos(ang) - x[b] * std::sin(ang);
        want[b] = x[b] * std::cos(ang) + x[a] * std::sin(ang);
      }
  CHECK(RelErr(y, want) < kTol);
}

TEST_CASE("CausalAttention with grouped KV heads over a cache", "[ops]") {
  for (auto [T, S] : {std::pair<int64_t, int64_t>{1, 9}, {4, 4}, {5, 12}}) {
    const int64_t H = 6, Hkv = 2, D = 8;
    auto q = Random(T * H * D), k = Random(S * Hkv * D), v = Random(S * Hkv * D);
    auto out = Poisoned(T * H * D);
    CausalAttention(q.data(), k.data(), v.data(), T, S, H, Hkv, D, out.data());
    const auto want = lm2::testing::CausalAttentionReference(q, k, v, T, S, H, Hkv, D);
    INFO("T=" << T << " S=" << S);
    CHECK(RelErr(out, want) < kTol);
  }
}

TEST_CASE("Memory read, streamed write sums, write update and gated update", "[ops]") {
  const int64_t T = 5, N = 12, d = 16, Hm = 4, dh = d / Hm;
  auto q = Random(T * d), mk = Random(N * d), mv = Random(N * d), offer = Random(T * d);
  auto attn = Poisoned(Hm * T * N), e = Poisoned(T * d);
  MemoryRead(q.data(), mk.data(), mv.data(), T, N, d, Hm, attn.data(), e.data());
  std::vector<double> want_attn(Hm * T * N), want_e(T * d, 0.0);
  for (int64_t j = 0; j < Hm; ++j) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double dot = 0;
        for (int64_t c = 0; c < dh; ++c) dot += static_cast<double>(q[t * d + j * dh + c]) * mk[n * d + j * dh + c];
        want_attn[(j * T + t) * N + n] = dot / std::sqrt(static_cast<double>(dh));
      }
  }
  SoftmaxRows(want_attn, Hm * T, N);
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < dh; ++c)
          want_e[t * d + j * dh + c] += want_attn[(j * T + t) * N + n] * mv[n * d + j * dh + c];
  CHECK(RelErr(attn, want_attn) < kTol);
  CHECK(RelErr(e, want_e) < kTol);

  // Streamed in two calls (3 tokens, then 2) equals the batch formula Σ A, Aᵀ C.
  std::vector<float> mass(Hm * N, 0.0f), acc(N * d, 0.0f);
  std::vector<float> attn_a(Hm * 3 * N), attn_b(Hm * 2 * N);
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n)
        (t < 3 ? attn_a[(j * 3 + t) * N + n] : attn_b[(j * 2 + t - 3) * N + n]) = attn[(j * T + t) * N + n];
  AccumulateWrite(attn_a.data(), offer.data(), 3, N, d, Hm, mass.data(), acc.data());
  AccumulateWrite(attn_b.data(), offer.data() + 3 * d, 2, N, d, Hm, mass.data(), acc.data());
  std::vector<double> want_mass(Hm * N, 0.0), want_acc(N * d, 0.0);
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        const double a = want_attn[(j * T + t) * N + n];
        want_mass[j * N + n] += a;
        for (int64_t c = 0; c < dh; ++c) want_acc[n * d + j * dh + c] += a * offer[t * d + j * dh + c];
      }
  CHECK(RelErr(mass, want_mass) < kTol);
  CHECK(RelErr(acc, want_acc) < kTol);

  auto u = Poisoned(N * d);
  WriteUpdate(mass.data(), acc.data(), N, d, Hm, u.data());
  std::vector<double> want_u(N * d);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < Hm; ++j)
      for (int64_t c = 0; c < dh; ++c)
        want_u[n * d + j * dh + c] = want_acc[n * d + j * dh + c] / (want_mass[j * N + n] + 1.0);
  CHECK(RelErr(u, want_u) < kTol);

  auto in_pre = Random(N * d), f_pre = Random(N * d), bank = Random(N * d);
  auto old = bank;
  GatedMemoryUpdate(u.data(), in_pre.data(), f_pre.data(), N * d, bank.data());
  std::vector<double> want_bank(N * d);
  for (int64_t i = 0; i < N * d; ++i) want_bank[i] = Sig(in_pre[i]) * std::tanh(static_cast<double>(u[i])) + Sig(f_pre[i]) * old[i];
  CHECK(RelErr(bank, want_bank) < kTol);
}

TEST_CASE("GatedResidual, SwiGlu, AddInPlace", "[ops]") {
  const int64_t n = 257;
  auto h = Random(n), a = Random(n), g = Random(n), e = Random(n), up = Random(n);
  auto h2 = h;
  GatedResidual(h2.data(), a.data(), g.data(), e.data(), n);
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = static_cast<double>(h[i]) + a[i] + Sig(g[i]) * e[i];
  CHECK(RelErr(h2, want) < kTol);
  auto out = Poisoned(n);
  SwiGlu(g.data(), up.data(), n, out.data());
  for (int64_t i = 0; i < n; ++i) want[i] = g[i] * Sig(g[i]) * up[i];
  CHECK(RelErr(out, want) < kTol);
  auto x = h;
  AddInPlace(x.data(), a.data(), n);
  for (int64_t i = 0; i < n; ++i) want[i] = static_cast<double>(h[i]) + a[i];
  CHECK(RelErr(x, want) < kTol);
}
