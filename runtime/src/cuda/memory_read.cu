// Memory read through cuBLAS: per memory head j (a strided batch over the heads, whose
// columns are dh apart in q, mem_k, mem_v and e),
//   attn_j = q_j · mem_k_jᵀ / sqrt(dh)          [T, N]   strided-batched bf16 GEMM
//   attn_j = softmax over the N slots            in place (SoftmaxRows, fp32)
//   e_j    = attn_j · mem_v_j                    [T, dh]  strided-batched bf16 GEMM
// The GEMMs take bf16 operands (mem_k and mem_v are bf16 already; q and attn are rounded
// into the scratch) and accumulate in fp32. attn stays [heads, T, N] fp32: the segment's
// write sums read it (AccumulateWrite).
#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {

int64_t MemoryReadScratch(int64_t T, int64_t N, int64_t d, int64_t heads) { return T * d + heads * T * N; }

Status MemoryRead(cublasHandle_t handle, const float* q, int64_t q_ld, const __nv_bfloat16* mem_k,
                  const __nv_bfloat16* mem_v, int64_t T, int64_t N, int64_t d, int64_t heads, float* attn, float* e,
                  __nv_bfloat16* scratch, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("MemoryRead", T, N, d, heads));
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryRead", {handle, q, mem_k, mem_v, attn, e, scratch}));
  if (q_ld < d) return Status::InvalidArgument("MemoryRead: q_ld " + std::to_string(q_ld) + " < d");
  const int64_t dh = d / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  __nv_bfloat16* q_b = scratch;           // [T, d]
  __nv_bfloat16* attn_b = scratch + T * d;  // [heads, T, N]
  LM2_RETURN_IF_ERROR(ConvertRowsF32ToBf16(q, T, d, q_ld, q_b, stream));
  // Row-major [T, N] = q_j [T, dh] · mem_k_j [N, dh]ᵀ (read column-major: N x T = Kᵀ·q).
  LM2_RETURN_IF_ERROR(GemmStridedBatchedBf16(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, dh, scale, mem_k, d, dh, q_b, d,
                                             dh, 0.0f, attn, N, T * N, heads, stream));
  LM2_RETURN_IF_ERROR(SoftmaxRows(attn, heads * T, N, 0, 0, stream));
  LM2_RETURN_IF_ERROR(ConvertF32ToBf16(attn, heads * T * N, attn_b, stream));
  // Row-major e_j [T, dh] = attn_j [T, N] · mem_v_j [N, dh] (column-major: dh x T = V·A).
  return GemmStridedBatchedBf16(handle, CUBLAS_OP_N, CUBLAS_OP_N, dh, T, N, 1.0f, mem_v, d, dh, attn_b, N, T * N, 0.0f,
                                e, d, dh, heads, stream);
}

}  // namespace lm2::runtime::cuda
