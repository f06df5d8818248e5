// Token sampling on the device: PickToken's rule (sampler.h) applied to each logits row, so
// a sampled decode step copies B token ids to the host instead of B x V logits and sorts on
// the GPU instead of the CPU.
//
// Per call: one kernel writes each row's keys (its logits, canonical: -0 as +0, NaN as
// -inf) and ids; one applies the repetition penalty to each row's distinct history ids. The
// passes over a whole row run on slices of kSliceKeys keys, a block each (a row of a 128k
// vocabulary is 63 blocks, not one): each slice's largest key, then each slice's weight
// against the row's largest and, for rows that sort (top-k or top-p), its histogram of
// (max - key) / temperature. A block per row then plans: the greedy pick outright; else the
// row's total weight and, for rows that sort, the fewest leading histogram bins sure to hold
// the top k, or mass enough for top-p, with each slice's offset among those candidates. When
// they number at most kBlockSortCapacity, each slice compacts its own (in id order) and the
// pick sorts them in shared memory (by rank up to 1,024 candidates, else a block radix
// sort); otherwise the row is left to the whole-row sort (SortSegmentsDescending: a block
// per row, a stable radix sort of all its keys through global memory; much slower), one
// launch whose blocks return at once for the rows that do not need it. Both sorts are stable
// and descending, so ties stay in id order. Last, a block per row walks its candidates: the
// total weight of a top-k, the top-p cut and the pick, each a block scan in double over
// tiles, stopping at the tile where the running weight reaches its target; a row without a
// sort walks only the slice where the slices' running weight reaches the draw.
#include <cub/cub.cuh>

#include <cmath>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"

namespace lm2::runtime::cuda {
namespace {

__device__ __forceinline__ float CanonicalKey(float l) { return isnan(l) ? -INFINITY : l + 0.0f; }

__device__ __forceinline__ bool RuleSorts(const DeviceTokenRule& r) {
  return r.temperature != 0.0f && (r.top_k > 0 || r.top_p < 1.0f);
}

__global__ void PrepareKeysKernel(const float* __restrict__ logits, int64_t cols, float* __restrict__ keys,
                                  int32_t* __restrict__ ids) {
  const int64_t base = static_cast<int64_t>(blockIdx.y) * cols;
  for (int64_t i = FirstIndex(); i < cols; i += GridStride()) {
    keys[base + i] = CanonicalKey(logits[base + i]);
    ids[base + i] = static_cast<int32_t>(i);
  }
}

// A block per row over its history ids (distinct: the host made them so).
__global__ void PenaltyKernel(const float* __restrict__ logits, int64_t cols, const DeviceTokenRule* __restrict__ rules,
                              const int32_t* __restrict__ history, float* __restrict__ keys) {
  const DeviceTokenRule r = rules[blockIdx.x];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  for (int32_t j = r.history_begin + static_cast<int32_t>(threadIdx.x); j < r.history_end; j += kThreads) {
    const int32_t id = history[j];
    if (id < 0 || id >= cols) continue;
    const float l = logits[base + id];
    keys[base + id] = CanonicalKey(l > 0.0f ? l / r.repetition_penalty : l * r.repetition_penalty);
  }
}

// w = exp((key - max) / temperature), summed in double. The host takes the exponential in
// double; here it is a float one (a pass of double exponentials over a 128k vocabulary costs
// one SM ~30 us): the weights differ in their last float bits, which moves a pick only when
// its draw falls within ~1e-7 of a boundary between two candidates.
__device__ __forceinline__ double Weight(float key, float max_key, float temperature) {
  return static_cast<double>(expf((key - max_key) / temperature));
}

// ---- Row slices: the passes over whole rows, a block per kSliceKeys keys ------------------------

constexpr int kSliceThreads = kThreads;
constexpr int kSliceItems = 8;  // keys per thread
constexpr int64_t kSliceKeys = int64_t{kSliceThreads} * kSliceItems;
constexpr int kBins = 128;            // histogram bins of (max - key) / temperature ...
constexpr float kBinsPerUnit = 4.0f;  // ... each a quarter wide: keys beyond 32 are left out
constexpr int kPickThreads = 1024;  // the pick's block
constexpr int kSortItems = 4;       // per thread in the pick's block sort
constexpr int kBlockSortCapacity = kPickThreads * kSortItems;

__host__ __device__ constexpr int64_t SlicesOf(int64_t cols) { return (cols + kSliceKeys - 1) / kSliceKeys; }

// One slice's partial results (SampleRows' temp).
struct SlicePart {
  unsigned long long best;  // ArgmaxKey of its largest key (the first of equals)
  double weight;            // Σ Weight(key, the row's largest, temperature) over it
  int32_t before;           // a row that sorts: its candidates in earlier slices
};

// Where the parts, the bin counts [rows * slices][kBins] and the whole-row sort's second
// keys and ids [rows * cols] (its passes alternate between them and sorted_keys / sorted_ids)
// lie in temp.
struct TempLayout {
  std::size_t parts = 0, counts = 0, alt_keys = 0, alt_ids = 0, end = 0;
};
constexpr std::size_t AlignUp(std::size_t n) { return (n + 255) / 256 * 256; }
TempLayout LayoutFor(int64_t rows, int64_t cols) {
  TempLayout t;
  const auto items = static_cast<std::size_t>(rows * SlicesOf(cols));
  const auto keys = static_cast<std::size_t>(rows * cols);
  t.counts = AlignUp(items * sizeof(SlicePart));
  t.alt_keys = t.counts + AlignUp(items * kBins * sizeof(int32_t));
  t.alt_ids = t.alt_keys + AlignUp(keys * sizeof(float));
  t.end = t.alt_ids + AlignUp(keys * sizeof(int32_t));
  return t;
}

// The float an ArgmaxKey holds.
__device__ __forceinline__ float KeyValue(unsigned long long key) {
  return FloatOfOrderedBits(static_cast<unsigned int>(key >> 32));
}

// The block's largest of v, in every thread; `scratch` 32 values of shared memory.
__device__ __forceinline__ unsigned long long BlockMaxKey(unsigned long long v, unsigned long long* scratch) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0ull;
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// The row's largest key (as a key) from its slices' parts, in every thread.
__device__ __forceinline__ unsigned long long RowBest(const SlicePart* parts, int64_t slices,
                                                      unsigned long long* scratch) {
  unsigned long long best = 0;
  for (int64_t j = threadIdx.x; j < slices; j += blockDim.x) best = parts[j].best > best ? parts[j].best : best;
  return BlockMaxKey(best, scratch);
}

// Which bin a key falls in (kBins: none). Monotone in the key (every float step is), so the
// keys of bins <= b are the leading keys of the sorted order.
__device__ __forceinline__ int BinOf(float key, float max_key, float temperature) {
  const float x = (max_key - key) / temperature * kBinsPerUnit;
  return x < static_cast<float>(kBins) ? static_cast<int>(x) : kBins;
}

// Block (slice, row): the slice's largest key.
__global__ void __launch_bounds__(kSliceThreads)
    SliceMaxKernel(const float* __restrict__ keys, int64_t cols, SlicePart* __restrict__ parts) {
  __shared__ unsigned long long scratch[32];
  const int64_t row = blockIdx.y, first = static_cast<int64_t>(blockIdx.x) * kSliceKeys;
  const float* k = keys + row * cols;
  unsigned long long best = 0;
#pragma unroll
  for (int i = 0; i < kSliceItems; ++i) {
    const int64_t c = first + i * kSliceThreads + threadIdx.x;
    if (c < cols) {
      const unsigned long long key = ArgmaxKey(k[c], c);
      best = key > best ? key : best;
    }
  }
  best = BlockMaxKey(best, scratch);
  if (threadIdx.x == 0) parts[row * gridDim.x + blockIdx.x].best = best;
}

using WeightReduce = cub::BlockReduce<double, kSliceThreads>;

// Block (slice, row) of a row with a temperature: the slice's weight against the row's
// largest key and, for a row that sorts, its bin counts.
__global__ void __launch_bounds__(kSliceThreads)
    SliceWeightsKernel(const float* __restrict__ keys, int64_t cols, const DeviceTokenRule* __restrict__ rules,
                       SlicePart* __restrict__ parts, int32_t* __restrict__ counts) {
  __shared__ unsigned long long scratch[32];
  __shared__ typename WeightReduce::TempStorage reduce;
  __shared__ int bins[kBins];
  const DeviceTokenRule r = rules[blockIdx.y];
  if (r.temperature == 0.0f) return;
  const int64_t row = blockIdx.y, slices = gridDim.x, first = static_cast<int64_t>(blockIdx.x) * kSliceKeys;
  const int tid = static_cast<int>(threadIdx.x);
  const float* k = keys + row * cols;
  SlicePart* row_parts = parts + row * slices;
  const float max_key = KeyValue(RowBest(row_parts, slices, scratch));
  const bool sorts = RuleSorts(r);
  for (int b = tid; b < kBins; b += kSliceThreads) bins[b] = 0;
  __syncthreads();
  double part = 0.0;
#pragma unroll
  for (int i = 0; i < kSliceItems; ++i) {
    const int64_t c = first + i * kSliceThreads + tid;
    if (c >= cols) continue;
    part += Weight(k[c], max_key, r.temperature);
    if (sorts) {
      const int b = BinOf(k[c], max_key, r.temperature);
      if (b < kBins) atomicAdd(&bins[b], 1);
    }
  }
  const double weight = WeightReduce(reduce).Sum(part);
  if (tid == 0) row_parts[blockIdx.x].weight = weight;
  if (!sorts) return;
  __syncthreads();
  for (int b = tid; b < kBins; b += kSliceThreads) counts[(row * slices + blockIdx.x) * kBins + b] = bins[b];
}

using PlanScan = cub::BlockScan<int, kSliceThreads>;

struct PlanShared {
  typename WeightReduce::TempStorage reduce;
  typename PlanScan::TempStorage scan;
  unsigned long long scratch[32];
  int counts[kBins];
  double total;
  int chosen_bin;
};

// A block per row: a greedy row's pick into out; else plans[row] and, for a row that sorts,
// either each slice's offset among the candidates (their count <= kBlockSortCapacity) or
// the whole row as its segment of the whole-row sort (every other row's segment is empty).
__global__ void __launch_bounds__(kSliceThreads)
    PlanKernel(int64_t cols, const DeviceTokenRule* __restrict__ rules, SlicePart* __restrict__ parts,
               const int32_t* __restrict__ counts, int32_t* __restrict__ seg_begin, int32_t* __restrict__ seg_end,
               SampleRowPlan* __restrict__ plans, int32_t* __restrict__ out) {
  __shared__ PlanShared sh;
  const DeviceTokenRule r = rules[blockIdx.x];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row = blockIdx.x, slices = SlicesOf(cols), base = row * cols;
  SlicePart* row_parts = parts + row * slices;
  if (tid == 0) seg_begin[row] = seg_end[row] = static_cast<int32_t>(base);
  const unsigned long long best = RowBest(row_parts, slices, sh.scratch);
  if (r.temperature == 0.0f) {  // greedy (with a penalty): the first maximum
    if (tid == 0) out[row] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<unsigned int>(best));  // ArgmaxKeyToken
    return;
  }
  const float max_key = KeyValue(best);
  double part = 0.0;  // each thread's slices in order, then the block's tree: the same sum every run
  for (int64_t j = tid; j < slices; j += kSliceThreads) part += row_parts[j].weight;
  const double total = WeightReduce(sh.reduce).Sum(part);
  if (!RuleSorts(r)) {
    if (tid == 0) plans[row] = SampleRowPlan{.total = total, .max_key = max_key, .candidates = -1, .chosen_bin = -1};
    return;
  }
  const int32_t* row_counts = counts + row * slices * kBins;
  for (int b = tid; b < kBins; b += kSliceThreads) {
    int n = 0;
    for (int64_t j = 0; j < slices; ++j) n += row_counts[j * kBins + b];
    sh.counts[b] = n;
  }
  __syncthreads();
  if (tid == 0) {
    // The fewest leading bins sure to hold the kept candidates: the top k, or (top-p alone)
    // all but a tail of weight at most (1 - top_p) x total, bounding each key of bin b by
    // exp(-(b - 1) / 4) (one bin of margin for the bin's float rounding) and each key past
    // the last bin by exp(-(kBins - 1) / 4).
    const int64_t need = r.top_k > 0 ? (r.top_k < cols ? int64_t{r.top_k} : cols) : 0;
    const double tail_allowed = (1.0 - static_cast<double>(r.top_p)) * total - 1e-9 * total;
    int64_t binned = 0;
    for (int b = 0; b < kBins; ++b) binned += sh.counts[b];
    const auto bound = [](int b) { return exp(-(b - 1) / static_cast<double>(kBinsPerUnit)); };
    double tail = static_cast<double>(cols - binned) * bound(kBins);  // the keys past the last bin
    int chosen = -1;
    int64_t count = 0;
    if (need > 0) {
      for (int b = 0; b < kBins && chosen < 0; ++b) {
        count += sh.counts[b];
        if (count >= need) chosen = b;
      }
    } else {
      // From the last bin down: the smallest b whose following bins' bound fits the tail.
      for (int b = kBins - 1; b >= 0 && tail <= tail_allowed; --b) {
        chosen = b;
        tail += sh.counts[b] * bound(b);
      }
      for (int b = 0; b <= chosen; ++b) count += sh.counts[b];
    }
    sh.chosen_bin = count <= kBlockSortCapacity ? chosen : -1;
    plans[row] = SampleRowPlan{.total = total, .max_key = max_key,
                               .candidates = sh.chosen_bin < 0 ? -1 : static_cast<int32_t>(count),
                               .chosen_bin = sh.chosen_bin};
    if (sh.chosen_bin < 0) seg_end[row] = static_cast<int32_t>(base + cols);  // the full sort
  }
  __syncthreads();
  const int chosen = sh.chosen_bin;
  if (chosen < 0) return;
  // Each slice's offset: the candidates of the slices before it, in tiles of the block.
  int carry = 0;
  for (int64_t tile = 0; tile < slices; tile += kSliceThreads) {
    const int64_t j = tile + tid;
    int n = 0;
    if (j < slices) {
      for (int b = 0; b <= chosen; ++b) n += row_counts[j * kBins + b];
    }
    int before, in_tile;
    PlanScan(sh.scan).ExclusiveSum(n, before, in_tile);
    if (j < slices) row_parts[j].before = carry + before;
    carry += in_tile;
    __syncthreads();  // the scan storage is reused by the next tile
  }
}

using CompactScan = cub::BlockScan<int, kSliceThreads>;

// Block (slice, row) of a row whose candidates fit the pick's sort: the slice's candidates
// (keys of bins <= the plan's), in id order, at the slice's offset in the row's sorted_keys
// and sorted_ids.
__global__ void __launch_bounds__(kSliceThreads)
    CompactKernel(const float* __restrict__ keys, int64_t cols, const DeviceTokenRule* __restrict__ rules,
                  const SlicePart* __restrict__ parts, const SampleRowPlan* __restrict__ plans,
                  float* __restrict__ cand_keys, int32_t* __restrict__ cand_ids) {
  __shared__ typename CompactScan::TempStorage scan;
  const DeviceTokenRule r = rules[blockIdx.y];
  if (!RuleSorts(r)) return;
  const int64_t row = blockIdx.y;
  const SampleRowPlan plan = plans[row];
  if (plan.candidates < 0) return;
  const int64_t base = row * cols, first = static_cast<int64_t>(blockIdx.x) * kSliceKeys +
                                           static_cast<int64_t>(threadIdx.x) * kSliceItems;
  const float* k = keys + base;
  int flags = 0;
#pragma unroll
  for (int i = 0; i < kSliceItems; ++i) {
    if (first + i < cols && BinOf(k[first + i], plan.max_key, r.temperature) <= plan.chosen_bin) flags |= 1 << i;
  }
  int before;
  CompactScan(scan).ExclusiveSum(__popc(flags), before);
  int at = parts[row * gridDim.x + blockIdx.x].before + before;
  for (int i = 0; i < kSliceItems; ++i) {
    if ((flags & (1 << i)) && at < plan.candidates) {  // the count said it fits; never overrun
      cand_keys[base + at] = k[first + i];
      cand_ids[base + at] = static_cast<int32_t>(first + i);
      ++at;
    }
  }
}

// ---- The whole-row sort -----------------------------------------------------------------------
//
// A block per segment: a stable LSD radix sort of the segment's (key, id) pairs, descending by
// key (the order of CUB's DeviceSegmentedRadixSort::SortPairsDescending), through global
// memory. One read of the segment counts the digits of all four 8-bit passes; each pass then
// walks the segment in tiles, in order: the tile's keys are ranked by digit (stable in the
// tile's order), staged in shared memory in rank order and written to their digit's next
// places, so that consecutive threads write a digit's run. A pass whose digit is one for all
// keys is skipped (it would move none); the passes alternate between the alt and the sorted
// arrays so that the last writes the sorted ones.

constexpr int kRowSortThreads = 1024;
constexpr int kRowSortItems = 8;  // keys per thread in a tile
constexpr int kRowSortTile = kRowSortThreads * kRowSortItems;
constexpr int kRadixBits = 8;
constexpr int kDigits = 1 << kRadixBits;
constexpr int kRadixPasses = 32 / kRadixBits;
static_assert(kRadixPasses * kDigits == kRowSortThreads, "the places' scan takes a (pass, digit) a thread");

using RowRank = cub::BlockRadixRankMatch<kRowSortThreads, kRadixBits, false>;
using RowScan = cub::BlockScan<unsigned, kRowSortThreads>;
static_assert(RowRank::BINS_TRACKED_PER_THREAD == 1, "digit d's tile offset in thread d");

// A key's sort bits: ascending in them is descending in the key (its OrderedBits, inverted).
// -0 sorts as +0 (as in CUB) and comes out as +0; keys hold no NaN.
__device__ __forceinline__ uint32_t DescendingBits(float key) { return ~OrderedBits(key); }
__device__ __forceinline__ float KeyOfDescendingBits(uint32_t u) { return FloatOfOrderedBits(~u); }

struct RadixDigit {
  int shift;
  __device__ __forceinline__ uint32_t Digit(uint32_t u) const { return (u >> shift) & (kDigits - 1); }
};

struct RowSortShared {
  union {
    typename RowRank::TempStorage rank;
    typename RowScan::TempStorage scan;
    uint32_t exchange[kRowSortTile];  // a tile's sort bits or ids, in rank order
  };
  unsigned start[kRadixPasses][kDigits];  // the segment's digit counts, then each digit's first place
  int tile_first[kDigits];                // the tile's keys of smaller digits
  int to[kDigits];                        // where the tile's rank r of digit d goes: to[d] + r
  int same[kRadixPasses];                 // the pass's digit is one for all keys
};

// Block s sorts [segment_begin[s], segment_end[s]) of keys / ids into the same places of
// sorted_keys / sorted_ids (alt_keys / alt_ids: the passes' other side), descending, equal
// keys in their input order. An empty segment returns at once, writing nothing. Places are
// relative to the segment; tile indices unsigned (a segment near 2^31 keys: no overflow).
__global__ void __launch_bounds__(kRowSortThreads)
    SortSegmentsKernel(const float* __restrict__ keys, const int32_t* __restrict__ ids,
                       const int32_t* __restrict__ segment_begin, const int32_t* __restrict__ segment_end,
                       float* sorted_keys, int32_t* sorted_ids, float* alt_keys, int32_t* alt_ids) {
  __shared__ RowSortShared sh;
  const int32_t begin = segment_begin[blockIdx.x], end = segment_end[blockIdx.x];
  if (end <= begin) return;
  const auto n = static_cast<unsigned>(end - begin);
  const auto tid = static_cast<unsigned>(threadIdx.x), lane = tid & 31u;
  keys += begin;
  ids += begin;
  sorted_keys += begin;
  sorted_ids += begin;
  alt_keys += begin;
  alt_ids += begin;

  // The digit counts of every pass, in one read of the keys. A warp whose keys share the
  // digit adds once (a run of equal keys, -inf say, would otherwise serialise its adds).
  unsigned* const start = &sh.start[0][0];
  start[tid] = 0;
  if (tid < kRadixPasses) sh.same[tid] = 0;
  __syncthreads();
  for (unsigned first = 0; first < n; first += kRowSortThreads) {
    const unsigned i = first + tid;
    const bool valid = i < n;  // the valid lanes are the warp's first ones
    const uint32_t u = valid ? DescendingBits(keys[i]) : 0u;
    const uint32_t valid_lanes = __ballot_sync(0xFFFFFFFFu, valid);
#pragma unroll
    for (int p = 0; p < kRadixPasses; ++p) {
      const uint32_t d = (u >> (p * kRadixBits)) & (kDigits - 1);
      const uint32_t d0 = __shfl_sync(0xFFFFFFFFu, d, 0);
      if (__all_sync(0xFFFFFFFFu, !valid || d == d0)) {
        if (lane == 0 && valid) atomicAdd(&sh.start[p][d0], static_cast<unsigned>(__popc(valid_lanes)));
      } else if (valid) {
        atomicAdd(&sh.start[p][d], 1u);
      }
    }
  }
  __syncthreads();
  // Each digit's first place: one exclusive scan over (pass, digit), less the passes before
  // (pass x n; unsigned, so the sum past 2^32 wraps and the difference is exact).
  {
    const unsigned pass = tid / kDigits, count = start[tid];
    if (count == n) sh.same[pass] = 1;
    unsigned before;
    RowScan(sh.scan).ExclusiveSum(count, before);
    start[tid] = before - pass * n;
  }
  __syncthreads();
  int passes = 0;
#pragma unroll
  for (int p = 0; p < kRadixPasses; ++p) passes += sh.same[p] ? 0 : 1;
  if (passes == 0) {  // one key, or all equal: already in order
    for (unsigned i = tid; i < n; i += kRowSortThreads) {
      sorted_keys[i] = KeyOfDescendingBits(DescendingBits(keys[i]));
      sorted_ids[i] = ids[i];
    }
    return;
  }

  int done = 0;
  for (int p = 0; p < kRadixPasses; ++p) {
    if (sh.same[p]) continue;
    // The last pass writes the sorted arrays; each reads what the one before wrote.
    const bool to_sorted = (passes - 1 - done) % 2 == 0;
    const float* src_keys = done == 0 ? keys : to_sorted ? alt_keys : sorted_keys;
    const int32_t* src_ids = done == 0 ? ids : to_sorted ? alt_ids : sorted_ids;
    float* dst_keys = to_sorted ? sorted_keys : alt_keys;
    int32_t* dst_ids = to_sorted ? sorted_ids : alt_ids;
    ++done;
    const RadixDigit digit{p * kRadixBits};
    int next = tid < kDigits ? static_cast<int>(sh.start[p][tid]) : 0;  // thread d: digit d's next place
    for (unsigned tile = 0; tile < n; tile += kRowSortTile) {
      // Warp-striped, as the ranking expects (its ranks are stable in that order): warp w's
      // keys are tile + w * kRowSortItems * 32 + k * 32 + lane.
      uint32_t u[kRowSortItems], id[kRowSortItems];
      const unsigned warp_first = tile + (tid >> 5) * kRowSortItems * 32 + lane;
#pragma unroll
      for (int k = 0; k < kRowSortItems; ++k) {
        const unsigned i = warp_first + k * 32;
        // Past the end: all bits set, the last digit of every pass and the tile's last
        // ranks, so the ranks below `valid` are the segment's keys.
        u[k] = i < n ? DescendingBits(src_keys[i]) : 0xFFFFFFFFu;
      }
      int rank[kRowSortItems], tile_first[1];
      RowRank(sh.rank).RankKeys(u, rank, digit, tile_first);
#pragma unroll
      for (int k = 0; k < kRowSortItems; ++k) {  // the ids, needed only after the keys' scatter
        const unsigned i = warp_first + k * 32;
        id[k] = i < n ? static_cast<uint32_t>(src_ids[i]) : 0u;
      }
      if (tid < kDigits) sh.tile_first[tid] = tile_first[0];
      __syncthreads();  // the ranking's storage is free for the exchange
      if (tid < kDigits) {
        const int after = tid + 1 < kDigits ? sh.tile_first[tid + 1] : kRowSortTile;
        sh.to[tid] = next - tile_first[0];
        next += after - tile_first[0];  // (past the last tile it counts the padding: unused)
      }
      const int valid = n - tile < kRowSortTile ? static_cast<int>(n - tile) : kRowSortTile;
#pragma unroll
      for (int k = 0; k < kRowSortItems; ++k) sh.exchange[rank[k]] = u[k];
      __syncthreads();
      int place[kRowSortItems];
#pragma unroll
      for (int k = 0; k < kRowSortItems; ++k) {
        const int r = k * kRowSortThreads + static_cast<int>(tid);
        const uint32_t s = sh.exchange[r];
        place[k] = sh.to[digit.Digit(s)] + r;
        if (r < valid) dst_keys[place[k]] = KeyOfDescendingBits(s);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kRowSortItems; ++k) sh.exchange[rank[k]] = id[k];
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kRowSortItems; ++k) {
        const int r = k * kRowSortThreads + static_cast<int>(tid);
        if (r < valid) dst_ids[place[k]] = static_cast<int32_t>(sh.exchange[r]);
      }
      __syncthreads();  // the exchange and `to` are reused by the next tile
    }
  }
}

// ---- The pick ---------------------------------------------------------------------------------

constexpr int kPickItems = 8;  // consecutive candidates per thread in a scan tile
constexpr int64_t kPickTile = int64_t{kPickThreads} * kPickItems;

using PickScan = cub::BlockScan<double, kPickThreads>;
using PickReduce = cub::BlockReduce<double, kPickThreads>;
using BlockSort = cub::BlockRadixSort<float, kPickThreads, kSortItems, int32_t>;

struct PickShared {
  union {
    typename PickScan::TempStorage scan;
    typename PickReduce::TempStorage reduce;
  };
  union {
    struct {  // the row's candidates, sorted
      float keys[kBlockSortCapacity];
      int32_t ids[kBlockSortCapacity];
    } cand;
    typename BlockSort::TempStorage sort;
  };
  int64_t found;      // the first index whose running weight reached the target, or -1
  double found_mass;  // the running weight there
  int64_t slice;      // a row without a sort: the slice where the draw falls
  double carry;       // and the weight of the slices before it
};

// The first i < n whose running weight (carry, then candidates 0..i) reaches `target`, or -1;
// its running weight in *mass. Tiles of kPickTile, each thread kPickItems consecutive candidates.
__device__ int64_t FirstReaching(const float* keys, int64_t n, float max_key, float temperature, double target,
                                 double carry, double* mass, PickShared& sh) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t tile = 0; tile < n; tile += kPickTile) {
    const int64_t first = tile + int64_t{tid} * kPickItems;
    double w[kPickItems];
    double local = 0.0;
    for (int k = 0; k < kPickItems; ++k) {
      w[k] = first + k < n ? Weight(keys[first + k], max_key, temperature) : 0.0;
      local += w[k];
    }
    double before, tile_total;
    if (tid == 0) sh.found = -1;
    PickScan(sh.scan).ExclusiveSum(local, before, tile_total);
    __syncthreads();  // sh.found reset before anyone writes it
    double run = carry + before;
    for (int k = 0; k < kPickItems && first + k < n; ++k) {
      run += w[k];
      if (run >= target) {
        // Each thread's candidates are consecutive: the smallest index wins.
        atomicMin(reinterpret_cast<unsigned long long*>(&sh.found), static_cast<unsigned long long>(first + k));
        break;
      }
    }
    __syncthreads();
    // The winner's running weight: recomputed by the thread that owns the index.
    const int64_t f = sh.found;
    if (f != -1) {
      if (f >= first && f < first + kPickItems) {
        double r = carry + before;
        for (int64_t i = first; i <= f; ++i) r += w[i - first];
        sh.found_mass = r;
      }
      __syncthreads();
      *mass = sh.found_mass;
      return f;
    }
    carry += tile_total;
    __syncthreads();  // the scan storage is reused by the next tile
  }
  return -1;
}

// The block's total of `part`, in every thread.
__device__ double PickTotal(double part, PickShared& sh) {
  const double total = PickReduce(sh.reduce).Sum(part);
  if (threadIdx.x == 0) sh.found_mass = total;
  __syncthreads();
  const double all = sh.found_mass;
  __syncthreads();
  return all;
}

// Places a row's n <= kPickThreads compacted candidates (in id order) into sh.cand by rank,
// descending, ties in id order: thread i's place is the number of candidates larger than
// its own plus the equal ones before it (each thread compares against all n: a few µs at
// n = 1024, where the radix sort's passes cost more).
// The compacted candidates wait in the arrays' upper halves, which no place reaches.
static_assert(kPickThreads <= kBlockSortCapacity / 2, "RankCandidates stages in the upper halves");
__device__ void RankCandidates(const float* keys, const int32_t* ids, int n, PickShared& sh) {
  const int i = static_cast<int>(threadIdx.x);
  float* in_keys = sh.cand.keys + kBlockSortCapacity / 2;
  int32_t* in_ids = sh.cand.ids + kBlockSortCapacity / 2;
  if (i < n) {
    in_keys[i] = keys[i];
    in_ids[i] = ids[i];
  }
  __syncthreads();
  if (i < n) {
    const float k = in_keys[i];
    const int32_t id = in_ids[i];
    int place = 0;
    for (int j = 0; j < n; ++j) {
      const float o = in_keys[j];
      place += (o > k || (o == k && j < i)) ? 1 : 0;
    }
    sh.cand.keys[place] = k;
    sh.cand.ids[place] = id;
  }
  __syncthreads();
}

// Sorts a row's n <= kBlockSortCapacity compacted candidates (in id order) into sh.cand,
// descending, ties in id order.
__device__ __noinline__ void SortCandidates(const float* keys, const int32_t* ids, int n, PickShared& sh) {
  const int tid = static_cast<int>(threadIdx.x);
  float k_items[kSortItems];
  int32_t id_items[kSortItems];
  for (int k = 0; k < kSortItems; ++k) {
    const int i = tid * kSortItems + k;  // blocked: the input order is the candidates' id order
    k_items[k] = i < n ? keys[i] : -INFINITY;
    id_items[k] = i < n ? ids[i] : INT32_MAX;
  }
  BlockSort(sh.sort).SortDescending(k_items, id_items);
  __syncthreads();  // the sort's storage overlaps the candidate arrays
  for (int k = 0; k < kSortItems; ++k) {
    const int i = tid * kSortItems + k;
    sh.cand.keys[i] = k_items[k];
    sh.cand.ids[i] = id_items[k];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kPickThreads)
    PickKernel(const float* __restrict__ keys, const float* __restrict__ sorted_keys,
               const int32_t* __restrict__ sorted_ids, int64_t cols, const DeviceTokenRule* __restrict__ rules,
               const SampleRowPlan* __restrict__ plans, const SlicePart* __restrict__ parts,
               int32_t* __restrict__ out) {
  __shared__ PickShared sh;
  const DeviceTokenRule r = rules[blockIdx.x];
  if (r.temperature == 0.0f) return;  // greedy: PlanKernel picked
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const SampleRowPlan plan = plans[blockIdx.x];
  const float max_key = plan.max_key;
  double total = plan.total;
  if (!RuleSorts(r)) {
    // Temperature alone: the slice where the slices' running weight reaches the draw, then
    // the key there (none, by rounding of the slice's sum: its last key).
    const int64_t slices = SlicesOf(cols);
    const SlicePart* row_parts = parts + blockIdx.x * slices;
    const double target = r.draw * total;
    if (tid == 0) {
      double carry = 0.0;
      int64_t j = 0;
      while (j < slices - 1 && carry + row_parts[j].weight < target) carry += row_parts[j++].weight;
      sh.slice = j;
      sh.carry = carry;
    }
    __syncthreads();
    const int64_t first = sh.slice * kSliceKeys, n = cols - first < kSliceKeys ? cols - first : kSliceKeys;
    double mass;
    const int64_t at = FirstReaching(keys + base + first, n, max_key, r.temperature, target, sh.carry, &mass, sh);
    if (tid == 0) out[blockIdx.x] = static_cast<int32_t>(first + (at < 0 ? n - 1 : at));
    return;
  }
  const float* cand = sorted_keys + base;
  const int32_t* cand_ids = sorted_ids + base;
  const int64_t keep = r.top_k > 0 ? (r.top_k < cols ? int64_t{r.top_k} : cols) : cols;
  int64_t cut = keep;
  if (plan.candidates >= 0) {
    if (plan.candidates <= kPickThreads) {
      RankCandidates(cand, cand_ids, plan.candidates, sh);
    } else {
      SortCandidates(cand, cand_ids, plan.candidates, sh);
    }
    cand = sh.cand.keys;
    cand_ids = sh.cand.ids;
    cut = plan.candidates < keep ? plan.candidates : keep;  // the selection holds the cut
  }
  if (r.top_k > 0) {  // the total of the kept
    double part = 0.0;
    for (int64_t i = tid; i < keep; i += kPickThreads) part += Weight(cand[i], max_key, r.temperature);
    total = PickTotal(part, sh);
  }
  if (r.top_p < 1.0f) {
    double mass = total;
    const int64_t at =
        FirstReaching(cand, cut, max_key, r.temperature, static_cast<double>(r.top_p) * total, 0.0, &mass, sh);
    if (at >= 0) {
      cut = at + 1;
      total = mass;
    }
  }
  double mass;
  int64_t pick = FirstReaching(cand, cut, max_key, r.temperature, r.draw * total, 0.0, &mass, sh);
  if (pick < 0) pick = cut - 1;
  if (tid == 0) out[blockIdx.x] = cand_ids[pick];
}

Status CheckSampleShape(int64_t rows, int64_t cols) {
  if (rows < 0 || cols <= 0 || rows * cols > (int64_t{1} << 31) - 1 || rows > 65535) {
    return Status::InvalidArgument("SampleRows: rows=" + std::to_string(rows) + " cols=" + std::to_string(cols));
  }
  return Status::Ok();
}

LM2_CUDA_KERNEL_MODULE(PrepareKeysKernel);

}  // namespace

Status SortSegmentsDescending(const float* keys, const int32_t* ids, int64_t n, int64_t segments,
                              const int32_t* segment_begin, const int32_t* segment_end, float* sorted_keys,
                              int32_t* sorted_ids, float* alt_keys, int32_t* alt_ids, cudaStream_t stream) {
  if (n < 0 || n > (int64_t{1} << 31) - 1 || segments < 0 || segments > (int64_t{1} << 31) - 1) {
    return Status::InvalidArgument("SortSegmentsDescending: n=" + std::to_string(n) +
                                   " segments=" + std::to_string(segments));
  }
  if (segments == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SortSegmentsDescending", {keys, ids, segment_begin, segment_end, sorted_keys,
                                                                sorted_ids, alt_keys, alt_ids}));
  SortSegmentsKernel<<<static_cast<unsigned int>(segments), kRowSortThreads, 0, stream>>>(
      keys, ids, segment_begin, segment_end, sorted_keys, sorted_ids, alt_keys, alt_ids);
  return CheckLaunch("SortSegmentsKernel");
}

Result<std::size_t> SampleRowsTempBytes(int64_t rows, int64_t cols) {
  LM2_RETURN_IF_ERROR(CheckSampleShape(rows, cols));
  return LayoutFor(rows, cols).end;
}

Status SampleRows(const float* logits, int64_t rows, int64_t cols, const DeviceTokenRule* rules, const int32_t* history,
                  SampleRowKinds kinds, const SampleRowsScratch& scratch, int32_t* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckSampleShape(rows, cols));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {logits, rules, out, scratch.keys, scratch.ids,
                                                    scratch.sorted_keys, scratch.sorted_ids, scratch.segment_begin,
                                                    scratch.segment_end, scratch.plans, scratch.temp}));
  const TempLayout layout = LayoutFor(rows, cols);
  if (scratch.temp_bytes < layout.end) {
    return Status::InvalidArgument("SampleRows: temp_bytes " + std::to_string(scratch.temp_bytes) +
                                   " below SampleRowsTempBytes(" + std::to_string(rows) + ", " + std::to_string(cols) +
                                   ")");
  }
  auto* temp = static_cast<char*>(scratch.temp);
  auto* parts = reinterpret_cast<SlicePart*>(temp + layout.parts);
  auto* counts = reinterpret_cast<int32_t*>(temp + layout.counts);
  const auto grid_rows = static_cast<unsigned int>(rows);
  const dim3 slice_grid(static_cast<unsigned int>(SlicesOf(cols)), grid_rows);
  PrepareKeysKernel<<<dim3(GridFor(cols, kThreads), grid_rows), kThreads, 0, stream>>>(logits, cols, scratch.keys,
                                                                                      scratch.ids);
  LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (kinds.penalty) {
    LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {history}));
    PenaltyKernel<<<grid_rows, kThreads, 0, stream>>>(logits, cols, rules, history, scratch.keys);
    LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  SliceMaxKernel<<<slice_grid, kSliceThreads, 0, stream>>>(scratch.keys, cols, parts);
  LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (kinds.temperature) {
    SliceWeightsKernel<<<slice_grid, kSliceThreads, 0, stream>>>(scratch.keys, cols, rules, parts, counts);
    LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  PlanKernel<<<grid_rows, kSliceThreads, 0, stream>>>(cols, rules, parts, counts, scratch.segment_begin,
                                                      scratch.segment_end, scratch.plans, out);
  LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (kinds.sorts) {
    CompactKernel<<<slice_grid, kSliceThreads, 0, stream>>>(scratch.keys, cols, rules, parts, scratch.plans,
                                                           scratch.sorted_keys, scratch.sorted_ids);
    LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    // The rows whose candidates did not fit the pick's sort (PlanKernel gave every other
    // row an empty segment, which this launch's block leaves at once).
    LM2_RETURN_IF_ERROR(SortSegmentsDescending(scratch.keys, scratch.ids, rows * cols, rows, scratch.segment_begin,
                                               scratch.segment_end, scratch.sorted_keys, scratch.sorted_ids,
                                               reinterpret_cast<float*>(temp + layout.alt_keys),
                                               reinterpret_cast<int32_t*>(temp + layout.alt_ids), stream));
  }
  if (!kinds.temperature) return Status::Ok();  // PlanKernel picked every row
  PickKernel<<<grid_rows, kPickThreads, 0, stream>>>(scratch.keys, scratch.sorted_keys, scratch.sorted_ids, cols,
                                                     rules, scratch.plans, parts, out);
  return CheckLaunch("PickKernel");
}

}  // namespace lm2::runtime::cuda
