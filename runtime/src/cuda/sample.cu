// Token sampling on the device: PickToken's rule (sampler.h) applied to each logits row, so
// a sampled decode step copies B token ids to the host instead of B x V logits and sorts on
// the GPU instead of the CPU.
//
// Per call: one kernel writes each row's keys (its logits, canonical: -0 as +0, NaN as
// -inf) and ids; one applies the repetition penalty to each row's distinct history ids.
// Rows that sort (top-k or top-p) then go through SelectCandidatesKernel, a block per row:
// the largest key, the total weight, and a histogram of (max - key) / temperature that finds
// the fewest leading candidates sure to hold the top k, or mass enough for top-p; when they
// number at most kBlockSortCapacity they are compacted (in id order) and sorted in shared
// memory; otherwise the row is left to CUB's segmented radix sort of all its keys (one block
// per row: much slower). Both sorts are stable and descending, so ties stay in id order.
// Last, a block per row walks its candidates: the total weight, the top-p cut and the pick,
// each a block scan in double over tiles, stopping at the tile where the running weight
// reaches its target.
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

// ---- Candidate selection --------------------------------------------------------------------

constexpr int kSelectThreads = 1024;
constexpr int kSortItems = 4;  // per thread in the block sort
constexpr int kCompactItems = 16;  // consecutive keys per thread in a compaction tile
constexpr int kBlockSortCapacity = kSelectThreads * kSortItems;
constexpr int kBins = 128;        // histogram bins of (max - key) / temperature ...
constexpr float kBinsPerUnit = 4.0f;  // ... each a quarter wide: keys beyond 32 are left out

// Which bin a key falls in (kBins: none). Monotone in the key (every float step is), so the
// keys of bins <= b are the leading keys of the sorted order.
__device__ __forceinline__ int BinOf(float key, float max_key, float temperature) {
  const float x = (max_key - key) / temperature * kBinsPerUnit;
  return x < static_cast<float>(kBins) ? static_cast<int>(x) : kBins;
}

using SelectScan = cub::BlockScan<int, kSelectThreads>;
using SelectReduce = cub::BlockReduce<double, kSelectThreads>;
using BlockSort = cub::BlockRadixSort<float, kSelectThreads, kSortItems, int32_t>;

struct SelectShared {
  union {
    struct {  // the compacted candidates, in id order
      float keys[kBlockSortCapacity];
      int32_t ids[kBlockSortCapacity];
    } cand;
    typename BlockSort::TempStorage sort;
    typename SelectReduce::TempStorage reduce;
  };
  typename SelectScan::TempStorage scan;  // used while the candidate arrays fill: not in the union
  int counts[kBins];
  float scratch[32];
  double total;
  int chosen_bin;  // candidates: the keys of bins <= chosen_bin; -1: sort the whole row
  int taken;       // candidates compacted so far
};

// A block per row: plans[row] and, for a row that sorts, either its candidates sorted into
// sorted_keys / sorted_ids (row-major, the row's first plan.candidates entries) with an
// empty sort segment, or plan.candidates = -1 and the whole row as its segment.
__global__ void __launch_bounds__(kSelectThreads)
    SelectCandidatesKernel(const float* __restrict__ keys, int64_t cols,
                           const DeviceTokenRule* __restrict__ rules, float* __restrict__ sorted_keys,
                           int32_t* __restrict__ sorted_ids, int32_t* __restrict__ seg_begin,
                           int32_t* __restrict__ seg_end, SampleRowPlan* __restrict__ plans) {
  __shared__ SelectShared sh;
  const DeviceTokenRule r = rules[blockIdx.x];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const float* row = keys + base;
  if (tid == 0) seg_begin[blockIdx.x] = seg_end[blockIdx.x] = static_cast<int32_t>(base);
  if (!RuleSorts(r)) return;

  float m = -INFINITY;
  for (int64_t i = tid; i < cols; i += kSelectThreads) m = fmaxf(m, row[i]);
  const float max_key = BlockMax(m, sh.scratch);
  double part = 0.0;
  for (int64_t i = tid; i < cols; i += kSelectThreads) part += Weight(row[i], max_key, r.temperature);
  for (int b = tid; b < kBins; b += kSelectThreads) sh.counts[b] = 0;
  const double total = SelectReduce(sh.reduce).Sum(part);
  if (tid == 0) sh.total = total;
  __syncthreads();
  for (int64_t i = tid; i < cols; i += kSelectThreads) {
    const int b = BinOf(row[i], max_key, r.temperature);
    if (b < kBins) atomicAdd(&sh.counts[b], 1);
  }
  __syncthreads();
  if (tid == 0) {
    // The fewest leading bins sure to hold the kept candidates: the top k, or (top-p alone)
    // all but a tail of weight at most (1 - top_p) x total, bounding each key of bin b by
    // exp(-(b - 1) / 4) (one bin of margin for the bin's float rounding) and each key past
    // the last bin by exp(-(kBins - 1) / 4).
    const int64_t need = r.top_k > 0 ? (r.top_k < cols ? int64_t{r.top_k} : cols) : 0;
    const double tail_allowed = (1.0 - static_cast<double>(r.top_p)) * sh.total - 1e-9 * sh.total;
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
    sh.taken = 0;
    plans[blockIdx.x] = SampleRowPlan{.total = sh.total, .max_key = max_key,
                                      .candidates = sh.chosen_bin < 0 ? -1 : static_cast<int32_t>(count)};
    if (sh.chosen_bin < 0) seg_end[blockIdx.x] = static_cast<int32_t>(base + cols);  // the full sort
  }
  __syncthreads();
  const int chosen = sh.chosen_bin;
  if (chosen < 0) return;
  // Compaction in id order: tiles of kSelectThreads x kCompactItems consecutive keys.
  for (int64_t tile = 0; tile < cols; tile += int64_t{kSelectThreads} * kCompactItems) {
    const int64_t first = tile + int64_t{tid} * kCompactItems;
    int flags = 0;
#pragma unroll
    for (int k = 0; k < kCompactItems; ++k) {
      if (first + k < cols && BinOf(row[first + k], max_key, r.temperature) <= chosen) flags |= 1 << k;
    }
    int before, in_tile;
    SelectScan(sh.scan).ExclusiveSum(__popc(flags), before, in_tile);
    int at = sh.taken + before;
    for (int k = 0; k < kCompactItems; ++k) {
      if ((flags & (1 << k)) && at < kBlockSortCapacity) {  // the count said it fits; never overrun
        sh.cand.keys[at] = row[first + k];
        sh.cand.ids[at] = static_cast<int32_t>(first + k);
        ++at;
      }
    }
    __syncthreads();
    if (tid == 0) sh.taken += in_tile;
    __syncthreads();
  }
  const int n = sh.taken < kBlockSortCapacity ? sh.taken : kBlockSortCapacity;
  float k_items[kSortItems];
  int32_t id_items[kSortItems];
  for (int k = 0; k < kSortItems; ++k) {
    const int i = tid * kSortItems + k;  // blocked: the input order is the candidates' id order
    k_items[k] = i < n ? sh.cand.keys[i] : -INFINITY;
    id_items[k] = i < n ? sh.cand.ids[i] : INT32_MAX;
  }
  __syncthreads();  // the sort's storage overlaps the candidate arrays
  BlockSort(sh.sort).SortDescending(k_items, id_items);
  for (int k = 0; k < kSortItems; ++k) {
    const int i = tid * kSortItems + k;
    if (i < n) {
      sorted_keys[base + i] = k_items[k];
      sorted_ids[base + i] = id_items[k];
    }
  }
}

// ---- The pick ---------------------------------------------------------------------------------

constexpr int kPickThreads = 1024;
constexpr int kPickItems = 8;  // consecutive candidates per thread in a scan tile
constexpr int64_t kPickTile = int64_t{kPickThreads} * kPickItems;

using PickScan = cub::BlockScan<double, kPickThreads>;
using PickReduce = cub::BlockReduce<double, kPickThreads>;

struct PickShared {
  union {
    typename PickScan::TempStorage scan;
    typename PickReduce::TempStorage reduce;
  };
  float scratch[32];
  int64_t found;      // the first index whose running weight reached the target, or -1
  double found_mass;  // the running weight there
};

// The first i < n whose running weight (candidates 0..i) reaches `target`, or -1; its running
// weight in *mass. Tiles of kPickTile, each thread kPickItems consecutive candidates.
__device__ int64_t FirstReaching(const float* keys, int64_t n, float max_key, float temperature, double target,
                                 double* mass, PickShared& sh) {
  const int tid = static_cast<int>(threadIdx.x);
  double carry = 0.0;
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

__global__ void __launch_bounds__(kPickThreads)
    PickKernel(const float* __restrict__ keys, const float* __restrict__ sorted_keys,
               const int32_t* __restrict__ sorted_ids, int64_t cols, const DeviceTokenRule* __restrict__ rules,
               const SampleRowPlan* __restrict__ plans, int32_t* __restrict__ out) {
  __shared__ PickShared sh;
  const DeviceTokenRule r = rules[blockIdx.x];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const float* row = keys + base;
  if (r.temperature == 0.0f) {  // greedy with a penalty: the first maximum
    // Each thread keeps its first maximum (its indices ascend); keys hold no NaN.
    float best = -INFINITY;
    int64_t at = cols;
      for (int64_t i = tid; i < cols; i += kPickThreads) {
      if (at == cols || row[i] > best) {
        best = row[i];
        at = i;
      }
    }
    const float top = BlockMax(best, sh.scratch);
    if (tid == 0) sh.found = cols;
    __syncthreads();
    if (best == top && at < cols) atomicMin(reinterpret_cast<unsigned long long*>(&sh.found), static_cast<unsigned long long>(at));
    __syncthreads();
    if (tid == 0) out[blockIdx.x] = static_cast<int32_t>(sh.found);
    return;
  }
  const bool sorted = RuleSorts(r);
  const float* cand = sorted ? sorted_keys + base : row;
  const int64_t keep = r.top_k > 0 ? (r.top_k < cols ? int64_t{r.top_k} : cols) : cols;
  float max_key;
  double total;
  int64_t cut = keep;
  if (sorted) {
    const SampleRowPlan plan = plans[blockIdx.x];
    max_key = plan.max_key;
    if (plan.candidates >= 0) cut = plan.candidates < keep ? plan.candidates : keep;  // the selection holds the cut
    total = plan.total;
    if (r.top_k > 0) {  // the total of the kept
      double part = 0.0;
      for (int64_t i = tid; i < keep; i += kPickThreads) part += Weight(cand[i], max_key, r.temperature);
      total = PickTotal(part, sh);
    }
  } else {
    float m = -INFINITY;
      for (int64_t i = tid; i < cols; i += kPickThreads) m = fmaxf(m, cand[i]);
    max_key = BlockMax(m, sh.scratch);
    double part = 0.0;
      for (int64_t i = tid; i < keep; i += kPickThreads) part += Weight(cand[i], max_key, r.temperature);
    total = PickTotal(part, sh);
  }
  if (r.top_p < 1.0f) {
    double mass = total;
    const int64_t at = FirstReaching(cand, cut, max_key, r.temperature, static_cast<double>(r.top_p) * total, &mass, sh);
    if (at >= 0) {
      cut = at + 1;
      total = mass;
    }
  }
  double mass;
  int64_t pick = FirstReaching(cand, cut, max_key, r.temperature, r.draw * total, &mass, sh);
  if (pick < 0) pick = cut - 1;
  if (tid == 0) out[blockIdx.x] = sorted ? sorted_ids[base + pick] : static_cast<int32_t>(pick);
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
  std::size_t bytes = 0;
  LM2_CUDA_RETURN_IF_ERROR(SortSegments(nullptr, &bytes, SampleRowsScratch{}, rows, cols, nullptr));
  return bytes;
}

Status SampleRows(const float* logits, int64_t rows, int64_t cols, const DeviceTokenRule* rules, const int32_t* history,
                  bool any_sorts, bool any_penalty, const SampleRowsScratch& scratch, int32_t* out,
                  cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(CheckSampleShape(rows, cols));
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {logits, rules, out, scratch.keys, scratch.ids,
                                                    scratch.sorted_keys, scratch.sorted_ids, scratch.segment_begin,
                                                    scratch.segment_end, scratch.plans}));
  const auto grid_rows = static_cast<unsigned int>(rows);
  PrepareKeysKernel<<<dim3(GridFor(cols, kThreads), grid_rows), kThreads, 0, stream>>>(logits, cols, scratch.keys,
                                                                                      scratch.ids);
  LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (any_penalty) {
    LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {history}));
    PenaltyKernel<<<grid_rows, kThreads, 0, stream>>>(logits, cols, rules, history, scratch.keys);
    LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (any_sorts) {
    LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {scratch.temp}));
    SelectCandidatesKernel<<<grid_rows, kSelectThreads, 0, stream>>>(
        scratch.keys, cols, rules, scratch.sorted_keys, scratch.sorted_ids, scratch.segment_begin,
        scratch.segment_end, scratch.plans);
    LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    std::size_t bytes = scratch.temp_bytes;
    LM2_CUDA_RETURN_IF_ERROR(SortSegments(scratch.temp, &bytes, scratch, rows, cols, stream));
  }
  PickKernel<<<grid_rows, kPickThreads, 0, stream>>>(scratch.keys, scratch.sorted_keys, scratch.sorted_ids, cols,
                                                     rules, scratch.plans, out);
  return CudaStatus(cudaGetLastError(), "PickKernel");
}

}  // namespace lm2::runtime::cuda
