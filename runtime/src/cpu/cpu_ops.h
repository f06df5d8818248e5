// The CPU backend's ops: fp32, row-major, OpenBLAS for the GEMMs (and their threads).
//
// Each op states its shapes; pointers are to caller-owned buffers that must not alias
// unless said. These are the reference implementations the CUDA kernels are tested
// against (tests/runtime/cpu_ops_test.cc checks them against plain loops).
#pragma once

#include <cstdint>

namespace lm2::runtime::cpu {

// y[rows, out] = x[rows, in] · W[out, in]ᵀ (+ y when accumulate). Linear layer, y = x Wᵀ.
void Linear(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y,
            bool accumulate = false);

// y[rows, out] += bias[out] broadcast over rows.
void AddBias(float* y, int64_t rows, int64_t out, const float* bias);

// out[rows, d] = x * rsqrt(mean(x²) + eps) * weight. out may alias x.
void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t d, float eps, float* out);

// Rotary embedding in place, rotate-half convention: x[t, h, :] for t < rows, h < heads,
// pairs (i, i + head_dim/2) rotated by positions[t] * theta^(-2i/head_dim). Angles are
// computed in double, as the reference does.
void Rope(float* x, int64_t rows, int64_t heads, int64_t head_dim, const int64_t* positions,
          double theta);

// Causal grouped-query attention of T new queries over S cached keys (the last T of which
// are the new tokens): q[T, H*D], k/v cache[S, Hkv*D] (rows = positions), out[T, H*D].
// Query t sits at cache position S - T + t and sees positions <= that.
void CausalAttention(const float* q, const float* k_cache, const float* v_cache, int64_t T,
                     int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim, float* out);

// Memory read, per memory head j of width dh = d / heads:
//   A_j = softmax_N(q_j · mem_k_jᵀ / sqrt(dh))   -> attn[j, T, N]
//   e[:, j*dh:(j+1)*dh] = A_j · mem_v_j           -> e[T, d]
// q[T, d], mem_k / mem_v [N, d].
void MemoryRead(const float* q, const float* mem_k, const float* mem_v, int64_t T, int64_t N,
                int64_t d, int64_t heads, float* attn, float* e);

// Streaming write sums (docs/lm2-spec.md): mass[j, n] += Σ_t A_j[t, n],
// acc[n, j*dh + c] += Σ_t A_j[t, n] · offer[t, j*dh + c]. attn[j, T, N], offer[T, d],
// mass[heads, N], acc[N, d].
void AccumulateWrite(const float* attn, const float* offer, int64_t T, int64_t N, int64_t d,
                     int64_t heads, float* mass, float* acc);

// u[n, j*dh + c] = acc[n, j*dh + c] / (mass[j, n] + 1): what each slot receives.
void WriteUpdate(const float* mass, const float* acc, int64_t N, int64_t d, int64_t heads,
                 float* u);

// bank = g_in ⊙ tanh(u) + g_fgt ⊙ bank, where g_in / g_fgt hold the gate pre-activations
// (sigmoid applied here). All [n].
void GatedMemoryUpdate(const float* u, const float* in_pre, const float* forget_pre, int64_t n,
                       float* bank);

// h += a + sigmoid(gate_pre) ⊙ e (the memory output gate and both residual adds), [n].
void GatedResidual(float* h, const float* a, const float* gate_pre, const float* e, int64_t n);

// out[n] = silu(gate[n]) * up[n]. out may alias gate.
void SwiGlu(const float* gate, const float* up, int64_t n, float* out);

// x[n] += y[n].
void AddInPlace(float* x, const float* y, int64_t n);

}  // namespace lm2::runtime::cpu
