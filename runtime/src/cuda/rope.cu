// Rotary embedding, rotate-half convention, in place. One thread per rotated pair; the
// angle, its cosine and sine are computed in double and rounded to fp32, exactly as the
// CPU backend does, so both backends rotate by the same fp32 factors.
#include <cuda_bf16.h>

#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// Where row t's k and v go: consecutive rows of one cache (and, where k_b / v_b are set,
// the same rows rounded to bf16: the tiled attention's operands), or each row into its own
// session's cache at its position.
struct ConsecutiveRows {
  float* k;
  float* v;
  int64_t kvdim;
  __nv_bfloat16* k_b = nullptr;
  __nv_bfloat16* v_b = nullptr;
  __device__ void StoreK(int64_t t, int c, float x) const {
    k[t * kvdim + c] = x;
    if (k_b != nullptr) k_b[t * kvdim + c] = __float2bfloat16_rn(x);
  }
  __device__ void StoreV(int64_t t, int c, float x) const {
    v[t * kvdim + c] = x;
    if (v_b != nullptr) v_b[t * kvdim + c] = __float2bfloat16_rn(x);
  }
};
struct RowPerCache {
  float* const* k;
  float* const* v;
  int64_t kvdim;
  const int64_t* positions;
  __device__ void StoreK(int64_t t, int c, float x) const { k[t][positions[t] * kvdim + c] = x; }
  __device__ void StoreV(int64_t t, int c, float x) const { v[t][positions[t] * kvdim + c] = x; }
};

// proj[t] = [q (H*D) | k (Hkv*D) | v (Hkv*D) | ...]: q and k rotated into q_out and the k
// row, v copied to the v row. A block per row: its q and k pairs rotated by the row's
// factors (RopeFactorsBatch: computed once per forward, not per layer and pair), then its v
// elements; 32-bit index math within the row.
template <typename Dest>
__global__ void SplitQkvRopeKernel(const float* __restrict__ proj, int64_t proj_ld, int heads, int kv_heads,
                                   int head_dim, const float2* __restrict__ factors, float* __restrict__ q_out,
                                   Dest dest) {
  WaitForPredecessor();  // proj is the previous kernel's output
  AllowDependents();
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2, pairs = (heads + kv_heads) * half, kvdim = kv_heads * head_dim;
  const float* src_row = proj + t * proj_ld;
  const float2* f = factors + t * half;
  float* q_row = q_out + t * heads * head_dim;
  for (int p = static_cast<int>(threadIdx.x); p < pairs; p += static_cast<int>(blockDim.x)) {
    const int h = p / half, i = p % half;  // k heads follow q heads in proj
    const float2 r = RotatedHalfPair(src_row + h * head_dim, i, half, f[i]);
    if (h < heads) {
      q_row[h * head_dim + i] = r.x;
      q_row[h * head_dim + i + half] = r.y;
    } else {
      const int c = (h - heads) * head_dim + i;
      dest.StoreK(t, c, r.x);
      dest.StoreK(t, c + half, r.y);
    }
  }
  const float* v_src = src_row + (heads + kv_heads) * head_dim;
  for (int c = static_cast<int>(threadIdx.x); c < kvdim; c += static_cast<int>(blockDim.x)) dest.StoreV(t, c, v_src[c]);
}

__global__ void RopeKernel(float* __restrict__ x, int64_t rows, int64_t heads, int64_t head_dim,
                           const int64_t* __restrict__ positions, double theta) {
  const int64_t half = head_dim / 2, pairs = rows * heads * half;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p % half, th = p / half, t = th / heads;
    float* v = x + th * head_dim;
    RotateHalfPair(v, v, i, half, RopeFactors(i, head_dim, positions[t], theta));
  }
}

// factors[t, i] for every pair i of row t's position.
__global__ void RopeFactorsKernel(const int64_t* __restrict__ positions, int64_t rows, int64_t head_dim, double theta,
                                  float2* __restrict__ factors) {
  WaitForPredecessor();  // the positions are this step's
  AllowDependents();
  const int64_t half = head_dim / 2;
  for (int64_t p = FirstIndex(); p < rows * half; p += GridStride()) {
    factors[p] = RopeFactors(p % half, head_dim, positions[p / half], theta);
  }
}

LM2_CUDA_KERNEL_MODULE(RopeKernel);

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

Status RopeFactorsBatch(const int64_t* positions, int64_t rows, int64_t head_dim, double theta, float2* factors,
                        cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckRope(rows, 1, head_dim, theta));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("RopeFactorsBatch", {positions, factors}));
  const int64_t pairs = rows * (head_dim / 2);
  return CudaStatus(LaunchPdl(&RopeFactorsKernel, GridFor(pairs, kThreads), kThreads, 0, stream, positions, rows,
                              head_dim, theta, factors),
                    "RopeFactorsKernel");
}

namespace {

// Both SplitQkvRope forms: the checks, then the kernel writing k and v rows through `dest`.
template <typename Dest>
Status LaunchSplitQkvRope(const char* op, const float* proj, int64_t rows, int64_t proj_ld, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, const float2* factors, float* q_out, Dest dest,
                          cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckRope(rows, heads, head_dim, /*theta=*/1.0));
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(0, 0, heads, kv_heads, head_dim));
  if (proj_ld < (heads + 2 * kv_heads) * head_dim) {
    return Status::InvalidArgument(std::string(op) + ": proj_ld " + std::to_string(proj_ld) +
                                   " narrower than q, k and v");
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull(op, {proj, factors, q_out, dest.k, dest.v}));
  if (rows > ops::detail::kInt32Max) return Status::InvalidArgument(std::string(op) + ": too many rows");
  return CudaStatus(LaunchPdl(&SplitQkvRopeKernel<Dest>, static_cast<unsigned int>(rows), kThreads, 0, stream, proj,
                              proj_ld, static_cast<int>(heads), static_cast<int>(kv_heads),
                              static_cast<int>(head_dim), factors, q_out, dest),
                    op);
}

}  // namespace

Status SplitQkvRope(const float* proj, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, const float2* factors, float* q_out, float* k_out, float* v_out,
                    cudaStream_t stream, __nv_bfloat16* k_bf16, __nv_bfloat16* v_bf16) {
  if ((k_bf16 == nullptr) != (v_bf16 == nullptr)) {
    return Status::InvalidArgument("SplitQkvRope: bf16 copies of k and v go together (one of them is null)");
  }
  return LaunchSplitQkvRope("SplitQkvRope", proj, rows, proj_ld, heads, kv_heads, head_dim, factors, q_out,
                            ConsecutiveRows{k_out, v_out, kv_heads * head_dim, k_bf16, v_bf16}, stream);
}

Status SplitQkvRopeBatch(const float* proj, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, const int64_t* positions, const float2* factors, float* q_out,
                         float* const* k_caches, float* const* v_caches, cudaStream_t stream) {
  if (rows > 0 && positions == nullptr) return Status::InvalidArgument("SplitQkvRopeBatch: null positions");
  return LaunchSplitQkvRope("SplitQkvRopeBatch", proj, rows, proj_ld, heads, kv_heads, head_dim, factors, q_out,
                            RowPerCache{k_caches, v_caches, kv_heads * head_dim, positions}, stream);
}

}  // namespace lm2::runtime::cuda
