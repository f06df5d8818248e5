// bf16 tensor-core building blocks (sm_80 and later) for kernels that keep their tiles in
// registers: mma.sync m16n8k16 with fp32 accumulation, ldmatrix fragment loads from shared
// memory, and cp.async copies into it.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4g + t:
//   A (16 x 16, row-major): a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same cols),
//                           a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, same cols)
//   B (16 x 8):             b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g)
//   C (16 x 8, fp32):       c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, same)
// so the C fragments of two neighbouring 16 x 8 tiles, packed to bf16 pairs, are the A
// fragment of the 16 x 16 product that follows (probabilities times values).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

namespace lm2::runtime::cuda {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Two floats as a bf16 pair (round to nearest even), `lo` in the low half.
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Eight floats as bf16 in order (the first in the lowest bytes): one 16-byte store.
__device__ __forceinline__ uint4 PackBf16x8(const float (&v)[8]) {
  return make_uint4(PackBf16x2(v[0], v[1]), PackBf16x2(v[2], v[3]), PackBf16x2(v[4], v[5]), PackBf16x2(v[6], v[7]));
}

// d += a · b for one 16 x 8 output tile.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8 x 8 bf16 matrices from shared memory; lane L gives the address of row L % 8 of
// matrix L / 8 (16-byte aligned). `Trans`: each matrix transposed on the way.
template <bool Trans>
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* row_address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SharedAddress(row_address)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SharedAddress(row_address)));
  }
#endif
}

// The A fragment of rows [row0, row0 + 16) x columns [k0, k0 + 16) of a row-major bf16 tile.
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const __nv_bfloat16* tile, int ld, int row0, int k0) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  LdMatrixX4<false>(a, tile + (row0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

// B fragments of the product with a tile's transpose: `tile` row-major [n][k]; b[0], b[1]
// for output columns [n0, n0 + 8), b[2], b[3] for [n0 + 8, n0 + 16); k in [k0, k0 + 16).
__device__ __forceinline__ void LoadBTransposed(uint32_t (&b)[4], const __nv_bfloat16* tile, int ld, int n0, int k0) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  LdMatrixX4<false>(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B fragments of the product with a tile as it is: `tile` row-major [k][n]; b[0], b[1] for
// output columns [n0, n0 + 8), b[2], b[3] for [n0 + 8, n0 + 16); k in [k0, k0 + 16).
__device__ __forceinline__ void LoadB(uint32_t (&b)[4], const __nv_bfloat16* tile, int ld, int k0, int n0) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  LdMatrixX4<true>(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// 16 bytes global -> shared without passing through registers; zeros when !valid (then
// `global` is not read, but must still be a valid address).
__device__ __forceinline__ void CopyAsync16(void* shared, const void* global, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(shared)), "l"(global),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void CopyAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `Pending` committed groups of this thread are still in flight.
template <int Pending>
__device__ __forceinline__ void CopyAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

// ---- 64-column tiles of a warp's 16 rows ------------------------------------------------
//
// Row-major bf16 tiles of up to 64 rows and DHP columns (a multiple of 16) in shared
// memory, rows TileLd apart (16-byte aligned, and 8 rows of ldmatrix hit distinct banks).
template <int DHP>
inline constexpr int TileLd = DHP + 8;

// Rows [0, Rows) x columns [0, DHP) of a tile (rows TileLd<DHP> apart) from bf16 `src`
// (rows `ld` apart), by a block of Threads threads: rows below rows_valid and columns below
// cols, zeros elsewhere. `vec` (cols, ld and src 8-element aligned): 16-byte cp.async
// copies, completed by the caller's CopyAsyncWait; else element loads, complete on return.
// A thread copies the same 16-byte piece of rows kRowStep apart, so its addresses are one
// product and a few additions (the tile kernels call this once or twice a tile, and a
// general index computation per piece, 64-bit, was a third of their instructions).
template <int DHP, int Rows, int Threads>
__device__ __forceinline__ void LoadBf16Tile(const __nv_bfloat16* __restrict__ src, int64_t ld, int64_t rows_valid,
                                             int cols, bool vec, __nv_bfloat16* tile) {
  constexpr int kLd = TileLd<DHP>, kChunks = DHP / 8;  // 16-byte pieces of a row
  if (vec) {
    static_assert(Threads % kChunks == 0 && Rows % (Threads / kChunks) == 0, "whole rows of pieces a pass");
    constexpr int kRowStep = Threads / kChunks, kPasses = Rows / kRowStep;
    const int r0 = static_cast<int>(threadIdx.x) / kChunks, c = (static_cast<int>(threadIdx.x) % kChunks) * 8;
    const bool col_in = c < cols;
    const __nv_bfloat16* s = src + r0 * ld + c;
    const int64_t step = kRowStep * ld;
    __nv_bfloat16* d = tile + r0 * kLd + c;
    if (rows_valid >= Rows) {  // a whole tile (uniform)
#pragma unroll
      for (int k = 0; k < kPasses; ++k) CopyAsync16(d + k * kRowStep * kLd, col_in ? s + k * step : src, col_in);
    } else {
#pragma unroll
      for (int k = 0; k < kPasses; ++k) {
        const bool in = col_in && r0 + k * kRowStep < rows_valid;
        CopyAsync16(d + k * kRowStep * kLd, in ? s + k * step : src, in);
      }
    }
  } else {
    for (int i = threadIdx.x; i < Rows * DHP; i += Threads) {
      const int r = i / DHP, c = i % DHP;
      tile[r * kLd + c] = r < rows_valid && c < cols ? src[r * ld + c] : __float2bfloat16(0.0f);
    }
  }
}

// The tile kernels' copy ring: the tile in use, the next one landing and the one after
// being copied. At the top of tile i a single block barrier shows tile i complete to every
// thread and every warp done with tile i - 1, whose buffers the copy of tile i + 2 then
// refills (two buffers needed a second barrier a tile, before the refill).
inline constexpr int kTileStages = 3;
__host__ __device__ constexpr int NextStage(int stage) { return stage + 1 == kTileStages ? 0 : stage + 1; }

// Head widths the tile kernels take, zero-padded to the tile width: 16, 32, 64 or 128.
inline constexpr int64_t kMaxTileWidth = 128;
__host__ __device__ constexpr int64_t PaddedTileWidth(int64_t width) {
  return width <= 16 ? 16 : width <= 32 ? 32 : width <= 64 ? 64 : 128;
}

// fn(std::integral_constant<int, PaddedTileWidth(width)>{}): the kernel instance for a
// head width in [1, kMaxTileWidth].
template <typename Fn>
auto WithPaddedTileWidth(int64_t width, Fn&& fn) {
  switch (PaddedTileWidth(width)) {
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    default: return fn(std::integral_constant<int, 128>{});
  }
}

// The tile kernels' blocks: 128 rows (queries, tokens or slots), each warp taking
// RowGroups groups of 16: two up to head width 64, so that every fragment read from shared
// memory serves two products, one past it (the registers).
inline constexpr int kTileBlockRows = 128;
__host__ __device__ constexpr int RowGroups(int dhp) { return dhp <= 64 ? 2 : 1; }
__host__ __device__ constexpr int GroupThreads(int dhp) { return 32 * kTileBlockRows / (16 * RowGroups(dhp)); }

// exp(x) = exp2(x · log2 e): the tile kernels' softmaxes work in log2 units.
inline constexpr float kLog2e = 1.4426950408889634f;

// 2^x by one SFU instruction (ex2.approx.ftz: results below 2^-126 flush to 0, which a
// softmax weight may; exp2f wraps the same instruction in denormal handling, three more
// instructions per weight in kernels whose issue slots are the limit). 2^-inf = 0.
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// s[m][8][4]: the 16 x 64 scores of each of a warp's M groups of 16 rows (A fragments
// a[m], DHP/16 of them) against the 64 rows of `tile` (row-major [64][DHP]): a · tileᵀ.
// Each B fragment is loaded once for the M groups (M = 2 halves the shared-memory reads per
// product).
template <int DHP, int M>
__device__ __forceinline__ void TileScoresM(const uint32_t (&a)[M][DHP / 16][4], const __nv_bfloat16* tile,
                                            float (&s)[M][8][4]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < 8; ++i) s[m][i][0] = s[m][i][1] = s[m][i][2] = s[m][i][3] = 0.0f;
#pragma unroll
  for (int kc = 0; kc < DHP / 16; ++kc) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      LoadBTransposed(b, tile, TileLd<DHP>, np * 16, kc * 16);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        MmaBf16(s[m][2 * np], a[m][kc], b[0], b[1]);
        MmaBf16(s[m][2 * np + 1], a[m][kc], b[2], b[3]);
      }
    }
  }
}

// The A fragment of the 16-wide step kc of the product that follows a 16-row score tile
// (C fragments p, NT of 8 columns: 8 for 64 columns, 16 for 128): columns [16 kc, 16 kc + 16)
// packed to bf16 pairs.
template <int NT>
__device__ __forceinline__ void PackStepA(const float (&p)[NT][4], int kc, uint32_t (&a)[4]) {
  a[0] = PackBf16x2(p[2 * kc][0], p[2 * kc][1]);
  a[1] = PackBf16x2(p[2 * kc][2], p[2 * kc][3]);
  a[2] = PackBf16x2(p[2 * kc + 1][0], p[2 * kc + 1][1]);
  a[3] = PackBf16x2(p[2 * kc + 1][2], p[2 * kc + 1][3]);
}

// out[m][DHP/8][4] += p[m] · tile for each of M groups of 16 rows: p[m] the 16 x 64
// probabilities in score-fragment form, `tile` row-major [64][DHP].
template <int DHP, int M>
__device__ __forceinline__ void TileProductsM(const float (&p)[M][8][4], const __nv_bfloat16* tile,
                                              float (&out)[M][DHP / 8][4]) {
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
    uint32_t a[M][4];
#pragma unroll
    for (int m = 0; m < M; ++m) PackStepA(p[m], kc, a[m]);
#pragma unroll
    for (int np = 0; np < DHP / 16; ++np) {
      uint32_t b[4];
      LoadB(b, tile, TileLd<DHP>, kc * 16, np * 16);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        MmaBf16(out[m][2 * np], a[m], b[0], b[1]);
        MmaBf16(out[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// This lane's elements of row g + 8r of a row of output tiles (C fragments tiles[i], columns
// [8i, 8i + 8)): fn(col, value) for its columns 8i + 2t and 8i + 2t + 1 below `width` (the
// rest is padding).
template <int kTiles, typename Fn>
__device__ __forceinline__ void ForEachOwnedElement(const float (&tiles)[kTiles][4], int r, int t, int width, Fn&& fn) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = i * 8 + 2 * t + c;
      if (col < width) fn(col, tiles[i][2 * r + c]);
    }
}

__device__ __forceinline__ float QuadMax(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The softmax weight of raw score s in log2 units against the maximum m (log2 units):
// 2^(s · scale_log2 - m), the scaling and the subtraction one fused multiply-add. The
// tiled read and write kernels compute their weights alike.
__device__ __forceinline__ float SoftmaxWeight(float s, float scale_log2, float m) {
  return FastExp2(fmaf(s, scale_log2, -m));
}

// The online softmax's state of M groups of 16 rows before the first tile: maxima -inf,
// sums and output rows 0.
template <int DHP, int M>
__device__ __forceinline__ void OnlineSoftmaxStart(float (&m)[M][2], float (&l)[M][2], float (&out)[M][DHP / 8][4]) {
#pragma unroll
  for (int mg = 0; mg < M; ++mg) {
    m[mg][0] = m[mg][1] = -INFINITY;
    l[mg][0] = l[mg][1] = 0.0f;
#pragma unroll
    for (int i = 0; i < DHP / 8; ++i) out[mg][i][0] = out[mg][i][1] = out[mg][i][2] = out[mg][i][3] = 0.0f;
  }
}

// How far (log2 units) a row's running maximum may lag its true maximum before the online
// softmax rescales: the weights then reach up to 2^8, harmless in fp32 sums and bf16
// products, and the final division by the row sums (taken against the same maximum) cancels
// it exactly.
inline constexpr float kRescaleSlack = 8.0f;

// The weights of one tile of the online softmax (FA2) over a warp's 16 rows, NT column
// tiles of 8: `s` holds the tile's raw scores (masked entries -inf) and leaves with
// SoftmaxWeight(s, scale_log2, m); the row maxima `m` (log2 units: raw maxima times
// scale_log2 > 0) and this lane's shares `l` of the row sums move to the new maxima only
// when some row of the warp has outgrown its maximum by more than kRescaleSlack (a
// warp-uniform branch; after the first tiles it is rarely taken), so `m` may lag the true
// maxima by up to that slack. When they move, rescale(r, alpha) is called for rows r = 0, 1
// (alpha 0 on the first tile, 1 where a row's maximum stayed): the output rows must be
// multiplied by it before this tile's product is added. Every row must have seen a finite
// score by now.
template <int NT, typename Rescale>
__device__ __forceinline__ void OnlineSoftmaxWeights(float (&s)[NT][4], float scale_log2, float (&m)[2],
                                                     float (&l)[2], Rescale&& rescale) {
  float m_new[2];
  bool grown = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    m_new[r] = fmaxf(m[r], QuadMax(mx) * scale_log2);
    grown |= m_new[r] > m[r] + kRescaleSlack;  // always on the first tile (m = -inf)
  }
  if (__any_sync(0xffffffffu, grown)) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float alpha = FastExp2(m[r] - m_new[r]);
      l[r] *= alpha;
      m[r] = m_new[r];
      rescale(r, alpha);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][2 * r] = SoftmaxWeight(s[nt][2 * r], scale_log2, m[r]);
      s[nt][2 * r + 1] = SoftmaxWeight(s[nt][2 * r + 1], scale_log2, m[r]);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    l[r] += sum;  // this lane's share; QuadSum adds the quad's at the end
  }
}

// Row r of a warp's 16 output rows (C fragments) times alpha.
template <int kTiles>
__device__ __forceinline__ void ScaleRow(float (&out)[kTiles][4], int r, float alpha) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    out[i][2 * r] *= alpha;
    out[i][2 * r + 1] *= alpha;
  }
}

// One 64-column tile of the online softmax: its weights (OnlineSoftmaxWeights), the running
// output rows rescaled where the maxima moved.
template <int DHP>
__device__ __forceinline__ void OnlineSoftmaxTile(float (&s)[8][4], float scale_log2, float (&m)[2], float (&l)[2],
                                                  float (&out)[DHP / 8][4]) {
  OnlineSoftmaxWeights(s, scale_log2, m, l, [&](int r, float alpha) { ScaleRow(out, r, alpha); });
}

}  // namespace lm2::runtime::cuda
