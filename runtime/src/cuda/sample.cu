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
// sort); otherwise the row is left to CUB's segmented radix sort of all its keys (much
// slower). Both sorts are stable and descending, so ties stay in id
// order. Last, a block per row walks its candidates: the total weight of a top-k, the top-p
// cut and the pick, each a block scan in double over tiles, stopping at the tile where the
// running weight reaches its target; a row without a sort walks only the slice where the
// slices' running weight reaches the draw.
#include <cub/cub.cuh>

#include <cmath>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"

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

// One slice's partial results (SampleRows' temp, before CUB's storage).
struct SlicePart {
  unsigned long long best;  // ArgmaxKey of its largest key (the first of equals)
  double weight;            // Σ Weight(key, the row's largest, temperature) over it
  int32_t before;           // a row that sorts: its candidates in earlier slices
};

// Where the parts and the bin counts [rows * slices][kBins] lie in temp, and CUB's storage.
struct TempLayout {
  std::size_t parts = 0, counts = 0, cub = 0, end = 0;
};
constexpr std::size_t AlignUp(std::size_t n) { return (n + 255) / 256 * 256; }
TempLayout LayoutFor(int64_t rows, int64_t cols, std::size_t cub_bytes) {
  TempLayout t;
  const auto items = static_cast<std::size_t>(rows * SlicesOf(cols));
  t.counts = AlignUp(items * sizeof(SlicePart));
  t.cub = t.counts + AlignUp(items * kBins * sizeof(int32_t));
  t.end = t.cub + cub_bytes;
  return t;
}

// The float an ArgmaxKey holds.
__device__ __forceinline__ float KeyValue(unsigned long long key) {
  const auto ordered = static_cast<unsigned int>(key >> 32);
  return __uint_as_float((ordered & 0x80000000u) != 0 ? (ordered & 0x7FFFFFFFu) : ~ordered);
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
// the whole row as its CUB sort segment.
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

// CUB's segmented sort of the keys; with temp == nullptr only its size into *temp_bytes.
cudaError_t SortSegments(void* temp, std::size_t* temp_bytes, const SampleRowsScratch& s, int64_t rows, int64_t cols,
                         cudaStream_t stream) {
  return cub::DeviceSegmentedRadixSort::SortPairsDescending(
      temp, *temp_bytes, s.keys, s.sorted_keys, s.ids, s.sorted_ids, static_cast<int>(rows * cols),
      static_cast<int>(rows), s.segment_begin, s.segment_end, 0, 32, stream);
}

}  // namespace

Result<std::size_t> SampleRowsTempBytes(int64_t rows, int64_t cols) {
  LM2_RETURN_IF_ERROR(CheckSampleShape(rows, cols));
  std::size_t cub_bytes = 0;
  LM2_CUDA_RETURN_IF_ERROR(SortSegments(nullptr, &cub_bytes, SampleRowsScratch{}, rows, cols, nullptr));
  return LayoutFor(rows, cols, cub_bytes).end;
}

Status SampleRows(const float* logits, int64_t rows, int64_t cols, const DeviceTokenRule* rules, const int32_t* history,
                  SampleRowKinds kinds, const SampleRowsScratch& scratch, int32_t* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckSampleShape(rows, cols));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {logits, rules, out, scratch.keys, scratch.ids,
                                                    scratch.sorted_keys, scratch.sorted_ids, scratch.segment_begin,
                                                    scratch.segment_end, scratch.plans, scratch.temp}));
  const TempLayout layout = LayoutFor(rows, cols, 0);
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
    std::size_t bytes = scratch.temp_bytes - layout.cub;
    LM2_CUDA_RETURN_IF_ERROR(SortSegments(temp + layout.cub, &bytes, scratch, rows, cols, stream));
  }
  if (!kinds.temperature) return Status::Ok();  // PlanKernel picked every row
  PickKernel<<<grid_rows, kPickThreads, 0, stream>>>(scratch.keys, scratch.sorted_keys, scratch.sorted_ids, cols,
                                                     rules, scratch.plans, parts, out);
  return CudaStatus(cudaGetLastError(), "PickKernel");
}

}  // namespace lm2::runtime::cuda
