// Token sampling on the device: PickToken's rule (sampler.h) applied to each logits row, so
// a sampled decode step copies B token ids to the host instead of B x V logits and sorts on
// the GPU instead of the CPU.
//
// Per call: one kernel writes each row's keys (its logits, canonical: -0 as +0, NaN as
// -inf) and ids, and the sort segments (empty for a row that does not sort); one applies the
// repetition penalty to each row's distinct history ids; CUB's segmented radix sort orders
// the rows that sort (descending, stable, so ties stay in id order); one block per row then
// walks the candidates: the total weight, the top-p cut and the pick, each a block scan in
// double over tiles of the candidates, stopping at the tile where the running weight
// reaches its target.
#include <cub/cub.cuh>

#include <cmath>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"

namespace lm2::runtime::cuda {
namespace {

constexpr int kPickThreads = 1024;
constexpr int kPickItems = 8;  // consecutive candidates per thread in a scan tile
constexpr int64_t kPickTile = int64_t{kPickThreads} * kPickItems;

__device__ __forceinline__ float CanonicalKey(float l) { return isnan(l) ? -INFINITY : l + 0.0f; }

__device__ __forceinline__ bool RuleSorts(const DeviceTokenRule& r) {
  return r.temperature != 0.0f && (r.top_k > 0 || r.top_p < 1.0f);
}

__global__ void PrepareKeysKernel(const float* __restrict__ logits, int64_t cols,
                                  const DeviceTokenRule* __restrict__ rules, float* __restrict__ keys,
                                  int32_t* __restrict__ ids, int32_t* __restrict__ seg_begin,
                                  int32_t* __restrict__ seg_end) {
  const int64_t row = blockIdx.y;
  const int64_t base = row * cols;
  for (int64_t i = FirstIndex(); i < cols; i += GridStride()) {
    keys[base + i] = CanonicalKey(logits[base + i]);
    ids[base + i] = static_cast<int32_t>(i);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    seg_begin[row] = static_cast<int32_t>(base);
    seg_end[row] = static_cast<int32_t>(RuleSorts(rules[row]) ? base + cols : base);
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

// w = exp((key - max) / temperature): the difference and the quotient in float, as the host.
__device__ __forceinline__ double Weight(float key, float max_key, float temperature) {
  return exp(static_cast<double>((key - max_key) / temperature));
}

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

__global__ void __launch_bounds__(kPickThreads)
    PickKernel(const float* __restrict__ keys, const float* __restrict__ sorted_keys,
               const int32_t* __restrict__ sorted_ids, int64_t cols, const DeviceTokenRule* __restrict__ rules,
               int32_t* __restrict__ out) {
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
  if (sorted) {
    max_key = cand[0];
  } else {
    float m = -INFINITY;
    for (int64_t i = tid; i < cols; i += kPickThreads) m = fmaxf(m, cand[i]);
    max_key = BlockMax(m, sh.scratch);
  }
  double part = 0.0;
  for (int64_t i = tid; i < keep; i += kPickThreads) part += Weight(cand[i], max_key, r.temperature);
  double total = PickReduce(sh.reduce).Sum(part);
  if (tid == 0) sh.found_mass = total;
  __syncthreads();
  total = sh.found_mass;
  __syncthreads();
  int64_t cut = keep;
  if (r.top_p < 1.0f) {
    double mass = total;
    const int64_t at = FirstReaching(cand, keep, max_key, r.temperature, static_cast<double>(r.top_p) * total, &mass, sh);
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
                                                    scratch.segment_end}));
  const dim3 prep_grid(GridFor(cols, kThreads), static_cast<unsigned int>(rows));
  PrepareKeysKernel<<<prep_grid, kThreads, 0, stream>>>(logits, cols, rules, scratch.keys, scratch.ids,
                                                        scratch.segment_begin, scratch.segment_end);
  LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (any_penalty) {
    LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {history}));
    PenaltyKernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(logits, cols, rules, history, scratch.keys);
    LM2_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (any_sorts) {
    std::size_t bytes = scratch.temp_bytes;
    LM2_RETURN_IF_ERROR(RequireNonNull("SampleRows", {scratch.temp}));
    LM2_CUDA_RETURN_IF_ERROR(SortSegments(scratch.temp, &bytes, scratch, rows, cols, stream));
  }
  PickKernel<<<static_cast<unsigned int>(rows), kPickThreads, 0, stream>>>(
      scratch.keys, scratch.sorted_keys, scratch.sorted_ids, cols, rules, out);
  return CudaStatus(cudaGetLastError(), "PickKernel");
}

}  // namespace lm2::runtime::cuda
