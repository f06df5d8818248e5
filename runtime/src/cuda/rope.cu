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
  // Four consecutive elements from c (a multiple of 4; every pointer 16-byte aligned).
  __device__ void StoreK4(int64_t t, int c, float4 x) const {
    *reinterpret_cast<float4*>(k + t * kvdim + c) = x;
    if (k_b != nullptr) *reinterpret_cast<uint2*>(k_b + t * kvdim + c) = PackBf16x4(x);
  }
  __device__ void StoreV4(int64_t t, int c, float4 x) const {
    *reinterpret_cast<float4*>(v + t * kvdim + c) = x;
    if (v_b != nullptr) *reinterpret_cast<uint2*>(v_b + t * kvdim + c) = PackBf16x4(x);
  }
  bool Aligned() const { return Aligned16({k, v, k_b, v_b}); }
};
struct RowPerCache {
  float* const* k;
  float* const* v;
  int64_t kvdim;
  const int64_t* positions;
  __device__ void StoreK(int64_t t, int c, float x) const { k[t][positions[t] * kvdim + c] = x; }
  __device__ void StoreV(int64_t t, int c, float x) const { v[t][positions[t] * kvdim + c] = x; }
};

// A SplitQkvRope block's row t (its block index, after the wait for proj's kernel): its
// projection row, rotary factors and q row.
struct SplitRow {
  int64_t t;
  const float* src;
  const float2* factors;
  float* q;
  __device__ SplitRow(const float* proj, int64_t proj_ld, int heads, int head_dim, const float2* all_factors,
                      float* q_out)
      : t(blockIdx.x),
        src(proj + t * proj_ld),
        factors(all_factors + t * (head_dim / 2)),
        q(q_out + t * heads * head_dim) {
    WaitForPredecessor();  // proj is the previous kernel's output
    AllowDependents();
  }
};

// proj[t] = [q (H*D) | k (Hkv*D) | v (Hkv*D) | ...]: q and k rotated into q_out and the k
// row, v copied to the v row. A block per row: its q and k pairs rotated by the row's
// factors (RopeFactorsBatch: computed once per forward, not per layer and pair), then its v
// elements; 32-bit index math within the row.
template <typename Dest>
__global__ void SplitQkvRopeKernel(const float* __restrict__ proj, int64_t proj_ld, int heads, int kv_heads,
                                   int head_dim, const float2* __restrict__ factors, float* __restrict__ q_out,
                                   Dest dest) {
  const SplitRow row(proj, proj_ld, heads, head_dim, factors, q_out);
  const int64_t t = row.t;
  const int half = head_dim / 2, pairs = (heads + kv_heads) * half, kvdim = kv_heads * head_dim;
  const float* src_row = row.src;
  const float2* f = row.factors;
  float* q_row = row.q;
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

// The same, four pairs (i .. i + 3, i + half .. i + half + 3) a thread by 16-byte loads and
// stores, for one cache (head_dim a multiple of 8; proj, its rows, q_out, factors and the
// cache rows 16-byte aligned). Each pair is rotated as above: the same bits.
__global__ void SplitQkvRopex4Kernel(const float* __restrict__ proj, int64_t proj_ld, int heads, int kv_heads,
                                     int head_dim, const float2* __restrict__ factors, float* __restrict__ q_out,
                                     ConsecutiveRows dest) {
  const SplitRow row(proj, proj_ld, heads, head_dim, factors, q_out);
  const int64_t t = row.t;
  const int half = head_dim / 2, quads = half / 4, groups = (heads + kv_heads) * quads, kvdim = kv_heads * head_dim;
  const float* src_row = row.src;
  const float2* f = row.factors;
  float* q_row = row.q;
  for (int p = static_cast<int>(threadIdx.x); p < groups; p += static_cast<int>(blockDim.x)) {
    const int h = p / quads, i = p % quads * 4;  // k heads follow q heads in proj
    const float* src = src_row + h * head_dim;
    const float4 a = *reinterpret_cast<const float4*>(src + i), b = *reinterpret_cast<const float4*>(src + i + half);
    const float4 f01 = *reinterpret_cast<const float4*>(f + i), f23 = *reinterpret_cast<const float4*>(f + i + 2);
    const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    const float2 fv[4] = {{f01.x, f01.y}, {f01.z, f01.w}, {f23.x, f23.y}, {f23.z, f23.w}};
    float lo[4], hi[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float pair[2] = {av[k], bv[k]};
      const float2 r = RotatedHalfPair(pair, 0, 1, fv[k]);
      lo[k] = r.x;
      hi[k] = r.y;
    }
    const float4 rlo = make_float4(lo[0], lo[1], lo[2], lo[3]), rhi = make_float4(hi[0], hi[1], hi[2], hi[3]);
    if (h < heads) {
      *reinterpret_cast<float4*>(q_row + h * head_dim + i) = rlo;
      *reinterpret_cast<float4*>(q_row + h * head_dim + i + half) = rhi;
    } else {
      const int c = (h - heads) * head_dim + i;
      dest.StoreK4(t, c, rlo);
      dest.StoreK4(t, c + half, rhi);
    }
  }
  const float* v_src = src_row + (heads + kv_heads) * head_dim;
  for (int c = 4 * static_cast<int>(threadIdx.x); c < kvdim; c += 4 * static_cast<int>(blockDim.x)) {
    dest.StoreV4(t, c, *reinterpret_cast<const float4*>(v_src + c));
  }
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

// The checks of both SplitQkvRope forms (`pointers`: those that must not be null where
// there are rows).
Status CheckSplitQkvRope(const char* op, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, std::initializer_list<const void*> pointers) {
  LM2_RETURN_IF_ERROR(ops::CheckRope(rows, heads, head_dim, /*theta=*/1.0));
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(0, 0, heads, kv_heads, head_dim));
  if (proj_ld < (heads + 2 * kv_heads) * head_dim) {
    return Status::InvalidArgument(std::string(op) + ": proj_ld " + std::to_string(proj_ld) +
                                   " narrower than q, k and v");
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull(op, pointers));
  if (rows > ops::detail::kInt32Max) return Status::InvalidArgument(std::string(op) + ": too many rows");
  return Status::Ok();
}

}  // namespace

Status SplitQkvRope(const float* proj, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, const float2* factors, float* q_out, float* k_out, float* v_out,
                    cudaStream_t stream, __nv_bfloat16* k_bf16, __nv_bfloat16* v_bf16) {
  LM2_RETURN_IF_ERROR(
      CheckSplitQkvRope("SplitQkvRope", rows, proj_ld, heads, kv_heads, head_dim, {proj, factors, q_out, k_out, v_out}));
  if ((k_bf16 == nullptr) != (v_bf16 == nullptr)) {
    return Status::InvalidArgument("SplitQkvRope: bf16 copies of k and v go together (one of them is null)");
  }
  if (rows == 0) return Status::Ok();
  const ConsecutiveRows dest{k_out, v_out, kv_heads * head_dim, k_bf16, v_bf16};
  const auto grid = static_cast<unsigned int>(rows);
  const int H = static_cast<int>(heads), Hkv = static_cast<int>(kv_heads), D = static_cast<int>(head_dim);
  if (head_dim % 8 == 0 && proj_ld % 4 == 0 && Aligned16({proj, q_out, factors}) && dest.Aligned()) {
    return CudaStatus(LaunchPdl(&SplitQkvRopex4Kernel, grid, kThreads, 0, stream, proj, proj_ld, H, Hkv, D, factors,
                                q_out, dest),
                      "SplitQkvRopex4Kernel");
  }
  return CudaStatus(LaunchPdl(&SplitQkvRopeKernel<ConsecutiveRows>, grid, kThreads, 0, stream, proj, proj_ld, H, Hkv,
                              D, factors, q_out, dest),
                    "SplitQkvRopeKernel");
}

Status SplitQkvRopeBatch(const float* proj, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, const int64_t* positions, const float2* factors, float* q_out,
                         float* const* k_caches, float* const* v_caches, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckSplitQkvRope("SplitQkvRopeBatch", rows, proj_ld, heads, kv_heads, head_dim,
                                        {proj, factors, q_out, k_caches, v_caches, positions}));
  if (rows == 0) return Status::Ok();
  return CudaStatus(LaunchPdl(&SplitQkvRopeKernel<RowPerCache>, static_cast<unsigned int>(rows), kThreads, 0, stream,
                              proj, proj_ld, static_cast<int>(heads), static_cast<int>(kv_heads),
                              static_cast<int>(head_dim), factors, q_out,
                              RowPerCache{k_caches, v_caches, kv_heads * head_dim, positions}),
                    "SplitQkvRopeBatch");
}

}  // namespace lm2::runtime::cuda
