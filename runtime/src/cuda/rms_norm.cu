// RMSNorm: one block per row, fp32 sum of squares reduced across the block. Launched by
// LaunchPdl, waiting for its predecessor at its very start (device_math.cuh).
#include <cuda_bf16.h>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// x and out may alias: every read of a row happens before the reduction's barrier, and
// each element is then read and written by the same thread.
template <typename Out>
__device__ __forceinline__ Out FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Four outputs at once (16-byte loads of x and the weight).
__device__ __forceinline__ void Store4(float* o, float4 v) { *reinterpret_cast<float4*>(o) = v; }
__device__ __forceinline__ void Store4(__nv_bfloat16* o, float4 v) { *reinterpret_cast<uint2*>(o) = PackBf16x4(v); }

// `vec`: d a multiple of 4, x, weight and out 16-byte aligned: the output pass four
// elements a thread (the same products; the statistic is InvRms's either way).
template <typename Out>
__global__ void RmsNormKernel(const float* x, const float* __restrict__ weight, int64_t d, float eps, bool vec,
                              Out* out) {
  __shared__ float scratch[32];
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  const int64_t row = blockIdx.x;
  const float* xr = x + row * d;
  Out* o = out + row * d;
  const float scale = InvRms(xr, d, eps, scratch);
  if (vec) {
    for (int64_t i = 4 * threadIdx.x; i < d; i += 4 * blockDim.x) {
      const float4 v = *reinterpret_cast<const float4*>(xr + i), w = *reinterpret_cast<const float4*>(weight + i);
      Store4(o + i, make_float4(v.x * scale * w.x, v.y * scale * w.y, v.z * scale * w.z, v.w * scale * w.w));
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = FromFloat<Out>(xr[i] * scale * weight[i]);
}

// GatedResidual then RmsNormBf16 of the new rows, a block per row: h += a + sigmoid(gate_pre
// + bias) ⊙ e (GatedResidualOf, each element as GatedResidual computes it), then out =
// bf16(h · InvRms(h) · weight). d a multiple of 8, at most kPieces x 8 x kThreads, and every
// pointer 16-byte aligned. Thread t takes the 8-column pieces t, t + kThreads, ..., those
// whose squares SumSquaresPart sums in thread t, in the same order, so the statistic has
// RmsNormBf16's bits. The new h stays in registers for the second pass, and the weights
// (bias, norm weight: no kernel of the step writes them) are loaded before the wait for the
// predecessor: one round trip to memory after it.
template <int kPieces>
__global__ void GatedResidualRmsNormBf16Kernel(float* __restrict__ h, const float* __restrict__ a,
                                               const float* __restrict__ gate_pre, const float* __restrict__ bias,
                                               const float* __restrict__ e, const float* __restrict__ weight,
                                               int64_t d, float eps, __nv_bfloat16* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * d;
  const auto load4 = [](const float* p) { return *reinterpret_cast<const float4*>(p); };
  float4 x[kPieces][2], bv[kPieces][2], wv[kPieces][2];
#pragma unroll
  for (int p = 0; p < kPieces; ++p) {
    const int64_t c = 8 * (static_cast<int64_t>(threadIdx.x) + p * kThreads);
    if (c >= d) break;
    for (int k = 0; k < 2; ++k) {
      bv[p][k] = load4(bias + c + 4 * k);
      wv[p][k] = load4(weight + c + 4 * k);
    }
  }
  WaitForPredecessor();  // h, a, gate_pre and e are the step's
  AllowDependents();
  float ss = 0.0f;
#pragma unroll
  for (int p = 0; p < kPieces; ++p) {
    const int64_t c = 8 * (static_cast<int64_t>(threadIdx.x) + p * kThreads);
    if (c >= d) break;
    float4 av[2], gv[2], ev[2];
    for (int k = 0; k < 2; ++k) {
      x[p][k] = load4(h + row_start + c + 4 * k);
      av[k] = load4(a + row_start + c + 4 * k);
      gv[k] = load4(gate_pre + row_start + c + 4 * k);
      ev[k] = load4(e + row_start + c + 4 * k);
    }
    for (int k = 0; k < 2; ++k) {
      float4& v = x[p][k];
      v.x = GatedResidualOf(v.x, av[k].x, gv[k].x, bv[p][k].x, ev[k].x);
      v.y = GatedResidualOf(v.y, av[k].y, gv[k].y, bv[p][k].y, ev[k].y);
      v.z = GatedResidualOf(v.z, av[k].z, gv[k].z, bv[p][k].z, ev[k].z);
      v.w = GatedResidualOf(v.w, av[k].w, gv[k].w, bv[p][k].w, ev[k].w);
      *reinterpret_cast<float4*>(h + row_start + c + 4 * k) = v;
    }
    ss = SumSquares8(x[p][0], x[p][1], ss);
  }
  const float scale = InvRmsOf(BlockSum(ss, scratch), d, eps);
#pragma unroll
  for (int p = 0; p < kPieces; ++p) {
    const int64_t c = 8 * (static_cast<int64_t>(threadIdx.x) + p * kThreads);
    if (c >= d) break;
    for (int k = 0; k < 2; ++k) {
      const float4 v = x[p][k], w = wv[p][k];
      Store4(out + row_start + c + 4 * k,
             make_float4(v.x * scale * w.x, v.y * scale * w.y, v.z * scale * w.z, v.w * scale * w.w));
    }
  }
}

bool Vectorizable(const float* x, const float* weight, const void* out, int64_t d) {
  return d % 4 == 0 && Aligned16({x, weight, out});
}

LM2_CUDA_KERNEL_MODULE(RmsNormKernel<float>);

}  // namespace

Status RmsNorm(const float* x, const float* weight, int64_t rows, int64_t d, float eps, float* out,
               cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckRmsNorm(rows, d, eps));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("RmsNorm", {x, weight, out}));
  return CudaStatus(LaunchPdl(&RmsNormKernel<float>, static_cast<unsigned int>(rows), kThreads, 0, stream, x, weight,
                              d, eps, Vectorizable(x, weight, out, d), out),
                    "RmsNormKernel");
}

Status RmsNormBf16(const float* x, const float* weight, int64_t rows, int64_t d, float eps, __nv_bfloat16* out,
                   cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckRmsNorm(rows, d, eps));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("RmsNormBf16", {x, weight, out}));
  return CudaStatus(LaunchPdl(&RmsNormKernel<__nv_bfloat16>, static_cast<unsigned int>(rows), kThreads, 0, stream, x,
                              weight, d, eps, Vectorizable(x, weight, out, d), out),
                    "RmsNormKernel<bf16>");
}

Status GatedResidualRmsNormBf16(float* h, const float* a, const float* gate_pre, const float* gate_bias,
                                int64_t rows, int64_t d, const float* e, const float* norm_weight, float eps,
                                __nv_bfloat16* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckRmsNorm(rows, d, eps));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("GatedResidualRmsNormBf16", {h, a, gate_pre, gate_bias, e, norm_weight, out}));
  constexpr int64_t kPiece = 8 * kThreads;  // the columns one piece a thread spans
  if (d % 8 != 0 || d > 2 * kPiece || !Aligned16({h, a, gate_pre, gate_bias, e, norm_weight, out})) {
    LM2_RETURN_IF_ERROR(GatedResidual(h, a, gate_pre, gate_bias, rows, d, e, stream));
    return RmsNormBf16(h, norm_weight, rows, d, eps, out, stream);
  }
  const auto kernel = d <= kPiece ? &GatedResidualRmsNormBf16Kernel<1> : &GatedResidualRmsNormBf16Kernel<2>;
  return CudaStatus(LaunchPdl(kernel, static_cast<unsigned int>(rows), kThreads, 0, stream, h, a, gate_pre, gate_bias,
                              e, norm_weight, d, eps, out),
                    "GatedResidualRmsNormBf16Kernel");
}

}  // namespace lm2::runtime::cuda
