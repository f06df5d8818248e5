// The memory read and the write sums of a multi-token chunk (prefill) on tensor cores, tile
// by tile, without ever storing the [heads, T, N] probabilities (the GEMM form in
// memory_read.cu / memory_write.cu writes them in fp32 and passes over them five times:
// softmax, bf16 copy, masses, two GEMMs; Nsight Compute put those passes at ~40% of a
// 4096-token prefill).
//
// Per memory head j (width dh = d / heads, zero-padded to DHP, a multiple of 16):
//   read kernel, a block per (128 tokens, head), each warp 32 tokens (16 past width 64):
//     one pass over the slots in tiles of 64, e = softmax(s) · V by the online softmax
//     (FA2: the running output rescaled as the row maxima grow, divided by the row sums at
//     the end). It leaves each token's shift m + log2 l (m the maximum its weights were
//     taken against, within kRescaleSlack of the true one; l their sum), and the chunk's q
//     and offer in bf16, in the scratch for the write kernel. Short chunks have too few
//     (tokens, head) pairs to fill the GPU (512 tokens of 32 heads: 128 blocks of 4 warps,
//     one an SM), so there a cluster of P blocks (ReadSplits) shares each pair, each over
//     1/P of the slot tiles; they leave their unnormalised rows and (m, l) in shared memory,
//     and after a cluster barrier each combines 128/P of the rows from all P through
//     distributed shared memory (m = the largest of the P maxima, the others' rows and sums
//     scaled to it).
//   write kernel, a block per (128 slots, head), each warp 32 slots (16 past width 64):
//     over the tokens in tiles of 64, the same scores transposed (K · Qᵀ), p = exp(s - m) / l
//     = 2^(s' - shift) from the read's shifts (one FMA and one exp2 a weight), mass += Σ_t p,
//     acc += pᵀ · offer (a segment's first chunk stores them instead: no zeroing). Each
//     block owns its slots' sums: no atomics.
// Scores: bf16(q) · mem_k (bf16), fp32 accumulation, as the GEMM form; p is fp32 for the
// statistics and the masses, rounded to bf16 for the two products (the GEMM form: bf16 for
// the read, TF32 for the write sums); the offer is rounded to bf16.
//
// The scores and probabilities never leave registers: mma.sync m16n8k16 (mma.cuh), the
// scores' accumulator fragments packed to bf16 are the next product's A fragments; tiles
// come through shared memory by cp.async, a ring of kTileStages: the next two tiles' copies
// in flight while the current one is used.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "cuda/memory_tiled.cuh"
#include "cuda/mma.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

using bf16 = __nv_bfloat16;

using tiled::Carve;
using tiled::CombineSplits;
using tiled::ReadSplits;
using tiled::kRows;
using tiled::kTile;
using tiled::MaskSlotsFrom;
using tiled::PaddedTokens;
using tiled::Scratch;
using tiled::SoftmaxShift;

template <int DHP>
struct Layout {
  static constexpr int kLd = TileLd<DHP>;
  static constexpr int kTileElems = kTile * kLd;  // a score tile's 64 rows
  static constexpr int kRowsElems = kRows * kLd;  // a block's rows
};

// A whole bf16 [64, DHP] scratch tile (padded: always complete and aligned) by cp.async, by
// a block of Threads threads.
template <int DHP, int Threads>
__device__ __forceinline__ void LoadScratchTile(const bf16* __restrict__ src, bf16* tile) {
  LoadBf16Tile<DHP, kTile, Threads>(src, DHP, kTile, DHP, true, tile);
}

// Two blocks per SM where the head width allows (DHP <= 64: at most 128 registers).
constexpr int MinBlocks(int dhp) { return dhp <= 64 ? 2 : 1; }

// Read: a block per (kRows tokens, head), or a cluster of gridDim.z blocks per pair, block
// z over slot tiles [z tiles / P, (z + 1) tiles / P) (P a power of two, at most the tiles).
template <int DHP>
__global__ void __launch_bounds__(GroupThreads(DHP), MinBlocks(DHP)) MemoryReadTiledKernel(
    const float* __restrict__ q, int64_t q_ld, const float* __restrict__ offer, int64_t offer_ld,
    const bf16* __restrict__ mem_k, const bf16* __restrict__ mem_v, int64_t T, int64_t N, int64_t d, int dh,
    float scale_log2, bool vec, bool rows_vec, float* __restrict__ e, Scratch scratch) {
  using L = Layout<DHP>;
  constexpr int M = RowGroups(DHP), kThreadsRead = GroupThreads(DHP);
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + L::kRowsElems;                // kTileStages buffers
  bf16* vs = ks + kTileStages * L::kTileElems;  // kTileStages buffers
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRows, j = blockIdx.y, Tp = scratch.tp;
  const bf16* k_head = mem_k + j * dh;
  const bf16* v_head = mem_v + j * dh;
  const int splits = static_cast<int>(gridDim.z);
  const tiled::ReadPart part = tiled::ThisReadPart(N);
  const int first_tile = part.first_tile, tiles = part.tiles;

  const auto load_slots = [&](int64_t n0, int buf) {
    LoadBf16Tile<DHP, kTile, kThreadsRead>(k_head + n0 * d, d, N - n0, dh, vec, ks + buf * L::kTileElems);
    LoadBf16Tile<DHP, kTile, kThreadsRead>(v_head + n0 * d, d, N - n0, dh, vec, vs + buf * L::kTileElems);
    CopyAsyncCommit();
  };
  load_slots(static_cast<int64_t>(first_tile) * kTile, 0);
  if (tiles > 1) load_slots(static_cast<int64_t>(first_tile + 1) * kTile, 1);
  tiled::StageReadRows<DHP, kThreadsRead, L::kLd>(q, q_ld, offer, offer_ld, t0, j, T, dh, part, rows_vec, qs,
                                                  scratch.q + (j * Tp + t0) * DHP, scratch.offer + (j * Tp + t0) * DHP);
  __syncthreads();
  uint32_t qa[M][DHP / 16][4];
#pragma unroll
  for (int mg = 0; mg < M; ++mg)
#pragma unroll
    for (int kc = 0; kc < DHP / 16; ++kc) LoadA(qa[mg][kc], qs, L::kLd, (warp * M + mg) * 16, kc * 16);

  // One pass over the slots, the online softmax (the maxima in log2 units); this lane's
  // rows are g and g + 8 of each of the warp's groups of 16, its columns 2t, 2t + 1 of
  // each 8.
  float m[M][2], l[M][2], out[M][DHP / 8][4];
  OnlineSoftmaxStart<DHP, M>(m, l, out);
  for (int it = 0, stage = 0; it < tiles; ++it, stage = NextStage(stage)) {
    if (it + 1 < tiles) {
      CopyAsyncWait<1>();
    } else {
      CopyAsyncWait<0>();
    }
    __syncthreads();  // the tile is in; every warp is done with the one before (kTileStages)
    if (it + 2 < tiles) load_slots(static_cast<int64_t>(first_tile + it + 2) * kTile, NextStage(NextStage(stage)));
    float s[M][8][4];
    TileScoresM<DHP, M>(qa, ks + stage * L::kTileElems, s);
    const int64_t valid = N - static_cast<int64_t>(first_tile + it) * kTile;
#pragma unroll
    for (int mg = 0; mg < M; ++mg) {
      if (valid < kTile) MaskSlotsFrom(s[mg], valid, t);  // the last tile's padding slots
      OnlineSoftmaxTile<DHP>(s[mg], scale_log2, m[mg], l[mg], out[mg]);  // the first tile has a valid slot
    }
    TileProductsM<DHP, M>(s, vs + stage * L::kTileElems, out);
  }

  if (splits > 1) {
    static_assert(tiled::SplitRowsBytes<DHP>() <= 2 * kTileStages * L::kTileElems * 2, "fits the K/V buffers");
    CombineSplits<DHP, M, kThreadsRead>(m, l, out, t0, j, T, d, dh, e, scratch.shift + j * Tp,
                                        reinterpret_cast<float*>(smem + L::kRowsElems * 2));
    return;
  }
  // e rows g and g + 8 of each group; this lane's columns 2t, 2t + 1 of each 8.
#pragma unroll
  for (int mg = 0; mg < M; ++mg)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = QuadSum(l[mg][r]), inv_l = 1.0f / sum;
      const int64_t row = t0 + (warp * M + mg) * 16 + g + 8 * r;
      if (row < T) {
        ForEachOwnedElement(out[mg], r, t, dh, [&](int col, float v) { e[row * d + j * dh + col] = v * inv_l; });
      }
      // The shifts of every row of the tile, padding rows (+inf: no weight) included.
      if (t == 0) scratch.shift[j * Tp + row] = row < T ? SoftmaxShift(m[mg][r], sum) : INFINITY;
    }
}

// Write sums: a block per (kRows slots, head), over the chunk's tokens 64 at a time; added
// to mass and acc, or (kAccumulate false) stored. (A template parameter: as a run-time flag
// the kernel took 3% longer, 266 against 258 us at 2048 tokens on an H200.)
template <int DHP, bool kAccumulate>
__global__ void __launch_bounds__(GroupThreads(DHP), MinBlocks(DHP)) MemoryWriteTiledKernel(
    const bf16* __restrict__ mem_k, int64_t T, int64_t N, int64_t d, int dh, float scale_log2, bool vec,
    Scratch scratch, float* __restrict__ mass, float* __restrict__ acc) {
  using L = Layout<DHP>;
  constexpr int M = RowGroups(DHP), kWriteThreads = GroupThreads(DHP);
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* qs = ks + L::kRowsElems;                // kTileStages buffers
  bf16* cs = qs + kTileStages * L::kTileElems;  // kTileStages buffers
  auto* shifts = reinterpret_cast<float*>(cs + kTileStages * L::kTileElems);  // kTileStages buffers of 64
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows, j = blockIdx.y, Tp = scratch.tp;
  const bf16* q_head = scratch.q + j * Tp * DHP;
  const bf16* offer_head = scratch.offer + j * Tp * DHP;
  const float* shift_head = scratch.shift + j * Tp;
  const int tiles = static_cast<int>((T + kTile - 1) / kTile);  // past them only padding (weight 0)
  const auto load_tokens = [&](int it, int buf) {
    LoadScratchTile<DHP, kWriteThreads>(q_head + it * kTile * DHP, qs + buf * L::kTileElems);
    LoadScratchTile<DHP, kWriteThreads>(offer_head + it * kTile * DHP, cs + buf * L::kTileElems);
    if (threadIdx.x < kTile / 4) {  // 64 floats = 16 copies of 16 bytes
      CopyAsync16(shifts + buf * kTile + 4 * threadIdx.x, shift_head + it * kTile + 4 * threadIdx.x, true);
    }
  };

  LoadBf16Tile<DHP, kRows, kWriteThreads>(mem_k + n0 * d + j * dh, d, N - n0, dh, vec, ks);
  load_tokens(0, 0);
  CopyAsyncCommit();
  if (tiles > 1) {
    load_tokens(1, 1);
    CopyAsyncCommit();
  }
  float out[M][DHP / 8][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < DHP / 8; ++i) out[m][i][0] = out[m][i][1] = out[m][i][2] = out[m][i][3] = 0.0f;
  float slot_mass[M][2] = {};
  uint32_t ka[M][DHP / 16][4];
  for (int it = 0, stage = 0; it < tiles; ++it, stage = NextStage(stage)) {
    if (it + 1 < tiles) {
      CopyAsyncWait<1>();
    } else {
      CopyAsyncWait<0>();
    }
    __syncthreads();  // the tile is in; every warp is done with the one before (kTileStages)
    if (it + 2 < tiles) {
      load_tokens(it + 2, NextStage(NextStage(stage)));
      CopyAsyncCommit();
    }
    if (it == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int kc = 0; kc < DHP / 16; ++kc) LoadA(ka[m][kc], ks, L::kLd, (warp * M + m) * 16, kc * 16);
    }
    float s[M][8][4];
    TileScoresM<DHP, M>(ka, qs + stage * L::kTileElems, s);  // s[slot, token]
    const float* st = shifts + stage * kTile;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      // This lane's two tokens (columns 2t, 2t + 1 of the 8); padding tokens: shift +inf, p = 0.
      const float2 sh = *reinterpret_cast<const float2*>(st + nt * 8 + 2 * t);
#pragma unroll
      for (int c = 0; c < 2; ++c)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float& x = s[m][nt][2 * r + c];
            x = SoftmaxWeight(x, scale_log2, c == 0 ? sh.x : sh.y);
            slot_mass[m][r] += x;
          }
    }
    TileProductsM<DHP, M>(s, cs + stage * L::kTileElems, out);
  }

  tiled::StoreSlotSums<DHP, M, kAccumulate>(out, slot_mass, n0, j, N, d, dh, mass, acc);
}

template <int DHP>
Status LaunchTiled(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, const bf16* mem_k,
                   const bf16* mem_v, int64_t T, int64_t N, int64_t d, int dh, float* e, bool accumulate,
                   float* mass, float* acc, const Scratch& carved, cudaStream_t stream, MemoryReadWriteParts parts,
                   bf16* e_bf16) {
  using L = Layout<DHP>;
  const bool read = parts != MemoryReadWriteParts::kWrite, write = parts != MemoryReadWriteParts::kRead;
  constexpr int kReadBytes = (L::kRowsElems + 2 * kTileStages * L::kTileElems) * 2;
  constexpr int kWriteBytes = (L::kRowsElems + 2 * kTileStages * L::kTileElems) * 2 + kTileStages * kTile * 4;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(dh));
  const bool vec = dh % 8 == 0 && d % 8 == 0;  // memory K/V rows and head offsets 16-byte aligned
  const bool rows_vec = tiled::StageRowsByPieces(q, q_ld, offer, offer_ld, dh);
  const auto heads = static_cast<unsigned int>(d / dh);
  // Hopper, head width 64: the same algorithm on wgmma (memory_tiled_sm90.cu: the read
  // warp-specialised, a block per 64 tokens and never split; both store whole 16-byte pieces
  // of e's and the sums' rows).
  if constexpr (DHP == 64) {
    if (dh == 64 && vec && Aligned16({acc, e}) && tiled::Sm90KernelsBuilt() && ComputeCapability90OnCurrentDevice()) {
      if (read) {
        // e in bf16 from the read's own 16-byte stores where e_bf16 allows them, else
        // converted after it (the same bits).
        const bool staged_bf16 = Aligned16({e_bf16});
        LM2_RETURN_IF_ERROR(tiled::ReadSm90(q, q_ld, offer, offer_ld, rows_vec, mem_k, mem_v, T, N, d, scale_log2, e,
                                            staged_bf16 ? e_bf16 : nullptr, carved, stream));
        if (!staged_bf16) LM2_RETURN_IF_ERROR(ConvertF32ToBf16(e, T * d, e_bf16, stream));
      }
      return write ? tiled::WriteSm90(mem_k, T, N, d, scale_log2, accumulate, mass, acc, carved, stream)
                   : Status::Ok();
    }
  }
  const void* read_kernel = reinterpret_cast<const void*>(&MemoryReadTiledKernel<DHP>);
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(read_kernel, kReadBytes, "MemoryReadWrite"));
  const auto write_kernel = accumulate ? &MemoryWriteTiledKernel<DHP, true> : &MemoryWriteTiledKernel<DHP, false>;
  LM2_RETURN_IF_ERROR(
      EnsureSharedMemory(reinterpret_cast<const void*>(write_kernel), kWriteBytes, "MemoryReadWrite"));
  const auto pairs = static_cast<unsigned int>(PaddedTokens(T) / kRows);
  if (read) {
    LM2_ASSIGN_OR_RETURN(const int splits, ReadSplits(pairs * heads, (N + kTile - 1) / kTile, read_kernel,
                                                      GroupThreads(DHP), kReadBytes));
    const tiled::ClusterLaunch launch(dim3(pairs, heads, static_cast<unsigned int>(splits)), GroupThreads(DHP),
                                      kReadBytes, stream, splits);
    LM2_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&launch.config, MemoryReadTiledKernel<DHP>, q, q_ld, offer, offer_ld,
                                                mem_k, mem_v, T, N, d, dh, scale_log2, vec, rows_vec, e, carved));
    if (e_bf16 != nullptr) LM2_RETURN_IF_ERROR(ConvertF32ToBf16(e, T * d, e_bf16, stream));
  }
  if (!write) return Status::Ok();
  const dim3 write_grid(static_cast<unsigned int>((N + kRows - 1) / kRows), heads);
  write_kernel<<<write_grid, GroupThreads(DHP), kWriteBytes, stream>>>(mem_k, T, N, d, dh, scale_log2, vec, carved,
                                                                      mass, acc);
  return CheckLaunch("MemoryWriteTiledKernel");
}

LM2_CUDA_KERNEL_MODULE(MemoryReadTiledKernel<64>);

}  // namespace

bool MemoryReadWriteSupported(int64_t d, int64_t heads) {
  return heads > 0 && d % heads == 0 && d / heads <= kMaxTileWidth;
}

int64_t MemoryReadWriteScratch(int64_t T, int64_t d, int64_t heads) {
  // The shift, then q and the offer as bf16 pairs, per head and padded token.
  return heads * PaddedTokens(T) * (1 + PaddedTileWidth(d / heads));
}

Status MemoryReadWrite(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, const bf16* mem_k,
                       const bf16* mem_v, int64_t T, int64_t N, int64_t d, int64_t heads, float* e, bool accumulate,
                       float* mass, float* acc, float* scratch, cudaStream_t stream, MemoryReadWriteParts parts,
                       bf16* e_bf16) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("MemoryReadWrite", T, N, d, heads));
  if (!MemoryReadWriteSupported(d, heads)) {
    return Status::InvalidArgument("MemoryReadWrite: head width " + std::to_string(d / heads) + " > " +
                                   std::to_string(kMaxTileWidth));
  }
  if (q_ld < d || offer_ld < d) {
    return Status::InvalidArgument("MemoryReadWrite: q_ld " + std::to_string(q_ld) + " or offer_ld " +
                                   std::to_string(offer_ld) + " < d");
  }
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadWrite", {q, offer, mem_k, mem_v, e, mass, acc, scratch}));
  const int dh = static_cast<int>(d / heads);
  return WithPaddedTileWidth(dh, [&](auto dhp) {
    constexpr int DHP = decltype(dhp)::value;
    return LaunchTiled<DHP>(q, q_ld, offer, offer_ld, mem_k, mem_v, T, N, d, dh, e, accumulate, mass, acc,
                            Carve(scratch, T, heads, DHP), stream, parts, e_bf16);
  });
}

int64_t StagedTokensFloats(int64_t capacity, int64_t d, int64_t heads) {
  return MemoryReadWriteScratch(capacity, d, heads);
}

namespace {

// A shift no score reaches: every byte 0x7F, 3.39e38 (a memset; +inf has no such pattern).
// SoftmaxWeight(s, scale_log2, shift) = 2^(s scale_log2 - shift) is then 0 for any finite s.
constexpr int kNoTokenShiftByte = 0x7F;

// The bytes of a staging buffer's shifts: its first part (Carve), every head's slots.
std::size_t StagedShiftBytes(int64_t capacity, int64_t heads) {
  return static_cast<std::size_t>(heads * PaddedTokens(capacity)) * sizeof(float);
}

}  // namespace

Status ClearStagedTokens(float* staged, int64_t buffers, int64_t capacity, int64_t d, int64_t heads,
                         cudaStream_t stream) {
  if (buffers == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("ClearStagedTokens", {staged}));
  const auto bytes = static_cast<std::size_t>(StagedTokensFloats(capacity, d, heads)) * sizeof(float);
  LM2_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(staged, 0, bytes * static_cast<std::size_t>(buffers), stream));
  // Each buffer's shifts, one buffer's bytes apart.
  return CudaStatus(cudaMemset2DAsync(staged, bytes, kNoTokenShiftByte, StagedShiftBytes(capacity, heads),
                                      static_cast<std::size_t>(buffers), stream),
                    "ClearStagedTokens");
}

Status FlushStagedTokens(const bf16* mem_k, float* staged, int64_t tokens, int64_t capacity, int64_t N, int64_t d,
                         int64_t heads, float* mass, float* acc, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("FlushStagedTokens", tokens, N, d, heads));
  if (!MemoryReadWriteSupported(d, heads) || tokens > capacity) {
    return Status::InvalidArgument("FlushStagedTokens: head width " + std::to_string(d / heads) + ", " +
                                   std::to_string(tokens) + " tokens staged of " + std::to_string(capacity));
  }
  if (tokens == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("FlushStagedTokens", {mem_k, staged, mass, acc}));
  const int dh = static_cast<int>(d / heads);
  LM2_RETURN_IF_ERROR(WithPaddedTileWidth(dh, [&](auto dhp) {
    constexpr int DHP = decltype(dhp)::value;
    return LaunchTiled<DHP>(nullptr, d, nullptr, d, mem_k, nullptr, tokens, N, d, dh, nullptr, true, mass, acc,
                            Carve(staged, capacity, heads, DHP), stream, MemoryReadWriteParts::kWrite, nullptr);
  }));
  // The staged rows are free again: their shifts back to "no token" (the rows' q and offer
  // stay: weight 0 times a finite value adds nothing).
  return CudaStatus(cudaMemsetAsync(staged, kNoTokenShiftByte, StagedShiftBytes(capacity, heads), stream),
                    "FlushStagedTokens");
}

}  // namespace lm2::runtime::cuda

namespace lm2::runtime::cuda::tiled {

// How many clusters of `size` blocks of `kernel` (`threads` threads, `smem` bytes of dynamic
// shared memory each) the current device holds at once (cudaOccupancyMaxActiveClusters:
// a cluster's blocks share one GPC, so it is fewer than multiprocessors x residency / size
// where a GPC's blocks do not divide evenly: 30 clusters of 8 of the read kernel on an
// H200, 240 blocks, not 264). Cached per device, kernel and size.
Result<int> MaxActiveClusters(const void* kernel, int size, int threads, int smem) {
  static std::mutex mu;
  static auto* cache = new std::map<std::tuple<int, const void*, int>, int>();
  int device = 0;
  LM2_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, kernel, size);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  const ClusterLaunch launch(dim3(1, 1, static_cast<unsigned int>(size)), threads, smem, nullptr, size);
  int clusters = 0;
  LM2_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config));
  cache->emplace(key, clusters);
  return clusters;
}

// Blocks a split read's cluster takes per (tokens, head) pair, for `pairs` pairs: the largest
// power of two (at most 8, the portable cluster size, and at most the slot tiles) whose
// blocks all fit in one wave of two blocks a multiprocessor (the read kernel's residency at
// head width 64) and whose clusters all fit at once (MaxActiveClusters): at 32 memory heads
// on an H200, 4 up to 128 tokens (32 clusters of 8 would be two waves: 30 fit), 2 at 512, 1
// from 640 on (each block of a split read repeats the q staging and adds the combine: a
// second wave of them lost); 1 where the device does not run the sm_90 code (no clusters).
Result<int> ReadSplits(int64_t pairs, int64_t tiles, const void* kernel, int threads, int smem) {
  if (!Sm90CodeOnCurrentDevice()) return 1;
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  int splits = 1;
  while (splits < 8 && 2 * splits <= tiles && 2 * splits * pairs <= 2 * static_cast<int64_t>(sms)) {
    LM2_ASSIGN_OR_RETURN(const int clusters, MaxActiveClusters(kernel, 2 * splits, threads, smem));
    if (pairs > clusters) break;
    splits *= 2;
  }
  return splits;
}

}  // namespace lm2::runtime::cuda::tiled
