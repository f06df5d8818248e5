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
//
// The FFN's down projection on the same machinery (LinearAddSplitK): y[rows, out] += x[rows,
// in] · Wᵀ in fp32 with the sums over k split across a cluster of P blocks (2, 4 or 8). Its
// output is narrow (out = d) and its k long (F), so at a few hundred rows whole-k tiles are
// too few for the multiprocessors (cuBLAS runs 128 x 64 tiles over all of k = 8,192 there,
// the tensor pipes half idle on shared-memory reads): here each tile of 128 rows x 256
// columns is taken by a cluster whose block p runs the p-th part of k, the same stages and
// m64n256k16 products as above (the 256 columns as two 128-row copies of W). Then each block
// sends its partial sums, row by row, to the block that owns those rows (block p: rows
// [128 p / P, 128 (p + 1) / P)) through distributed shared memory, and after a cluster
// barrier every block adds its rows' P partials in the order of p and then y's value: the
// same bits on every run, whatever order the blocks finish in.
#include <cooperative_groups.h>
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda/cluster_launch.cuh"
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

// A block's ring of stages in its dynamic shared memory (aligned to the swizzle's 1 KiB) and
// their barriers: full[s] completes once stage s's copies have landed, empty[s] once every
// consumer warp has released it. `it` counts the stages a thread has passed, over all its
// tiles (stage it mod kStages, phase it / kStages).
template <int kCols>
struct Ring {
  using T = Tiles<kCols>;
  static constexpr int kStages = T::kStages, kStageBytes = T::kStageBytes, kWBytes = T::kWBytes;
  char* stages;
  uint64_t* full;
  uint64_t* empty;

  __device__ explicit Ring(unsigned char* smem)
      : stages(reinterpret_cast<char*>(smem) +
               (kSwizzleAtomBytes - SharedAddress(smem) % kSwizzleAtomBytes) % kSwizzleAtomBytes),
        full(reinterpret_cast<uint64_t*>(stages + kStages * kStageBytes)),
        empty(full + kStages) {}

  // Thread 0 sets the barriers up; the block's threads wait for that.
  __device__ void Init() const {
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        BarrierInit(&full[s], 1);
        BarrierInit(&empty[s], 8);  // every consumer warp
      }
    }
    __syncthreads();
  }

  // The producer thread: `steps` stages from step k0 of k on, each x's rows m0 (and m0 + 64
  // where any are in the matrix) and weight rows w0 and w1 (kCols each, back to back).
  __device__ void Produce(int& it, const CUtensorMap* x_map, const CUtensorMap* w_map, int64_t rows, int m0, int w0,
                          int w1, int k0, int steps) const {
    // x's second 64 rows only where any are in the matrix (rows a multiple of 64, as the
    // model's are, never copy a box partly past the end, whose zero fill is slow).
    const bool second = m0 + kHalfRows < rows;
    for (int k = k0; k < k0 + steps; ++k, ++it) {
      const int s = it % kStages;
      if (it >= kStages) BarrierWait(&empty[s], static_cast<uint32_t>(it / kStages - 1) & 1);
      char* stage = stages + s * kStageBytes;
      BarrierExpectBytes(&full[s], kStageBytes - (second ? 0 : kXHalfBytes));
      TensorTile(stage, x_map, k * kStepK, m0, &full[s]);
      if (second) TensorTile(stage + kXHalfBytes, x_map, k * kStepK, m0 + kHalfRows, &full[s]);
      TensorTile(stage + kXBytes, w_map, k * kStepK, w0, &full[s]);
      TensorTile(stage + kXBytes + kWBytes, w_map, k * kStepK, w1, &full[s]);
    }
  }

  // Consumer warpgroup `half`: acc = its 64 rows of x times the stages' 2 kCols weight rows
  // over `steps` stages, each released once the products after it are issued; a warpgroup
  // without rows in the tile (has_rows false) passes the stages on and leaves acc as it is.
  __device__ void Consume(int& it, float (&acc)[T::kAccumulators][4], int half, bool has_rows, int steps) const {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    if (!has_rows) {
      for (int k = 0; k < steps; ++k, ++it) {
        const int s = it % kStages;
        BarrierWait(&full[s], static_cast<uint32_t>(it / kStages) & 1);
        __syncwarp();
        if (lane == 0) BarrierArrive(&empty[s]);
      }
      return;
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
  }
};

template <int kCols>
__global__ void __launch_bounds__(kGemmThreads, 1)
    LinearSwiGluKernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                       int64_t rows, int64_t F, int64_t d, bf16* __restrict__ y) {
#if LM2_WGMMA
  extern __shared__ __align__(16) unsigned char smem[];
  const Ring<kCols> ring(smem);
  ring.Init();
  WaitForPredecessor();  // x is the kernel before's output (LaunchPdl)
  AllowDependents();
  const int warpgroup = static_cast<int>(threadIdx.x) / 128;
  const int m_tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
  const int tiles = m_tiles * static_cast<int>(F / kCols), steps = static_cast<int>(d / kStepK);

  if (warpgroup == 0) {  // the producer
    if (threadIdx.x == 0) {
      int it = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
        const int m0 = (tile % m_tiles) * kTileRows, n0 = (tile / m_tiles) * kCols;
        ring.Produce(it, &x_map, &w_map, rows, m0, n0, static_cast<int>(F) + n0, 0, steps);
      }
    }
    return;
  }

  const int half = warpgroup - 1;  // this warpgroup's 64 rows of the tile
  const int warp = static_cast<int>(threadIdx.x) / 32 % 4, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  float acc[Tiles<kCols>::kAccumulators][4];
  int it = 0;
  for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
    const int m0 = (tile % m_tiles) * kTileRows, n0 = (tile / m_tiles) * kCols;
    const bool has_rows = m0 + half * kHalfRows < rows;
    ring.Consume(it, acc, half, has_rows, steps);
    if (!has_rows) continue;

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

// The split-k down projection's partial sums on their way to the block that owns their rows:
// [P][128 / P rows][2 kCols columns], each row padded by 8 floats (a warp's 8-byte stores of
// its eight rows then fall in two wavefronts), over the block's stages (free by then).
template <int kCols>
constexpr int kExchangeLd = 2 * kCols + 8;
static_assert(kTileRows * kExchangeLd<128> * 4 <= Tiles<128>::kStages * Tiles<128>::kStageBytes);
static_assert(kTileRows * kExchangeLd<64> * 4 <= Tiles<64>::kStages * Tiles<64>::kStageBytes);

// y[rows, out] += x[rows, in] · Wᵀ: a cluster of kSplit blocks (along z, block z the z-th
// part of k) per tile of 128 rows (blockIdx.y) x 2 kCols columns (blockIdx.x).
template <int kCols, int kSplit>
__global__ void __launch_bounds__(kGemmThreads, 1)
    LinearAddSplitKKernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                          int64_t rows, int64_t in, int64_t out, float* __restrict__ y) {
#if LM2_WGMMA
  namespace cg = cooperative_groups;
  constexpr int kOut = 2 * kCols, kLd = kExchangeLd<kCols>;
  constexpr int kOwnRows = kTileRows / kSplit;  // a warp's 16 rows always have one owner
  static_assert(kOwnRows >= 16);
  extern __shared__ __align__(16) unsigned char smem[];
  const Ring<kCols> ring(smem);
  ring.Init();
  WaitForPredecessor();  // x is the kernel before's output, y the residual stream (LaunchPdl)
  AllowDependents();
  cg::cluster_group cluster = cg::this_cluster();
  const int warpgroup = static_cast<int>(threadIdx.x) / 128, part = static_cast<int>(blockIdx.z);
  const int m0 = static_cast<int>(blockIdx.y) * kTileRows, n0 = static_cast<int>(blockIdx.x) * kOut;
  const int steps = static_cast<int>(in / kStepK) / kSplit;
  const int half = warpgroup - 1;
  const bool has_rows = half >= 0 && m0 + half * kHalfRows < rows;
  float acc[Tiles<kCols>::kAccumulators][4];
  if (warpgroup == 0) {  // the producer: stays for the cluster barriers
    if (threadIdx.x == 0) {
      int it = 0;
      ring.Produce(it, &x_map, &w_map, rows, m0, n0, n0 + kCols, part * steps, steps);
    }
  } else {
    int it = 0;
    ring.Consume(it, acc, half, has_rows, steps);
  }
  cluster.sync();  // every block of the cluster is done with its stages

  auto* exchange = reinterpret_cast<float*>(ring.stages);
  if (has_rows) {
    const int warp = static_cast<int>(threadIdx.x) / 32 % 4, lane = static_cast<int>(threadIdx.x) % 32;
    const int g = lane / 4, t = lane % 4;
    const int row0 = half * kHalfRows + warp * 16;  // the warp's first row of the tile
    float* to = cluster.map_shared_rank(exchange, row0 / kOwnRows) + (part * kOwnRows + row0 % kOwnRows + g) * kLd +
                2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (m0 + row0 + g + 8 * r >= rows) continue;
#pragma unroll
      for (int i = 0; i < kOut / 8; ++i) {
        *reinterpret_cast<float2*>(to + 8 * r * kLd + 8 * i) = make_float2(acc[i][2 * r], acc[i][2 * r + 1]);
      }
    }
  }
  cluster.sync();  // every partial of this block's rows has arrived

  // This block's rows, four columns a thread at a time: the parts' sums in the order of the
  // parts, then y's value.
  const int own0 = part * kOwnRows;
  for (int i = static_cast<int>(threadIdx.x); i < kOwnRows * kOut / 4; i += kGemmThreads) {
    const int r = i / (kOut / 4), c = 4 * (i % (kOut / 4));
    const int64_t row = m0 + own0 + r;
    if (row >= rows) break;  // and every later i: its rows are further on
    float4 sum = *reinterpret_cast<const float4*>(exchange + r * kLd + c);
#pragma unroll
    for (int p = 1; p < kSplit; ++p) {
      const float4 v = *reinterpret_cast<const float4*>(exchange + (p * kOwnRows + r) * kLd + c);
      sum = make_float4(sum.x + v.x, sum.y + v.y, sum.z + v.z, sum.w + v.w);
    }
    auto* dst = reinterpret_cast<float4*>(y + row * out + n0 + c);
    const float4 h = *dst;
    *dst = make_float4(h.x + sum.x, h.y + sum.y, h.z + sum.z, h.w + sum.w);
  }
#else
  __trap();  // launched only where the build has sm_90a code (LinearAddSplitKSupported)
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
// capability 9.0 in a build with the sm_90a code, the driver's tensor-map encoder), else 0;
// read once per device (the model asks before every layer's GEMMs).
int WgmmaGemmMultiprocessors() {
#if defined(LM2_CUDA_SM90A)
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices];  // multiprocessors + 1; 0: not read yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const auto read = [] {
    const Result<int> major = CurrentDeviceAttribute(cudaDevAttrComputeCapabilityMajor);
    const Result<int> minor = CurrentDeviceAttribute(cudaDevAttrComputeCapabilityMinor);
    const Result<int> sms = Multiprocessors();
    const bool runs = major.ok() && minor.ok() && sms.ok() && *major == 9 && *minor == 0 &&
                      TensorMapEncoder() != nullptr;
    return runs ? *sms : 0;
  };
  if (device < 0 || device >= kDevices) return read();
  int cached = cache[device].load(std::memory_order_relaxed);
  if (cached == 0) {
    cached = read() + 1;
    cache[device].store(cached, std::memory_order_relaxed);
  }
  return cached - 1;
#else
  return 0;
#endif
}

// Whether the environment leaves a kernel on: `name` unset or anything but "0" (read once
// per process by the caller's static).
bool SwitchedOn(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The kernel of a plan (columns 128 or 256, parts 2, 4 or 8) and its shared memory.
const void* SplitKKernel(SplitKPlan plan) {
  const auto pick = [&](auto cols) -> const void* {
    constexpr int kCols = decltype(cols)::value;
    switch (plan.parts) {
      case 2: return reinterpret_cast<const void*>(&LinearAddSplitKKernel<kCols, 2>);
      case 4: return reinterpret_cast<const void*>(&LinearAddSplitKKernel<kCols, 4>);
      default: return reinterpret_cast<const void*>(&LinearAddSplitKKernel<kCols, 8>);
    }
  };
  return plan.columns == 256 ? pick(std::integral_constant<int, 128>{}) : pick(std::integral_constant<int, 64>{});
}
int SplitKSharedBytes(SplitKPlan plan) {
  return plan.columns == 256 ? Tiles<128>::kSharedBytes : Tiles<64>::kSharedBytes;
}

// Whether a plan fits rows x in → out: columns 128 or 256 dividing out, 2, 4 or 8 parts of
// k in whole 64-wide steps.
bool SplitKPlanFits(SplitKPlan plan, int64_t in, int64_t out) {
  return (plan.columns == 128 || plan.columns == 256) && (plan.parts == 2 || plan.parts == 4 || plan.parts == 8) &&
         out % plan.columns == 0 && in % (kStepK * plan.parts) == 0;
}

// The plan for rows x in → out on `sms` multiprocessors: of the tile widths and parts that
// fit, the one with the most blocks that all run at once, a block a multiprocessor, with
// every cluster on the device at once (MaxActiveClusters: a cluster's blocks share one GPC,
// so on the H200 fewer than 33 clusters of 4 of these blocks fit); of equal blocks the wider
// tiles, then the fewer parts. None (parts 0) where no plan puts more than half the
// multiprocessors to work: cuBLAS's own tiles fill them there.
Result<SplitKPlan> ChooseSplitKPlan(int64_t rows, int64_t in, int64_t out, int sms) {
  SplitKPlan best;
  int64_t best_blocks = sms / 2;
  for (const int columns : {256, 128}) {
    for (const int parts : {2, 4, 8}) {
      const SplitKPlan plan{columns, parts};
      if (!SplitKPlanFits(plan, in, out)) continue;
      const int64_t tiles = (rows + kTileRows - 1) / kTileRows * (out / columns), blocks = tiles * parts;
      if (blocks > sms || blocks <= best_blocks) continue;
      const void* kernel = SplitKKernel(plan);
      LM2_RETURN_IF_ERROR(EnsureSharedMemory(kernel, SplitKSharedBytes(plan), "LinearAddSplitK"));
      LM2_ASSIGN_OR_RETURN(const int clusters, MaxActiveClusters(kernel, parts, kGemmThreads, SplitKSharedBytes(plan)));
      if (tiles > clusters) continue;
      best = plan;
      best_blocks = blocks;
    }
  }
  return best;
}

template <int kCols, int kSplit>
Status LaunchLinearAddSplitK(const bf16* x, int64_t rows, int64_t in, const bf16* w, int64_t out, float* y,
                             cudaStream_t stream) {
  using T = Tiles<kCols>;
  LM2_ASSIGN_OR_RETURN(const CUtensorMap x_map, SwizzledRowsMap(x, rows, in, in, kHalfRows, "LinearAddSplitK"));
  LM2_ASSIGN_OR_RETURN(const CUtensorMap w_map, SwizzledRowsMap(w, out, in, in, kCols, "LinearAddSplitK"));
  const auto kernel = &LinearAddSplitKKernel<kCols, kSplit>;
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), T::kSharedBytes, "LinearAddSplitK"));
  const ClusterLaunch launch(dim3(static_cast<unsigned int>(out / (2 * kCols)),
                                  static_cast<unsigned int>((rows + kTileRows - 1) / kTileRows), kSplit),
                             kGemmThreads, T::kSharedBytes, stream, kSplit, /*pdl=*/true);
  return CudaStatus(cudaLaunchKernelEx(&launch.config, kernel, x_map, w_map, rows, in, out, y), "LinearAddSplitK");
}

template <int kCols>
Status LaunchLinearAddSplitK(int parts, const bf16* x, int64_t rows, int64_t in, const bf16* w, int64_t out,
                             float* y, cudaStream_t stream) {
  switch (parts) {
    case 8: return LaunchLinearAddSplitK<kCols, 8>(x, rows, in, w, out, y, stream);
    case 4: return LaunchLinearAddSplitK<kCols, 4>(x, rows, in, w, out, y, stream);
    default: return LaunchLinearAddSplitK<kCols, 2>(x, rows, in, w, out, y, stream);
  }
}

}  // namespace

bool LinearSwiGluSupported(int64_t rows, int64_t d, int64_t F) {
  static const bool on = SwitchedOn("LM2_CUDA_FUSED_SWIGLU");  // "0": cuBLAS's GEMM and SwiGluBf16 instead
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

SplitKPlan LinearAddSplitKPlan(int64_t rows, int64_t in, int64_t out) {
  static const bool on = SwitchedOn("LM2_CUDA_SPLITK");  // "0": cuBLAS's GEMM instead
  if (!on || in <= 0 || out <= 0 || rows <= 0) return {};
  const int sms = WgmmaGemmMultiprocessors();
  if (sms == 0) return {};
  const Result<SplitKPlan> plan = ChooseSplitKPlan(rows, in, out, sms);
  return plan.ok() ? *plan : SplitKPlan{};
}

bool LinearAddSplitKSupported(int64_t rows, int64_t in, int64_t out) {
  return LinearAddSplitKPlan(rows, in, out).parts > 0;
}

Status LinearAddSplitK(const bf16* x, int64_t rows, int64_t in, const bf16* w, int64_t out, float* y,
                       cudaStream_t stream, SplitKPlan plan) {
  if (plan.parts == 0) {
    plan = LinearAddSplitKPlan(rows, in, out);
    if (plan.parts == 0) return Status::Unavailable("LinearAddSplitK: no sm_90a kernel for this device or shape");
  } else if (WgmmaGemmMultiprocessors() == 0) {
    return Status::Unavailable("LinearAddSplitK: no sm_90a kernel for this device");
  } else if (rows <= 0 || !SplitKPlanFits(plan, in, out)) {
    return Status::InvalidArgument("LinearAddSplitK: a plan of " + std::to_string(plan.columns) + " columns and " +
                                   std::to_string(plan.parts) + " parts does not fit " + std::to_string(rows) + " x " +
                                   std::to_string(in) + " -> " + std::to_string(out));
  }
  LM2_RETURN_IF_ERROR(RequireNonNull("LinearAddSplitK", {x, w, y}));
  // The tensor copies read 16-byte aligned rows (in a multiple of 64); the sums are added
  // into y four floats at a time (out a multiple of 128).
  if (!Aligned16({x, w, y})) {
    return Status::InvalidArgument("LinearAddSplitK: x, the weights and y must be 16-byte aligned");
  }
  if (plan.columns == 256) return LaunchLinearAddSplitK<128>(plan.parts, x, rows, in, w, out, y, stream);
  return LaunchLinearAddSplitK<64>(plan.parts, x, rows, in, w, out, y, stream);
}

}  // namespace lm2::runtime::cuda
