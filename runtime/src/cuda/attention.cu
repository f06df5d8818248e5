// Causal grouped-query self-attention over a KV cache, fp32: a decode kernel (one block per
// query row and head, head_dim <= 256) and a tiled prefill kernel (a block per query tile and head, key tiles
// through shared memory). Both use the online softmax (running max and sum, rescaled
// partial outputs), so no kernel holds a whole row of S scores and S has no limit.
// Correctness first: neither uses tensor cores yet (docs/cuda.md).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// ---- Decode: one block per (query t, head h) ----------------------------------------------

// Warps per block (W): warp w takes keys [Kw, Kw + K), then W·K further on. 8 while the step
// has few rows (up to kGemvMaxRows: few blocks, each should finish fast), 4 for larger
// batches (many blocks: 8 warps each measured slower at 64 sessions). The warp count sets the
// order of the sums, so a row's result is the same at any batch size up to kGemvMaxRows.
constexpr int kDecodeWarpsFew = 8, kDecodeWarpsMany = 4;
// Keys (K) a warp has in flight at once, their key and value rows together: 8 for head widths
// up to 64, fewer for wider heads (kCols registers per row and lane).
__host__ __device__ constexpr int DecodeKeys(int cols) { return cols <= 2 ? 8 : 16 / cols; }

// Where query row t's keys and values are, and how many it sees: one cache for T queries at
// its end (a sequence), or one cache per row at that row's position (a batch of sessions).
struct OneCache {
  static constexpr bool kFresh = false;
  const float* k;
  const float* v;
  int64_t T, S;
  __device__ const float* Keys(int64_t) const { return k; }
  __device__ const float* Values(int64_t) const { return v; }
  __device__ int64_t Visible(int64_t t) const { return S - T + t + 1; }  // query t sits at S - T + t
};
struct CachePerRow {
  static constexpr bool kFresh = false;
  const float* const* k;
  const float* const* v;
  const int64_t* positions;
  __device__ const float* Keys(int64_t t) const { return k[t]; }
  __device__ const float* Values(int64_t t) const { return v[t]; }
  __device__ int64_t Visible(int64_t t) const { return positions[t] + 1; }
};
// CachePerRow whose last visible row is this step's token, still in the stacked projection
// (RopeAttentionDecodeBatch): each block rotates its query head and its KV head's key from
// proj (SplitQkvRope's arithmetic) and writes the new k and v rows into the cache for the
// steps after; it attends to them from its shared-memory copy (every block of a KV group
// writes the same values to the same row: a benign race, identical bits, and no block reads
// that row from memory). The older rows, the rotary factors and the positions were written
// before the step's previous kernel ran, so the kernel loads its first keys and the factors
// before it waits for that kernel (PDL).
struct FreshRowPerCache {
  static constexpr bool kFresh = true;
  float* const* k;
  float* const* v;
  const int64_t* positions;
  const float* proj;
  int64_t proj_ld;
  const float2* factors;  // [rows, D/2]: RopeFactorsBatch of the positions
  __device__ const float* Keys(int64_t t) const { return k[t]; }
  __device__ const float* Values(int64_t t) const { return v[t]; }
  __device__ int64_t Visible(int64_t t) const { return positions[t] + 1; }
  // Row t's rotary factors [D/2] into f (shared memory): before the wait.
  __device__ void LoadFactors(int64_t t, int D, float2* f) const {
    const int half = D / 2;
    for (int p = static_cast<int>(threadIdx.x); p < half; p += blockDim.x) f[p] = factors[t * half + p];
  }
  // Fills q_new (kHeads rows, q_ld floats apart), k_new and v_new [D] for query heads h0,
  // ..., h0 + kHeads - 1 of row t (of one KV head, h0 / group), rotated by f (LoadFactors).
  template <int kHeads>
  __device__ void Prepare(int64_t t, int h0, int heads, int group, int D, const float2* f, float* q_new, int q_ld,
                          float* k_new, float* v_new) const {
    const int kvh = h0 / group, kv_heads = heads / group;
    const float* row = proj + t * proj_ld;
    for (int c = static_cast<int>(threadIdx.x); c < D; c += blockDim.x) {
#pragma unroll
      for (int j = 0; j < kHeads; ++j) q_new[j * q_ld + c] = row[static_cast<int64_t>(h0 + j) * D + c];
      k_new[c] = row[static_cast<int64_t>(heads + kvh) * D + c];
      v_new[c] = row[static_cast<int64_t>(heads + kv_heads + kvh) * D + c];
    }
    __syncthreads();
    const int64_t pos = positions[t];
    const int half = D / 2;
    if constexpr (kHeads == 1) {  // the general loop's pairs without its division (batch 1's kernels as measured)
      for (int i = static_cast<int>(threadIdx.x); i < D; i += blockDim.x) {  // q's pairs, then k's
        const int pair = i < half ? i : i - half;
        RotateHalfPair(i < half ? q_new : k_new, i < half ? q_new : k_new, pair, half, f[pair]);
      }
    } else {
      // Each q's pairs, then k's.
      for (int i = static_cast<int>(threadIdx.x); i < (kHeads + 1) * half; i += blockDim.x) {
        const int vec = i / half, pair = i - vec * half;
        float* x = vec < kHeads ? q_new + vec * q_ld : k_new;
        RotateHalfPair(x, x, pair, half, f[pair]);
      }
    }
    __syncthreads();
    const int64_t at = pos * kv_heads * D + static_cast<int64_t>(kvh) * D;
    for (int c = static_cast<int>(threadIdx.x); c < D; c += blockDim.x) {
      k[t][at + c] = k_new[c];
      v[t][at + c] = v_new[c];
    }
  }
};

// Lane l owns columns l, l + 32, ... (kCols of them, D <= 32 * kCols) of the query, of each
// key and value row and of the output, in registers. A warp loads K keys' key and value rows
// at once (one memory round trip: their latencies overlap), reduces the K dot products, then
// folds the K values into its running output with one online-softmax rescale; the warps'
// partial results merge at the end. AttentionDecodeKernel: a block per (row, head) over all
// its keys; AttentionDecodeSplitKernel (few rows, with scratch): a block per key range.
constexpr int kSplitKeys = 128;    // keys a range holds at least, where the row has more than one
constexpr int kMaxSplits = 16;     // ranges of a row at most
constexpr int kSplitPack = 4;      // query heads a split block serves in steps of more than two rows
// The most rows a step off the GEMV path splits with packed blocks (SplitsDecodeAttention): at
// 8 sessions after 2,048 tokens the packed split attention took 92.7 µs against 83.0 unsplit
// (the step even: 1.007), at 4 the step was 14% faster (H200).
constexpr int64_t kSplitPackMaxRows = 4;

struct DecodeSplit {
  unsigned int* counters;  // [rows * heads], zero between calls
  float* parts;            // [rows * heads * kMaxSplits, D + 2]: a range's Σ p v, then its max and sum
  int rows;
};

// The split scratch: item counters for kGemvMaxRows rows (whole 16-byte words), then the
// ranges' partial results; the same layout for any batch, so that counters stay zero
// between calls of different sizes.
constexpr int64_t SplitCounterWords(int64_t heads) { return (kGemvMaxRows * heads + 3) / 4 * 4; }

__host__ __device__ constexpr int Splits(int64_t visible) {
  const int64_t p = (visible + kSplitKeys - 1) / kSplitKeys;
  return static_cast<int>(p < 1 ? 1 : (p > kMaxSplits ? kMaxSplits : p));
}

// Splits(max_keys) rounded up to a power of two: the ranges a launch's grid is sized for.
constexpr int64_t SplitGridRanges(int64_t max_keys) {
  int64_t r = 1;
  while (r < Splits(max_keys)) r *= 2;
  return r;
}

// Shared memory of a decode block for kHeads query heads (of one KV head).
template <typename Rows, int kCols, int kDecodeWarps, int kHeads = 1>
struct DecodeShared {
  float wmax[kHeads][kDecodeWarps], wsum[kHeads][kDecodeWarps];
  float wacc[kHeads][kDecodeWarps][kCols * 32];
  float fresh[Rows::kFresh ? kHeads + 2 : 1][kCols * 32];  // the new token's q rows, k, v (FreshRowPerCache)
  float2 rope_f[Rows::kFresh ? kCols * 16 : 1];  // its rotary factors
};

// What a decode block's threads keep for their warp: kKeys key and value rows in flight.
template <int kCols>
struct DecodeRows {
  static constexpr int kKeys = DecodeKeys(kCols);
  float x[kKeys][kCols], y[kKeys][kCols];  // key rows, value rows
  // Keys [j0, j0 + kKeys) of k and v (kv_stride floats apart), lane's columns, except
  // fresh_row (taken from shared memory instead); from `end` on, zeros.
  __device__ __forceinline__ void Load(const float* k, const float* v, int64_t kv_stride, int D, int64_t j0,
                                       int64_t end, int64_t fresh_row) {
    const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
    for (int s = 0; s < kKeys; ++s) {
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int c = lane + 32 * i;
        const bool ok = j0 + s < end && j0 + s != fresh_row && c < D;
        x[s][i] = ok ? __ldg(k + (j0 + s) * kv_stride + c) : 0.0f;
        y[s][i] = ok ? __ldg(v + (j0 + s) * kv_stride + c) : 0.0f;
      }
    }
  }
};

// One warp's online softmax over keys [first, end) in steps of kDecodeWarps * kKeys (its keys
// of a block's range), for kHeads query rows (q_row, q_ld floats apart) that share the keys:
// each key and value row is loaded once for all of them, and each head's arithmetic, in its
// order, is that of a block of one head. Each head's max, sum and Σ p v (the lane's columns)
// go to the warp's entries of sh, for BlockMaxSum and BlockColumn after a barrier. loaded: the
// first step's rows are in `rows` already (the prologue's).
template <typename Rows, int kCols, int kDecodeWarps, int kHeads>
__device__ __forceinline__ void AttendKeys(DecodeRows<kCols>& rows,
                                           DecodeShared<Rows, kCols, kDecodeWarps, kHeads>& sh, const float* q_row,
                                           int64_t q_ld, const float* k, const float* v, int64_t kv_stride, int D,
                                           float scale, int64_t first, int64_t end, int64_t fresh_row, bool loaded) {
  constexpr int kKeys = DecodeRows<kCols>::kKeys;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float qr[kHeads][kCols];
  struct {
    float m, l, o[kCols];
  } p[kHeads];
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int c = lane + 32 * i;
      qr[j][i] = c < D ? q_row[j * q_ld + c] : 0.0f;
      p[j].o[i] = 0.0f;
    }
    p[j].m = -INFINITY;
    p[j].l = 0.0f;
  }
  for (int64_t j0 = first; j0 < end; j0 += kDecodeWarps * kKeys) {
    if (!loaded || j0 != first) rows.Load(k, v, kv_stride, D, j0, end, fresh_row);
    if constexpr (Rows::kFresh) {
#pragma unroll
      for (int s = 0; s < kKeys; ++s) {
        if (j0 + s != fresh_row) continue;
#pragma unroll
        for (int i = 0; i < kCols; ++i) {
          const int c = lane + 32 * i;
          rows.x[s][i] = c < D ? sh.fresh[kHeads][c] : 0.0f;  // after the heads' q rows
          rows.y[s][i] = c < D ? sh.fresh[kHeads + 1][c] : 0.0f;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      float sc[kKeys];
      float gm = -INFINITY;
#pragma unroll
      for (int s = 0; s < kKeys; ++s) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kCols; ++i) dot += qr[j][i] * rows.x[s][i];
        sc[s] = j0 + s < end ? WarpSum(dot) * scale : -INFINITY;
        gm = fmaxf(gm, sc[s]);
      }
      const float m_new = fmaxf(p[j].m, gm);  // finite: key j0 is in the range
      const float corr = expf(p[j].m - m_new);  // 0 on the first keys (m = -inf)
      p[j].l *= corr;
#pragma unroll
      for (int i = 0; i < kCols; ++i) p[j].o[i] *= corr;
#pragma unroll
      for (int s = 0; s < kKeys; ++s) {
        const float pr = expf(sc[s] - m_new);  // 0 past the range
        p[j].l += pr;
#pragma unroll
        for (int i = 0; i < kCols; ++i) p[j].o[i] += pr * rows.y[s][i];
      }
      p[j].m = m_new;
    }
  }
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
    if (lane == 0) {
      sh.wmax[j][warp] = p[j].m;
      sh.wsum[j][warp] = p[j].l;
    }
#pragma unroll
    for (int i = 0; i < kCols; ++i) sh.wacc[j][warp][lane + 32 * i] = p[j].o[i];
  }
}

// The warps' results merged (after a barrier): the block's max M and sum L over its keys, and
// its Σ p v for column c rescaled to M. A warp without keys has max -inf and adds nothing.
// (Head j of the block's kHeads.)
template <typename Rows, int kCols, int kDecodeWarps, int kHeads>
__device__ __forceinline__ void BlockMaxSum(const DecodeShared<Rows, kCols, kDecodeWarps, kHeads>& sh, int j, float& M,
                                            float& L) {
  M = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) M = fmaxf(M, sh.wmax[j][w]);
  L = 0.0f;
  for (int w = 0; w < kDecodeWarps; ++w) {
    if (sh.wmax[j][w] != -INFINITY) L += sh.wsum[j][w] * expf(sh.wmax[j][w] - M);
  }
}
template <typename Rows, int kCols, int kDecodeWarps, int kHeads>
__device__ __forceinline__ float BlockColumn(const DecodeShared<Rows, kCols, kDecodeWarps, kHeads>& sh, int j, float M,
                                             int c) {
  float r = 0.0f;
  for (int w = 0; w < kDecodeWarps; ++w) {
    if (sh.wmax[j][w] != -INFINITY) r += sh.wacc[j][w][c] * expf(sh.wmax[j][w] - M);
  }
  return r;
}
// Head j's keys merged (BlockMaxSum's M and L) and normalised into dst [D]: its output row
// when the block saw all of the row's keys.
template <typename Rows, int kCols, int kDecodeWarps, int kHeads>
__device__ __forceinline__ void WriteRow(const DecodeShared<Rows, kCols, kDecodeWarps, kHeads>& sh, int j, float M,
                                         float L, int D, float* dst) {
  const float inv = 1.0f / L;
  for (int c = static_cast<int>(threadIdx.x); c < D; c += kDecodeWarps * 32) dst[c] = BlockColumn(sh, j, M, c) * inv;
}

// A block per (row t, head h) over all of the row's keys.
template <typename Rows, int kCols, int kDecodeWarps>
__global__ void __launch_bounds__(kDecodeWarps * 32) AttentionDecodeKernel(const float* __restrict__ q, Rows rows,
                                                                        int heads, int group, int D, float scale,
                                                                        float* __restrict__ out) {
  __shared__ DecodeShared<Rows, kCols, kDecodeWarps> sh;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t t = blockIdx.x / heads;
  const int h = static_cast<int>(blockIdx.x % heads), kvh = h / group;
  const int64_t q_stride = static_cast<int64_t>(heads) * D, kv_stride = static_cast<int64_t>(heads / group) * D;
  DecodeRows<kCols> kv;
  const int64_t first = static_cast<int64_t>(warp) * DecodeRows<kCols>::kKeys;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t visible = 0, fresh_row = -1;
  if constexpr (Rows::kFresh) {  // written before the previous kernel: loaded while it ends
    k = rows.Keys(t) + static_cast<int64_t>(kvh) * D;
    v = rows.Values(t) + static_cast<int64_t>(kvh) * D;
    visible = rows.Visible(t);
    fresh_row = visible - 1;
    rows.LoadFactors(t, D, sh.rope_f);
    if (first < visible) kv.Load(k, v, kv_stride, D, first, visible, fresh_row);
  }
  WaitForPredecessor();  // q and (but for FreshRowPerCache) the cache rows come from the kernels before
  AllowDependents();
  const float* q_row = q + t * q_stride + static_cast<int64_t>(h) * D;
  if constexpr (Rows::kFresh) {
    rows.template Prepare<1>(t, h, heads, group, D, sh.rope_f, sh.fresh[0], kCols * 32, sh.fresh[1], sh.fresh[2]);
    q_row = sh.fresh[0];
  } else {
    k = rows.Keys(t) + static_cast<int64_t>(kvh) * D;
    v = rows.Values(t) + static_cast<int64_t>(kvh) * D;
    visible = rows.Visible(t);
  }
  AttendKeys(kv, sh, q_row, D, k, v, kv_stride, D, scale, first, visible, fresh_row, Rows::kFresh);
  __syncthreads();
  float M = 0.0f, L = 0.0f;
  BlockMaxSum(sh, 0, M, L);  // warp 0 has key 0: a finite max
  WriteRow(sh, 0, M, L, D, out + t * q_stride + static_cast<int64_t>(h) * D);
}

// Split over key ranges (DecodeSplit): a row's keys cut into Splits(visible) contiguous
// ranges, the same whatever the batch. A range is always one block's: its warps take keys
// w K, w K + W K, ... (as the unsplit kernel's within a row), and the block merges them into
// the range's (max, sum, Σ p v), which goes to the scratch; the row and head's output is the
// ranges' merge in range order: the same bits whichever blocks computed which ranges. A work
// item is one (row, kHeads query heads of one KV head, group): the row's ranges cut into
// min(groups, ranges) groups of consecutive ranges, which a block walks one after another
// (`groups` from the batch size: a block a range for one row, a few ranges a block for
// eight); blocks take items in a grid-stride loop. kHeads > 1 (kSplitPack, steps of more than
// two rows) loads each key once for the pack's heads (AttendKeys), each head's arithmetic
// unchanged: the same bits as a block a head. The block that finishes an item's last group
// merges each of its heads (a counter per row and first head, set back to zero). A row of
// one range (up to kSplitKeys keys) is written directly: the unsplit kernel's arithmetic,
// so its bits. kDecodeWarpsFew warps; registers capped for three blocks an SM at kHeads 1
// (80: one fits beside a memory-read block, which a batch-1 step runs at the same time; at
// 119 with two an SM, batch-1 decode was 2% slower at short contexts), two at kSplitPack.
template <typename Rows, int kCols, int kHeads>
__global__ void __launch_bounds__(kDecodeWarpsFew * 32, kHeads > 1 ? 2 : 3)
    AttentionDecodeSplitKernel(const float* __restrict__ q, Rows rows, int heads, int group, int D, float scale,
                               float* __restrict__ out, DecodeSplit split, int groups) {
  constexpr int kWarps = kDecodeWarpsFew, kKeys = DecodeRows<kCols>::kKeys, kStep = kWarps * kKeys;
  __shared__ DecodeShared<Rows, kCols, kWarps, kHeads> sh;
  __shared__ bool merges;                                     // this block merges its item's row and heads
  __shared__ float range_w[kMaxSplits], range_l[kMaxSplits];  // and the ranges' maxima (then weights), sums
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t q_stride = static_cast<int64_t>(heads) * D, kv_stride = static_cast<int64_t>(heads / group) * D;
  const int64_t part_floats = D + 2;  // a range's partial: Σ p v [D], max, sum
  // Item `item` as (row t, head h, group g of `gs`) of a row of `ranges` ranges: the items of
  // rows 0, 1, ... in turn, heads * min(groups, ranges) each; false past the last. Every warp
  // alike: lane r < rows takes row r's length (one load, not one a row), then a scan.
  auto item_of = [&](int64_t item, int& t, int& h, int& g, int& gs, int& ranges) {
    const int r_ranges = lane < split.rows ? Splits(rows.Visible(lane)) : 0;
    const int r_groups = r_ranges < groups ? r_ranges : groups;
    int64_t end = static_cast<int64_t>(heads / kHeads) * r_groups;  // row `lane`'s items end here, after the scan
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t before = __shfl_up_sync(0xffffffffu, end, o);
      if (lane >= o) end += before;
    }
    const int row = __popc(__ballot_sync(0xffffffffu, lane < split.rows && end <= item));
    const int64_t begin = __shfl_sync(0xffffffffu, end, row > 0 ? row - 1 : 0);
    ranges = __shfl_sync(0xffffffffu, r_ranges, row < 32 ? row : 0);
    gs = __shfl_sync(0xffffffffu, r_groups, row < 32 ? row : 0);
    if (row >= split.rows) return false;
    t = row;
    item -= row == 0 ? 0 : begin;
    h = static_cast<int>(item / gs) * kHeads;
    g = static_cast<int>(item % gs);
    return true;
  };
  // Range r of `ranges` over `visible` keys: [begin, end), whole steps of kStep keys each.
  auto range_of = [&](int64_t visible, int r, int ranges, int64_t& begin, int64_t& end) {
    const int64_t per = (visible + ranges - 1) / ranges;
    const int64_t chunk = (per + kStep - 1) / kStep * kStep;
    begin = r * chunk;
    end = begin + chunk < visible ? begin + chunk : visible;
  };

  int64_t item = blockIdx.x, begin = 0, end = 0, visible = 0, fresh_row = -1;
  int t = 0, h = 0, g = 0, gs = 1, ranges = 1;
  DecodeRows<kCols> kv;
  const float* k = nullptr;
  const float* v = nullptr;
  auto locate = [&] {
    k = rows.Keys(t) + static_cast<int64_t>(h / group) * D;
    v = rows.Values(t) + static_cast<int64_t>(h / group) * D;
    visible = rows.Visible(t);
    fresh_row = Rows::kFresh ? visible - 1 : -1;
  };
  auto first_range = [&] { return g * ranges / gs; };
  bool have = false;
  if constexpr (Rows::kFresh) {  // positions, factors and older rows: written before the previous kernel
    have = item_of(item, t, h, g, gs, ranges);
    if (have) {
      locate();
      range_of(visible, first_range(), ranges, begin, end);
      rows.LoadFactors(t, D, sh.rope_f);
      if (begin + warp * kKeys < end) kv.Load(k, v, kv_stride, D, begin + warp * kKeys, end, fresh_row);
    }
  }
  WaitForPredecessor();  // (but for FreshRowPerCache) the positions and cache rows come from the kernels before
  AllowDependents();
  if constexpr (!Rows::kFresh) have = item_of(item, t, h, g, gs, ranges);
  for (bool first_item = true; have; first_item = false) {
    if (!first_item) __syncthreads();  // the item before no longer reads the shared arrays
    if (!Rows::kFresh || !first_item) locate();
    const float* q_row = q + t * q_stride + static_cast<int64_t>(h) * D;
    int64_t q_ld = D;
    if constexpr (Rows::kFresh) {
      if (!first_item) rows.LoadFactors(t, D, sh.rope_f);
      rows.template Prepare<kHeads>(t, h, heads, group, D, sh.rope_f, sh.fresh[0], kCols * 32, sh.fresh[kHeads],
                                    sh.fresh[kHeads + 1]);
      q_row = sh.fresh[0];
      q_ld = kCols * 32;
    }
    const int64_t th = static_cast<int64_t>(t) * heads + h;  // the pack's first head (its counter)
    float* dst = out + t * q_stride + static_cast<int64_t>(h) * D;  // head h + j's row: dst + j D
    float* parts = split.parts + th * kMaxSplits * part_floats;  // head h + j's: + j kMaxSplits part_floats
    const int r0 = first_range(), r1 = (g + 1) * ranges / gs;
    for (int r = r0; r < r1; ++r) {
      range_of(visible, r, ranges, begin, end);
      if (r != r0) __syncthreads();  // the range before's warp results are read
      AttendKeys(kv, sh, q_row, q_ld, k, v, kv_stride, D, scale, begin + warp * kKeys, end, fresh_row,
                 Rows::kFresh && first_item && r == r0);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        float M = 0.0f, L = 0.0f;
        BlockMaxSum(sh, j, M, L);  // an empty range (the last of a short row's): max -inf, sum 0
        if (ranges == 1) {  // the whole row: normalised here
          WriteRow(sh, j, M, L, D, dst + j * D);
        } else {
          float* part = parts + (j * kMaxSplits + r) * part_floats;
          for (int c = static_cast<int>(threadIdx.x); c < D; c += kWarps * 32) part[c] = BlockColumn(sh, j, M, c);
          if (threadIdx.x == 0) {
            part[D] = M;
            part[D + 1] = L;
          }
        }
      }
    }
    if (ranges > 1) {
      if (gs > 1) {  // other blocks hold other groups: the last to finish merges
        __threadfence();  // the partials are visible before the count says so
        __syncthreads();
        if (threadIdx.x == 0) merges = atomicAdd(split.counters + th, 1u) == static_cast<unsigned int>(gs) - 1;
        __syncthreads();
        if (merges) __threadfence();
      } else {
        __syncthreads();  // every range is this block's
      }
      for (int j = 0; j < kHeads && (gs == 1 || merges); ++j) {  // every range in order: weights through shared memory
        if (j > 0) __syncthreads();  // the head before's weights are read
        const float* parts_j = parts + j * kMaxSplits * part_floats;
        float* dst_j = dst + j * D;
        if (static_cast<int>(threadIdx.x) < ranges) {
          range_w[threadIdx.x] = __ldcg(parts_j + threadIdx.x * part_floats + D);
          range_l[threadIdx.x] = __ldcg(parts_j + threadIdx.x * part_floats + D + 1);
        }
        __syncthreads();
        float M = -INFINITY;
        for (int r = 0; r < ranges; ++r) M = fmaxf(M, range_w[r]);  // finite: range 0 has key 0
        float L = 0.0f;
        for (int r = 0; r < ranges; ++r) L += range_l[r] * expf(range_w[r] - M);  // 0 for an empty range
        __syncthreads();  // every thread has read the maxima
        if (static_cast<int>(threadIdx.x) < ranges) range_w[threadIdx.x] = expf(range_w[threadIdx.x] - M);
        __syncthreads();
        const float inv = 1.0f / L;
        for (int c = static_cast<int>(threadIdx.x); c < D; c += kWarps * 32) {
          float vals[kMaxSplits];  // every range's sum for column c, loaded at once
#pragma unroll
          for (int r = 0; r < kMaxSplits; ++r) vals[r] = r < ranges ? __ldcg(parts_j + r * part_floats + c) : 0.0f;
          float acc = 0.0f;
#pragma unroll
          for (int r = 0; r < kMaxSplits; ++r) {
            if (r < ranges) acc += vals[r] * range_w[r];
          }
          dst_j[c] = acc * inv;
        }
        if (gs > 1 && j == kHeads - 1 && threadIdx.x == 0) split.counters[th] = 0;  // for the next call
      }
    }
    item += gridDim.x;
    have = item_of(item, t, h, g, gs, ranges);
  }
}

// launch(std::integral_constant<int, kCols>{}) for the registers a lane needs for D columns
// (D <= kMaxDecodeHeadDim).
template <typename Launch>
cudaError_t ByHeadWidth(int D, Launch launch) {
  if (D <= 32) return launch(std::integral_constant<int, 1>{});
  if (D <= 64) return launch(std::integral_constant<int, 2>{});
  if (D <= 128) return launch(std::integral_constant<int, 4>{});
  return launch(std::integral_constant<int, 8>{});
}

// The decode kernel with kWarps warps per block.
template <int kWarps, typename Rows>
cudaError_t LaunchDecodeWarps(const float* q, Rows rows, int64_t blocks, int H, int group, int D, float scale,
                              float* out, cudaStream_t stream) {
  return ByHeadWidth(D, [&](auto cols) {
    return LaunchPdl(&AttentionDecodeKernel<Rows, decltype(cols)::value, kWarps>, static_cast<unsigned int>(blocks),
                     dim3(kWarps * 32), 0, stream, q, rows, H, group, D, scale, out);
  });
}

// The split kernel over `blocks` blocks, `pack` query heads a block (1 or kSplitPack).
template <typename Rows>
cudaError_t LaunchDecodeSplit(const float* q, Rows rows, int64_t blocks, int H, int group, int D, float scale,
                              float* out, DecodeSplit split, int groups, int pack, cudaStream_t stream) {
  return ByHeadWidth(D, [&](auto cols) {
    constexpr int kCols = decltype(cols)::value;
    auto launch = [&](auto kernel) {
      return LaunchPdl(kernel, static_cast<unsigned int>(blocks), dim3(kDecodeWarpsFew * 32), 0, stream, q, rows, H,
                       group, D, scale, out, split, groups);
    };
    if constexpr (!std::is_same_v<Rows, OneCache>) {  // (a single cache's rows are few: never packed)
      if (pack == kSplitPack) return launch(&AttentionDecodeSplitKernel<Rows, kCols, kSplitPack>);
    }
    return launch(&AttentionDecodeSplitKernel<Rows, kCols, 1>);
  });
}

// Launches the decode kernel for `rows_n` rows with registers for D columns per row: split
// over the keys where the caller gave scratch and the rows are few (up to kGemvMaxRows).
template <typename Rows>
Status LaunchDecode(const float* q, Rows rows, int64_t rows_n, int64_t heads, int64_t kv_heads, int64_t D,
                    float* out, float* split_scratch, int64_t max_keys, cudaStream_t stream) {
  if (D > kMaxDecodeHeadDim) {
    return Status::InvalidArgument("CausalAttention (decode): head_dim " + std::to_string(D) + " above " +
                                   std::to_string(kMaxDecodeHeadDim));
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  const int H = static_cast<int>(heads), group = static_cast<int>(heads / kv_heads), d = static_cast<int>(D);
  const int64_t blocks = rows_n * heads;
  if (rows_n > kGemvMaxRows || split_scratch == nullptr) {
    return CudaStatus(rows_n > kGemvMaxRows
                          ? LaunchDecodeWarps<kDecodeWarpsMany>(q, rows, blocks, H, group, d, scale, out, stream)
                          : LaunchDecodeWarps<kDecodeWarpsFew>(q, rows, blocks, H, group, d, scale, out, stream),
                      "AttentionDecodeKernel");
  }
  // Steps of more than two rows give a block kSplitPack query heads where the group allows
  // (AttentionDecodePacksHeads): a quarter of the L2 traffic. One or two rows keep a block a
  // head (the most blocks for the fewest rows). Groups of ranges a row: as many blocks a
  // (row, pack) as the resident blocks (three an SM, two packed) give the batch, at most a
  // range each. The grid: a block an item of rows of max_keys keys, their ranges rounded up
  // to a power of two (a captured step's grid then changes only at 129, 257, 513 and 1,025
  // keys); the blocks loop over any further items (rows past max_keys).
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  const int pack =
      !std::is_same_v<Rows, OneCache> && rows_n > 2 && AttentionDecodePacksHeads(heads, kv_heads) ? kSplitPack : 1;
  const int64_t blocks_packed = blocks / pack;
  const int64_t resident = int64_t{pack > 1 ? 2 : 3} * sms;
  const int64_t groups = std::clamp<int64_t>(resident / blocks_packed, 1, kMaxSplits);
  const int64_t items = blocks_packed * std::min(groups, SplitGridRanges(max_keys));
  const DecodeSplit split{.counters = reinterpret_cast<unsigned int*>(split_scratch),
                          .parts = split_scratch + SplitCounterWords(heads),
                          .rows = static_cast<int>(rows_n)};
  return CudaStatus(LaunchDecodeSplit(q, rows, std::min(items, resident), H, group, d, scale, out, split,
                                      static_cast<int>(groups), pack, stream),
                    "AttentionDecodeSplitKernel");
}

// ---- Prefill: a block per (query tile, head) ----------------------------------------------

constexpr int kTileQ = 16;          // queries per block
constexpr int kTileK = 32;          // keys per shared-memory tile (one per lane in the softmax)
constexpr int kPrefillThreads = 128;

__host__ __device__ constexpr int64_t PrefillSharedFloats(int64_t D) {
  // q[TQ][D], k[TK][D+1] (padded: threads of a warp read different keys), v[TK][D],
  // p[TQ][TK], o[TQ][D], running max / sum / this tile's correction [TQ] each.
  return kTileQ * D + kTileK * (D + 1) + kTileK * D + kTileQ * kTileK + kTileQ * D + 3 * kTileQ;
}

__global__ void AttentionPrefillKernel(const float* __restrict__ q, const float* __restrict__ k,
                                       const float* __restrict__ v, int64_t T, int64_t S, int heads, int group,
                                       int D, float scale, float* __restrict__ out) {
  extern __shared__ float smem[];
  const int Dk = D + 1;
  float* qs = smem;
  float* ks = qs + kTileQ * D;
  float* vs = ks + kTileK * Dk;
  float* ps = vs + kTileK * D;
  float* os = ps + kTileQ * kTileK;
  float* row_max = os + kTileQ * D;
  float* row_sum = row_max + kTileQ;
  float* row_corr = row_sum + kTileQ;

  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
  const int h = static_cast<int>(blockIdx.y), kvh = h / group;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTileQ;
  const int rows = static_cast<int>(T - q0 < kTileQ ? T - q0 : kTileQ);
  const int64_t q_stride = static_cast<int64_t>(heads) * D, kv_stride = static_cast<int64_t>(heads / group) * D;
  const int64_t past = S - T;  // query q0 + r sits at position past + q0 + r

  for (int i = tid; i < kTileQ * D; i += nthreads) {
    const int r = i / D, c = i % D;
    qs[i] = r < rows ? q[(q0 + r) * q_stride + static_cast<int64_t>(h) * D + c] : 0.0f;
    os[i] = 0.0f;
  }
  for (int r = tid; r < kTileQ; r += nthreads) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }

  const int64_t k_end = past + q0 + rows;  // the tile's last query sees keys < k_end
  for (int64_t k0 = 0; k0 < k_end; k0 += kTileK) {
    const int kn = static_cast<int>(k_end - k0 < kTileK ? k_end - k0 : kTileK);
    __syncthreads();  // the previous tile's k, v, p are no longer read
    for (int i = tid; i < kn * D; i += nthreads) {
      const int j = i / D, c = i % D;
      const int64_t src = (k0 + j) * kv_stride + static_cast<int64_t>(kvh) * D + c;
      ks[j * Dk + c] = k[src];
      vs[j * D + c] = v[src];
    }
    __syncthreads();
    for (int i = tid; i < kTileQ * kTileK; i += nthreads) {
      const int r = i / kTileK, j = i % kTileK;
      float s = -INFINITY;
      if (r < rows && j < kn && k0 + j <= past + q0 + r) {
        float dot = 0.0f;
        for (int c = 0; c < D; ++c) dot += qs[r * D + c] * ks[j * Dk + c];
        s = dot * scale;
      }
      ps[i] = s;
    }
    __syncthreads();
    // Online softmax, a warp per row, a lane per key of the tile.
    for (int r = warp; r < kTileQ; r += warps) {
      const float s = ps[r * kTileK + lane];
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, WarpMax(s));
      const float p = s == -INFINITY ? 0.0f : expf(s - m_new);
      const float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
      const float tile_sum = WarpSum(p);
      ps[r * kTileK + lane] = p;
      __syncwarp();  // every lane has read row_max[r] before lane 0 replaces it
      if (lane == 0) {
        row_max[r] = m_new;
        row_sum[r] = row_sum[r] * corr + tile_sum;
        row_corr[r] = corr;
      }
    }
    __syncthreads();
    for (int i = tid; i < kTileQ * D; i += nthreads) {
      const int r = i / D, c = i % D;
      float o = os[i] * row_corr[r];
      for (int j = 0; j < kn; ++j) o += ps[r * kTileK + j] * vs[j * D + c];
      os[i] = o;
    }
  }
  __syncthreads();
  for (int i = tid; i < rows * D; i += nthreads) {
    const int r = i / D, c = i % D;
    out[(q0 + r) * q_stride + static_cast<int64_t>(h) * D + c] = os[i] / row_sum[r];
  }
}

static_assert(kTileK == 32, "the prefill softmax gives each lane of a warp one key of the tile");

Status CheckAttentionArgs(const char* op, const float* q, const float* k, const float* v, int64_t T, int64_t S,
                          int64_t heads, int64_t kv_heads, int64_t head_dim, float* out) {
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(T, S, heads, kv_heads, head_dim));
  if (T == 0) return Status::Ok();
  return RequireNonNull(op, {q, k, v, out});
}

LM2_CUDA_KERNEL_MODULE(AttentionPrefillKernel);

}  // namespace

int64_t AttentionDecodeSplitGrid(int64_t max_keys) { return SplitGridRanges(max_keys); }

bool AttentionDecodePacksHeads(int64_t heads, int64_t kv_heads) {
  return kv_heads > 0 && heads % kv_heads == 0 && (heads / kv_heads) % kSplitPack == 0;
}

bool SplitsDecodeAttention(int64_t rows, int64_t gemv_rows, int64_t heads, int64_t kv_heads) {
  return rows <= gemv_rows || (rows <= kSplitPackMaxRows && AttentionDecodePacksHeads(heads, kv_heads));
}

int64_t AttentionDecodeSplitScratch(int64_t heads, int64_t head_dim) {
  if (heads <= 0 || head_dim <= 0) return 0;
  return SplitCounterWords(heads) + kGemvMaxRows * heads * kMaxSplits * (head_dim + 2);
}

Status CausalAttentionDecode(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                             int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckAttentionArgs("CausalAttentionDecode", q, k_cache, v_cache, T, S, heads, kv_heads,
                                         head_dim, out));
  if (T == 0) return Status::Ok();
  return LaunchDecode(q, OneCache{k_cache, v_cache, T, S}, T, heads, kv_heads, head_dim, out, nullptr, 0, stream);
}

Status CausalAttentionDecodeSplit(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, float* split_scratch,
                                  cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckAttentionArgs("CausalAttentionDecodeSplit", q, k_cache, v_cache, T, S, heads, kv_heads,
                                         head_dim, out));
  if (T == 0) return Status::Ok();
  if (T > kGemvMaxRows) {
    return Status::InvalidArgument("CausalAttentionDecodeSplit: T=" + std::to_string(T) + " above " +
                                   std::to_string(kGemvMaxRows));
  }
  LM2_RETURN_IF_ERROR(RequireNonNull("CausalAttentionDecodeSplit", {split_scratch}));
  return LaunchDecode(q, OneCache{k_cache, v_cache, T, S}, T, heads, kv_heads, head_dim, out, split_scratch, S,
                      stream);
}
Status CausalAttentionDecodeBatch(const float* q, const float* const* k_caches, const float* const* v_caches,
                                  const int64_t* positions, int64_t B, int64_t heads, int64_t kv_heads,
                                  int64_t head_dim, float* out, float* split_scratch, int64_t max_keys,
                                  cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(0, 0, heads, kv_heads, head_dim));
  if (B < 0 || B * heads > (int64_t{1} << 31) - 1) {
    return Status::InvalidArgument("CausalAttentionDecodeBatch: B=" + std::to_string(B));
  }
  if (B == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("CausalAttentionDecodeBatch", {q, k_caches, v_caches, positions, out}));
  return LaunchDecode(q, CachePerRow{k_caches, v_caches, positions}, B, heads, kv_heads, head_dim, out,
                      split_scratch, max_keys, stream);
}

Status RopeAttentionDecodeBatch(const float* proj, int64_t proj_ld, const int64_t* positions, const float2* factors,
                                float* const* k_caches, float* const* v_caches, int64_t B, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, float* out, float* split_scratch,
                                int64_t max_keys, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(0, 0, heads, kv_heads, head_dim));
  if (B < 0 || B * heads > (int64_t{1} << 31) - 1 || head_dim % 2 != 0) {
    return Status::InvalidArgument("RopeAttentionDecodeBatch: B=" + std::to_string(B) + " head_dim=" +
                                   std::to_string(head_dim) + " (need 0 <= B * heads < 2^31, even head_dim)");
  }
  if (proj_ld < (heads + 2 * kv_heads) * head_dim) {
    return Status::InvalidArgument("RopeAttentionDecodeBatch: proj_ld " + std::to_string(proj_ld) +
                                   " narrower than q, k and v");
  }
  if (B == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("RopeAttentionDecodeBatch", {proj, positions, factors, k_caches, v_caches, out}));
  return LaunchDecode(static_cast<const float*>(nullptr),
                      FreshRowPerCache{k_caches, v_caches, positions, proj, proj_ld, factors}, B, heads, kv_heads,
                      head_dim, out, split_scratch, max_keys, stream);
}

Status CausalAttentionPrefill(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                              int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckAttentionArgs("CausalAttentionPrefill", q, k_cache, v_cache, T, S, heads, kv_heads,
                                         head_dim, out));
  if (T == 0) return Status::Ok();
  if (heads > 65535) return Status::InvalidArgument("CausalAttentionPrefill: more than 65535 heads");
  const int64_t smem = static_cast<int64_t>(sizeof(float)) * PrefillSharedFloats(head_dim);
  LM2_RETURN_IF_ERROR(
      EnsureSharedMemory(reinterpret_cast<const void*>(&AttentionPrefillKernel), smem, "CausalAttentionPrefill"));
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  const dim3 grid(static_cast<unsigned int>((T + kTileQ - 1) / kTileQ), static_cast<unsigned int>(heads));
  AttentionPrefillKernel<<<grid, kPrefillThreads, static_cast<size_t>(smem), stream>>>(
      q, k_cache, v_cache, T, S, static_cast<int>(heads), static_cast<int>(heads / kv_heads),
      static_cast<int>(head_dim), scale, out);
  return CheckLaunch("AttentionPrefillKernel");
}

Status CausalAttention(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream) {
  if (T == 1) return CausalAttentionDecode(q, k_cache, v_cache, T, S, heads, kv_heads, head_dim, out, stream);
  return CausalAttentionPrefill(q, k_cache, v_cache, T, S, heads, kv_heads, head_dim, out, stream);
}

}  // namespace lm2::runtime::cuda

namespace lm2::runtime::cuda {

// ---- Prefill through cuBLAS: scores, causal softmax, values --------------------------------
//
// Query head h = g * group + r reads key-value head g. For each r, one strided batch over g
// (query columns group*D apart, key columns D apart, score blocks group*T*S apart) computes
// the scores of the heads r, group + r, ...; then one causal softmax over every row, then the
// values the same way. TF32 tensor cores with fp32 accumulation; scores are [H, T, S] fp32.
Status CausalAttentionGemm(cublasHandle_t handle, const float* q, const float* k_cache, const float* v_cache,
                           int64_t T, int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim, float* scores,
                           float* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(T, S, heads, kv_heads, head_dim));
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("CausalAttentionGemm", {handle, q, k_cache, v_cache, scores, out}));
  const int64_t group = heads / kv_heads, D = head_dim;
  const int64_t q_ld = heads * D, kv_ld = kv_heads * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t r = 0; r < group; ++r) {
    // Row-major scores_h [T, S] = q_h [T, D] · k_g [S, D]ᵀ.
    LM2_RETURN_IF_ERROR(GemmStridedBatchedF32(handle, CUBLAS_OP_T, CUBLAS_OP_N, S, T, D, scale, k_cache, kv_ld, D,
                                              q + r * D, q_ld, group * D, 0.0f, scores + r * T * S, S,
                                              group * T * S, kv_heads, stream));
  }
  LM2_RETURN_IF_ERROR(SoftmaxRows(scores, heads * T, S, T, S - T, stream));
  for (int64_t r = 0; r < group; ++r) {
    // Row-major out_h [T, D] = p_h [T, S] · v_g [S, D].
    LM2_RETURN_IF_ERROR(GemmStridedBatchedF32(handle, CUBLAS_OP_N, CUBLAS_OP_N, D, T, S, 1.0f, v_cache, kv_ld, D,
                                              scores + r * T * S, S, group * T * S, 0.0f, out + r * D, q_ld,
                                              group * D, kv_heads, stream));
  }
  return Status::Ok();
}

}  // namespace lm2::runtime::cuda
