// The FFN's gate|up projection and its SwiGLU as one GEMM on Hopper's warpgroup MMA (wgmma,
// sm_90a): y[rows, F] = bf16(silu(g) · u) with g = bf16(x W_gateᵀ), u = bf16(x W_upᵀ), x
// [rows, d] and W_gate|W_up the stacked [2F, d] bf16 weights; what LinearToBf16 followed by
// SwiGluBf16 gives, to the GEMM's summation order, without the [rows, 2F] intermediate's
// store and reload.
//
// A persistent grid, a block per multiprocessor over output tiles of 128 rows x kCols gate
// and kCols up columns (tile t: rows (t mod m_tiles) · 128, columns (t / m_tiles) · kCols, so
// the blocks running at once share their weight columns); kCols is 128, or 64 where
// 128-column tiles would not fill the multiprocessors (a few hundred rows). A block is three
// warpgroups: a producer whose one thread brings, per 64-wide step of k, the tile's x rows
// and its gate and up weight rows by tensor copies (tma.cuh: 48 or 32 KiB a stage, 192 KiB
// of stages on transaction barriers), and two consumer warpgroups of 64 rows each that take
// each stage as four m64nNk16 products (N = 2 kCols: the gate then the up columns, one
// accumulator of 64 x N a warpgroup, N / 2 registers a thread) and release it once the
// products after it are issued. A thread holds gate column c and up column c of the same
// rows, so the epilogue is elementwise in registers; the producer meanwhile fills the next
// tile's stages.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "cuda/mbarrier.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

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

// A tile's shape by its gate columns (and as many up columns): 128, or 64 where 128-column
// tiles would leave multiprocessors idle (a few hundred rows).
template <int kCols>
struct Tiles {
  static constexpr int kWBytes = kCols * kSwizzleRowBytes;                  // each: gate, up
  static constexpr int kStageBytes = kXBytes + 2 * kWBytes;                 // 48 or 32 KiB
  static constexpr int kStages = kRingBytes / kStageBytes;                  // 4 or 6
  static constexpr int kAccumulators = kCols / 4;                           // 8-column groups of gate | up
  static constexpr int kSharedBytes = kSwizzleAtomBytes + kStages * kStageBytes + 2 * kStages * 8;
};

#define LM2_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LM2_ACC32(i) \
  LM2_ACC4(i), LM2_ACC4(i + 1), LM2_ACC4(i + 2), LM2_ACC4(i + 3), LM2_ACC4(i + 4), LM2_ACC4(i + 5), LM2_ACC4(i + 6), \
      LM2_ACC4(i + 7)

// d[64 x N] (+)= A[64 x 16] · B[16 x N] (N = 8 x R: 256 or 128), both from swizzled shared
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

#undef LM2_ACC32
#undef LM2_ACC4

template <int kCols>
__global__ void __launch_bounds__(kGemmThreads, 1)
    LinearSwiGluKernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                       int64_t rows, int64_t F, int64_t d, bf16* __restrict__ y) {
#if LM2_WGMMA
  using T = Tiles<kCols>;
  constexpr int kStages = T::kStages, kStageBytes = T::kStageBytes, kWBytes = T::kWBytes;
  extern __shared__ __align__(16) unsigned char smem[];
  char* stages = reinterpret_cast<char*>(smem) +
                 (kSwizzleAtomBytes - SharedAddress(smem) % kSwizzleAtomBytes) % kSwizzleAtomBytes;
  auto* full = reinterpret_cast<uint64_t*>(stages + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warpgroup = static_cast<int>(threadIdx.x) / 128;
  const int m_tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
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
          const bool second = m0 + kHalfRows < rows;
          BarrierExpectBytes(&full[s], kStageBytes - (second ? 0 : kXHalfBytes));
          TensorTile(stage, &x_map, k * kStepK, m0, &full[s]);
          if (second) TensorTile(stage + kXHalfBytes, &x_map, k * kStepK, m0 + kHalfRows, &full[s]);
          TensorTile(stage + kXBytes, &w_map, k * kStepK, n0, &full[s]);
          TensorTile(stage + kXBytes + kWBytes, &w_map, k * kStepK, static_cast<int>(F) + n0, &full[s]);
        }
      }
    }
    return;
  }

  const int half = warpgroup - 1;  // this warpgroup's 64 rows of the tile
  const int warp = static_cast<int>(threadIdx.x) / 32 % 4, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  float acc[T::kAccumulators][4];
  int it = 0;
  for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
    const int m0 = (tile % m_tiles) * kTileRows, n0 = (tile / m_tiles) * kCols;
    if (m0 + half * kHalfRows >= rows) {  // no rows of this warpgroup in the tile: pass the stages on
      for (int k = 0; k < steps; ++k, ++it) {
        const int s = it % kStages;
        BarrierWait(&full[s], static_cast<uint32_t>(it / kStages) & 1);
        __syncwarp();
        if (lane == 0) BarrierArrive(&empty[s]);
      }
      continue;
    }
    for (int k = 0; k < steps; ++k, ++it) {
      const int s = it % kStages;
      BarrierWait(&full[s], static_cast<uint32_t>(it / kStages) & 1);
      const char* stage = stages + s * kStageBytes;
      const uint64_t a = SwizzledTileDescriptor(stage + half * kXHalfBytes);
      const uint64_t b = SwizzledTileDescriptor(stage + kXBytes);
      FenceOperands(acc);
      WgmmaFence();
#pragma unroll
      for (int kc = 0; kc < kStepK / 16; ++kc) {
        Mma64xN(acc, a + kc * kDescriptorColumnStep, b + kc * kDescriptorColumnStep, k > 0 || kc > 0);
      }
      WgmmaCommit();
      FenceOperands(acc);
      WgmmaWait<1>();  // the stage before's products are done: its buffers go back to the producer
      FenceOperands(acc);
      if (k > 0) {
        __syncwarp();
        if (lane == 0) BarrierArrive(&empty[(it - 1) % kStages]);
      }
    }
    WgmmaWait<0>();
    FenceOperands(acc);
    __syncwarp();
    if (lane == 0) BarrierArrive(&empty[(it - 1) % kStages]);

    // gate column 8i + 2t (+1) in acc[i], up's in acc[i + kCols / 8]; both rounded to bf16 first.
    constexpr int kUp = kCols / 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + half * kHalfRows + warp * 16 + g + 8 * r;
      if (row >= rows) continue;
      bf16* out = y + row * F + n0 + 2 * t;
#pragma unroll
      for (int i = 0; i < kUp; ++i) {
        const float2 gate = __bfloat1622float2(__floats2bfloat162_rn(acc[i][2 * r], acc[i][2 * r + 1]));
        const float2 up = __bfloat1622float2(__floats2bfloat162_rn(acc[i + kUp][2 * r], acc[i + kUp][2 * r + 1]));
        *reinterpret_cast<__nv_bfloat162*>(out + 8 * i) =
            __floats2bfloat162_rn(SwiGluOf(gate.x, up.x), SwiGluOf(gate.y, up.y));
      }
    }
  }
#else
  __trap();  // launched only where the build has sm_90a code (LinearSwiGluSupported)
#endif
}

#if defined(LM2_CUDA_SM90A)
LM2_CUDA_KERNEL_MODULE(LinearSwiGluKernel<128>);
#endif

// The tile width and its kernel, launched with grid (persistent: a block per multiprocessor
// at most) and shared memory as its Tiles give.
template <int kCols>
Status LaunchLinearSwiGlu(const bf16* x, int64_t rows, int64_t d, const bf16* w_gate_up, int64_t F, bf16* y,
                          int sms, cudaStream_t stream) {
  using T = Tiles<kCols>;
  LM2_ASSIGN_OR_RETURN(const CUtensorMap x_map, SwizzledRowsMap(x, rows, d, d, kHalfRows, "LinearSwiGlu"));
  LM2_ASSIGN_OR_RETURN(const CUtensorMap w_map, SwizzledRowsMap(w_gate_up, 2 * F, d, d, kCols, "LinearSwiGlu"));
  const auto kernel = &LinearSwiGluKernel<kCols>;
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), T::kSharedBytes, "LinearSwiGlu"));
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows * (F / kCols);
  const auto grid = static_cast<unsigned int>(std::min<int64_t>(tiles, sms));
  return CudaStatus(
      LaunchPdl(kernel, dim3(grid), dim3(kGemmThreads), T::kSharedBytes, stream, x_map, w_map, rows, F, d, y),
      "LinearSwiGlu");
}

// The tile width for rows x F on `sms` multiprocessors, 0 for none: 64 columns where their
// tiles fit in one round over the multiprocessors (a chunk of up to 128 rows at F 8192), 128
// where the last round of those tiles is nearly full. Elsewhere the blocks of the last round
// would run alone while the rest wait: on the H200 (132 SMs, F 8192) the kernel took 47.1
// µs at 384 rows (192 tiles of 128 columns, or 384 of 64, in 3 rounds) and 75.8 at 640 (320
// tiles: 81% of 3 rounds) against the GEMM and SwiGluBf16's 42.2 and 66.5, while at 97%
// (256, 512, 1,024 and 2,048 rows) it was 6-9% faster (docs/benchmarks.md).
int TileColumns(int64_t rows, int64_t F, int sms) {
  constexpr double kMinRoundFill = 0.92;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows * (F / 128);
  if (2 * tiles <= sms) return 64;
  const int64_t rounds = (tiles + sms - 1) / sms;
  return static_cast<double>(tiles) >= kMinRoundFill * static_cast<double>(rounds * sms) ? 128 : 0;
}

// The current device's multiprocessors where it runs this file's kernels (compute
// capability 9.0 in a build with the sm_90a code, the driver's tensor-map encoder), else 0.
int WgmmaGemmMultiprocessors() {
#if defined(LM2_CUDA_SM90A)
  if (!ComputeCapability90OnCurrentDevice() || TensorMapEncoder() == nullptr) return 0;
  const Result<int> sms = Multiprocessors();
  return sms.ok() ? *sms : 0;
#else
  return 0;
#endif
}

}  // namespace

bool LinearSwiGluSupported(int64_t rows, int64_t d, int64_t F) {
  static const bool on = [] {  // read once per process; "0": cuBLAS's GEMM and SwiGluBf16 instead
    const char* v = std::getenv("LM2_CUDA_FUSED_SWIGLU");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!on || d % kStepK != 0 || F % 128 != 0 || d <= 0 || F <= 0 || rows <= 0) return false;
  const int sms = WgmmaGemmMultiprocessors();
  return sms > 0 && TileColumns(rows, F, sms) > 0;
}

Status LinearSwiGlu(const bf16* x, int64_t rows, int64_t d, const bf16* w_gate_up, int64_t F, bf16* y,
                    cudaStream_t stream) {
  if (!LinearSwiGluSupported(rows, d, F)) {
    return Status::Unavailable("LinearSwiGlu: no sm_90a kernel for this device or shape");
  }
  LM2_RETURN_IF_ERROR(RequireNonNull("LinearSwiGlu", {x, w_gate_up, y}));
  // The tensor copies read x and the weights from 16-byte aligned rows (d a multiple of 64);
  // the epilogue stores pairs of bf16.
  if (!Aligned16({x, w_gate_up}) || reinterpret_cast<uintptr_t>(y) % 4 != 0) {
    return Status::InvalidArgument("LinearSwiGlu: x and the weights must be 16-byte aligned, y 4-byte aligned");
  }
  const int sms = WgmmaGemmMultiprocessors();
  if (TileColumns(rows, F, sms) == 64) return LaunchLinearSwiGlu<64>(x, rows, d, w_gate_up, F, y, sms, stream);
  return LaunchLinearSwiGlu<128>(x, rows, d, w_gate_up, F, y, sms, stream);
}

}  // namespace lm2::runtime::cuda
