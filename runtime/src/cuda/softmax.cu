// Row softmax in place, optionally causal: the middle step of the GEMM-based memory read
// and prefill attention (the scores come from cuBLAS, the probabilities go back to it).
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"

namespace lm2::runtime::cuda {
namespace {

// A block per row. Row r has `valid` leading entries (all of them, or, causal, the keys
// query r % causal_T sees); the rest become 0. Three passes over the row in global memory
// (max, exp and sum, scale): rows are at most a few thousand floats and stay in L1/L2.
__global__ void SoftmaxRowsKernel(float* __restrict__ x, int64_t cols, int64_t causal_T, int64_t causal_offset) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  float* row = x + r * cols;
  const int64_t valid = causal_T > 0 ? causal_offset + r % causal_T + 1 : cols;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < valid; c += blockDim.x) mx = fmaxf(mx, row[c]);
  mx = BlockMax(mx, scratch);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < valid; c += blockDim.x) {
    const float p = expf(row[c] - mx);
    row[c] = p;
    sum += p;
  }
  sum = BlockSum(sum, scratch);
  const float inv = 1.0f / sum;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) row[c] = c < valid ? row[c] * inv : 0.0f;
}

LM2_CUDA_KERNEL_MODULE(SoftmaxRowsKernel);

}  // namespace

Status SoftmaxRows(float* x, int64_t rows, int64_t cols, int64_t causal_T, int64_t causal_offset,
                   cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || causal_T < 0 || causal_offset < 0 || rows > (int64_t{1} << 31) - 1 ||
      (causal_T > 0 && causal_offset + causal_T > cols)) {
    return Status::InvalidArgument("SoftmaxRows: rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                                   " causal_T=" + std::to_string(causal_T) +
                                   " causal_offset=" + std::to_string(causal_offset));
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SoftmaxRows", {x}));
  SoftmaxRowsKernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(x, cols, causal_T, causal_offset);
  return CheckLaunch("SoftmaxRowsKernel");
}

}  // namespace lm2::runtime::cuda
