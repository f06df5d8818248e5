// Rotary embedding, rotate-half convention, in place. One thread per rotated pair; the
// angle, its cosine and sine are computed in double and rounded to fp32, exactly as the
// CPU backend does, so both backends rotate by the same fp32 factors.
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

__global__ void RopeKernel(float* __restrict__ x, int64_t rows, int64_t heads, int64_t head_dim,
                           const int64_t* __restrict__ positions, double theta) {
  const int64_t half = head_dim / 2, pairs = rows * heads * half;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p % half, th = p / half, t = th / heads;
    const double inv_freq = pow(theta, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
    const double angle = static_cast<double>(positions[t]) * inv_freq;
    const float c = static_cast<float>(cos(angle)), s = static_cast<float>(sin(angle));
    float* v = x + th * head_dim;
    const float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

}  // namespace

Status Rope(float* x, int64_t rows, int64_t heads, int64_t head_dim, const int64_t* positions, double theta,
            cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckRope(rows, heads, head_dim, theta));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("Rope", {x, positions}));
  const int64_t pairs = rows * heads * (head_dim / 2);
  RopeKernel<<<GridFor(pairs, kThreads), kThreads, 0, stream>>>(x, rows, heads, head_dim, positions, theta);
  return CheckLaunch("RopeKernel");
}

}  // namespace lm2::runtime::cuda
