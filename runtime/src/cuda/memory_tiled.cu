// The memory read and the write sums of a multi-token chunk (prefill) on tensor cores, tile
// by tile, without ever storing the [heads, T, N] probabilities (the GEMM form in
// memory_read.cu / memory_write.cu writes them in fp32 and passes over them five times:
// softmax, bf16 copy, masses, two GEMMs; Nsight Compute put those passes at ~40% of a
// 4096-token prefill).
//
// Per memory head j (width dh = d / heads, zero-padded to DHP, a multiple of 16):
//   read kernel, a block per (64 tokens, head): pass 1 over the slots in tiles of 64 takes
//     each token's score maximum m and sum l (online); pass 2 recomputes the scores, forms
//     p = exp(s - m) / l exactly (no rescaling needed) and accumulates e = p · V. m and 1/l
//     go to `stats` for the write kernel.
//   write kernel, a block per (64 slots, head): over the tokens in tiles of 64, the same
//     scores (transposed: K · Qᵀ), the same p from the read's statistics, mass += Σ_t p,
//     acc += pᵀ · offer. Each block owns its slots' sums, so no atomics.
// Scores: bf16(q) · mem_k (bf16) with fp32 accumulation, as the GEMM form; p is fp32 for
// the statistics and the masses, rounded to bf16 for the two products (the GEMM form: bf16
// for the read, TF32 for the write sums); the offer is rounded to bf16.
//
// nvcuda::wmma 16x16x16 bf16 fragments (sm_80 and later); 4 warps per block, each warp 16
// rows of the block's 64.
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kTile = 64;                 // rows of a block, and columns of a score tile
constexpr int kWarps = 4;                 // each warp takes 16 of the block's rows
constexpr int kBlockThreads = 32 * kWarps;
constexpr int kSLd = kTile + 4;           // fp32 score tile row stride (floats)
constexpr int kPLd = kTile + 8;           // bf16 probability tile row stride (elements)

template <int DHP>
struct Layout {
  static constexpr int kLd = DHP + 8;                                  // bf16 row tile stride
  static constexpr int kStageLd = DHP + 4;                             // fp32 output staging stride
  static constexpr int kRowTileBytes = kTile * kLd * 2;                // a 64 x DHP bf16 tile
  static constexpr int kScoreBytes = kWarps * 16 * kSLd * 4;           // each warp's 16 x 64 scores
  static constexpr int kProbBytes = kWarps * 16 * kPLd * 2;            // each warp's 16 x 64 bf16 p
  static constexpr int kStatBytes = 2 * kTile * 4;                     // the write's m and 1/l
  // Three row tiles (read: Q, K, V; write: K, Q, offer), the scores, the probabilities and
  // the statistics. The fp32 output staging (4 warps x 16 x kStageLd floats) reuses the
  // last two row tiles.
  static constexpr int kBytes = 3 * kRowTileBytes + kScoreBytes + kProbBytes + kStatBytes;
  static_assert(kWarps * 16 * kStageLd * 4 <= 2 * kRowTileBytes, "the output staging fits in two row tiles");
  static_assert(DHP % 16 == 0 && DHP <= 128, "DHP: a multiple of 16, at most 128");
};

// rows [0, 64) x columns [0, DHP) of `tile` (stride kLd) from bf16 `src` (rows `ld` apart):
// src rows < rows_valid and columns < cols, zeros elsewhere. `vec`: cols, ld and src are
// 8-element aligned (16-byte copies).
template <int DHP>
__device__ __forceinline__ void LoadBf16Tile(const bf16* __restrict__ src, int64_t ld, int64_t rows_valid, int cols,
                                             bool vec, bf16* tile) {
  constexpr int kLd = Layout<DHP>::kLd;
  if (vec) {
    constexpr int kChunks = DHP / 8;
    for (int i = threadIdx.x; i < kTile * kChunks; i += kBlockThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < rows_valid && c < cols) v = *reinterpret_cast<const uint4*>(src + r * ld + c);
      *reinterpret_cast<uint4*>(tile + r * kLd + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < kTile * DHP; i += kBlockThreads) {
      const int r = i / DHP, c = i % DHP;
      tile[r * kLd + c] = r < rows_valid && c < cols ? src[r * ld + c] : __float2bfloat16(0.0f);
    }
  }
}

// The same from fp32 `src`, each value rounded to bf16.
template <int DHP>
__device__ __forceinline__ void LoadF32Tile(const float* __restrict__ src, int64_t ld, int64_t rows_valid, int cols,
                                            bf16* tile) {
  constexpr int kLd = Layout<DHP>::kLd;
  for (int i = threadIdx.x; i < kTile * DHP; i += kBlockThreads) {
    const int r = i / DHP, c = i % DHP;
    tile[r * kLd + c] = __float2bfloat16(r < rows_valid && c < cols ? src[r * ld + c] : 0.0f);
  }
}

// s[16, 64] (stride kSLd) = a[16, DHP] · b[64, DHP]ᵀ, both bf16 row tiles (stride kLd).
template <int DHP>
__device__ __forceinline__ void ScoreTile(const bf16* a, const bf16* b, float* s) {
  constexpr int kLd = Layout<DHP>::kLd;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTile / 16];
#pragma unroll
  for (int i = 0; i < kTile / 16; ++i) wmma::fill_fragment(acc[i], 0.0f);
#pragma unroll
  for (int k = 0; k < DHP / 16; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + k * 16, kLd);
#pragma unroll
    for (int i = 0; i < kTile / 16; ++i) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;  // b's rows are bᵀ's columns
      wmma::load_matrix_sync(fb, b + i * 16 * kLd + k * 16, kLd);
      wmma::mma_sync(acc[i], fa, fb, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kTile / 16; ++i) wmma::store_matrix_sync(s + i * 16, acc[i], kSLd, wmma::mem_row_major);
}

template <int DHP>
using OutFragments = wmma::fragment<wmma::accumulator, 16, 16, 16, float>[DHP / 16];

// out[16, DHP] += p[16, 64] (bf16, stride kPLd) · v[64, DHP] (bf16 row tile).
template <int DHP>
__device__ __forceinline__ void AccumulateTile(const bf16* p, const bf16* v, OutFragments<DHP>& out) {
  constexpr int kLd = Layout<DHP>::kLd;
#pragma unroll
  for (int k = 0; k < kTile / 16; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, p + k * 16, kPLd);
#pragma unroll
    for (int c = 0; c < DHP / 16; ++c) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, v + k * 16 * kLd + c * 16, kLd);
      wmma::mma_sync(out[c], fa, fb, out[c]);
    }
  }
}

// Stages a warp's out[16, DHP] in shared memory (stride kStageLd) and returns the warp's
// staging rows.
template <int DHP>
__device__ __forceinline__ const float* StageOut(OutFragments<DHP>& out, float* stage_base, int warp) {
  float* stage = stage_base + warp * 16 * Layout<DHP>::kStageLd;
#pragma unroll
  for (int c = 0; c < DHP / 16; ++c) wmma::store_matrix_sync(stage + c * 16, out[c], Layout<DHP>::kStageLd, wmma::mem_row_major);
  __syncwarp();
  return stage;
}

// Read: a block per (64 tokens, head). Each lane pair owns one of its warp's 16 rows (lanes
// 2r and 2r + 1: the even and the odd columns of each score tile).
template <int DHP>
__global__ void __launch_bounds__(kBlockThreads) MemoryReadTiledKernel(
    const float* __restrict__ q, int64_t q_ld, const bf16* __restrict__ mem_k, const bf16* __restrict__ mem_v,
    int64_t T, int64_t N, int64_t d, int dh, float scale, bool vec, float* __restrict__ e, float* __restrict__ stats) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = Layout<DHP>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = reinterpret_cast<bf16*>(smem + L::kRowTileBytes);
  bf16* vs = reinterpret_cast<bf16*>(smem + 2 * L::kRowTileBytes);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* s = reinterpret_cast<float*>(smem + 3 * L::kRowTileBytes) + warp * 16 * kSLd;
  bf16* p = reinterpret_cast<bf16*>(smem + 3 * L::kRowTileBytes + L::kScoreBytes) + warp * 16 * kPLd;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile, j = blockIdx.y;
  const int row = lane / 2, half = lane % 2;
  const bf16* k_head = mem_k + j * dh;
  const bf16* v_head = mem_v + j * dh;

  LoadF32Tile<DHP>(q + t0 * q_ld + j * dh, q_ld, T - t0, dh, qs);
  const bf16* q_rows = qs + warp * 16 * L::kLd;

  // Pass 1: each row's maximum and sum of exponentials over all N slots.
  float m = -INFINITY, l = 0.0f;
  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    __syncthreads();  // the previous tile's readers are done (and, first time, qs is loaded)
    LoadBf16Tile<DHP>(k_head + n0 * d, d, N - n0, dh, vec, ks);
    __syncthreads();
    ScoreTile<DHP>(q_rows, ks, s);
    __syncwarp();
    const int valid = N - n0 < kTile ? static_cast<int>(N - n0) : kTile;
    float tile_max = -INFINITY;
    for (int c = half; c < kTile; c += 2) {
      if (c < valid) tile_max = fmaxf(tile_max, s[row * kSLd + c] * scale);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    float sum = 0.0f;
    for (int c = half; c < kTile; c += 2) {
      if (c < valid) sum += expf(s[row * kSLd + c] * scale - m_new);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * expf(m - m_new) + sum;
    m = m_new;
    __syncwarp();  // s is rewritten by the next tile
  }
  const float inv_l = 1.0f / l;

  // Pass 2: p = exp(s - m) / l, e += p · V.
  OutFragments<DHP> out;
#pragma unroll
  for (int c = 0; c < DHP / 16; ++c) wmma::fill_fragment(out[c], 0.0f);
  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    __syncthreads();
    LoadBf16Tile<DHP>(k_head + n0 * d, d, N - n0, dh, vec, ks);
    LoadBf16Tile<DHP>(v_head + n0 * d, d, N - n0, dh, vec, vs);
    __syncthreads();
    ScoreTile<DHP>(q_rows, ks, s);
    __syncwarp();
    const int valid = N - n0 < kTile ? static_cast<int>(N - n0) : kTile;
    for (int c = half; c < kTile; c += 2) {
      const float pv = c < valid ? expf(s[row * kSLd + c] * scale - m) * inv_l : 0.0f;
      p[row * kPLd + c] = __float2bfloat16(pv);
    }
    __syncwarp();
    AccumulateTile<DHP>(p, vs, out);
  }

  __syncthreads();  // ks and vs become the output staging
  const float* stage = StageOut<DHP>(out, reinterpret_cast<float*>(ks), warp);
  const int64_t r0 = t0 + warp * 16;
  for (int i = lane; i < 16 * dh; i += 32) {
    const int r = i / dh, c = i % dh;
    if (r0 + r < T) e[(r0 + r) * d + j * dh + c] = stage[r * L::kStageLd + c];
  }
  if (half == 0 && r0 + row < T) {
    stats[(j * T + r0 + row) * 2] = m;
    stats[(j * T + r0 + row) * 2 + 1] = inv_l;
  }
#else
  __trap();
#endif
}

// Write sums: a block per (64 slots, head), over the chunk's tokens 64 at a time. Each lane
// pair owns one of its warp's 16 slots.
template <int DHP>
__global__ void __launch_bounds__(kBlockThreads) MemoryWriteTiledKernel(
    const float* __restrict__ q, int64_t q_ld, const float* __restrict__ offer, int64_t offer_ld,
    const bf16* __restrict__ mem_k, int64_t T, int64_t N, int64_t d, int dh, float scale, bool vec,
    const float* __restrict__ stats, float* __restrict__ mass, float* __restrict__ acc) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = Layout<DHP>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* qs = reinterpret_cast<bf16*>(smem + L::kRowTileBytes);
  bf16* cs = reinterpret_cast<bf16*>(smem + 2 * L::kRowTileBytes);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* s = reinterpret_cast<float*>(smem + 3 * L::kRowTileBytes) + warp * 16 * kSLd;
  bf16* p = reinterpret_cast<bf16*>(smem + 3 * L::kRowTileBytes + L::kScoreBytes) + warp * 16 * kPLd;
  float* tile_m = reinterpret_cast<float*>(smem + 3 * L::kRowTileBytes + L::kScoreBytes + L::kProbBytes);
  float* tile_inv_l = tile_m + kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile, j = blockIdx.y;
  const int row = lane / 2, half = lane % 2;

  LoadBf16Tile<DHP>(mem_k + n0 * d + j * dh, d, N - n0, dh, vec, ks);
  const bf16* k_rows = ks + warp * 16 * L::kLd;
  OutFragments<DHP> out;
#pragma unroll
  for (int c = 0; c < DHP / 16; ++c) wmma::fill_fragment(out[c], 0.0f);
  float slot_mass = 0.0f;
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    __syncthreads();  // the previous tile's readers are done
    LoadF32Tile<DHP>(q + t0 * q_ld + j * dh, q_ld, T - t0, dh, qs);
    LoadF32Tile<DHP>(offer + t0 * offer_ld + j * dh, offer_ld, T - t0, dh, cs);
    for (int i = threadIdx.x; i < kTile; i += kBlockThreads) {
      const bool in = t0 + i < T;
      tile_m[i] = in ? stats[(j * T + t0 + i) * 2] : 0.0f;
      tile_inv_l[i] = in ? stats[(j * T + t0 + i) * 2 + 1] : 0.0f;  // p = 0 for padding tokens
    }
    __syncthreads();
    ScoreTile<DHP>(k_rows, qs, s);  // s[slot, token]
    __syncwarp();
    for (int c = half; c < kTile; c += 2) {
      const float pv = tile_inv_l[c] == 0.0f ? 0.0f : expf(s[row * kSLd + c] * scale - tile_m[c]) * tile_inv_l[c];
      slot_mass += pv;
      p[row * kPLd + c] = __float2bfloat16(pv);
    }
    __syncwarp();
    AccumulateTile<DHP>(p, cs, out);
  }
  slot_mass += __shfl_xor_sync(0xffffffffu, slot_mass, 1);

  __syncthreads();  // qs and cs become the output staging
  const float* stage = StageOut<DHP>(out, reinterpret_cast<float*>(qs), warp);
  const int64_t r0 = n0 + warp * 16;
  for (int i = lane; i < 16 * dh; i += 32) {
    const int r = i / dh, c = i % dh;
    if (r0 + r < N) acc[(r0 + r) * d + j * dh + c] += stage[r * L::kStageLd + c];
  }
  if (half == 0 && r0 + row < N) mass[j * N + r0 + row] += slot_mass;
#else
  __trap();
#endif
}

template <int DHP>
Status LaunchTiled(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, const bf16* mem_k,
                   const bf16* mem_v, int64_t T, int64_t N, int64_t d, int dh, float* e, float* mass, float* acc,
                   float* stats, cudaStream_t stream) {
  constexpr int kBytes = Layout<DHP>::kBytes;
  LM2_RETURN_IF_ERROR(
      EnsureSharedMemory(reinterpret_cast<const void*>(&MemoryReadTiledKernel<DHP>), kBytes, "MemoryReadWrite"));
  LM2_RETURN_IF_ERROR(
      EnsureSharedMemory(reinterpret_cast<const void*>(&MemoryWriteTiledKernel<DHP>), kBytes, "MemoryReadWrite"));
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const bool vec = dh % 8 == 0 && d % 8 == 0;  // mem_k/mem_v rows and head offsets 16-byte aligned
  const auto heads = static_cast<unsigned int>(d / dh);
  MemoryReadTiledKernel<DHP><<<dim3(static_cast<unsigned int>((T + kTile - 1) / kTile), heads), kBlockThreads, kBytes, stream>>>(
      q, q_ld, mem_k, mem_v, T, N, d, dh, scale, vec, e, stats);
  LM2_RETURN_IF_ERROR(CheckLaunch("MemoryReadTiledKernel"));
  MemoryWriteTiledKernel<DHP><<<dim3(static_cast<unsigned int>((N + kTile - 1) / kTile), heads), kBlockThreads, kBytes, stream>>>(
      q, q_ld, offer, offer_ld, mem_k, T, N, d, dh, scale, vec, stats, mass, acc);
  return CheckLaunch("MemoryWriteTiledKernel");
}

}  // namespace

bool MemoryReadWriteSupported(int64_t d, int64_t heads) {
  return heads > 0 && d % heads == 0 && d / heads <= 128;
}

int64_t MemoryReadWriteScratch(int64_t T, int64_t heads) { return 2 * heads * T; }

Status MemoryReadWrite(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld, const bf16* mem_k,
                       const bf16* mem_v, int64_t T, int64_t N, int64_t d, int64_t heads, float* e, float* mass,
                       float* acc, float* scratch, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckMemory("MemoryReadWrite", T, N, d, heads));
  if (!MemoryReadWriteSupported(d, heads)) {
    return Status::InvalidArgument("MemoryReadWrite: head width " + std::to_string(d / heads) + " > 128");
  }
  if (q_ld < d || offer_ld < d) {
    return Status::InvalidArgument("MemoryReadWrite: q_ld " + std::to_string(q_ld) + " or offer_ld " +
                                   std::to_string(offer_ld) + " < d");
  }
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("MemoryReadWrite", {q, offer, mem_k, mem_v, e, mass, acc, scratch}));
  const int dh = static_cast<int>(d / heads);
  if (dh <= 16) return LaunchTiled<16>(q, q_ld, offer, offer_ld, mem_k, mem_v, T, N, d, dh, e, mass, acc, scratch, stream);
  if (dh <= 32) return LaunchTiled<32>(q, q_ld, offer, offer_ld, mem_k, mem_v, T, N, d, dh, e, mass, acc, scratch, stream);
  if (dh <= 64) return LaunchTiled<64>(q, q_ld, offer, offer_ld, mem_k, mem_v, T, N, d, dh, e, mass, acc, scratch, stream);
  return LaunchTiled<128>(q, q_ld, offer, offer_ld, mem_k, mem_v, T, N, d, dh, e, mass, acc, scratch, stream);
}

}  // namespace lm2::runtime::cuda
