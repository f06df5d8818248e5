// What the tiled memory read and write kernels share (memory_tiled.cu: mma.sync, any head
// width up to 128 on sm_80+; memory_tiled_sm90.cu: wgmma, head width 64 on sm_90a): the
// scratch the read leaves for the write, and the tile shapes.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda/device_math.cuh"
#include "cuda/mma.cuh"
#include "lm2/core/status.h"

namespace lm2::runtime::cuda::tiled {

constexpr int kTile = 64;               // columns of a score tile: slots (read), tokens (write)
constexpr int kRows = kTileBlockRows;   // rows of a block: tokens (read), slots (write)

__host__ __device__ constexpr int64_t PaddedTokens(int64_t T) { return (T + kRows - 1) / kRows * kRows; }

// The scratch: per head, each token's softmax shift m + log2 l (log2 units; +inf, or any
// value past every score, for padding tokens: weight 0) [tp], then q and the offer in bf16
// [tp, DHP] each (tp = the tokens it was carved for rounded up to kRows; padding rows and
// columns zero). A read carves it for its chunk; decode steps stage their tokens into one
// carved for CudaOptions::write_flush_tokens (memory_decode.cu, FlushStagedTokens), which a
// write then takes T <= tp of.
struct Scratch {
  float* shift;
  __nv_bfloat16* q;
  __nv_bfloat16* offer;
  int64_t tp;  // rows per head
};
__host__ __device__ inline Scratch Carve(float* base, int64_t T, int64_t heads, int64_t dhp) {
  const int64_t tp = PaddedTokens(T);
  auto* q = reinterpret_cast<__nv_bfloat16*>(base + heads * tp);  // 16-byte aligned: tp is a multiple of 128
  return {base, q, q + heads * tp * dhp, tp};
}

// A token's shift for the write kernel: its weights 2^(s' - m) / l = 2^(s' - (m + log2 l)).
__device__ __forceinline__ float SoftmaxShift(float m, float l) { return m + log2f(l); }

// A read's last slot tile: the scores of slots at or past `valid` (C fragments of NT column
// tiles of 8, this lane's quad column t) to -inf, weight 0.
template <int NT>
__device__ __forceinline__ void MaskSlotsFrom(float (&s)[NT][4], int64_t valid, int t) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (nt * 8 + 2 * t + (c & 1) >= valid) s[nt][c] = -INFINITY;
}

// The part of the slots a block of a read takes: a cluster of gridDim.z blocks shares a
// (tokens, head) pair, block z over slot tiles [z tiles / P, (z + 1) tiles / P); its own
// rows [own0, own1) are the ones it writes to the scratch and, split, combines.
struct ReadPart {
  int first_tile, tiles, own0, own1;
};
__device__ __forceinline__ ReadPart ThisReadPart(int64_t N) {
  const int splits = static_cast<int>(gridDim.z), part = static_cast<int>(blockIdx.z);
  const int all_tiles = static_cast<int>((N + kTile - 1) / kTile);
  const int first_tile = all_tiles * part / splits;
  return {first_tile, all_tiles * (part + 1) / splits - first_tile, kRows * part / splits,
          kRows * (part + 1) / splits};
}

// Whether StageReadRows may load q and offer 16 bytes at a time: both 16-byte aligned, their
// row strides and the head width multiples of 4 floats and 8 columns (a piece of 8 columns
// then lies wholly inside a head or wholly past it).
inline bool StageRowsByPieces(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, int64_t dh) {
  return dh % 8 == 0 && q_ld % 4 == 0 && offer_ld % 4 == 0 && Aligned16({q, offer});
}

// A read block's q rows [t0, t0 + kBlockRows) of head j in bf16 into shared memory `qs` (rows
// kLd apart; kLd 0: 64-column rows of 128 bytes in wgmma's 128-byte swizzle, 16-byte piece
// c of row r at r · 128 + (c ⊕ r mod 8) · 16), and its own rows' q and offer into the
// scratch rows q_out / offer_out (DHP apart) for the write kernel: padding rows and columns
// zero. Each thread takes pieces of 8 columns, up to kMaxBatch at a time, their loads all
// issued before the first store (one load at a time, each waited for before the stores that
// might alias it, took ~20 us a block): with `vec` (StageRowsByPieces) two 16-byte loads of
// each row a piece, else element by element; one 16-byte store to each destination. By a
// block of kThreads threads.
template <int DHP, int kThreads, int kLd, int kBlockRows = kRows, int kMaxBatch = 2>
__device__ __forceinline__ void StageReadRows(const float* __restrict__ q, int64_t q_ld,
                                              const float* __restrict__ offer, int64_t offer_ld, int64_t t0,
                                              int64_t j, int64_t T, int dh, const ReadPart& p, bool vec,
                                              __nv_bfloat16* qs, __nv_bfloat16* q_out, __nv_bfloat16* offer_out) {
  constexpr int kPieces = kBlockRows * DHP / 8, kPerThread = kPieces / kThreads;
  constexpr int kBatch = kPerThread < kMaxBatch ? kPerThread : kMaxBatch;
  static_assert(kPieces % kThreads == 0 && kPerThread % kBatch == 0, "whole batches");
  static_assert(kLd > 0 || DHP == 64, "the swizzled rows are 64 columns");
  const auto at = [](int r, int c8) { return kLd > 0 ? r * kLd + c8 * 8 : r * 64 + ((c8 ^ (r & 7)) << 3); };
#pragma unroll 1
  for (int b = 0; b < kPerThread; b += kBatch) {
    float qv[kBatch][8], ov[kBatch][8];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = static_cast<int>(threadIdx.x) + (b + u) * kThreads, r = i / (DHP / 8), c = i % (DHP / 8) * 8;
      const bool row_in = t0 + r < T, own = r >= p.own0 && r < p.own1;
      const float* qr = q + (t0 + r) * q_ld + j * dh + c;
      const float* orow = offer + (t0 + r) * offer_ld + j * dh + c;
      if (vec) {  // a piece lies wholly inside the head or wholly past it
        const bool in = row_in && c < dh;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float4 qh = in ? reinterpret_cast<const float4*>(qr)[h] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          const float4 oh =
              in && own ? reinterpret_cast<const float4*>(orow)[h] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          qv[u][4 * h] = qh.x, qv[u][4 * h + 1] = qh.y, qv[u][4 * h + 2] = qh.z, qv[u][4 * h + 3] = qh.w;
          ov[u][4 * h] = oh.x, ov[u][4 * h + 1] = oh.y, ov[u][4 * h + 2] = oh.z, ov[u][4 * h + 3] = oh.w;
        }
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const bool in = row_in && c + k < dh;
          qv[u][k] = in ? qr[k] : 0.0f;
          ov[u][k] = in && own ? orow[k] : 0.0f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = static_cast<int>(threadIdx.x) + (b + u) * kThreads, r = i / (DHP / 8), c8 = i % (DHP / 8);
      const uint4 qb = PackBf16x8(qv[u]);
      *reinterpret_cast<uint4*>(qs + at(r, c8)) = qb;
      if (r >= p.own0 && r < p.own1) {
        *reinterpret_cast<uint4*>(q_out + r * DHP + c8 * 8) = qb;
        *reinterpret_cast<uint4*>(offer_out + r * DHP + c8 * 8) = PackBf16x8(ov[u]);
      }
    }
  }
}

// The end of a write block (slots n0 + (warp M + m) 16 + g + 8r of head j): its sums out
// and slot_mass (this lane's share) added to acc and mass, or (kAccumulate false) stored
// as 0 + sum: the bits a zero-filled buffer would give. A row group's loads all issued
// before its stores (one read-modify-write at a time, each waited for, took ~20 us a block).
template <int DHP, int M, bool kAccumulate>
__device__ __forceinline__ void StoreSlotSums(const float (&out)[M][DHP / 8][4], const float (&slot_mass)[M][2],
                                              int64_t n0, int64_t j, int64_t N, int64_t d, int dh,
                                              float* __restrict__ mass, float* __restrict__ acc) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float old[2][DHP / 8][2], old_mass[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t slot = n0 + (warp * M + m) * 16 + g + 8 * r;
      old_mass[r] = kAccumulate && slot < N && t == 0 ? mass[j * N + slot] : 0.0f;
#pragma unroll
      for (int i = 0; i < DHP / 8; ++i)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = i * 8 + 2 * t + c;
          old[r][i][c] = kAccumulate && slot < N && col < dh ? acc[slot * d + j * dh + col] : 0.0f;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t slot = n0 + (warp * M + m) * 16 + g + 8 * r;
      const float total = QuadSum(slot_mass[m][r]);
      if (slot < N) {
#pragma unroll
        for (int i = 0; i < DHP / 8; ++i)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = i * 8 + 2 * t + c;
            if (col < dh) acc[slot * d + j * dh + col] = old[r][i][c] + out[m][i][2 * r + c];
          }
        if (t == 0) mass[j * N + slot] = old_mass[r] + total;
      }
    }
  }
}

// A split read's unnormalised rows in shared memory (over the K/V buffers, free by then):
// [kRows][DHP + 4] floats (the 4 spread a quad's rows over the banks), then (m, l) per row.
template <int DHP>
struct SplitRows {
  static constexpr int kLd = DHP + 4;
  static constexpr int kBytes = kRows * kLd * 4 + kRows * 8;
};
template <int DHP>
__host__ __device__ constexpr int SplitRowsBytes() { return SplitRows<DHP>::kBytes; }

// The end of a split read: this block's rows (the online softmax's m, this lane's share of
// l, the unnormalised output fragments) into its shared memory; after a cluster barrier
// block z combines rows [kRows z / P, kRows (z + 1) / P) from the P blocks' shared memory
// into e and the shifts (of padding rows too: +inf); a second barrier keeps every
// block's shared memory alive until the others have read it. A block of kThreads threads,
// each warp M groups of 16 rows (rows (warp M + mg) 16 + g + 8r); `rows` its shared memory
// for SplitRowsBytes<DHP>() (over its K/V buffers, free by then).
template <int DHP, int M, int kThreads>
__device__ __forceinline__ void CombineSplits(const float (&m)[M][2], const float (&l)[M][2],
                                              const float (&out)[M][DHP / 8][4], int64_t t0, int64_t j, int64_t T,
                                              int64_t d, int dh, float* __restrict__ e, float* __restrict__ shift,
                                              float* rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90: ReadSplits gives 1 before it
#else
  using R = SplitRows<DHP>;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  auto* ml = reinterpret_cast<float2*>(rows + kRows * R::kLd);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  __syncthreads();  // every warp's last tile's K/V reads are done
#pragma unroll
  for (int mg = 0; mg < M; ++mg)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = (warp * M + mg) * 16 + g + 8 * r;
      const float sum = QuadSum(l[mg][r]);
#pragma unroll
      for (int i = 0; i < DHP / 8; ++i) {
        *reinterpret_cast<float2*>(rows + row * R::kLd + i * 8 + 2 * t) =
            make_float2(out[mg][i][2 * r], out[mg][i][2 * r + 1]);
      }
      if (t == 0) ml[row] = make_float2(m[mg][r], sum);
    }
  cluster.sync();
  const int splits = static_cast<int>(cluster.num_blocks()), part = static_cast<int>(cluster.block_rank());
  const int own0 = kRows * part / splits, own = kRows / splits;
  // Each thread takes one (row, column pair) at a time of the block's own rows.
  for (int i = threadIdx.x; i < own * (DHP / 2); i += kThreads) {
    const int row = own0 + i / (DHP / 2), col = 2 * (i % (DHP / 2));
    float mx = -INFINITY;
    for (int p = 0; p < splits; ++p) mx = fmaxf(mx, cluster.map_shared_rank(ml, p)[row].x);
    float sum = 0.0f;
    float2 acc = make_float2(0.0f, 0.0f);
    for (int p = 0; p < splits; ++p) {
      const float2 mp = cluster.map_shared_rank(ml, p)[row];
      const float w = FastExp2(mp.x - mx);  // 1 for the largest; a power of two at most 2^slack off otherwise
      const float2 v = *reinterpret_cast<const float2*>(cluster.map_shared_rank(rows, p) + row * R::kLd + col);
      sum += mp.y * w;
      acc.x += v.x * w;
      acc.y += v.y * w;
    }
    const float inv_l = 1.0f / sum;
    const int64_t token = t0 + row;
    if (token < T) {
      if (col < dh) e[token * d + j * dh + col] = acc.x * inv_l;
      if (col + 1 < dh) e[token * d + j * dh + col + 1] = acc.y * inv_l;
    }
    if (col == 0) shift[t0 + row] = token < T ? SoftmaxShift(mx, sum) : INFINITY;
  }
  cluster.sync();
#endif
}

// How many clusters of `size` blocks of `kernel` fit the device at once, and the blocks a
// split read takes per (tokens, head) pair (memory_tiled.cu).
Result<int> MaxActiveClusters(const void* kernel, int size, int threads, int smem);
Result<int> ReadSplits(int64_t pairs, int64_t tiles, const void* kernel, int threads, int smem);

// A launch of `grid` blocks of `threads` with `smem` bytes of dynamic shared memory on
// `stream`, grouped in clusters of `size` blocks along z (no cluster attribute for 1): a
// read's launch (cudaLaunchKernelEx(&launch.config, ...)), or the shape asked of
// cudaOccupancyMaxActiveClusters. The config points at the attribute: not copied.
struct ClusterLaunch {
  ClusterLaunch(dim3 grid, int threads, int smem, cudaStream_t stream, int size) {
    cluster[0].id = cudaLaunchAttributeClusterDimension;
    cluster[0].val.clusterDim = {1, 1, static_cast<unsigned int>(size)};
    config.gridDim = grid;
    config.blockDim = dim3(static_cast<unsigned int>(threads));
    config.dynamicSmemBytes = static_cast<std::size_t>(smem);
    config.stream = stream;
    config.attrs = cluster;
    config.numAttrs = size > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;

  cudaLaunchAttribute cluster[1];
  cudaLaunchConfig_t config{};
};


// The wgmma kernels (memory_tiled_sm90.cu), for head width 64 and 16-byte aligned rows
// (d % 8 == 0) on compute capability 9.0 (the caller checks): whether they run (this build
// has sm_90a code and the driver cuTensorMapEncodeTiled; LM2_CUDA_WGMMA=0 in the environment
// turns them off), the read of an unsplit chunk (e also in bf16 into e_b where set: 16-byte
// aligned), and the write sums (after either read: the scratch is the same).
bool Sm90KernelsBuilt();
Status ReadSm90(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, bool rows_vec,
                const __nv_bfloat16* mem_k, const __nv_bfloat16* mem_v, int64_t T, int64_t N, int64_t d,
                float scale_log2, float* e, __nv_bfloat16* e_b, Scratch scratch, cudaStream_t stream);
Status WriteSm90(const __nv_bfloat16* mem_k, int64_t T, int64_t N, int64_t d, float scale_log2, bool accumulate,
                 float* mass, float* acc, Scratch scratch, cudaStream_t stream);

}  // namespace lm2::runtime::cuda::tiled
