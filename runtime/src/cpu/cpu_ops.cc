#include "cpu/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace lm2::runtime::cpu {
namespace {

// BLAS takes int dimensions; every caller's dimensions are far below 2^31 (checked at model
// load), so the narrowing is safe.
inline int I(int64_t v) { return static_cast<int>(v); }
inline std::size_t Z(int64_t v) { return static_cast<std::size_t>(v); }

inline float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// In-place softmax of one row of n scores (entries may be -inf, at least one is finite).
inline void SoftmaxRow(float* row, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, row[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    row[i] = std::exp(row[i] - mx);
    sum += row[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) row[i] *= inv;
}

}  // namespace

void Linear(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y,
            bool accumulate) {
  if (rows == 0) return;
  if (rows == 1) {  // decode: a matrix-vector product; sgemm would pack all of W first
    cblas_sgemv(CblasRowMajor, CblasNoTrans, I(out), I(in), 1.0f, w, I(in), x, 1, accumulate ? 1.0f : 0.0f, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(rows), I(out), I(in), 1.0f, x, I(in), w,
              I(in), accumulate ? 1.0f : 0.0f, y, I(out));
}

void AddBias(float* y, int64_t rows, int64_t out, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = y + r * out;
    for (int64_t i = 0; i < out; ++i) row[i] += bias[i];
  }
}

void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t d, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    double ss = 0.0;  // double accumulation: d can be thousands
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
    const float scale =
        static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + static_cast<double>(eps)));
    float* o = out + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = xr[i] * scale * weight[i];
  }
}

void Rope(float* x, int64_t rows, int64_t heads, int64_t head_dim, const int64_t* positions,
          double theta) {
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(Z(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[Z(i)] = std::pow(theta, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
  }
  for (int64_t t = 0; t < rows; ++t) {
    std::vector<float> cs(Z(half)), sn(Z(half));
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(positions[t]) * inv_freq[Z(i)];
      cs[Z(i)] = static_cast<float>(std::cos(angle));
      sn[Z(i)] = static_cast<float>(std::sin(angle));
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[Z(i)] - b * sn[Z(i)];
        v[i + half] = b * cs[Z(i)] + a * sn[Z(i)];
      }
    }
  }
}

void CausalAttention(const float* q, const float* k_cache, const float* v_cache, int64_t T,
                     int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim, float* out) {
  const int64_t group = heads / kv_heads;
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> scores(Z(T * S));
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kvh = h / group;
    const float* qh = q + h * head_dim;
    const float* kh = k_cache + kvh * head_dim;
    const float* vh = v_cache + kvh * head_dim;
    // scores[T, S] = q_h · k_hᵀ * scale; then mask the future and softmax each row.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(T), I(S), I(head_dim), scale, qh,
                I(q_stride), kh, I(kv_stride), 0.0f, scores.data(), I(S));
    for (int64_t t = 0; t < T; ++t) {
      float* row = scores.data() + t * S;
      const int64_t visible = S - T + t + 1;
      std::fill(row + visible, row + S, 0.0f);
      SoftmaxRow(row, visible);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(T), I(head_dim), I(S), 1.0f,
                scores.data(), I(S), vh, I(kv_stride), 0.0f, out + h * head_dim, I(q_stride));
  }
}

void MemoryRead(const float* q, const float* mem_k, const float* mem_v, int64_t T, int64_t N,
                int64_t d, int64_t heads, float* attn, float* e) {
  const int64_t dh = d / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  for (int64_t j = 0; j < heads; ++j) {
    float* a = attn + j * T * N;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(T), I(N), I(dh), scale, q + j * dh,
                I(d), mem_k + j * dh, I(d), 0.0f, a, I(N));
    for (int64_t t = 0; t < T; ++t) SoftmaxRow(a + t * N, N);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(T), I(dh), I(N), 1.0f, a, I(N),
                mem_v + j * dh, I(d), 0.0f, e + j * dh, I(d));
  }
}

void AccumulateWrite(const float* attn, const float* offer, int64_t T, int64_t N, int64_t d,
                     int64_t heads, float* mass, float* acc) {
  const int64_t dh = d / heads;
  for (int64_t j = 0; j < heads; ++j) {
    const float* a = attn + j * T * N;
    float* m = mass + j * N;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t n = 0; n < N; ++n) m[n] += a[t * N + n];
    }
    // acc_j[N, dh] += A_jᵀ[N, T] · offer_j[T, dh]
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, I(N), I(dh), I(T), 1.0f, a, I(N),
                offer + j * dh, I(d), 1.0f, acc + j * dh, I(d));
  }
}

void WriteUpdate(const float* mass, const float* acc, int64_t N, int64_t d, int64_t heads,
                 float* u) {
  const int64_t dh = d / heads;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < heads; ++j) {
      const float inv = 1.0f / (mass[j * N + n] + 1.0f);
      for (int64_t c = 0; c < dh; ++c) u[n * d + j * dh + c] = acc[n * d + j * dh + c] * inv;
    }
  }
}

void GatedMemoryUpdate(const float* u, const float* in_pre, const float* forget_pre, int64_t n,
                       float* bank) {
  for (int64_t i = 0; i < n; ++i) {
    bank[i] = Sigmoid(in_pre[i]) * std::tanh(u[i]) + Sigmoid(forget_pre[i]) * bank[i];
  }
}

void GatedResidual(float* h, const float* a, const float* gate_pre, const float* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += a[i] + Sigmoid(gate_pre[i]) * e[i];
}

void SwiGlu(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * Sigmoid(gate[i]) * up[i];
}

void AddInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace lm2::runtime::cpu
