// Memory read through cuBLAS: per memory head j (a strided batch over the heads, whose
// columns are dh apart in q, mem_k, mem_v and e),
//   attn_j = q_j · mem_k_jᵀ / sqrt(dh)          [T, N]   strided-batched GEMM (TF32)
//   attn_j = softmax over the N slots            in place (SoftmaxRows)
//   e_j    = attn_j · mem_v_j                    [T, dh]  strided-batched GEMM (TF32)
// attn stays [heads, T, N] fp32: the segment's write sums read it (AccumulateWrite).
#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {

Status MemoryRead(cublasHandle_t handle, const float* q, int64_t q_ld, const float* mem_k, const float* mem_v, int64_t T,
                  int64_t N, int64_t d, int64_t heads, float* attn, float* e, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("MemoryRead", T, N, d, heads));
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryRead", {handle, q, mem_k, mem_v, attn, e}));
  if (q_ld < d) return Status::InvalidArgument("MemoryRead: q_ld " + std::to_string(q_ld) + " < d");
  const int64_t dh = d / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  // Row-major [T, N] = q_j [T, dh] · mem_k_j [N, dh]ᵀ (read column-major: N x T = Kᵀ·q).
  LM2_RETURN_IF_ERROR(GemmStridedBatchedF32(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, dh, scale, mem_k, d, dh, q, q_ld,
                                            dh, 0.0f, attn, N, T * N, heads, stream));
  LM2_RETURN_IF_ERROR(SoftmaxRows(attn, heads * T, N, 0, 0, stream));
  // Row-major e_j [T, dh] = attn_j [T, N] · mem_v_j [N, dh] (column-major: dh x T = V·A).
  return GemmStridedBatchedF32(handle, CUBLAS_OP_N, CUBLAS_OP_N, dh, T, N, 1.0f, mem_v, d, dh, attn, N, T * N, 0.0f,
                               e, d, dh, heads, stream);
}

}  // namespace lm2::runtime::cuda
