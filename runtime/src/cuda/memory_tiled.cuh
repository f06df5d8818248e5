// What the tiled memory read and write kernels share (memory_tiled.cu: mma.sync, any head
// width up to 128 on sm_80+; memory_tiled_sm90.cu: wgmma, head width 64 on sm_90a): the
// scratch the read leaves for the write, and the tile shapes.
#pragma once

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
