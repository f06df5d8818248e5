// Linear layers through cuBLAS: bf16 weights W[out, in] (row-major, as in safetensors) and
// bf16 activations, fp32 accumulation (CUBLAS_COMPUTE_32F), fp32 output (bf16 for the
// memory K/V). Also the strided-batched GEMMs of the memory and attention ops.
//
// Row-major y[rows, out] = x[rows, in] · Wᵀ is, read column-major, yᵀ[out, rows] =
// W_cm[in, out]ᵀ · x_cm[in, rows]: GEMM with op(A) = T on W (lda = in), op(B) = N on x
// (ldb = in), C = y (ldc = out). No host code here needs nvcc; it is a .cu for the one-file-
// per-op layout and because the bf16 conversion it uses is a kernel.
#include <limits>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {

namespace {

// y (of type y_type) = x · Wᵀ (+ y when beta = 1), cuBLAS with fp32 accumulation.
Status LinearInto(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w,
                  int64_t out, void* y, cudaDataType_t y_type, float beta, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(rows, in, out));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("Linear", {handle, x, w, y}));
  LM2_CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle, stream));
  LM2_CUBLAS_RETURN_IF_ERROR(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  const float alpha = 1.0f;
  const int m = static_cast<int>(out), n = static_cast<int>(rows), k = static_cast<int>(in);
  LM2_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_16BF, k, x,
                                          CUDA_R_16BF, k, &beta, y, y_type, m, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
  return Status::Ok();
}

Status CheckStridedBatched(const char* op, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                           int64_t batch) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m < 0 || n < 0 || k <= 0 || batch < 0 || m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax ||
      ldc > kMax || batch > kMax) {
    return Status::InvalidArgument(std::string(op) + ": m=" + std::to_string(m) + " n=" + std::to_string(n) +
                                   " k=" + std::to_string(k) + " batch=" + std::to_string(batch));
  }
  return Status::Ok();
}

// cublasGemmStridedBatchedEx with the given operand, C and compute types.
Status StridedBatched(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m, int64_t n,
                      int64_t k, float alpha, const void* a, int64_t lda, int64_t stride_a, const void* b, int64_t ldb,
                      int64_t stride_b, float beta, void* c, int64_t ldc, int64_t stride_c, int64_t batch,
                      cudaDataType_t ab_type, cudaDataType_t c_type, cublasComputeType_t compute,
                      cudaStream_t stream) {
  LM2_CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle, stream));
  LM2_CUBLAS_RETURN_IF_ERROR(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  LM2_CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
      handle, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a, ab_type,
      static_cast<int>(lda), stride_a, b, ab_type, static_cast<int>(ldb), stride_b, &beta, c, c_type,
      static_cast<int>(ldc), stride_c, static_cast<int>(batch), compute, CUBLAS_GEMM_DEFAULT));
  return Status::Ok();
}

// LinearInto's GEMM twice, as one strided-batched call: W_i at w_pair + i·out·in, x_i at
// x + i·x_stride (0: one x for both), y_i at y_pair + i·rows·out (elements of y_type).
Status LinearPairInto(cublasHandle_t handle, const __nv_bfloat16* x, int64_t x_stride, int64_t rows, int64_t in,
                      const __nv_bfloat16* w_pair, int64_t out, void* y_pair, cudaDataType_t y_type,
                      cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(rows, in, out));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("LinearPair", {handle, x, w_pair, y_pair}));
  return StridedBatched(handle, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, 1.0f, w_pair, in, out * in, x, in, x_stride,
                        0.0f, y_pair, out, rows * out, 2, CUDA_R_16BF, y_type, CUBLAS_COMPUTE_32F, stream);
}

}  // namespace

Status Linear(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w,
              int64_t out, float* y, bool accumulate, cudaStream_t stream) {
  return LinearInto(handle, x, rows, in, w, out, y, CUDA_R_32F, accumulate ? 1.0f : 0.0f, stream);
}

Status LinearToBf16(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w,
                    int64_t out, __nv_bfloat16* y, cudaStream_t stream) {
  return LinearInto(handle, x, rows, in, w, out, y, CUDA_R_16BF, 0.0f, stream);
}

Status LinearPair(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in,
                  const __nv_bfloat16* w_pair, int64_t out, float* y_pair, cudaStream_t stream) {
  return LinearPairInto(handle, x, 0, rows, in, w_pair, out, y_pair, CUDA_R_32F, stream);
}

Status LinearPairToBf16(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in,
                        const __nv_bfloat16* w_pair, int64_t out, __nv_bfloat16* y_pair, cudaStream_t stream) {
  return LinearPairInto(handle, x, 0, rows, in, w_pair, out, y_pair, CUDA_R_16BF, stream);
}

Status LinearTwo(cublasHandle_t handle, const __nv_bfloat16* x_pair, int64_t rows, int64_t in,
                 const __nv_bfloat16* w_pair, int64_t out, float* y_pair, cudaStream_t stream) {
  return LinearPairInto(handle, x_pair, rows * in, rows, in, w_pair, out, y_pair, CUDA_R_32F, stream);
}

Status LinearF32(cublasHandle_t handle, const float* x, int64_t rows, int64_t in, const __nv_bfloat16* w,
                 int64_t out, float* y, bool accumulate, __nv_bfloat16* x_bf16, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(rows, in, out));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(ConvertF32ToBf16(x, rows * in, x_bf16, stream));
  return Linear(handle, x_bf16, rows, in, w, out, y, accumulate, stream);
}

Status GemmStridedBatchedF32(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m,
                             int64_t n, int64_t k, float alpha, const float* a, int64_t lda, int64_t stride_a,
                             const float* b, int64_t ldb, int64_t stride_b, float beta, float* c, int64_t ldc,
                             int64_t stride_c, int64_t batch, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckStridedBatched("GemmStridedBatchedF32", m, n, k, lda, ldb, ldc, batch));
  if (m == 0 || n == 0 || batch == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("GemmStridedBatchedF32", {handle, a, b, c}));
  return StridedBatched(handle, op_a, op_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c,
                        batch, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, stream);
}

Status GemmStridedBatchedBf16(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m,
                              int64_t n, int64_t k, float alpha, const __nv_bfloat16* a, int64_t lda,
                              int64_t stride_a, const __nv_bfloat16* b, int64_t ldb, int64_t stride_b, float beta,
                              float* c, int64_t ldc, int64_t stride_c, int64_t batch, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckStridedBatched("GemmStridedBatchedBf16", m, n, k, lda, ldb, ldc, batch));
  if (m == 0 || n == 0 || batch == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("GemmStridedBatchedBf16", {handle, a, b, c}));
  return StridedBatched(handle, op_a, op_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c,
                        batch, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, stream);
}

}  // namespace lm2::runtime::cuda
