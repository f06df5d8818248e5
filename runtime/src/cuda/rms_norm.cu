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

}  // namespace lm2::runtime::cuda
