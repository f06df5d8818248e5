// The memory read and write sums for one token per session (decode), as bandwidth-bound
// fp32 kernels: at one token the work is a GEMV over each session's memory K and V and a
// rank-one update of its write sums, which cuBLAS's (batched) GEMMs run far below the
// memory bandwidth. One session (B = 1) or many (a device array of per-session pointers,
// a batched decode step); the same kernels either way.
#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// Where session b's buffer is: one buffer, or one per session.
template <typename T>
struct One {
  T* p;
  __device__ T* operator()(int64_t) const { return p; }
};
template <typename T>
struct PerSession {
  T* const* p;
  __device__ T* operator()(int64_t b) const { return p[b]; }
};

constexpr int kSlotsPerWarp = 8;
constexpr int kSlotsPerBlock = kSlotsPerWarp * (kThreads / 32);  // 64

// attn[b, j, n] = q_bj · K_b[n, j*dh : (j+1)*dh] * scale. Grid (B*heads, N / 64): each warp
// takes 8 slots at once (8 independent dot products in flight: the loads overlap), its lanes
// over the head's dh columns (contiguous: coalesced).
template <typename K>
__global__ void MemoryScoresKernel(const float* __restrict__ q, int64_t q_ld, K mem_k, int64_t N, int64_t d,
                                   int64_t heads, float scale, float* __restrict__ attn) {
  const int64_t bj = blockIdx.x, b = bj / heads, j = bj % heads, dh = d / heads;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const float* qr = q + b * q_ld + j * dh;
  const float* k = mem_k(b) + j * dh;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSlotsPerBlock + warp * kSlotsPerWarp;
  float dot[kSlotsPerWarp];
#pragma unroll
  for (int s = 0; s < kSlotsPerWarp; ++s) dot[s] = 0.0f;
  for (int64_t c = lane; c < dh; c += 32) {
    const float qc = qr[c];
#pragma unroll
    for (int s = 0; s < kSlotsPerWarp; ++s) {
      if (n0 + s < N) dot[s] += qc * k[(n0 + s) * d + c];
    }
  }
#pragma unroll
  for (int s = 0; s < kSlotsPerWarp; ++s) {
    const float v = WarpSum(dot[s]);
    if (lane == 0 && n0 + s < N) attn[bj * N + n0 + s] = v * scale;
  }
}

constexpr int64_t kValueSlots = 256;  // slots per block of the value pass

// Partial read outputs: partial[(b*heads + j) * chunks + chunk, c] = Σ over the chunk's slots
// n of attn[b, j, n] · V_b[n, j*dh + c]. Grid (B*heads, chunks); groups of threads take every
// G-th slot of the chunk, one column each (coalesced rows of V), then the groups' sums are
// added in a fixed order (deterministic: no atomics).
template <typename V>
__global__ void MemoryValuesPartialKernel(const float* __restrict__ attn, V mem_v, int64_t N, int64_t d,
                                          int64_t heads, float* __restrict__ partial) {
  extern __shared__ float group_sums[];  // [G][dh]
  const int64_t bj = blockIdx.x, b = bj / heads, j = bj % heads, dh = d / heads;
  const int64_t cols = dh < static_cast<int64_t>(blockDim.x) ? dh : static_cast<int64_t>(blockDim.x);
  const int64_t G = static_cast<int64_t>(blockDim.x) / cols;
  const int64_t g = threadIdx.x / cols, c0 = threadIdx.x % cols;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kValueSlots;
  const int64_t n1 = n0 + kValueSlots < N ? n0 + kValueSlots : N;
  const float* a = attn + bj * N;
  const float* v = mem_v(b) + j * dh;
  if (g < G) {
    for (int64_t c = c0; c < dh; c += cols) {
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains in flight, added in a fixed order
      int64_t n = n0 + g;
      for (; n + 3 * G < n1; n += 4 * G) {
#pragma unroll
        for (int u = 0; u < 4; ++u) s[u] += a[n + u * G] * v[(n + u * G) * d + c];
      }
      for (; n < n1; n += G) s[0] += a[n] * v[n * d + c];
      group_sums[g * dh + c] = (s[0] + s[1]) + (s[2] + s[3]);
    }
  }
  __syncthreads();
  float* out = partial + (bj * gridDim.y + blockIdx.y) * dh;
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) {
    float s = 0.0f;
    for (int64_t k = 0; k < G; ++k) s += group_sums[k * dh + c];
    out[c] = s;
  }
}

// e[b, j*dh + c] = the chunks' partial sums in order. A block per (b, j).
__global__ void MemoryValuesReduceKernel(const float* __restrict__ partial, int64_t chunks, int64_t d, int64_t heads,
                                         float* __restrict__ e) {
  const int64_t bj = blockIdx.x, b = bj / heads, j = bj % heads, dh = d / heads;
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) {
    float s = 0.0f;
    for (int64_t k = 0; k < chunks; ++k) s += partial[(bj * chunks + k) * dh + c];
    e[b * d + j * dh + c] = s;
  }
}

// mass_b[j, n] += attn[b, j, n] and acc_b[n, j*dh + c] += attn[b, j, n] · offer_b[j*dh + c]:
// a block per (b, n) row of the sums, its threads over the columns (coalesced), the masses
// by the first thread of each head.
template <typename M>
__global__ void AccumulateOneTokenKernel(const float* __restrict__ attn, const float* __restrict__ offer,
                                         int64_t offer_ld, int64_t N, int64_t d, int64_t heads, M mass, M acc) {
  const int64_t bn = blockIdx.x, b = bn / N, n = bn % N;
  const int dh = static_cast<int>(d / heads);
  float* row = acc(b) + n * d;
  const float* o = offer + b * offer_ld;
  const float* a = attn + b * heads * N + n;
  for (int col = static_cast<int>(threadIdx.x); col < d; col += static_cast<int>(blockDim.x)) {
    const int j = col / dh;
    const float p = a[static_cast<int64_t>(j) * N];
    row[col] += p * o[col];
    if (col % dh == 0) mass(b)[static_cast<int64_t>(j) * N + n] += p;
  }
}

Status CheckDecode(const char* op, int64_t B, int64_t N, int64_t d, int64_t heads, int64_t ld) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory(op, 1, N, d, heads));
  if (B < 0 || B * N > (int64_t{1} << 31) - 1 || ld < d) {
    return Status::InvalidArgument(std::string(op) + ": B=" + std::to_string(B) + " ld=" + std::to_string(ld));
  }
  return Status::Ok();
}

template <typename K, typename V>
Status LaunchRead(const float* q, int64_t q_ld, K mem_k, V mem_v, int64_t B, int64_t N, int64_t d, int64_t heads,
                  float* attn, float* e, float* scratch, cudaStream_t stream) {
  const int64_t dh = d / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const dim3 grid(static_cast<unsigned int>(B * heads), static_cast<unsigned int>((N + kSlotsPerBlock - 1) / kSlotsPerBlock));
  MemoryScoresKernel<<<grid, kThreads, 0, stream>>>(q, q_ld, mem_k, N, d, heads, scale, attn);
  LM2_RETURN_IF_ERROR(CheckLaunch("MemoryScoresKernel"));
  LM2_RETURN_IF_ERROR(SoftmaxRows(attn, B * heads, N, 0, 0, stream));
  const int64_t cols = dh < kThreads ? dh : kThreads;
  const int64_t smem = (kThreads / cols) * dh * static_cast<int64_t>(sizeof(float));
  if (smem > 48 * 1024) return Status::InvalidArgument("MemoryRead (decode): head width " + std::to_string(dh) + " too wide");
  const int64_t chunks = (N + kValueSlots - 1) / kValueSlots;
  MemoryValuesPartialKernel<<<dim3(static_cast<unsigned int>(B * heads), static_cast<unsigned int>(chunks)), kThreads,
                              static_cast<size_t>(smem), stream>>>(attn, mem_v, N, d, heads, scratch);
  LM2_RETURN_IF_ERROR(CheckLaunch("MemoryValuesPartialKernel"));
  MemoryValuesReduceKernel<<<static_cast<unsigned int>(B * heads), 64, 0, stream>>>(scratch, chunks, d, heads, e);
  return CheckLaunch("MemoryValuesReduceKernel");
}

}  // namespace

int64_t MemoryReadDecodeScratch(int64_t B, int64_t N, int64_t d) {
  return B * ((N + kValueSlots - 1) / kValueSlots) * d;
}

Status MemoryReadOneToken(const float* q, int64_t q_ld, const float* mem_k, const float* mem_v, int64_t N, int64_t d,
                          int64_t heads, float* attn, float* e, float* scratch, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckDecode("MemoryReadOneToken", 1, N, d, heads, q_ld));
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadOneToken", {q, mem_k, mem_v, attn, e, scratch}));
  return LaunchRead(q, q_ld, One<const float>{mem_k}, One<const float>{mem_v}, 1, N, d, heads, attn, e, scratch,
                    stream);
}

Status MemoryReadBatch(const float* q, int64_t q_ld, const float* const* mem_k, const float* const* mem_v, int64_t B,
                       int64_t N, int64_t d, int64_t heads, float* attn, float* e, float* scratch,
                       cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckDecode("MemoryReadBatch", B, N, d, heads, q_ld));
  if (B == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadBatch", {q, mem_k, mem_v, attn, e, scratch}));
  return LaunchRead(q, q_ld, PerSession<const float>{mem_k}, PerSession<const float>{mem_v}, B, N, d, heads, attn, e,
                    scratch, stream);
}

Status AccumulateWriteOneToken(const float* attn, const float* offer, int64_t N, int64_t d, int64_t heads, float* mass,
                               float* acc, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckDecode("AccumulateWriteOneToken", 1, N, d, heads, d));
  LM2_RETURN_IF_ERROR(RequireNonNull("AccumulateWriteOneToken", {attn, offer, mass, acc}));
  AccumulateOneTokenKernel<<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(attn, offer, d, N, d, heads,
                                                                                 One<float>{mass}, One<float>{acc});
  return CheckLaunch("AccumulateOneTokenKernel");
}

}  // namespace lm2::runtime::cuda

namespace lm2::runtime::cuda {
namespace {

// Session b's token: attn row [heads, N] and offer row [d] into its staging slot slots[b],
// masses added now. A block per (b, j): the head's N probabilities and dh offer columns.
__global__ void StageWriteKernel(const float* __restrict__ attn, const float* __restrict__ offer, int64_t offer_ld,
                                 int64_t N, int64_t d, int64_t heads, const int64_t* __restrict__ slots,
                                 float* const* __restrict__ pending_attn, float* const* __restrict__ pending_offer,
                                 float* const* __restrict__ mass) {
  const int64_t bj = blockIdx.x, b = bj / heads, j = bj % heads, dh = d / heads;
  const int64_t slot = slots[b];
  const float* a = attn + bj * N;
  float* pa = pending_attn[b] + (slot * heads + j) * N;
  float* m = mass[b] + j * N;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const float p = a[n];
    pa[n] = p;
    m[n] += p;
  }
  const float* o = offer + b * offer_ld + j * dh;
  float* po = pending_offer[b] + slot * d + j * dh;
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) po[c] = o[c];
}

}  // namespace

Status StageWriteBatch(const float* attn, const float* offer, int64_t offer_ld, int64_t B, int64_t N, int64_t d,
                       int64_t heads, const int64_t* slots, float* const* pending_attn, float* const* pending_offer,
                       float* const* mass, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("StageWriteBatch", 1, N, d, heads));
  if (B < 0 || B * heads > (int64_t{1} << 31) - 1 || offer_ld < d) {
    return Status::InvalidArgument("StageWriteBatch: B=" + std::to_string(B) + " offer_ld=" + std::to_string(offer_ld));
  }
  if (B == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("StageWriteBatch", {attn, offer, slots, pending_attn, pending_offer, mass}));
  StageWriteKernel<<<static_cast<unsigned int>(B * heads), kThreads, 0, stream>>>(
      attn, offer, offer_ld, N, d, heads, slots, pending_attn, pending_offer, mass);
  return CheckLaunch("StageWriteKernel");
}

Status FlushStagedWrites(cublasHandle_t handle, const float* pending_attn, const float* pending_offer, int64_t tokens,
                         int64_t N, int64_t d, int64_t heads, float* acc, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("FlushStagedWrites", tokens, N, d, heads));
  if (tokens == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("FlushStagedWrites", {handle, pending_attn, pending_offer, acc}));
  // Per head j: acc_j [N, dh] += A_jᵀ · O_j with A_j the [tokens, N] rows of head j (row
  // stride heads*N, head offset N) and O_j the [tokens, dh] offer columns (row stride d).
  const int64_t dh = d / heads;
  return GemmStridedBatchedF32(handle, CUBLAS_OP_N, CUBLAS_OP_T, dh, N, tokens, 1.0f, pending_offer, d, dh,
                               pending_attn, heads * N, N, 1.0f, acc, d, dh, heads, stream);
}

}  // namespace lm2::runtime::cuda
