// The memory read and write sums for one token per session (decode), as bandwidth-bound
// kernels: at one token the work is a GEMV over each session's memory K and V (bf16) and a
// rank-one update of its write sums, which cuBLAS's (batched) GEMMs run far below the
// memory bandwidth. One session (B = 1) or many (a device array of per-session pointers,
// a batched decode step); the same kernels either way. fp32 math throughout (a token staged
// for the tiled write kernel leaves its query and offer in bf16: MemoryStage).
#include <algorithm>
#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "cuda/memory_tiled.cuh"
#include "cuda/mma.cuh"
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

using bf16 = __nv_bfloat16;

// ---- The fast read (dh a multiple of 8, dh / 8 a power of two up to 32) ----------------------
//
// Flash-decoding over the slots: a block per (16-slot chunk, session). Thread t owns the 8
// columns [8t, 8t + 8) of every slot row (16-byte loads: a block reads whole rows of K and V,
// coalesced), so the dh / 8 threads of a memory head hold its query in registers and add
// their partial dot products by shuffles. Each block keeps a running max, sum and weighted
// value sum per head over its 16 slots (all their K and V loads in flight together) and
// leaves them, with the raw scores, for the combine kernel.

constexpr int kChunkSlots = 16;  // slots of a block, their K and V loads in flight together

__device__ __forceinline__ void Widen8(const uint4& v, float* out) {
  const auto* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(p[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// q · K[n, head] over the head's dh columns: this thread's 8 (k, bf16) and its g - 1
// neighbours' (a power of two up to 32, aligned in the warp), added by shuffles.
__device__ __forceinline__ float HeadDot(const float (&qv)[8], const uint4& k, int g) {
  float kf[8];
  Widen8(k, kf);
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) dot = fmaf(qv[i], kf[i], dot);
  for (int o = g / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  return dot;
}

// A chunk's results, by each of the block's active threads (t < d / 8): the chunk's raw
// scores into attn (by a head's first thread; not where attn is null: a step that stages
// its tokens' queries needs no probabilities), then into part this thread's 8 columns of
// Σ p v and (by a head's first thread) the head's (m, l): the combine kernel's input.
__device__ __forceinline__ void StoreScores(const float (&sc)[kChunkSlots], int b, int chunk, int N, int heads, int g,
                                            int t, float* __restrict__ attn) {
  const int n0 = chunk * kChunkSlots, j = t / g;
  if (attn != nullptr && t % g == 0) {
    float* a = attn + (static_cast<int64_t>(b) * heads + j) * N;
#pragma unroll
    for (int s = 0; s < kChunkSlots; ++s) {
      if (n0 + s < N) a[n0 + s] = sc[s];
    }
  }
}
// Partial `entry` of session b's `entries` (a chunk's, or a merged run's).
__device__ __forceinline__ void StorePartial(const float (&acc)[8], float m, float l, int b, int entry, int entries,
                                             int d, int heads, int g, int t, float* __restrict__ part) {
  const int j = t / g;
  float* out = part + (static_cast<int64_t>(b) * entries + entry) * (d + 2 * heads);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[t * 8 + i] = acc[i];
  if (t % g == 0) {
    out[d + 2 * j] = m;
    out[d + 2 * j + 1] = l;
  }
}
__device__ __forceinline__ void StoreChunk(const float (&sc)[kChunkSlots], const float (&acc)[8], float m, float l,
                                           int b, int chunk, int chunks, int N, int d, int heads, int g, int t,
                                           float* __restrict__ attn, float* __restrict__ part) {
  StoreScores(sc, b, chunk, N, heads, g, t, attn);
  StorePartial(acc, m, l, b, chunk, chunks, d, heads, g, t, part);
}

// part[(b * chunks + chunk) * (d + 2 * heads) + ...]: [0, d) the chunk's Σ_n p_n V[n, :] with
// p_n = exp(s_n - m_j), then (m_j, l_j = Σ_n p_n) per head j. attn gets the raw scores s.
// K and V rows are loaded before the wait for the predecessor (the segment's memory K/V are
// not written during a step); the query after it.
template <typename KV>
__global__ void MemoryReadPartialKernel(const float* __restrict__ q, int64_t q_ld, KV mem_k, KV mem_v, int N, int d,
                                        int heads, int g, float scale, float* __restrict__ attn,
                                        float* __restrict__ part) {
  const int b = static_cast<int>(blockIdx.y), chunk = static_cast<int>(blockIdx.x), chunks = static_cast<int>(gridDim.x);
  const int t = static_cast<int>(threadIdx.x), vt = d / 8;
  const bool active = t < vt;  // the block is rounded up to whole warps; the rest only shuffle
  const int n0 = chunk * kChunkSlots;
  const uint4* K = reinterpret_cast<const uint4*>(mem_k(b));
  const uint4* V = reinterpret_cast<const uint4*>(mem_v(b));
  uint4 kr[kChunkSlots], vr[kChunkSlots];
#pragma unroll
  for (int s = 0; s < kChunkSlots; ++s) {
    const bool ok = active && n0 + s < N;
    const int64_t at = static_cast<int64_t>(n0 + s) * vt + t;
    kr[s] = ok ? __ldcs(K + at) : make_uint4(0, 0, 0, 0);
    vr[s] = ok ? __ldcs(V + at) : make_uint4(0, 0, 0, 0);
  }
  WaitForPredecessor();  // q is the output of an earlier kernel of the step
  AllowDependents();
  float qv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) qv[i] = active ? q[b * q_ld + t * 8 + i] : 0.0f;
  float sc[kChunkSlots];
  float m = -INFINITY;
#pragma unroll
  for (int s = 0; s < kChunkSlots; ++s) {
    sc[s] = n0 + s < N ? HeadDot(qv, kr[s], g) * scale : -INFINITY;
    m = fmaxf(m, sc[s]);  // finite: the chunk has a slot
  }
  float l = 0.0f, acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll
  for (int s = 0; s < kChunkSlots; ++s) {
    const float p = expf(sc[s] - m);  // 0 past the last slot
    float vf[8];
    Widen8(vr[s], vf);
    l += p;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = fmaf(p, vf[i], acc[i]);
  }
  if (active) StoreChunk(sc, acc, m, l, b, chunk, chunks, N, d, heads, g, t, attn, part);
}

// ---- The streamed read (a batched step: each block a run of chunks) ---------------------------
//
// The fast read's block holds its chunk's K and V loads in registers (~155 a thread: one
// block an SM) and exits once they are used, so a multiprocessor alternates between loading
// and computing: a batched step's read of the sessions' K/V ran at ~64% of the copy
// bandwidth. Here a block per (run of chunks, session) streams its chunks through a ring of
// kStreamStages stages in shared memory by cp.async, a stage kStageSlots rows of K or of V
// (a chunk's K rows, then its V rows), so the next stages' copies are in flight while one is
// used. Each thread copies, and later reads, only its own 16-byte pieces (the fast read's
// thread layout), so no block barrier is needed. The arithmetic is the fast read's, chunk by
// chunk, in the same order, into the same partials: the results are bit-identical to it for
// any run length (a session's tokens do not depend on the batch), and the combine kernel is
// the same. The ring is small on purpose: at 64 KiB (d = 2048), 80 registers, three blocks
// share a multiprocessor and leave room for the step's other stream; rings of 128 KiB (one
// block an SM) read faster alone (bench breakdown 362 against 382 µs at 64 sessions) but
// made the whole step 12% slower, and 192 KiB was slower still (H200, docs/benchmarks.md).
constexpr int kStageSlots = 2;    // rows of K or of V a stage
constexpr int kStreamStages = 8;  // the ring: half a chunk's stages
constexpr int kStagesPerChunk = 2 * kChunkSlots / kStageSlots;  // a chunk's K rows, then its V rows
static_assert(kStagesPerChunk % kStreamStages == 0, "a stage's buffer follows from its place in the chunk");
// Sessions from which a batched step reads through the streamed kernel.
constexpr int64_t kStreamMinSessions = 2;
// Sessions from which a streamed block merges its run's chunks into one partial (online
// softmax across the run) instead of leaving one per chunk: 1 MiB of partials a session and
// layer at the paper's shape written and read back otherwise, ~12% of the K/V bytes. The
// merge sums in another order than the one-pass read, so it starts past the GEMV kernels'
// rows (CudaOptions::gemv_max_rows, at most 8), where a session's results already differ
// from its own alone by fp32 rounding (cuBLAS's order); up to 8 sessions keep the one-pass
// read's bits.
constexpr int64_t kMergeRunMinSessions = kGemvMaxRows + 1;

constexpr int64_t StreamSharedBytes(int64_t d) { return int64_t{kStreamStages} * kStageSlots * (d / 8) * 16; }

template <typename KV, bool kMergeRun>
__global__ void __launch_bounds__(kThreads)
    MemoryReadStreamKernel(const float* __restrict__ q, int64_t q_ld, KV mem_k, KV mem_v, int N, int run, int d,
                           int heads, int g, float scale, float* __restrict__ attn, float* __restrict__ part) {
  extern __shared__ uint4 ring[];  // [kStreamStages][kStageSlots][d / 8]
  const int b = static_cast<int>(blockIdx.y), chunks = (N + kChunkSlots - 1) / kChunkSlots;
  const int c0 = static_cast<int>(blockIdx.x) * run, c1 = c0 + run < chunks ? c0 + run : chunks;
  const int t = static_cast<int>(threadIdx.x), vt = d / 8;
  const bool active = t < vt;  // the block is rounded up to whole warps; the rest only shuffle
  const uint4* K = reinterpret_cast<const uint4*>(mem_k(b));
  const uint4* V = reinterpret_cast<const uint4*>(mem_v(b));
  const auto piece = [&](int buf, int s) { return ring + (buf * kStageSlots + s) * vt + t; };
  // Stage `in_chunk` of chunk c's copies as one group (an empty group past the run, so that
  // the wait below always counts the same); rows past N zeros.
  const auto load = [&](int c, int in_chunk) {
    if (active && c < c1) {
      const int buf = in_chunk % kStreamStages;
      const int n = c * kChunkSlots + in_chunk % (kChunkSlots / kStageSlots) * kStageSlots;
      const uint4* src = in_chunk < kStagesPerChunk / 2 ? K : V;
#pragma unroll
      for (int s = 0; s < kStageSlots; ++s) {
        const bool ok = n + s < N;
        CopyAsync16(piece(buf, s), src + static_cast<int64_t>(ok ? n + s : 0) * vt + t, ok);
      }
    }
    CopyAsyncCommit();
  };
#pragma unroll
  for (int i = 0; i + 1 < kStreamStages; ++i) {  // K and V are not written during a step
    load(c0 + i / kStagesPerChunk, i % kStagesPerChunk);
  }
  WaitForPredecessor();  // q is the output of an earlier kernel of the step
  AllowDependents();
  float qv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) qv[i] = active ? q[b * q_ld + t * 8 + i] : 0.0f;
  float run_m = -INFINITY, run_l = 0.0f, run_acc[8];  // (kMergeRun) the run's chunks so far
#pragma unroll
  for (int i = 0; i < 8; ++i) run_acc[i] = 0.0f;
  for (int c = c0; c < c1; ++c) {
    const int n0 = c * kChunkSlots;
    float sc[kChunkSlots], m = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int in_chunk = 0; in_chunk < kStagesPerChunk; ++in_chunk) {
      constexpr int kAhead = kStreamStages - 1;  // into the buffer used last
      load(c + (in_chunk + kAhead) / kStagesPerChunk, (in_chunk + kAhead) % kStagesPerChunk);
      CopyAsyncWait<kStreamStages - 1>();  // this stage's copies (of the kStreamStages groups since) are in
#pragma unroll
      for (int s = 0; s < kStageSlots; ++s) {
        const int slot = in_chunk % (kChunkSlots / kStageSlots) * kStageSlots + s;
        const uint4 row = active ? *piece(in_chunk % kStreamStages, s) : make_uint4(0, 0, 0, 0);
        if (in_chunk < kStagesPerChunk / 2) {  // the chunk's scores and their max, as the fast read
          sc[slot] = n0 + slot < N ? HeadDot(qv, row, g) * scale : -INFINITY;
          m = fmaxf(m, sc[slot]);
        } else {  // its weighted values
          const float p = expf(sc[slot] - m);
          float vf[8];
          Widen8(row, vf);
          l += p;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = fmaf(p, vf[i], acc[i]);
        }
      }
    }
    if constexpr (kMergeRun) {
      if (active) StoreScores(sc, b, c, N, heads, g, t, attn);
      const float merged = fmaxf(run_m, m);  // finite: the chunk has a slot
      const float old_w = expf(run_m - merged), new_w = expf(m - merged);
      run_l = run_l * old_w + l * new_w;
#pragma unroll
      for (int i = 0; i < 8; ++i) run_acc[i] = run_acc[i] * old_w + acc[i] * new_w;
      run_m = merged;
    } else if (active) {
      StoreChunk(sc, acc, m, l, b, c, chunks, N, d, heads, g, t, attn, part);
    }
  }
  if constexpr (kMergeRun) {
    if (active) StorePartial(run_acc, run_m, run_l, b, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), d,
                             heads, g, t, part);
  }
  CopyAsyncWait<0>();  // (only empty groups are left)
}

constexpr int kCombineThreads = 1024;

// Session b's token, head j, into its staging slot (MemoryStage::staged): q and the offer in
// bf16 (zero past the head width) and the shift M log2(e) + log2(L), so that the write
// kernel's weights 2^(s' - shift), s' = bf16(q) · k log2(e) / sqrt(dh), are this read's
// probabilities exp(s - M) / L up to q's rounding (a prefill chunk's rounding too).
__device__ __forceinline__ void StageToken(const MemoryStage& stage, const float* __restrict__ q, int64_t q_ld, int b,
                                           int j, int d, int heads, float M, float L) {
  const int dh = d / heads, dhp = static_cast<int>(PaddedTileWidth(dh)), tid = static_cast<int>(threadIdx.x);
  const tiled::Scratch s = tiled::Carve(stage.staged[b], stage.capacity, heads, dhp);
  const int64_t row = j * s.tp + stage.slots[b];
  if (tid == 0) s.shift[row] = tiled::SoftmaxShift(M * kLog2e, L);
  for (int c = tid; c < dhp; c += kCombineThreads) {
    const bool in = c < dh;
    s.q[row * dhp + c] = __float2bfloat16(in ? q[b * q_ld + j * dh + c] : 0.0f);
    s.offer[row * dhp + c] = __float2bfloat16(in ? stage.offer[b * stage.offer_ld + j * dh + c] : 0.0f);
  }
}

// A block per (head j, session b): the global max M and sum L over the partials (`chunks`:
// the chunks', or a streamed read's merged runs'), e = Σ_c exp(m_c - M) acc_c / L (added in
// a fixed order: the same result every run), and the raw scores in attn turned into
// probabilities exp(s - M) / L, or the token staged (MemoryStage: its probabilities and
// masses, or, with `staged`, its q, offer and shift).
__global__ void __launch_bounds__(kCombineThreads)
    MemoryReadCombineKernel(const float* __restrict__ part, int chunks, int N, int d, int heads,
                            const float* __restrict__ q, int64_t q_ld, float* __restrict__ attn,
                            float* __restrict__ e, MemoryStage stage) {
  constexpr int kTile = 1024;  // chunk weights held in shared memory at a time
  __shared__ float scratch[32];
  __shared__ float sums[kCombineThreads];
  __shared__ float weight[kTile];
  WaitForPredecessor();
  AllowDependents();
  const int j = static_cast<int>(blockIdx.x), b = static_cast<int>(blockIdx.y), tid = static_cast<int>(threadIdx.x);
  const int dh = d / heads, stride = d + 2 * heads;
  const float* pb = part + static_cast<int64_t>(b) * chunks * stride;
  // Columns in passes of up to kCombineThreads; R groups of threads split the chunks of a column.
  const int cols = dh < kCombineThreads ? dh : kCombineThreads, R = kCombineThreads / cols;
  const int r = tid / cols, cc = tid % cols;
  float* a = attn != nullptr ? attn + (static_cast<int64_t>(b) * heads + j) * N : nullptr;
  constexpr int kPrefetch = 8;  // chunk partials per thread in the one-round form
  if (chunks <= kCombineThreads && dh <= kCombineThreads && (chunks + R - 1) / R <= kPrefetch &&
      N <= 2 * kCombineThreads) {
    // The common shapes: every value this block reads is loaded at once, then reduced (the
    // same arithmetic in the same order as the general form below, so the same results).
    const float mc = tid < chunks ? pb[tid * stride + d + 2 * j] : -INFINITY;
    const float lc = tid < chunks ? pb[tid * stride + d + 2 * j + 1] : 0.0f;
    float pv[kPrefetch];
#pragma unroll
    for (int k = 0; k < kPrefetch; ++k) {
      const int c = r + k * R;
      pv[k] = r < R && c < chunks ? pb[c * stride + j * dh + cc] : 0.0f;
    }
    float raw[2], old_mass[2] = {0.0f, 0.0f};
    float* m = stage.pending_attn != nullptr ? stage.mass[b] + static_cast<int64_t>(j) * N : nullptr;
    const bool scores = stage.staged == nullptr;  // (staged queries: the partials left none)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int n = tid + i * kCombineThreads;
      raw[i] = scores && n < N ? a[n] : 0.0f;
      if (m != nullptr && n < N) old_mass[i] = m[n];
    }
    const float M = BlockMax(mc, scratch);
    const float w = tid < chunks ? expf(mc - M) : 0.0f;
    if (tid < chunks) weight[tid] = w;
    const float L = BlockSum(tid < chunks ? lc * w : 0.0f, scratch);  // its barriers publish weight[]
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kPrefetch; ++k) {
      const int c = r + k * R;
      if (r < R && c < chunks) s += pv[k] * weight[c];
    }
    sums[tid] = s;
    __syncthreads();
    if (r == 0) {
      float total = 0.0f;
      for (int k = 0; k < R; ++k) total += sums[k * cols + cc];
      e[static_cast<int64_t>(b) * d + j * dh + cc] = total / L;
    }
    if (!scores) {
      StageToken(stage, q, q_ld, b, j, d, heads, M, L);
      return;
    }
    if (m == nullptr) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int n = tid + i * kCombineThreads;
        if (n < N) a[n] = expf(raw[i] - M) / L;
      }
      return;
    }
    const int64_t slot = stage.slots[b];
    float* pa = stage.pending_attn[b] + (slot * heads + j) * N;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int n = tid + i * kCombineThreads;
      if (n >= N) continue;
      const float p = expf(raw[i] - M) / L;
      pa[n] = p;
      m[n] = old_mass[i] + p;
    }
    if (tid < dh) stage.pending_offer[b][slot * d + j * dh + tid] = stage.offer[b * stage.offer_ld + j * dh + tid];
    return;
  }
  float mx = -INFINITY;
  for (int c = tid; c < chunks; c += kCombineThreads) mx = fmaxf(mx, pb[c * stride + d + 2 * j]);
  const float M = BlockMax(mx, scratch);
  float ls = 0.0f;
  for (int c = tid; c < chunks; c += kCombineThreads) ls += pb[c * stride + d + 2 * j + 1] * expf(pb[c * stride + d + 2 * j] - M);
  const float L = BlockSum(ls, scratch);
  for (int col0 = 0; col0 < dh; col0 += cols) {
    const int col = col0 + cc;
    float s = 0.0f;
    for (int c0 = 0; c0 < chunks; c0 += kTile) {
      const int n = chunks - c0 < kTile ? chunks - c0 : kTile;
      __syncthreads();  // the previous tile's weights are used
      for (int c = tid; c < n; c += kCombineThreads) weight[c] = expf(pb[(c0 + c) * stride + d + 2 * j] - M);
      __syncthreads();
      if (r < R && col < dh) {
        const float* pc = pb + static_cast<int64_t>(c0) * stride + j * dh + col;
#pragma unroll 8
        for (int c = r; c < n; c += R) s += pc[static_cast<int64_t>(c) * stride] * weight[c];
      }
    }
    __syncthreads();
    sums[tid] = s;
    __syncthreads();
    if (r == 0 && col < dh) {
      float total = 0.0f;
      for (int k = 0; k < R; ++k) total += sums[k * cols + cc];
      e[static_cast<int64_t>(b) * d + j * dh + col] = total / L;
    }
  }
  if (stage.staged != nullptr) {
    StageToken(stage, q, q_ld, b, j, d, heads, M, L);
    return;
  }
  if (stage.pending_attn == nullptr) {
    for (int n = tid; n < N; n += kCombineThreads) a[n] = expf(a[n] - M) / L;
    return;
  }
  // The token's write terms go straight to its staging slot (StageWriteKernel's work).
  const int64_t slot = stage.slots[b];
  float* pa = stage.pending_attn[b] + (slot * heads + j) * N;
  float* m = stage.mass[b] + static_cast<int64_t>(j) * N;
  for (int n = tid; n < N; n += kCombineThreads) {
    const float p = expf(a[n] - M) / L;
    pa[n] = p;
    m[n] += p;
  }
  const float* o = stage.offer + b * stage.offer_ld + j * dh;
  float* po = stage.pending_offer[b] + slot * d + j * dh;
  for (int c = tid; c < dh; c += kCombineThreads) po[c] = o[c];
}

// The one-pass read: a thread per 8 columns, at most kThreads of them (its 32 loads in
// flight take ~170 registers a thread: a 512-thread block at d 4096 would not launch).
bool FastRead(int64_t d, int64_t heads) {
  const int64_t dh = d / heads, g = dh / 8;
  return dh % 8 == 0 && g <= 32 && (g & (g - 1)) == 0 && d / 8 <= kThreads;
}

int64_t Chunks(int64_t N) { return (N + kChunkSlots - 1) / kChunkSlots; }

// ---- The general read (any head width) -------------------------------------------------------

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
  const bf16* k = mem_k(b) + j * dh;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSlotsPerBlock + warp * kSlotsPerWarp;
  float dot[kSlotsPerWarp];
#pragma unroll
  for (int s = 0; s < kSlotsPerWarp; ++s) dot[s] = 0.0f;
  for (int64_t c = lane; c < dh; c += 32) {
    const float qc = qr[c];
#pragma unroll
    for (int s = 0; s < kSlotsPerWarp; ++s) {
      if (n0 + s < N) dot[s] += qc * __bfloat162float(k[(n0 + s) * d + c]);
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
  const bf16* v = mem_v(b) + j * dh;
  if (g < G) {
    for (int64_t c = c0; c < dh; c += cols) {
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains in flight, added in a fixed order
      int64_t n = n0 + g;
      for (; n + 3 * G < n1; n += 4 * G) {
#pragma unroll
        for (int u = 0; u < 4; ++u) s[u] += a[n + u * G] * __bfloat162float(v[(n + u * G) * d + c]);
      }
      for (; n < n1; n += G) s[0] += a[n] * __bfloat162float(v[n * d + c]);
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

// The streamed read for B sessions, blocks of `threads` (the fast read's), where the device
// gives its blocks the shared memory: runs of chunks such that the B sessions' blocks make
// about one wave. *partials: the partials it left per session (its chunks, or from
// kMergeRunMinSessions its runs); 0: not launched (the caller runs the fast read).
template <typename KV>
Status LaunchStream(const float* q, int64_t q_ld, KV mem_k, KV mem_v, int64_t B, int64_t N, int64_t d, int64_t heads,
                    float scale, float* attn, float* scratch, unsigned int threads, cudaStream_t stream,
                    int64_t* partials) {
  *partials = 0;
  const bool merge = B >= kMergeRunMinSessions;
  const auto kernel = merge ? &MemoryReadStreamKernel<KV, true> : &MemoryReadStreamKernel<KV, false>;
  const int64_t bytes = StreamSharedBytes(d);
  LM2_ASSIGN_OR_RETURN(const int optin, CurrentDeviceAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  if (bytes > optin) return Status::Ok();
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), bytes, "MemoryReadBatch"));
  int per_sm = 0;
  LM2_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, static_cast<int>(threads), bytes));
  if (per_sm == 0) return Status::Ok();  // (no block fits: the fast read instead)
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  const int64_t chunks = Chunks(N);
  const int64_t runs_wanted = std::max<int64_t>(1, std::min<int64_t>(chunks, int64_t{per_sm} * sms / B));
  const int64_t run = (chunks + runs_wanted - 1) / runs_wanted, runs = (chunks + run - 1) / run;
  LM2_RETURN_IF_ERROR(CudaStatus(
      LaunchPdl(kernel, dim3(static_cast<unsigned int>(runs), static_cast<unsigned int>(B)), threads,
                static_cast<std::size_t>(bytes), stream, q, q_ld, mem_k, mem_v,
                static_cast<int>(N), static_cast<int>(run), static_cast<int>(d), static_cast<int>(heads),
                static_cast<int>(d / heads / 8), scale, attn, scratch),
      "MemoryReadStreamKernel"));
  *partials = merge ? runs : chunks;
  return Status::Ok();
}

template <typename KV>
Status LaunchRead(const float* q, int64_t q_ld, KV mem_k, KV mem_v, int64_t B, int64_t N, int64_t d, int64_t heads,
                  float* attn, float* e, float* scratch, const MemoryStage* stage, cudaStream_t stream) {
  const int64_t dh = d / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  if (FastRead(d, heads)) {
    const int64_t chunks = Chunks(N);
    const auto threads = static_cast<unsigned int>((d / 8 + 31) / 32 * 32);  // a thread per 8 columns, whole warps
    if (stage != nullptr && stage->staged != nullptr) attn = nullptr;  // no probabilities: the queries are staged
    int64_t partials = 0;  // per session, for the combine
    if (B >= kStreamMinSessions) {
      LM2_RETURN_IF_ERROR(
          LaunchStream(q, q_ld, mem_k, mem_v, B, N, d, heads, scale, attn, scratch, threads, stream, &partials));
    }
    if (partials == 0) {
      partials = chunks;
      LM2_RETURN_IF_ERROR(CudaStatus(
          LaunchPdl(&MemoryReadPartialKernel<KV>, dim3(static_cast<unsigned int>(chunks), static_cast<unsigned int>(B)),
                    threads, 0, stream, q, q_ld, mem_k, mem_v, static_cast<int>(N), static_cast<int>(d),
                    static_cast<int>(heads), static_cast<int>(dh / 8), scale, attn, scratch),
          "MemoryReadPartialKernel"));
    }
    return CudaStatus(
        LaunchPdl(&MemoryReadCombineKernel, dim3(static_cast<unsigned int>(heads), static_cast<unsigned int>(B)),
                  kCombineThreads, 0, stream, static_cast<const float*>(scratch), static_cast<int>(partials),
                  static_cast<int>(N), static_cast<int>(d), static_cast<int>(heads), q, q_ld, attn, e,
                  stage != nullptr ? *stage : MemoryStage{}),
        "MemoryReadCombineKernel");
  }
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
  LM2_RETURN_IF_ERROR(CheckLaunch("MemoryValuesReduceKernel"));
  if (stage == nullptr) return Status::Ok();
  return StageWriteBatch(attn, stage->offer, stage->offer_ld, B, N, d, heads, stage->slots, stage->pending_attn,
                         stage->pending_offer, stage->mass, stream);
}

LM2_CUDA_KERNEL_MODULE(MemoryReadCombineKernel);

}  // namespace

bool DecodeStagesTokens(int64_t d, int64_t heads) {
  return MemoryReadWriteSupported(d, heads) && FastRead(d, heads);  // (the first checks d / heads)
}

int64_t MemoryReadDecodeScratch(int64_t B, int64_t N, int64_t d, int64_t heads) {
  if (FastRead(d, heads)) return B * Chunks(N) * (d + 2 * heads);
  return B * ((N + kValueSlots - 1) / kValueSlots) * d;
}

Status MemoryReadOneToken(const float* q, int64_t q_ld, const __nv_bfloat16* mem_k, const __nv_bfloat16* mem_v,
                          int64_t N, int64_t d, int64_t heads, float* attn, float* e, float* scratch,
                          cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckDecode("MemoryReadOneToken", 1, N, d, heads, q_ld));
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadOneToken", {q, mem_k, mem_v, attn, e, scratch}));
  return LaunchRead(q, q_ld, One<const bf16>{mem_k}, One<const bf16>{mem_v}, 1, N, d, heads, attn, e, scratch,
                    nullptr, stream);
}

Status MemoryReadBatch(const float* q, int64_t q_ld, const __nv_bfloat16* const* mem_k,
                       const __nv_bfloat16* const* mem_v, int64_t B, int64_t N, int64_t d, int64_t heads, float* attn,
                       float* e, float* scratch, const MemoryStage* stage, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckDecode("MemoryReadBatch", B, N, d, heads, q_ld));
  if (stage != nullptr) LM2_RETURN_IF_ERROR(CheckDecode("MemoryReadBatch (staging)", B, N, d, heads, stage->offer_ld));
  if (B == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadBatch", {q, mem_k, mem_v, e, scratch}));
  if (stage != nullptr && stage->staged != nullptr) {  // (attn unused)
    if (!DecodeStagesTokens(d, heads)) {
      return Status::InvalidArgument("MemoryReadBatch: queries cannot be staged at head width " +
                                     std::to_string(d / heads));
    }
    if (stage->capacity < 1) return Status::InvalidArgument("MemoryReadBatch: no staging slots");
    LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadBatch (staging)", {stage->offer, stage->slots, stage->staged}));
  } else {
    LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadBatch", {attn}));
    if (stage != nullptr) {
      LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadBatch (staging)", {stage->offer, stage->slots,
                                                                        stage->pending_attn, stage->pending_offer,
                                                                        stage->mass}));
    }
  }
  return LaunchRead(q, q_ld, PerSession<const bf16>{mem_k}, PerSession<const bf16>{mem_v}, B, N, d, heads, attn, e,
                    scratch, stage, stream);
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
