// Two GEMMs of the prefill on Hopper's warpgroup MMA (wgmma, sm_90a) with the elementwise
// op after them as their epilogue, so that their [rows, 2F] intermediate is neither stored
// nor read again and no kernel of its own runs:
//
// - LinearSwiGlu, the FFN's gate|up projection and its SwiGLU: y[rows, F] = bf16(silu(g) · u)
//   with g = bf16(x W_gateᵀ), u = bf16(x W_upᵀ), x [rows, d] and W_gate|W_up the stacked
//   [2F, d] bf16 weights: LinearToBf16 then SwiGluBf16.
// - LinearGatedResidual, a memory layer's o_proj and output gate and both residual adds:
//   h += a W_oᵀ + sigmoid(e W_ogᵀ + b) ⊙ e for the attention output a and the read's output
//   e (both bf16, stacked) and the stacked [W_o; W_og] ([2d, d]): LinearTwo then
//   GatedResidual.
//
// Both are one kernel, FusedGemmKernel, with the epilogue as a template parameter: the
// columns of a tile are two halves, lo (W's rows n0 ..) and hi (W's rows F + n0 ..), and a
// thread's accumulators hold column c of both halves for the same rows, so the epilogue is
// elementwise in registers. The results equal the unfused ops' to the GEMMs' summation order.
//
// A persistent grid, a block per multiprocessor over output tiles of 128 rows x kCols columns
// of each half (tile t: rows (t mod m_tiles) · 128, columns (t / m_tiles) · kCols, so the
// blocks running at once share their weight columns); kCols is 128, or 64 where 128-column
// tiles would not fill the multiprocessors (a few hundred rows). A block is three
// warpgroups: a producer whose one thread brings, per 64-wide step of k, the tile's x rows
// (by 64-row boxes; the gated residual's second x too) and both halves' weight rows by
// tensor copies (tma.cuh) into 192 KiB of stages on transaction barriers, and two consumer
// warpgroups of 64 rows each that take each stage as four 16-wide steps of m64nNk16
// products (the SwiGLU: one product over both halves, N = 2 kCols, its B the two weight
// tiles back to back; the gated residual: one per half, each with its own x) and release it
// once the products after it are issued. The producer meanwhile fills the next tile's
// stages.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "cuda/mbarrier.cuh"
#include "cuda/tma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LM2_WGMMA 1  // this compilation pass has the sm_90a instructions
#else
#define LM2_WGMMA 0
#endif

namespace lm2::runtime::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTileRows = 128;                        // two consumer warpgroups of 64
constexpr int kStepK = kSwizzleRowBytes / 2;          // 64: one swizzled row of a stage's tiles
constexpr int kGemmThreads = 384;                     // producer, two consumers
constexpr int kHalfRows = 64;                         // a consumer warpgroup's rows: a box of x
constexpr int kXHalfBytes = kHalfRows * kSwizzleRowBytes;  // 8 KiB
constexpr int kXBytes = 2 * kXHalfBytes;              // 16 KiB
constexpr int kRingBytes = 192 * 1024;                // the stages' shared memory

// What a fused GEMM's epilogue makes of its two halves of columns, lo (x W_loᵀ) and hi:
// kSwiGlu y = bf16(silu(bf16(lo)) · bf16(hi)), both halves from one x; kGatedResidual
// h += lo + sigmoid(hi + bias) ⊙ e, hi from a second x (LinearGatedResidual).
enum class Epilogue { kSwiGlu, kGatedResidual };

struct EpilogueArgs {
  bf16* y = nullptr;           // kSwiGlu: [rows, F]
  float* h = nullptr;          // kGatedResidual: [rows, F], added to
  const float* e = nullptr;    // kGatedResidual: [rows, F]
  const float* bias = nullptr; // kGatedResidual: [F]
  int64_t rows = 0;            // the rows written (at most the maps' rows)
};

// A tile's shape by its columns of each half: 128, or 64 where 128-column tiles would leave
// multiprocessors idle (a few hundred rows); kGatedResidual copies two x tiles a stage.
template <int kCols, Epilogue kE>
struct Tiles {
  static constexpr int kXTiles = kE == Epilogue::kGatedResidual ? 2 : 1;
  static constexpr int kWBytes = kCols * kSwizzleRowBytes;                  // each half's weights
  static constexpr int kStageBytes = kXTiles * kXBytes + 2 * kWBytes;       // 32-64 KiB
  static constexpr int kStages = kRingBytes / kStageBytes;                  // 3-6
  static constexpr int kHalfAccumulators = kCols / 8;                       // 8-column groups of a half
  static constexpr int kSharedBytes = kSwizzleAtomBytes + kStages * kStageBytes + 2 * kStages * 8;
};

// Issue order and completion of wgmma (a warpgroup's commit groups).
__device__ __forceinline__ void WgmmaFence() {
#if LM2_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#if LM2_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
#if LM2_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accesses of the accumulators across the asm around it.
template <int R>
__device__ __forceinline__ void FenceAccumulators(float (&d)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) asm volatile("" : "+f"(d[i][c])::"memory");
}

#define LM2_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LM2_ACC32(i) \
  LM2_ACC4(i), LM2_ACC4(i + 1), LM2_ACC4(i + 2), LM2_ACC4(i + 3), LM2_ACC4(i + 4), LM2_ACC4(i + 5), LM2_ACC4(i + 6), \
      LM2_ACC4(i + 7)

// d[64 x N] (+)= A[64 x 16] · B[16 x N] (N = 8 x R: 256, 128 or 64), both from swizzled shared
// tiles (K-major), for the warpgroup; accumulate 0: d = A · B. Issued only: WgmmaCommit and
// WgmmaWait complete it. The accumulators of m64nNk16: warp w of the warpgroup holds rows
// 16w + g and 16w + g + 8 (lane 4g + t), columns 8i + 2t and 8i + 2t + 1 in d[i][0, 1] and
// d[i][2, 3].
__device__ __forceinline__ void Mma64xN(float (&d)[32][4], uint64_t a, uint64_t b, int accumulate) {
#if LM2_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : LM2_ACC32(0), LM2_ACC32(8), LM2_ACC32(16), LM2_ACC32(24)
      : "l"(a), "l"(b), "r"(accumulate));
#endif
}

__device__ __forceinline__ void Mma64xN(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) {
#if LM2_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : LM2_ACC32(0), LM2_ACC32(8)
      : "l"(a), "l"(b), "r"(accumulate));
#endif
}

__device__ __forceinline__ void Mma64xN(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {
#if LM2_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : LM2_ACC32(0)
      : "l"(a), "l"(b), "r"(accumulate));
#endif
}

#undef LM2_ACC32
#undef LM2_ACC4

// Output columns [n0, n0 + kCols) of both halves: lo = x W[n0 ..]ᵀ, hi = x2 W[F + n0 ..]ᵀ (x2
// = x for kSwiGlu), over x's rows [0, x_rows) (the maps' rows; rows past them read as zeros);
// the epilogue writes rows below out.rows.
template <int kCols, Epilogue kE>
__global__ void __launch_bounds__(kGemmThreads, 1)
    FusedGemmKernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap x2_map,
                    const __grid_constant__ CUtensorMap w_map, int64_t x_rows, int64_t F, int64_t d,
                    EpilogueArgs out) {
#if LM2_WGMMA
  using T = Tiles<kCols, kE>;
  constexpr int kStages = T::kStages, kStageBytes = T::kStageBytes, kWBytes = T::kWBytes;
  constexpr int kXTiles = T::kXTiles, kHalf = T::kHalfAccumulators;
  extern __shared__ __align__(16) unsigned char smem[];
  char* stages = reinterpret_cast<char*>(smem) +
                 (kSwizzleAtomBytes - SharedAddress(smem) % kSwizzleAtomBytes) % kSwizzleAtomBytes;
  auto* full = reinterpret_cast<uint64_t*>(stages + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warpgroup = static_cast<int>(threadIdx.x) / 128;
  const int m_tiles = static_cast<int>((x_rows + kTileRows - 1) / kTileRows);
  const int tiles = m_tiles * static_cast<int>(F / kCols), steps = static_cast<int>(d / kStepK);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      BarrierInit(&full[s], 1);
      BarrierInit(&empty[s], 8);  // every consumer warp
    }
  }
  __syncthreads();
  WaitForPredecessor();  // x is the kernel before's output (LaunchPdl)
  AllowDependents();

  if (warpgroup == 0) {  // the producer
    if (threadIdx.x == 0) {
      int it = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
        const int m0 = (tile % m_tiles) * kTileRows, n0 = (tile / m_tiles) * kCols;
        for (int k = 0; k < steps; ++k, ++it) {
          const int s = it % kStages;
          if (it >= kStages) BarrierWait(&empty[s], static_cast<uint32_t>(it / kStages - 1) & 1);
          char* stage = stages + s * kStageBytes;
          // x's second 64 rows only where any are in the matrix (rows a multiple of 64, as
          // the model's are, never copy a box partly past the end, whose zero fill is slow).
          const bool second = m0 + kHalfRows < x_rows;
          BarrierExpectBytes(&full[s], kStageBytes - (second ? 0 : kXTiles * kXHalfBytes));
          TensorTile(stage, &x_map, k * kStepK, m0, &full[s]);
          if (second) TensorTile(stage + kXHalfBytes, &x_map, k * kStepK, m0 + kHalfRows, &full[s]);
          if constexpr (kXTiles == 2) {
            TensorTile(stage + kXBytes, &x2_map, k * kStepK, m0, &full[s]);
            if (second) TensorTile(stage + kXBytes + kXHalfBytes, &x2_map, k * kStepK, m0 + kHalfRows, &full[s]);
          }
          char* w = stage + kXTiles * kXBytes;
          TensorTile(w, &w_map, k * kStepK, n0, &full[s]);
          TensorTile(w + kWBytes, &w_map, k * kStepK, static_cast<int>(F) + n0, &full[s]);
        }
      }
    }
    return;
  }

  const int half = warpgroup - 1;  // this warpgroup's 64 rows of the tile
  const int warp = static_cast<int>(threadIdx.x) / 32 % 4, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  float acc[2][kHalf][4];  // lo's column groups, then hi's: one m64n(2 kCols) accumulator
  auto& both = reinterpret_cast<float (&)[2 * kHalf][4]>(acc);
  int it = 0;
  for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
    const int m0 = (tile % m_tiles) * kTileRows, n0 = (tile / m_tiles) * kCols;
    if (m0 + half * kHalfRows >= x_rows) {  // no rows of this warpgroup in the tile: pass the stages on
      for (int k = 0; k < steps; ++k, ++it) {
        const int s = it % kStages;
        BarrierWait(&full[s], static_cast<uint32_t>(it / kStages) & 1);
        __syncwarp();
        if (lane == 0) BarrierArrive(&empty[s]);
      }
      continue;
    }
    if constexpr (kE == Epilogue::kGatedResidual) {
      // The epilogue's h and e rows into L2 while the products run: a 32-byte sector a
      // lane of each quad, per row and column group.
      if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t row = m0 + half * kHalfRows + warp * 16 + g + 8 * r;
          if (row >= out.rows) continue;
#pragma unroll
          for (int i = 0; i < kHalf; ++i) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(out.h + row * F + n0 + 8 * i));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(out.e + row * F + n0 + 8 * i));
          }
        }
      }
    }
    for (int k = 0; k < steps; ++k, ++it) {
      const int s = it % kStages;
      BarrierWait(&full[s], static_cast<uint32_t>(it / kStages) & 1);
      const char* stage = stages + s * kStageBytes;
      const uint64_t a = SwizzledTileDescriptor(stage + half * kXHalfBytes);
      const uint64_t b = SwizzledTileDescriptor(stage + kXTiles * kXBytes);
      FenceAccumulators(both);
      WgmmaFence();
#pragma unroll
      for (int kc = 0; kc < kStepK / 16; ++kc) {
        const uint64_t step = kc * kDescriptorColumnStep;
        const int accumulate = k > 0 || kc > 0;
        if constexpr (kE == Epilogue::kSwiGlu) {
          Mma64xN(both, a + step, b + step, accumulate);  // lo and hi's weights are one B of 2 kCols rows
        } else {
          const uint64_t a2 = SwizzledTileDescriptor(stage + kXBytes + half * kXHalfBytes);
          Mma64xN(acc[0], a + step, b + step, accumulate);
          Mma64xN(acc[1], a2 + step, b + (kWBytes >> 4) + step, accumulate);
        }
      }
      WgmmaCommit();
      FenceAccumulators(both);
      WgmmaWait<1>();  // the stage before's products are done: its buffers go back to the producer
      FenceAccumulators(both);
      if (k > 0) {
        __syncwarp();
        if (lane == 0) BarrierArrive(&empty[(it - 1) % kStages]);
      }
    }
    WgmmaWait<0>();
    FenceAccumulators(both);
    __syncwarp();
    if (lane == 0) BarrierArrive(&empty[(it - 1) % kStages]);

    // Columns n0 + 8i + 2t (+1): lo's in acc[0][i], hi's in acc[1][i].
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + half * kHalfRows + warp * 16 + g + 8 * r;
      if (row >= out.rows) continue;
      const int64_t at = row * F + n0 + 2 * t;
      if constexpr (kE == Epilogue::kSwiGlu) {
#pragma unroll
        for (int i = 0; i < kHalf; ++i) {  // gate and up rounded to bf16 first
          const float2 gate = __bfloat1622float2(__floats2bfloat162_rn(acc[0][i][2 * r], acc[0][i][2 * r + 1]));
          const float2 up = __bfloat1622float2(__floats2bfloat162_rn(acc[1][i][2 * r], acc[1][i][2 * r + 1]));
          *reinterpret_cast<__nv_bfloat162*>(out.y + at + 8 * i) =
              __floats2bfloat162_rn(SwiGluOf(gate.x, up.x), SwiGluOf(gate.y, up.y));
        }
      } else {
        // h, e and the bias a group of column pairs at a time, every load of the group issued
        // before its stores (one at a time, each store kept the next load waiting: 30 µs at
        // 512 rows against 19 for the unfused pair).
        constexpr int kGroup = kCols == 128 ? 2 : 4;  // (4 at 128 columns spilled)
        float* __restrict__ hp = out.h + at;
        const float* __restrict__ ep = out.e + at;
        const float* __restrict__ bp = out.bias + n0 + 2 * t;
#pragma unroll
        for (int i0 = 0; i0 < kHalf; i0 += kGroup) {
          float2 h[kGroup], e[kGroup], bias[kGroup];
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            h[j] = *reinterpret_cast<const float2*>(hp + 8 * (i0 + j));
            e[j] = *reinterpret_cast<const float2*>(ep + 8 * (i0 + j));
            bias[j] = *reinterpret_cast<const float2*>(bp + 8 * (i0 + j));
          }
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            const int i = i0 + j;
            h[j].x = GatedResidualOf(h[j].x, acc[0][i][2 * r], acc[1][i][2 * r], bias[j].x, e[j].x);
            h[j].y = GatedResidualOf(h[j].y, acc[0][i][2 * r + 1], acc[1][i][2 * r + 1], bias[j].y, e[j].y);
            *reinterpret_cast<float2*>(hp + 8 * i) = h[j];
          }
        }
      }
    }
  }
#else
  __trap();  // launched only where the build has sm_90a code (FusedGemmSupported)
#endif
}

#if defined(LM2_CUDA_SM90A)
LM2_CUDA_KERNEL_MODULE(FusedGemmKernel<128, Epilogue::kSwiGlu>);
#endif

// The tile width for x_rows x F on `sms` multiprocessors, 0 for none: 64 columns where their
// tiles fit in one round over the multiprocessors (a chunk of up to 128 rows at F 8192), 128
// where the last round of those tiles is nearly full. Elsewhere the blocks of the last round
// would run alone while the rest wait: on the H200 (132 SMs, F 8192) the SwiGLU form took
// 47.1 µs at 384 rows (192 tiles of 128 columns, or 384 of 64, in 3 rounds) and 75.8 at 640
// (320 tiles: 81% of 3 rounds) against the GEMM and SwiGluBf16's 42.2 and 66.5, while at
// 97% (256, 512, 1,024 and 2,048 rows) it was 6-9% faster (docs/benchmarks.md).
int TileColumns(int64_t x_rows, int64_t F, int sms) {
  constexpr double kMinRoundFill = 0.92;
  const int64_t tiles = (x_rows + kTileRows - 1) / kTileRows * (F / 128);
  if (2 * tiles <= sms) return 64;
  const int64_t rounds = (tiles + sms - 1) / sms;
  return static_cast<double>(tiles) >= kMinRoundFill * static_cast<double>(rounds * sms) ? 128 : 0;
}

// Whether the environment leaves a fused form on (`name` unset or not "0") and the driver has
// tensor maps; read once per form and process.
bool SwitchedOn(const char* name) {
  const char* v = std::getenv(name);
  return (v == nullptr || std::strcmp(v, "0") != 0) && TensorMapEncoder() != nullptr;
}

// Whether the fused kernels run x_rows x d -> F here (FusedGemm's conditions), `on` the
// form's SwitchedOn.
bool FusedGemmSupported(int64_t x_rows, int64_t d, int64_t F, bool on) {
#if defined(LM2_CUDA_SM90A)
  if (!on) return false;
  if (d % kStepK != 0 || F % 128 != 0 || d <= 0 || F <= 0 || x_rows <= 0) return false;
  const Result<int> major = CurrentDeviceAttribute(cudaDevAttrComputeCapabilityMajor);
  const Result<int> minor = CurrentDeviceAttribute(cudaDevAttrComputeCapabilityMinor);
  const Result<int> sms = Multiprocessors();
  return major.ok() && minor.ok() && sms.ok() && *major == 9 && *minor == 0 && TileColumns(x_rows, F, *sms) > 0;
#else
  (void)x_rows;
  (void)d;
  (void)F;
  (void)on;
  return false;
#endif
}

template <int kCols, Epilogue kE>
Status LaunchFusedGemm(const bf16* x, const bf16* x2, int64_t x_rows, int64_t d, const bf16* w, int64_t F,
                       const EpilogueArgs& out, int sms, const char* op, cudaStream_t stream) {
  using T = Tiles<kCols, kE>;
  LM2_ASSIGN_OR_RETURN(const CUtensorMap x_map, SwizzledRowsMap(x, x_rows, d, d, kHalfRows, op));
  LM2_ASSIGN_OR_RETURN(const CUtensorMap x2_map, SwizzledRowsMap(x2, x_rows, d, d, kHalfRows, op));
  LM2_ASSIGN_OR_RETURN(const CUtensorMap w_map, SwizzledRowsMap(w, 2 * F, d, d, kCols, op));
  const auto kernel = &FusedGemmKernel<kCols, kE>;
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), T::kSharedBytes, op));
  const int64_t tiles = (x_rows + kTileRows - 1) / kTileRows * (F / kCols);
  const auto grid = static_cast<unsigned int>(std::min<int64_t>(tiles, sms));
  return CudaStatus(LaunchPdl(kernel, dim3(grid), dim3(kGemmThreads), T::kSharedBytes, stream, x_map, x2_map, w_map,
                              x_rows, F, d, out),
                    op);
}

// x [x_rows, d] (and x2) against the stacked [2F, d] weights w with epilogue kE, the tile
// width by TileColumns; Unavailable where FusedGemmSupported is not.
template <Epilogue kE>
Status FusedGemm(const bf16* x, const bf16* x2, int64_t x_rows, int64_t d, const bf16* w, int64_t F,
                 const EpilogueArgs& out, bool on, const char* op, cudaStream_t stream) {
  if (!FusedGemmSupported(x_rows, d, F, on)) {
    return Status::Unavailable(std::string(op) + ": no sm_90a kernel for this device or shape");
  }
  if (out.rows > x_rows) return Status::InvalidArgument(std::string(op) + ": more rows written than read");
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  if (TileColumns(x_rows, F, sms) == 64) return LaunchFusedGemm<64, kE>(x, x2, x_rows, d, w, F, out, sms, op, stream);
  return LaunchFusedGemm<128, kE>(x, x2, x_rows, d, w, F, out, sms, op, stream);
}

bool SwiGluOn() {
  static const bool on = SwitchedOn("LM2_CUDA_FUSED_SWIGLU");
  return on;
}
bool GatedResidualOn() {
  static const bool on = SwitchedOn("LM2_CUDA_FUSED_GATED_RESIDUAL");
  return on;
}

}  // namespace

bool LinearSwiGluSupported(int64_t rows, int64_t d, int64_t F) { return FusedGemmSupported(rows, d, F, SwiGluOn()); }

Status LinearSwiGlu(const bf16* x, int64_t rows, int64_t d, const bf16* w_gate_up, int64_t F, bf16* y,
                    cudaStream_t stream) {
  return FusedGemm<Epilogue::kSwiGlu>(x, x, rows, d, w_gate_up, F, {.y = y, .rows = rows}, SwiGluOn(),
                                      "LinearSwiGlu", stream);
}

bool LinearGatedResidualSupported(int64_t rows, int64_t d) {
  return FusedGemmSupported(rows, d, d, GatedResidualOn());
}

Status LinearGatedResidual(const bf16* x_pair, int64_t x_rows, int64_t rows, int64_t d, const bf16* w_pair,
                           const float* bias, const float* e, float* h, cudaStream_t stream) {
  return FusedGemm<Epilogue::kGatedResidual>(x_pair, x_pair + x_rows * d, x_rows, d, w_pair, d,
                                             {.h = h, .e = e, .bias = bias, .rows = rows}, GatedResidualOn(),
                                             "LinearGatedResidual", stream);
}

}  // namespace lm2::runtime::cuda
