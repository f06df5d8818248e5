// Greedy token choice on the device: the argmax of each logits row as a 64-bit key
// (ArgmaxKeyToken), so a decode step copies B keys to the host instead of B x V logits.
// (Steps whose LM head runs through the GEMV get the keys from it directly.)
#include <cmath>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"

namespace lm2::runtime::cuda {
namespace {

constexpr int kColsPerBlock = 8 * kThreads;  // 8 independent loads in flight per thread

__device__ __forceinline__ unsigned long long WarpMaxKey(unsigned long long k) {
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, k, o);
    k = other > k ? other : k;
  }
  return k;
}

// A block per (slice of kColsPerBlock columns, row): the slice's best key, then one
// atomicMax into the row's key (zeroed before the launch).
__global__ void ArgmaxRowsKernel(const float* __restrict__ x, int64_t cols, unsigned long long* __restrict__ keys) {
  WaitForPredecessor();
  AllowDependents();
  __shared__ unsigned long long warp_best[kThreads / 32];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row = blockIdx.y;
  const float* xr = x + row * cols;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kColsPerBlock;
  float v[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int64_t c = c0 + u * kThreads + tid;
    v[u] = c < cols ? xr[c] : NAN;
  }
  unsigned long long best = 0;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const unsigned long long k = CandidateKey(v[u], c0 + u * kThreads + tid);  // columns past cols: NaN, no key
    best = k > best ? k : best;
  }
  best = WarpMaxKey(best);
  if ((tid & 31) == 0) warp_best[tid >> 5] = best;
  __syncthreads();
  if (tid < 32) {
    best = WarpMaxKey(tid < kThreads / 32 ? warp_best[tid] : 0ull);
    if (tid == 0 && best != 0) atomicMax(keys + row, best);
  }
}

LM2_CUDA_KERNEL_MODULE(ArgmaxRowsKernel);

}  // namespace

Status ArgmaxRows(const float* x, int64_t rows, int64_t cols, uint64_t* keys, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || rows > 65535 || cols > (int64_t{1} << 31) - 1) {
    return Status::InvalidArgument("ArgmaxRows: rows=" + std::to_string(rows) + " (at most 65535) cols=" +
                                   std::to_string(cols));
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("ArgmaxRows", {x, keys}));
  LM2_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(keys, 0, static_cast<std::size_t>(rows) * sizeof(uint64_t), stream));
  const dim3 grid(static_cast<unsigned int>((cols + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned int>(rows));
  static_assert(sizeof(unsigned long long) == sizeof(uint64_t));
  return CudaStatus(LaunchPdl(&ArgmaxRowsKernel, grid, kThreads, 0, stream, x, cols,
                              reinterpret_cast<unsigned long long*>(keys)),
                    "ArgmaxRowsKernel");
}

}  // namespace lm2::runtime::cuda
