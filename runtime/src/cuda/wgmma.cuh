// Hopper's warpgroup MMA (wgmma, sm_90a) for the sm_90a kernels (memory_tiled_sm90.cu,
// gemm_sm90.cu): the shared-memory matrix descriptor of a tile in the 128-byte swizzle
// (tma.cuh's tensor copies store that layout), and a warpgroup's issue order and completion.
//
// The swizzled layout: rows of 64 bf16 (128 bytes), 16-byte piece c of row r at
// r · 128 + (c ⊕ r mod 8) · 16, the tile 1 KiB aligned: what a descriptor with 128-byte
// swizzle and 1 KiB between 8-row groups reads, for a "K-major" operand (a row's 64 k
// contiguous) of any number of rows.
#pragma once

#include <cstdint>

#include "cuda/mma.cuh"  // SharedAddress

// LM2_WGMMA: whether this compilation pass has the sm_90a instructions (wgmma, and the
// tensor copies tma.cuh issues); the sm_90a files' device code is guarded by it.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LM2_WGMMA 1
#else
#define LM2_WGMMA 0
#endif

namespace lm2::runtime::cuda {

constexpr int kSwizzleRowBytes = 128;                    // a swizzled row: 64 bf16
constexpr int kSwizzleAtomBytes = 8 * kSwizzleRowBytes;  // the swizzle's repeat: 8 rows, 1 KiB

// The matrix descriptor of a swizzled tile: start address, stride between 8-row groups
// (1 KiB), 128-byte swizzle. Adding b / 16 moves its start b bytes on (a 16-column step
// along a row: 32 bytes, kDescriptorColumnStep; a 16-row step: 2 KiB).
__device__ __forceinline__ uint64_t SwizzledTileDescriptor(const void* tile) {
  const uint64_t address = SharedAddress(tile);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{kSwizzleAtomBytes >> 4} << 32) |
         (uint64_t{1} << 62);
}
constexpr uint64_t kDescriptorColumnStep = 32 >> 4;  // 16 columns of a row

// Orders this warpgroup's earlier register and shared-memory accesses before the wgmma
// instructions that follow (before the first of a batch).
__device__ __forceinline__ void WgmmaFence() {
#if LM2_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the wgmma instructions issued since the last commit into one group.
__device__ __forceinline__ void WgmmaCommit() {
#if LM2_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N of this warpgroup's commit groups are pending.
template <int N>
__device__ __forceinline__ void WgmmaWait() {
#if LM2_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accesses of v (accumulators) across the asm statements
// around it: it sees a wgmma as done when issued.
template <int R>
__device__ __forceinline__ void FenceOperands(float (&v)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) asm volatile("" : "+f"(v[i][c])::"memory");
}

}  // namespace lm2::runtime::cuda

