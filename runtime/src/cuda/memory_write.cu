// The memory write: the streamed sums a segment accumulates (AccumulateWrite), what each
// slot receives at the segment's end (WriteUpdate), and the gated commit into the bank
// (GatedMemoryUpdate). All fp32: the bank is fp32 state (docs/lm2-spec.md).
//
// AccumulateWrite is a plain kernel (a thread per output, a loop over the T tokens of the
// call); a strided-batched GEMM is the faster form for long prefills (docs/cuda.md).
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// mass[j, n] += Σ_t attn[j, t, n]; a thread per (j, n).
__global__ void AccumulateMassKernel(const float* __restrict__ attn, int64_t T, int64_t N, int64_t heads,
                                     float* __restrict__ mass) {
  for (int64_t i = FirstIndex(); i < heads * N; i += GridStride()) {
    const int64_t j = i / N, n = i % N;
    const float* a = attn + j * T * N + n;
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) s += a[t * N];
    mass[i] += s;
  }
}

// acc[n, col] += Σ_t attn[j, t, n] · offer[t, col], j = col / dh; a thread per (n, col).
__global__ void AccumulateAccKernel(const float* __restrict__ attn, const float* __restrict__ offer, int64_t T,
                                    int64_t N, int64_t d, int64_t dh, float* __restrict__ acc) {
  for (int64_t i = FirstIndex(); i < N * d; i += GridStride()) {
    const int64_t n = i / d, col = i % d, j = col / dh;
    const float* a = attn + j * T * N + n;
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) s += a[t * N] * offer[t * d + col];
    acc[i] += s;
  }
}

// u[n, col] = acc[n, col] / (mass[j, n] + 1).
__global__ void WriteUpdateKernel(const float* __restrict__ mass, const float* __restrict__ acc, int64_t N,
                                  int64_t d, int64_t dh, float* __restrict__ u) {
  for (int64_t i = FirstIndex(); i < N * d; i += GridStride()) {
    const int64_t n = i / d, j = (i % d) / dh;
    u[i] = acc[i] * (1.0f / (mass[j * N + n] + 1.0f));
  }
}

__global__ void GatedMemoryUpdateKernel(const float* __restrict__ u, const float* __restrict__ in_pre,
                                        const float* __restrict__ forget_pre, int64_t n, float* __restrict__ bank) {
  for (int64_t i = FirstIndex(); i < n; i += GridStride()) {
    bank[i] = Sigmoid(in_pre[i]) * tanhf(u[i]) + Sigmoid(forget_pre[i]) * bank[i];
  }
}

}  // namespace

Status AccumulateWrite(const float* attn, const float* offer, int64_t T, int64_t N, int64_t d, int64_t heads,
                       float* mass, float* acc, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("AccumulateWrite", T, N, d, heads));
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("AccumulateWrite", {attn, offer, mass, acc}));
  AccumulateMassKernel<<<GridFor(heads * N, kThreads), kThreads, 0, stream>>>(attn, T, N, heads, mass);
  LM2_RETURN_IF_ERROR(CheckLaunch("AccumulateMassKernel"));
  AccumulateAccKernel<<<GridFor(N * d, kThreads), kThreads, 0, stream>>>(attn, offer, T, N, d, d / heads, acc);
  return CheckLaunch("AccumulateAccKernel");
}

Status WriteUpdate(const float* mass, const float* acc, int64_t N, int64_t d, int64_t heads, float* u,
                   cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("WriteUpdate", 0, N, d, heads));
  LM2_RETURN_IF_ERROR(RequireNonNull("WriteUpdate", {mass, acc, u}));
  WriteUpdateKernel<<<GridFor(N * d, kThreads), kThreads, 0, stream>>>(mass, acc, N, d, d / heads, u);
  return CheckLaunch("WriteUpdateKernel");
}

Status GatedMemoryUpdate(const float* u, const float* in_pre, const float* forget_pre, int64_t n, float* bank,
                         cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCount("GatedMemoryUpdate", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("GatedMemoryUpdate", {u, in_pre, forget_pre, bank}));
  GatedMemoryUpdateKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(u, in_pre, forget_pre, n, bank);
  return CheckLaunch("GatedMemoryUpdateKernel");
}

}  // namespace lm2::runtime::cuda
