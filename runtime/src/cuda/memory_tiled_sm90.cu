// The tiled memory read and write sums of memory_tiled.cu on Hopper's warpgroup MMA
// (wgmma, sm_90a), for head width 64: the same algorithm, scratch and results to rounding,
// with each tile product one asynchronous warpgroup instruction per 16-wide step instead
// of 32 mma.sync per warp.
//
// Every operand but the weights comes from shared memory through wgmma's matrix
// descriptors, in the 128-byte swizzled layout wgmma reads: 16-byte piece c of row r at
// r · 128 + (c ⊕ r mod 8) · 16 (tiles 1024-byte aligned). For the scores a tile is B
// "K-major" (a row's 64 head columns contiguous), for the products "MN-major" (the
// transpose flag): the same bytes either way.
//
// - The write: a block is two warpgroups of 64 slots (8 warps of 16 rows): its own K rows
//   once, the chunk's 64-token tiles of q and the offer by cp.async, a ring of kTileStages
//   under a block barrier a tile.
// - The read: a block is one warpgroup of 64 tokens and a producer warp that brings the
//   K and V rows by tensor copies, 128 slots a stage, on transaction barriers (below,
//   "The read: warp-specialised").
//
// Scores: wgmma accumulators of m64nN hold, per warp, rows g and g + 8 of its 16 and columns
// 8i + 2t, 8i + 2t + 1: the layout of mma.sync's C fragments, so memory_tiled's online
// softmax, weights and epilogues apply unchanged, and the weights packed to bf16 pairs are
// the next product's A fragments.
#include <cuda_bf16.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/kernel_modules.h"
#include "cuda/mbarrier.cuh"
#include "cuda/memory_tiled.cuh"
#include "cuda/mma.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace lm2::runtime::cuda::tiled {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kDh = 64;                         // head width: one 128-byte row of bf16
constexpr int kThreads = 256;                   // the write's two warpgroups of 64 rows
constexpr int kRowBytes = kDh * 2;              // 128
constexpr int kTileBytes = kTile * kRowBytes;   // a 64-row tile: 8 KiB
constexpr int kAtomBytes = kSwizzleAtomBytes;  // the swizzle's repeat: 8 rows, 1 KiB
constexpr int kOwnBytes = kRows * kRowBytes;    // a write block's own rows, swizzled: a tile per warpgroup

// Shared-memory writes of this thread (cp.async, completed) made visible to wgmma's reads.
__device__ __forceinline__ void FenceProxyAsync() {
#if LM2_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The top of tile `it` of `tiles` in a copy ring of kTileStages: this thread's copies of it
// complete and fenced for wgmma, then a block barrier (the tile is in for every thread, and
// every warp is done with the tile before, whose buffers the caller may refill).
__device__ __forceinline__ void TileArrived(int it, int tiles) {
  if (it + 1 < tiles) {
    CopyAsyncWait<1>();
  } else {
    CopyAsyncWait<0>();
  }
  FenceProxyAsync();
  __syncthreads();
}

// A 16-row step of a swizzled tile's descriptor (wgmma.cuh: 2 KiB).
constexpr uint64_t kRowStep = 16 * kRowBytes >> 4;

// d[64 x 64] (+)= A[64 x 64] · B[64 x 64] for the warpgroup, as four 16-wide steps, b[kc]
// the descriptors of B's steps (kTransB 0: the tile's rows are B's columns, as in the
// scores q · Kᵀ; 1: its rows are B's rows, as in the products p · V); accumulate false:
// d = A · B. A is
// either the descriptors of a shared-memory tile's steps (the scores: the block's own rows,
// "K-major") or, for the products, this warp's register fragments of its 16 rows. One asm
// statement from the fence to the wait: the compiler sees a wgmma as done when issued, and
// would otherwise be free to reuse its operand registers (or move the accumulators' reads)
// before the wait that actually completes it.
#define LM2_WGMMA_STEP(A, B, P)                                                               \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " A ", " \
  B ", " P ", 1, 1"
#define LM2_WGMMA_ACCUMULATORS                                                                                  \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),     \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), \
      "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), \
      "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

template <int kTransB>
__device__ __forceinline__ void Mma64x64x64(float (&d)[8][4], const uint64_t (&a)[4], const uint64_t (&b)[4],
                                            bool accumulate) {
#if LM2_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred first, rest;\n"
      "setp.ne.b32 first, %40, 0;\n"
      "setp.eq.b32 rest, 0, 0;\n"
      "wgmma.fence.sync.aligned;\n"
      LM2_WGMMA_STEP("%32", "%36", "first") ", 0, %41;\n"
      LM2_WGMMA_STEP("%33", "%37", "rest") ", 0, %41;\n"
      LM2_WGMMA_STEP("%34", "%38", "rest") ", 0, %41;\n"
      LM2_WGMMA_STEP("%35", "%39", "rest") ", 0, %41;\n"
      "wgmma.commit_group.sync.aligned;\n"
      "wgmma.wait_group.sync.aligned 0;\n"
      "}\n"
      : LM2_WGMMA_ACCUMULATORS
      : "l"(a[0]), "l"(a[1]), "l"(a[2]), "l"(a[3]), "l"(b[0]), "l"(b[1]), "l"(b[2]), "l"(b[3]),
        "r"(static_cast<int>(accumulate)), "n"(kTransB)
      : "memory");
#endif
}

template <int kTransB>
__device__ __forceinline__ void Mma64x64x64(float (&d)[8][4], const uint32_t (&a)[4][4], const uint64_t (&b)[4],
                                            bool accumulate) {
#if LM2_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred first, rest;\n"
      "setp.ne.b32 first, %52, 0;\n"
      "setp.eq.b32 rest, 0, 0;\n"
      "wgmma.fence.sync.aligned;\n"
      LM2_WGMMA_STEP("{%32, %33, %34, %35}", "%48", "first") ", %53;\n"
      LM2_WGMMA_STEP("{%36, %37, %38, %39}", "%49", "rest") ", %53;\n"
      LM2_WGMMA_STEP("{%40, %41, %42, %43}", "%50", "rest") ", %53;\n"
      LM2_WGMMA_STEP("{%44, %45, %46, %47}", "%51", "rest") ", %53;\n"
      "wgmma.commit_group.sync.aligned;\n"
      "wgmma.wait_group.sync.aligned 0;\n"
      "}\n"
      : LM2_WGMMA_ACCUMULATORS
      : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(a[1][0]), "r"(a[1][1]), "r"(a[1][2]),
        "r"(a[1][3]), "r"(a[2][0]), "r"(a[2][1]), "r"(a[2][2]), "r"(a[2][3]), "r"(a[3][0]), "r"(a[3][1]),
        "r"(a[3][2]), "r"(a[3][3]), "l"(b[0]), "l"(b[1]), "l"(b[2]), "l"(b[3]), "r"(static_cast<int>(accumulate)),
        "n"(kTransB)
      : "memory");
#endif
}
#undef LM2_WGMMA_ACCUMULATORS
#undef LM2_WGMMA_STEP

// A tile's four 16-wide steps: along its rows' 64 columns (step 32 bytes) or down 16 rows at
// a time (2 KiB).
__device__ __forceinline__ void ColumnSteps(const void* tile, uint64_t (&steps)[4]) {
  const uint64_t first = SwizzledTileDescriptor(tile);
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) steps[kc] = first + kc * kDescriptorColumnStep;
}
__device__ __forceinline__ void RowSteps(const void* tile, uint64_t (&steps)[4]) {
  const uint64_t first = SwizzledTileDescriptor(tile);
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) steps[kc] = first + kc * kRowStep;
}

// s = own · tileᵀ over the 64 head columns (four steps; `own` this warpgroup's 64 rows, a
// swizzled tile like the others), then out += weights(s) · tile2 after `weigh` turns s into
// weights: one tile of either kernel.
template <typename Weigh>
__device__ __forceinline__ void TileStep(const void* own, const void* tile, const void* tile2, float (&out)[8][4],
                                         Weigh&& weigh) {
  float s[8][4] = {};  // (the first step overwrites them: zeros only keep them defined)
  uint64_t a[4], b[4];
  ColumnSteps(own, a);
  ColumnSteps(tile, b);
  Mma64x64x64<0>(s, a, b, false);
  weigh(s);
  uint32_t p[4][4];  // the weights in bf16: the A fragments of the product's four steps
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) PackStepA(s, kc, p[kc]);
  RowSteps(tile2, b);
  Mma64x64x64<1>(out, p, b, true);
}

// Rows [0, 64) of a tile of 64-column bf16 rows `ld` elements apart in `src` into `tile`
// (1 KiB aligned), swizzled; rows at or past rows_valid zero. Completed by CopyAsyncWait.
__device__ __forceinline__ void LoadSwizzledTile(const bf16* __restrict__ src, int64_t ld, int64_t rows_valid,
                                                 char* tile) {
  const int c = static_cast<int>(threadIdx.x) % 8;
#pragma unroll
  for (int k = 0; k < kTile * 8 / kThreads; ++k) {
    const int r = static_cast<int>(threadIdx.x) / 8 + k * (kThreads / 8);
    const bool in = r < rows_valid;
    CopyAsync16(tile + r * kRowBytes + ((c ^ (r & 7)) << 4), in ? src + r * ld + c * 8 : src, in);
  }
}

// The dynamic shared memory, its start rounded up to 1 KiB (the swizzle's alignment; the
// launch asks for 1 KiB more).
__device__ __forceinline__ char* AlignedSharedMemory() {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t address = SharedAddress(smem);
  return reinterpret_cast<char*>(smem) + ((kAtomBytes - address % kAtomBytes) % kAtomBytes);
}

// A block's 128 output rows leave through shared memory (`rows`: over the other side's
// tiles, free by then: the caller's barrier) as whole rows, 16 bytes a thread and a row's
// 256 bytes by 16 neighbouring threads: storing the fragments directly wrote 8-byte pieces
// of eight rows per warp instruction, half of each 32-byte sector (Nsight Compute had the
// write's warps stalled on the store queue at its end). The values are unchanged.
constexpr int kStagedLd = kDh + 8;  // floats a staged row: float2 stores of a half-warp hit 32 banks
constexpr int kStagedBytes = kRows * kStagedLd * 4;

// This warp's 16 rows of fragments into `rows`, row g + 8r of the warp scaled by scale[r].
__device__ __forceinline__ void StageFragments(const float (&out)[8][4], const float (&scale)[2], float* rows) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      *reinterpret_cast<float2*>(rows + row * kStagedLd + i * 8 + 2 * t) =
          make_float2(out[i][2 * r] * scale[r], out[i][2 * r + 1] * scale[r]);
    }
  }
}

// After a barrier: staged rows [0, valid) into dst (row i at dst + i ld; 16-byte aligned),
// added to what dst holds where kAccumulate (its loads all issued before the first store);
// where dst_b is set, each stored value also rounded to bf16 there (row i at dst_b + i ld).
template <bool kAccumulate, int kBlockRows = kRows, int kBlockThreads = kThreads>
__device__ __forceinline__ void StoreStagedRows(const float* rows, int64_t valid, float* __restrict__ dst, int64_t ld,
                                                bf16* __restrict__ dst_b = nullptr) {
  constexpr int kPieces = kDh / 4;                                  // float4 pieces of a row
  constexpr int kPerThread = kBlockRows * kPieces / kBlockThreads;  // 8
  float4 old[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int f = static_cast<int>(threadIdx.x) + k * kBlockThreads, row = f / kPieces, c = (f % kPieces) * 4;
    old[k] = kAccumulate && row < valid ? *reinterpret_cast<const float4*>(dst + row * ld + c)
                                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int f = static_cast<int>(threadIdx.x) + k * kBlockThreads, row = f / kPieces, c = (f % kPieces) * 4;
    if (row >= valid) continue;
    const float4 v = *reinterpret_cast<const float4*>(rows + row * kStagedLd + c);
    const float4 sum = make_float4(old[k].x + v.x, old[k].y + v.y, old[k].z + v.z, old[k].w + v.w);
    *reinterpret_cast<float4*>(dst + row * ld + c) = sum;
    if (dst_b != nullptr) *reinterpret_cast<uint2*>(dst_b + row * ld + c) = PackBf16x4(sum);
  }
}

// The write's end: the block's 128 slot rows of sums (+)= into acc [N, d] at columns
// [j 64, j 64 + 64), staged as above, and their masses.
template <bool kAccumulate>
__device__ __forceinline__ void StoreSlotSumsStaged(const float (&out)[1][8][4], const float (&slot_mass)[1][2],
                                                    int64_t n0, int64_t j, int64_t N, int64_t d, float* rows,
                                                    float* __restrict__ mass, float* __restrict__ acc) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  StageFragments(out[0], {1.0f, 1.0f}, rows);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = QuadSum(slot_mass[0][r]);
    const int64_t slot = n0 + warp * 16 + g + 8 * r;
    if (t == 0 && slot < N) mass[j * N + slot] = (kAccumulate ? mass[j * N + slot] : 0.0f) + total;
  }
  __syncthreads();
  StoreStagedRows<kAccumulate>(rows, N - n0, acc + n0 * d + j * kDh, d);
}

// Write sums: a block per (128 slots, head), over the chunk's tokens 64 at a time.
// memory_tiled.cu's MemoryWriteTiledKernel.
template <bool kAccumulate>
__global__ void __launch_bounds__(kThreads, 2)
    WriteKernel(const bf16* __restrict__ mem_k, int64_t T, int64_t N, int64_t d, float scale_log2, Scratch scratch,
                float* __restrict__ mass, float* __restrict__ acc) {
#if LM2_WGMMA
  char* qt = AlignedSharedMemory();                                          // kTileStages tiles
  char* ot = qt + kTileStages * kTileBytes;                                  // kTileStages tiles
  char* ks = ot + kTileStages * kTileBytes;                                  // a tile per warpgroup
  auto* shifts = reinterpret_cast<float*>(ks + kOwnBytes);                   // kTileStages x 64
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows, j = blockIdx.y, Tp = scratch.tp;
  const bf16* q_head = scratch.q + j * Tp * kDh;
  const bf16* offer_head = scratch.offer + j * Tp * kDh;
  const float* shift_head = scratch.shift + j * Tp;
  const int tiles = static_cast<int>((T + kTile - 1) / kTile);  // past them only padding (weight 0)
  const auto load_tokens = [&](int it, int buf) {
    LoadSwizzledTile(q_head + static_cast<int64_t>(it) * kTile * kDh, kDh, kTile, qt + buf * kTileBytes);
    LoadSwizzledTile(offer_head + static_cast<int64_t>(it) * kTile * kDh, kDh, kTile, ot + buf * kTileBytes);
    if (threadIdx.x < kTile / 4) {  // 64 floats = 16 copies of 16 bytes
      CopyAsync16(shifts + buf * kTile + 4 * threadIdx.x, shift_head + it * kTile + 4 * threadIdx.x, true);
    }
    CopyAsyncCommit();
  };
  // The block's 128 slots' K rows, a tile per warpgroup (past N zeros: the second tile's
  // source stays the first's where it starts past the last slot, an address never read).
  LoadSwizzledTile(mem_k + n0 * d + j * kDh, d, N - n0, ks);
  LoadSwizzledTile(mem_k + (N - n0 > kTile ? n0 + kTile : n0) * d + j * kDh, d, N - n0 - kTile, ks + kTileBytes);
  load_tokens(0, 0);  // the slots' K rows complete with the first tokens' group
  if (tiles > 1) load_tokens(1, 1);

  float out[1][8][4], slot_mass[1][2] = {{0.0f, 0.0f}};  // one row group of 16 a warp
#pragma unroll
  for (int i = 0; i < 8; ++i) out[0][i][0] = out[0][i][1] = out[0][i][2] = out[0][i][3] = 0.0f;
  for (int it = 0, stage = 0; it < tiles; ++it, stage = NextStage(stage)) {
    TileArrived(it, tiles);
    if (it + 2 < tiles) load_tokens(it + 2, NextStage(NextStage(stage)));
    const float* st = shifts + stage * kTile;
    const char* own = ks + (warp / 4) * kTileBytes;  // this warpgroup's 64 slots
    TileStep(own, qt + stage * kTileBytes, ot + stage * kTileBytes, out[0], [&](float (&s)[8][4]) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        // This lane's two tokens (columns 2t, 2t + 1 of the 8); padding tokens: shift +inf, p = 0.
        const float2 sh = *reinterpret_cast<const float2*>(st + nt * 8 + 2 * t);
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float& x = s[nt][2 * r + c];
            x = SoftmaxWeight(x, scale_log2, c == 0 ? sh.x : sh.y);
            slot_mass[0][r] += x;
          }
      }
    });
  }

  __syncthreads();  // every warpgroup is done with the token tiles: their buffers take the sums
  StoreSlotSumsStaged<kAccumulate>(out, slot_mass, n0, j, N, d, reinterpret_cast<float*>(qt), mass, acc);
#else
  __trap();
#endif
}

// ---- The read: warp-specialised ------------------------------------------------------------
//
// FlashAttention-3's form. A block is one consumer warpgroup (64 token rows of one head) and
// a producer warp, two blocks an SM. The producer's one lane brings each 128-slot stage of
// the head's K and V columns by tensor copies (TMA, cuTensorMapEncodeTiled's 128-byte
// swizzle: the layout above) into a ring of kReadStages, counted on the stage's transaction
// barrier ("full"). The consumer waits only on those barriers and gives a stage back on its
// "empty" barrier (each warp once its products over the stage are done), so no block barrier
// ties the warps tile by tile. And it issues a stage's scores before the weights of the stage
// before, whose product then runs on the tensor cores while the exponentials are taken:
//
//   scores(0); weights(0)
//   for stage i = 1 ...: scores(i) and product(i - 1) issued; wait for scores(i);
//                        weights(i); wait for product(i - 1); rescale the output if the
//                        running maximum moved; give stage i - 1 back
//   product(last)
//
// Nsight Compute (H200, the paper's 32 heads over 2,048 slots): 37.7 µs at 512 tokens
// against 50.5 for the block-barrier form it replaced (two warpgroups a block, 64-slot
// tiles, two blocks a pair below 640 tokens combining through distributed shared memory),
// 132 against 145 at 2,048. Two consumer warpgroups a block with one block an SM (4, 5 or 6
// stages) measured 38.8-43.9 and 140.5-143.6.

// The consumer warpgroup's barrier (named barrier 1: the producer warp is not in it).
__device__ __forceinline__ void ConsumerSync() { asm volatile("bar.sync 1, 128;" ::: "memory"); }

constexpr int kReadSlots = 128;                           // slots a stage: K and V rows
constexpr int kReadStages = 3;                            // two blocks an SM fit
constexpr int kReadStageBytes = kReadSlots * kRowBytes;   // 16 KiB of K, as much of V
constexpr int kReadThreads = 128 + 32;                    // the consumer warpgroup, the producer warp
constexpr int kReadBytes = kAtomBytes + 2 * kReadStages * kReadStageBytes + kTileBytes + 2 * kReadStages * 8;
static_assert(kTile * (kDh + 8) * 4 <= 2 * kReadStages * kReadStageBytes, "the staged rows fit over the stages");

// The read's asynchronous products. Their asm lists: the accumulators of m64n64 (32
// registers a thread, %0-%31) and of m64n128 (64, %0-%63); a 16-wide step's A fragments.
#define LM2_ACC_REGS_32                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define LM2_ACC_REGS_64                                                                            \
  LM2_ACC_REGS_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, " \
                  "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define LM2_ACC_TILE(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LM2_ACC_TILES_8(d, i)                                                                                   \
  LM2_ACC_TILE(d, i), LM2_ACC_TILE(d, i + 1), LM2_ACC_TILE(d, i + 2), LM2_ACC_TILE(d, i + 3),                 \
      LM2_ACC_TILE(d, i + 4), LM2_ACC_TILE(d, i + 5), LM2_ACC_TILE(d, i + 6), LM2_ACC_TILE(d, i + 7)
#define LM2_A_STEP(p, k) "r"(p[k][0]), "r"(p[k][1]), "r"(p[k][2]), "r"(p[k][3])
// Scale-d as predicates: `none` for a product that overwrites d, `all` for one that adds.
#define LM2_PREDICATES ".reg .pred none, all;\nsetp.ne.b32 none, 0, 0;\nsetp.eq.b32 all, 0, 0;\n"
#define LM2_SCORES_STEP(A, B, P) \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " LM2_ACC_REGS_64 ", " A ", " B ", " P ", 1, 1, 0, 0;\n"
#define LM2_PRODUCTS_STEP(A, B) \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LM2_ACC_REGS_32 "}, " A ", " B ", all, 1, 1, 1;\n"

// Issues d = own · tileᵀ (64 x 128: four 16-column steps, a the own rows' descriptors, b the
// tile's) as one commit group, not waited for (WaitGroups).
__device__ __forceinline__ void IssueScores128(float (&d)[16][4], const uint64_t (&a)[4], const uint64_t (&b)[4]) {
#if LM2_WGMMA
  asm volatile("{\n" LM2_PREDICATES "wgmma.fence.sync.aligned;\n"
               LM2_SCORES_STEP("%64", "%68", "none") LM2_SCORES_STEP("%65", "%69", "all")
               LM2_SCORES_STEP("%66", "%70", "all") LM2_SCORES_STEP("%67", "%71", "all")
               "wgmma.commit_group.sync.aligned;\n}\n"
               : LM2_ACC_TILES_8(d, 0), LM2_ACC_TILES_8(d, 8)
               : "l"(a[0]), "l"(a[1]), "l"(a[2]), "l"(a[3]), "l"(b[0]), "l"(b[1]), "l"(b[2]), "l"(b[3])
               : "memory");
#endif
}

// Issues d += p · tile (64 x 64 over the tile's 128 rows: eight 16-row steps, A from this
// warp's registers p, `tile` the tile's descriptor) as one commit group, not waited for.
__device__ __forceinline__ void IssueProducts128(float (&d)[8][4], const uint32_t (&p)[8][4], uint64_t tile) {
#if LM2_WGMMA
  asm volatile("{\n" LM2_PREDICATES "wgmma.fence.sync.aligned;\n"
               LM2_PRODUCTS_STEP("{%32, %33, %34, %35}", "%64") LM2_PRODUCTS_STEP("{%36, %37, %38, %39}", "%65")
               LM2_PRODUCTS_STEP("{%40, %41, %42, %43}", "%66") LM2_PRODUCTS_STEP("{%44, %45, %46, %47}", "%67")
               LM2_PRODUCTS_STEP("{%48, %49, %50, %51}", "%68") LM2_PRODUCTS_STEP("{%52, %53, %54, %55}", "%69")
               LM2_PRODUCTS_STEP("{%56, %57, %58, %59}", "%70") LM2_PRODUCTS_STEP("{%60, %61, %62, %63}", "%71")
               "wgmma.commit_group.sync.aligned;\n}\n"
               : LM2_ACC_TILES_8(d, 0)
               : LM2_A_STEP(p, 0), LM2_A_STEP(p, 1), LM2_A_STEP(p, 2), LM2_A_STEP(p, 3), LM2_A_STEP(p, 4),
                 LM2_A_STEP(p, 5), LM2_A_STEP(p, 6), LM2_A_STEP(p, 7), "l"(tile), "l"(tile + kRowStep),
                 "l"(tile + 2 * kRowStep), "l"(tile + 3 * kRowStep), "l"(tile + 4 * kRowStep),
                 "l"(tile + 5 * kRowStep), "l"(tile + 6 * kRowStep), "l"(tile + 7 * kRowStep)
               : "memory");
#endif
}
#undef LM2_PRODUCTS_STEP
#undef LM2_SCORES_STEP
#undef LM2_PREDICATES
#undef LM2_A_STEP
#undef LM2_ACC_TILES_8
#undef LM2_ACC_TILE
#undef LM2_ACC_REGS_64
#undef LM2_ACC_REGS_32

// One stage's weights (OnlineSoftmaxWeights over its 128 columns, the last stage's padding
// slots -inf first); whether the output rows must be rescaled by alpha (set then) returned.
__device__ __forceinline__ bool StageWeights(float (&s)[16][4], int64_t valid, int t, float scale_log2, float (&m)[2],
                                             float (&l)[2], float (&alpha)[2]) {
  if (valid < kReadSlots) MaskSlotsFrom(s, valid, t);  // the last stage's padding slots
  bool grown = false;
  OnlineSoftmaxWeights(s, scale_log2, m, l, [&](int r, float a) {
    grown = true;
    alpha[r] = a;
  });
  return grown;
}

// Read: a block per (64 tokens, head), k_map / v_map the memory K and V (SlotRowsMap).
// memory_tiled.cu's MemoryReadTiledKernel, without the splits.
__global__ void __launch_bounds__(kReadThreads, 2)
    ReadKernel(const float* __restrict__ q, int64_t q_ld, const float* __restrict__ offer, int64_t offer_ld,
               bool rows_vec, int64_t T, int64_t N, int64_t d, float scale_log2, float* __restrict__ e,
               bf16* __restrict__ e_b, Scratch scratch, const __grid_constant__ CUtensorMap k_map,
               const __grid_constant__ CUtensorMap v_map) {
#if LM2_WGMMA
  char* ks = AlignedSharedMemory();                   // kReadStages stages of K rows
  char* vs = ks + kReadStages * kReadStageBytes;      // and of V rows
  char* qs = vs + kReadStages * kReadStageBytes;      // the block's 64 q rows
  auto* full = reinterpret_cast<uint64_t*>(qs + kTileBytes);
  uint64_t* empty = full + kReadStages;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  constexpr int kProducer = 4;  // the warp after the consumer warpgroup's four
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile, j = blockIdx.y, Tp = scratch.tp;
  const int tiles = static_cast<int>((N + kReadSlots - 1) / kReadSlots);
  const ReadPart part{0, tiles, 0, kTile};
  // q into qs, q and the offer into the scratch (zeros past T); a thread's four pieces'
  // loads in one round (two rounds left the consumers waiting on them: docs/cuda.md).
  const auto stage_rows = [&] {
    StageReadRows<kDh, 128, 0, kTile, 4>(q, q_ld, offer, offer_ld, t0, j, T, kDh, part, rows_vec,
                                         reinterpret_cast<bf16*>(qs), scratch.q + (j * Tp + t0) * kDh,
                                         scratch.offer + (j * Tp + t0) * kDh);
  };
  if (t0 >= T) {  // padding rows only (a chunk's last 64 of 128): their scratch rows for the write
    if (warp < kProducer) {
      stage_rows();
      if (threadIdx.x < kTile) scratch.shift[j * Tp + t0 + threadIdx.x] = INFINITY;  // weight 0
    }
    return;
  }
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kReadStages; ++stage) {
      BarrierInit(&full[stage], 1);
      BarrierInit(&empty[stage], kProducer);  // every consumer warp
    }
  }
  __syncthreads();  // the barriers are set up
  if (warp == kProducer) {
    if (lane == 0) {
      for (int it = 0; it < tiles; ++it) {
        const int stage = it % kReadStages;
        if (it >= kReadStages) BarrierWait(&empty[stage], static_cast<uint32_t>(it / kReadStages - 1) & 1);
        BarrierExpectBytes(&full[stage], 2 * kReadStageBytes);
        TensorTile(ks + stage * kReadStageBytes, &k_map, static_cast<int>(j * kDh), it * kReadSlots, &full[stage]);
        TensorTile(vs + stage * kReadStageBytes, &v_map, static_cast<int>(j * kDh), it * kReadSlots, &full[stage]);
      }
    }
    return;
  }
  stage_rows();
  FenceProxyAsync();
  ConsumerSync();  // the q rows are in for the warpgroup

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2], out[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i][0] = out[i][1] = out[i][2] = out[i][3] = 0.0f;
  uint64_t a[4], b[4];
  ColumnSteps(qs, a);
  float s[16][4];
  uint32_t p[8][4];  // the weights in bf16: the A fragments of the product's eight steps
  const auto pack = [&] {
#pragma unroll
    for (int kc = 0; kc < 8; ++kc) PackStepA(s, kc, p[kc]);
  };
  BarrierWait(&full[0], 0);
  ColumnSteps(ks, b);
  IssueScores128(s, a, b);
  WgmmaWait<0>();
  FenceOperands(s);
  StageWeights(s, N, t, scale_log2, m, l, alpha);  // the first stage: out is 0, nothing to rescale
  pack();
  for (int it = 1; it < tiles; ++it) {
    const int stage = it % kReadStages, prev = (it - 1) % kReadStages;
    BarrierWait(&full[stage], static_cast<uint32_t>(it / kReadStages) & 1);
    ColumnSteps(ks + stage * kReadStageBytes, b);
    IssueScores128(s, a, b);
    IssueProducts128(out, p, SwizzledTileDescriptor(vs + prev * kReadStageBytes));
    WgmmaWait<1>();  // the scores (the product may still run)
    FenceOperands(s);
    const bool grown = StageWeights(s, N - static_cast<int64_t>(it) * kReadSlots, t, scale_log2, m, l, alpha);
    WgmmaWait<0>();
    FenceOperands(out);
    if (grown) {
      ScaleRow(out, 0, alpha[0]);
      ScaleRow(out, 1, alpha[1]);
    }
    __syncwarp();
    if (lane == 0) BarrierArrive(&empty[prev]);  // this warp is done with the stage before
    pack();
  }
  IssueProducts128(out, p, SwizzledTileDescriptor(vs + (tiles - 1) % kReadStages * kReadStageBytes));
  WgmmaWait<0>();
  FenceOperands(out);
  // e: the rows normalised, staged over the K/V stages and stored whole; each row's shift.
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = QuadSum(l[r]);
    inv_l[r] = 1.0f / sum;
    const int64_t row = t0 + warp * 16 + g + 8 * r;
    if (t == 0) scratch.shift[j * Tp + row] = row < T ? SoftmaxShift(m[r], sum) : INFINITY;
  }
  float* rows = reinterpret_cast<float*>(ks);
  ConsumerSync();  // every warp's products are done (and every stage's copies landed)
  StageFragments(out, inv_l, rows);
  ConsumerSync();
  StoreStagedRows<false, kTile, 128>(rows, T - t0, e + t0 * d + j * kDh, d,
                                     e_b != nullptr ? e_b + t0 * d + j * kDh : nullptr);
#else
  __trap();  // launched only where the build has sm_90a code (Sm90KernelsBuilt)
#endif
}

// The map of the [rows, d] bf16 matrix at `base` in boxes of 64 columns (a head) x kReadSlots
// rows: what the read's producer copies from (rows past the end zero).
Result<CUtensorMap> SlotRowsMap(const bf16* base, int64_t rows, int64_t d) {
  return SwizzledRowsMap(base, rows, d, d, kReadSlots, "MemoryReadWrite");
}

constexpr int kWriteBytes = kAtomBytes + 2 * kTileStages * kTileBytes + kOwnBytes + kTileStages * kTile * 4;
static_assert(kStagedBytes <= 2 * kTileStages * kTileBytes, "the staged rows fit over the other side's tiles");

#if defined(LM2_CUDA_SM90A)
LM2_CUDA_KERNEL_MODULE(ReadKernel);
#endif

}  // namespace

bool Sm90KernelsBuilt() {
#if defined(LM2_CUDA_SM90A)
  static const bool on = [] {  // read once per process; "0": the mma.sync kernels instead
    const char* v = std::getenv("LM2_CUDA_WGMMA");
    // A driver without tensor maps (the read's copies need them) keeps the mma.sync kernels.
    return (v == nullptr || std::strcmp(v, "0") != 0) && TensorMapEncoder() != nullptr;
  }();
  return on;
#else
  return false;
#endif
}

Status ReadSm90(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, bool rows_vec,
               const bf16* mem_k, const bf16* mem_v, int64_t T, int64_t N, int64_t d, float scale_log2, float* e,
               bf16* e_b, Scratch scratch, cudaStream_t stream) {
  LM2_ASSIGN_OR_RETURN(const CUtensorMap k_map, SlotRowsMap(mem_k, N, d));
  LM2_ASSIGN_OR_RETURN(const CUtensorMap v_map, SlotRowsMap(mem_v, N, d));
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(&ReadKernel), kReadBytes, "MemoryReadWrite"));
  const dim3 grid(static_cast<unsigned int>(PaddedTokens(T) / kTile), static_cast<unsigned int>(d / kDh));
  ReadKernel<<<grid, kReadThreads, kReadBytes, stream>>>(q, q_ld, offer, offer_ld, rows_vec, T, N, d, scale_log2, e,
                                                         e_b, scratch, k_map, v_map);
  return CheckLaunch("MemoryReadWrite (wgmma read)");
}

Status WriteSm90(const bf16* mem_k, int64_t T, int64_t N, int64_t d, float scale_log2, bool accumulate, float* mass,
                 float* acc, Scratch scratch, cudaStream_t stream) {
  const auto kernel = accumulate ? &WriteKernel<true> : &WriteKernel<false>;
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), kWriteBytes, "MemoryReadWrite"));
  const dim3 grid(static_cast<unsigned int>((N + kRows - 1) / kRows), static_cast<unsigned int>(d / kDh));
  kernel<<<grid, kThreads, kWriteBytes, stream>>>(mem_k, T, N, d, scale_log2, scratch, mass, acc);
  return CheckLaunch("MemoryReadWrite (wgmma write)");
}

}  // namespace lm2::runtime::cuda::tiled
