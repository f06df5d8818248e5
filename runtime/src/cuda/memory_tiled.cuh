// What the tiled memory read and write kernels share (memory_tiled.cu: mma.sync, any head
// width up to 128 on sm_80+; memory_tiled_sm90.cu: wgmma, head width 64 on sm_90a): the
// scratch the read leaves for the write, and the tile shapes.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/mma.cuh"
#include "lm2/core/status.h"

namespace lm2::runtime::cuda::tiled {

constexpr int kTile = 64;               // columns of a score tile: slots (read), tokens (write)
constexpr int kRows = kTileBlockRows;   // rows of a block: tokens (read), slots (write)

__host__ __device__ constexpr int64_t PaddedTokens(int64_t T) { return (T + kRows - 1) / kRows * kRows; }

// The scratch: per head, each token's softmax shift m + log2 l (log2 units; +inf for
// padding tokens: weight 0) [Tp], then q and the offer in bf16 [Tp, DHP] each (Tp = T
// rounded up to kRows; padding rows and columns zero).
struct Scratch {
  float* shift;
  __nv_bfloat16* q;
  __nv_bfloat16* offer;
};
inline Scratch Carve(float* base, int64_t T, int64_t heads, int64_t dhp) {
  const int64_t Tp = PaddedTokens(T);
  auto* q = reinterpret_cast<__nv_bfloat16*>(base + heads * Tp);  // 16-byte aligned: Tp is a multiple of 128
  return {base, q, q + heads * Tp * dhp};
}

// A token's shift for the write kernel: its weights 2^(s' - m) / l = 2^(s' - (m + log2 l)).
__device__ __forceinline__ float SoftmaxShift(float m, float l) { return m + log2f(l); }

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


// The wgmma kernels (memory_tiled_sm90.cu), for head width 64 and 16-byte aligned rows
// (d % 8 == 0) on compute capability 9.0 (the caller checks): whether this build has them
// (sm_90a code; LM2_CUDA_WGMMA=0 in the environment turns them off), the read of an
// unsplit chunk, and the write sums (after either read: the scratch is the same).
bool Sm90KernelsBuilt();
Status ReadSm90(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, const __nv_bfloat16* mem_k,
                const __nv_bfloat16* mem_v, int64_t T, int64_t N, int64_t d, float scale_log2, float* e,
                Scratch scratch, cudaStream_t stream);
Status WriteSm90(const __nv_bfloat16* mem_k, int64_t T, int64_t N, int64_t d, float scale_log2, bool accumulate,
                 float* mass, float* acc, Scratch scratch, cudaStream_t stream);

}  // namespace lm2::runtime::cuda::tiled
