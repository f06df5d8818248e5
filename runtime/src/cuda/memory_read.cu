// Memory read: per memory head j, softmax over the N slots of q_j · mem_k_jᵀ / sqrt(dh),
// written out as attn[j, T, N] (the write at the segment's end needs it), then e = A_j ·
// mem_v_j. One block per (head, query); fp32. The scores go through attn itself (written,
// exponentiated, normalised in place), so N has no shared-memory limit.
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// Shared: q_j [dh]. Every thread owns slots n = tid, tid + blockDim, ... through the three
// softmax passes; the barrier inside each block reduction and the one before the value
// pass make all of a row's probabilities visible to every thread.
__global__ void MemoryReadKernel(const float* __restrict__ q, const float* __restrict__ mem_k,
                                 const float* __restrict__ mem_v, int64_t T, int64_t N, int64_t d, int64_t dh,
                                 float scale, float* __restrict__ attn, float* __restrict__ e) {
  extern __shared__ float qs[];
  __shared__ float scratch[32];
  const int64_t j = blockIdx.x / T, t = blockIdx.x % T;
  const int64_t col0 = j * dh;
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) qs[c] = q[t * d + col0 + c];
  __syncthreads();

  float* a = attn + (j * T + t) * N;
  float mx = -INFINITY;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const float* kn = mem_k + n * d + col0;
    float dot = 0.0f;
    for (int64_t c = 0; c < dh; ++c) dot += qs[c] * kn[c];
    const float s = dot * scale;
    a[n] = s;
    mx = fmaxf(mx, s);
  }
  mx = BlockMax(mx, scratch);
  float sum = 0.0f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const float p = expf(a[n] - mx);
    a[n] = p;
    sum += p;
  }
  sum = BlockSum(sum, scratch);
  const float inv = 1.0f / sum;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) a[n] *= inv;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) {
    float o = 0.0f;
    for (int64_t n = 0; n < N; ++n) o += a[n] * mem_v[n * d + col0 + c];
    e[t * d + col0 + c] = o;
  }
}

}  // namespace

Status MemoryRead(const float* q, const float* mem_k, const float* mem_v, int64_t T, int64_t N, int64_t d,
                  int64_t heads, float* attn, float* e, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("MemoryRead", T, N, d, heads));
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryRead", {q, mem_k, mem_v, attn, e}));
  const int64_t dh = d / heads;
  const int64_t smem = dh * static_cast<int64_t>(sizeof(float));
  if (smem > 47 * 1024) {  // 48 KiB less the block reduction's scratch
    return Status::InvalidArgument("MemoryRead: head width " + std::to_string(dh) + " too wide for shared memory");
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(dh));
  MemoryReadKernel<<<static_cast<unsigned int>(heads * T), kThreads, static_cast<size_t>(smem), stream>>>(
      q, mem_k, mem_v, T, N, d, dh, scale, attn, e);
  return CheckLaunch("MemoryReadKernel");
}

}  // namespace lm2::runtime::cuda
