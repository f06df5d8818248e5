// The memory write: the streamed sums a segment accumulates (AccumulateWrite), what each
// slot receives at the segment's end (WriteUpdate), and the gated commit into the bank
// (GatedMemoryUpdate). All fp32: the bank is fp32 state (docs/lm2-spec.md).
//
// AccumulateWrite: the slot masses by a column-sum kernel, acc_j += attn_jᵀ · offer_j by a
// strided-batched GEMM over the memory heads (TF32 tensor cores, fp32 accumulation).
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
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

// u[n, col] = acc[n, col] / (mass[j, n] + 1), and its bf16 rounding into u_b.
__global__ void WriteUpdateKernel(const float* __restrict__ mass, const float* __restrict__ acc, int64_t N,
                                  int64_t d, int64_t dh, float* __restrict__ u, __nv_bfloat16* __restrict__ u_b) {
  for (int64_t i = FirstIndex(); i < N * d; i += GridStride()) {
    const int64_t n = i / d, j = (i % d) / dh;
    u[i] = acc[i] * (1.0f / (mass[j * N + n] + 1.0f));
    u_b[i] = __float2bfloat16_rn(u[i]);
  }
}

__global__ void GatedMemoryUpdateKernel(const float* __restrict__ u, const float* __restrict__ in_pre,
                                        const float* __restrict__ in_bias, const float* __restrict__ forget_pre,
                                        const float* __restrict__ forget_bias, int64_t n, int64_t width,
                                        float* __restrict__ bank) {
  for (int64_t i = FirstIndex(); i < n; i += GridStride()) {
    const int64_t c = i % width;
    bank[i] = Sigmoid(in_pre[i] + in_bias[c]) * tanhf(u[i]) + Sigmoid(forget_pre[i] + forget_bias[c]) * bank[i];
  }
}

LM2_CUDA_KERNEL_MODULE(AccumulateMassKernel);

}  // namespace

Status AccumulateWrite(cublasHandle_t handle, const float* attn, const float* offer, int64_t offer_ld, int64_t T, int64_t N, int64_t d,
                       int64_t heads, float* mass, float* acc, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("AccumulateWrite", T, N, d, heads));
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("AccumulateWrite", {handle, attn, offer, mass, acc}));
  if (offer_ld < d) return Status::InvalidArgument("AccumulateWrite: offer_ld " + std::to_string(offer_ld) + " < d");
  AccumulateMassKernel<<<GridFor(heads * N, kThreads), kThreads, 0, stream>>>(attn, T, N, heads, mass);
  LM2_RETURN_IF_ERROR(CheckLaunch("AccumulateMassKernel"));
  // Row-major acc_j [N, dh] += attn_j [T, N]ᵀ · offer_j [T, dh] (column-major: dh x N =
  // offer_j · attn_jᵀ, with attn_j read as the N x T column-major matrix it is).
  const int64_t dh = d / heads;
  return GemmStridedBatchedF32(handle, CUBLAS_OP_N, CUBLAS_OP_T, dh, N, T, 1.0f, offer, offer_ld, dh, attn, N, T * N, 1.0f,
                               acc, d, dh, heads, stream);
}

Status WriteUpdate(const float* mass, const float* acc, int64_t N, int64_t d, int64_t heads, float* u,
                   __nv_bfloat16* u_b, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("WriteUpdate", 0, N, d, heads));
  LM2_RETURN_IF_ERROR(RequireNonNull("WriteUpdate", {mass, acc, u, u_b}));
  WriteUpdateKernel<<<GridFor(N * d, kThreads), kThreads, 0, stream>>>(mass, acc, N, d, d / heads, u, u_b);
  return CheckLaunch("WriteUpdateKernel");
}

Status GatedMemoryUpdate(const float* u, const float* in_pre, const float* in_bias, const float* forget_pre,
                         const float* forget_bias, int64_t rows, int64_t width, float* bank, cudaStream_t stream) {
  if (rows < 0 || width <= 0) {
    return Status::InvalidArgument("GatedMemoryUpdate: rows=" + std::to_string(rows) + " width=" + std::to_string(width));
  }
  const int64_t n = rows * width;
  LM2_RETURN_IF_ERROR(ops::CheckCount("GatedMemoryUpdate", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("GatedMemoryUpdate", {u, in_pre, in_bias, forget_pre, forget_bias, bank}));
  GatedMemoryUpdateKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(u, in_pre, in_bias, forget_pre, forget_bias,
                                                                         n, width, bank);
  return CheckLaunch("GatedMemoryUpdateKernel");
}

}  // namespace lm2::runtime::cuda
