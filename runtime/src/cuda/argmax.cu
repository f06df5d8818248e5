// Greedy token choice on the device: the argmax of each logits row, so a decode step copies
// B token ids to the host instead of B x V logits.
#include <cmath>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"

namespace lm2::runtime::cuda {
namespace {

// Whether candidate (v, i) beats (w, j): the larger value, the smaller index on a tie; an
// empty candidate (index -1) loses to any.
__device__ __forceinline__ bool Beats(float v, int64_t i, float w, int64_t j) {
  if (i < 0) return false;
  if (j < 0) return true;
  return v > w || (v == w && i < j);
}

// A block per row: each thread scans its strided share keeping the first maximum (NaNs never
// win: NaN > x is false), then the block reduces (value, index) pairs.
__global__ void ArgmaxRowsKernel(const float* __restrict__ x, int64_t cols, int32_t* __restrict__ out) {
  WaitForPredecessor();
  AllowDependents();
  __shared__ float best_v[kThreads];
  __shared__ int64_t best_i[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  float v = 0.0f;
  int64_t i = -1;
  for (int64_t c = tid; c < cols; c += kThreads) {
    const float y = row[c];
    if (!isnan(y) && (i < 0 || y > v)) {
      v = y;
      i = c;
    }
  }
  best_v[tid] = v;
  best_i[tid] = i;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (tid < stride && Beats(best_v[tid + stride], best_i[tid + stride], best_v[tid], best_i[tid])) {
      best_v[tid] = best_v[tid + stride];
      best_i[tid] = best_i[tid + stride];
    }
    __syncthreads();
  }
  // std::max_element's answer: 0 when the first entry is NaN (nothing compares above it) or
  // every entry is.
  if (tid == 0) out[blockIdx.x] = static_cast<int32_t>(isnan(row[0]) || best_i[0] < 0 ? 0 : best_i[0]);
}

}  // namespace

Status ArgmaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || rows > (int64_t{1} << 31) - 1 || cols > (int64_t{1} << 31) - 1) {
    return Status::InvalidArgument("ArgmaxRows: rows=" + std::to_string(rows) + " cols=" + std::to_string(cols));
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("ArgmaxRows", {x, out}));
  return CudaStatus(LaunchPdl(&ArgmaxRowsKernel, static_cast<unsigned int>(rows), kThreads, 0, stream, x, cols, out),
                    "ArgmaxRowsKernel");
}

}  // namespace lm2::runtime::cuda
