// EXPERIMENT: SkinnyLinear with the weights through a deep ring of tiled tensor copies (TMA,
// one copy a 128 x 64 tile, 128-byte swizzle, 8 stages of 16 KB, mbarriers) and x through a
// shallow cp.async ring; blocks of 8 warps own 128 output columns, one block an SM.
// Linear layers of a few dozen rows: y[rows, out] = x[rows, in] · W[out, in]ᵀ on tensor cores.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "cuda/mma.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 8, kBlockThreads = 32 * kWarps;
constexpr int kBn = 16 * kWarps, kBk = 64;  // a block's output columns (a warp 16), the k of a chunk
constexpr int kWStages = 8, kXStages = 6;   // weights from DRAM; x from L2
constexpr int kLd = kBk + 8;  // shared row stride in elements (144 bytes: ldmatrix rows on distinct banks)
constexpr int kPieces = kBk / 8;  // 16-byte pieces of a chunk's row

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kBulkCopies = false;  // (the launcher never runs this kernel below sm_90)
#else
constexpr bool kBulkCopies = true;
#endif

// A transaction barrier for one arrival (the copying lane's) and the bytes it expects.
__device__ __forceinline__ void BarrierInit(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SharedAddress(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

__device__ __forceinline__ void BarrierExpectBytes(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SharedAddress(bar)), "r"(bytes)
               : "memory");
#endif
}

// Waits for the barrier's phase `parity` to complete (its bytes landed).
__device__ __forceinline__ void BarrierWait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(SharedAddress(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}

__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}

__device__ __forceinline__ uint64_t EvictLastPolicy() {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}

// The [128 rows x 64 k] box of W at (k, n) into 1024-byte-aligned shared dst, counted on `bar`.
__device__ __forceinline__ void TensorCopy(void* dst, const CUtensorMap* map, int k, int n, uint64_t* bar,
                                           uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(SharedAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k), "r"(n), "r"(SharedAddress(bar)), "l"(policy)
      : "memory");
#endif
}

// Orders this thread's earlier shared-memory reads (through the barrier before it, every
// thread's) before the bulk copies it issues next.
__device__ __forceinline__ void FenceBeforeBulkCopy() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LM2_SKINNY_WGMMA 1
#else
#define LM2_SKINNY_WGMMA 0
#endif

// (memory_tiled_sm90.cu's) the matrix descriptor of a 1024-byte-aligned tile of 128-byte rows
// in the 128-byte swizzle, and its four 16-wide steps along the rows.
__device__ __forceinline__ uint64_t TileDescriptor(const void* tile) {
  const uint64_t address = SharedAddress(tile);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void ColumnSteps(const void* tile, uint64_t (&steps)[4]) {
  const uint64_t first = TileDescriptor(tile);
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) steps[kc] = first + kc * 2;
}

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

// d[64 x 64] += A[64 x 64] · Bᵀ, A and B both tiles of 64 k-wide rows (K-major).
__device__ __forceinline__ void Mma64x64x64(float (&d)[8][4], const uint64_t (&a)[4], const uint64_t (&b)[4]) {
#if LM2_SKINNY_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.eq.b32 p, 0, 0;\n"
      "wgmma.fence.sync.aligned;\n"
      LM2_WGMMA_STEP("%32", "%36", "p") ", 0, 0;\n"
      LM2_WGMMA_STEP("%33", "%37", "p") ", 0, 0;\n"
      LM2_WGMMA_STEP("%34", "%38", "p") ", 0, 0;\n"
      LM2_WGMMA_STEP("%35", "%39", "p") ", 0, 0;\n"
      "wgmma.commit_group.sync.aligned;\n"
      "wgmma.wait_group.sync.aligned 0;\n"
      "}\n"
      : LM2_WGMMA_ACCUMULATORS
      : "l"(a[0]), "l"(a[1]), "l"(a[2]), "l"(a[3]), "l"(b[0]), "l"(b[1]), "l"(b[2]), "l"(b[3])
      : "memory");
#endif
}
#undef LM2_WGMMA_ACCUMULATORS
#undef LM2_WGMMA_STEP

// This form: rows padded to 64 (the x box), a stage = the weights' 128 x 64 tile and x's 64 x 64.
struct SharedW {
  bf16 w[kWStages][kBn][kBk];
  bf16 x[kWStages][64][kBk];
  uint64_t full[kWStages];
};

__global__ void __launch_bounds__(kBlockThreads, 1)
    SkinnyWgmmaKernel(const SkinnyArgs a, const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap x_map) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  auto& sh = *reinterpret_cast<SharedW*>(shared_raw + ((1024 - (SharedAddress(shared_raw) & 1023)) & 1023));
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int rows = static_cast<int>(a.rows);
  const int64_t in = a.in, out = a.out, n0 = static_cast<int64_t>(blockIdx.x) * kBn;
  const int splits = static_cast<int>(gridDim.y), split = static_cast<int>(blockIdx.y);
  const int64_t chunks = (in + kBk - 1) / kBk;
  const int64_t c0 = chunks * split / splits, nc = chunks * (split + 1) / splits - c0;
  if (tid == 0) {
    for (int s = 0; s < kWStages; ++s) BarrierInit(&sh.full[s]);
  }
  __syncthreads();
  const uint64_t policy = EvictFirstPolicy(), x_policy = EvictLastPolicy();
  constexpr auto kStageBytes = static_cast<uint32_t>(sizeof(sh.w[0]) + sizeof(sh.x[0]));
  if (tid == 0) {
    for (int s = 0; s < kWStages - 1 && s < nc; ++s) {
      BarrierExpectBytes(&sh.full[s], kStageBytes);
      TensorCopy(&sh.w[s][0][0], &w_map, static_cast<int>((c0 + s) * kBk), static_cast<int>(n0), &sh.full[s], policy);
    }
  }
  WaitForPredecessor();
  AllowDependents();
  if (tid == 0) {
    for (int s = 0; s < kWStages - 1 && s < nc; ++s) {
      TensorCopy(&sh.x[s][0][0], &x_map, static_cast<int>((c0 + s) * kBk), 0, &sh.full[s], x_policy);
    }
  }
  const int wg = warp / 4;  // this warpgroup's 64 columns of the block's 128
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  for (int64_t i = 0; i < nc; ++i) {
    const int st = static_cast<int>(i % kWStages);
    BarrierWait(&sh.full[st], static_cast<uint32_t>((i / kWStages) & 1));
    __syncthreads();  // every warpgroup done with chunk i - 1's stage, which the next copy refills
    const int64_t next = i + kWStages - 1;
    if (tid == 0 && next < nc) {
      const int ns = static_cast<int>(next % kWStages);
      FenceBeforeBulkCopy();
      BarrierExpectBytes(&sh.full[ns], kStageBytes);
      TensorCopy(&sh.w[ns][0][0], &w_map, static_cast<int>((c0 + next) * kBk), static_cast<int>(n0), &sh.full[ns], policy);
      TensorCopy(&sh.x[ns][0][0], &x_map, static_cast<int>((c0 + next) * kBk), 0, &sh.full[ns], x_policy);
    }
    uint64_t da[4], db[4];
    ColumnSteps(&sh.x[st][0][0], da);
    ColumnSteps(&sh.w[st][wg * 64][0], db);
    Mma64x64x64(acc, da, db);
  }

  // Accumulator (i, e) of this thread: row 16 (warp % 4) + g (+ 8 for e >= 2), column
  // 64 wg + 8 i + 2 t (+ 1 for odd e).
  auto emit = [&](int row, int64_t col, float v0, float v1) {
    const int64_t at = row * out + col;
    if (a.y_bf16 != nullptr) {
      *reinterpret_cast<uint32_t*>(a.y_bf16 + at) = PackBf16x2(v0, v1);
    } else if (a.accumulate) {
      float2 y = *reinterpret_cast<const float2*>(a.y + at);
      *reinterpret_cast<float2*>(a.y + at) = make_float2(y.x + v0, y.y + v1);
    } else {
      *reinterpret_cast<float2*>(a.y + at) = make_float2(v0, v1);
    }
  };
  const int g = lane >> 2, t = lane & 3;
  if (splits == 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t col = n0 + wg * 64 + i * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * (warp % 4) + g + 8 * h;
        if (row < rows && col < out) emit(row, col, acc[i][2 * h], acc[i][2 * h + 1]);
      }
    }
    return;
  }
  // Split k: the tile's splits are one cluster (along y). Each block leaves its sums in its
  // shared memory (the ring, done with), and block r of the cluster adds rows r, r + splits,
  // ... of every block's, in split order, through distributed shared memory.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __syncthreads();  // every warpgroup done with the ring
  auto* sums = reinterpret_cast<float*>(&sh.w[0][0][0]);  // [64][kBn + 4]
  constexpr int kSumLd = kBn + 4;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int col = wg * 64 + i * 8 + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * (warp % 4) + g + 8 * h;
      *reinterpret_cast<float2*>(sums + row * kSumLd + col) = make_float2(acc[i][2 * h], acc[i][2 * h + 1]);
    }
  }
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  for (int p = tid; p < 64 * (kBn / 2); p += kBlockThreads) {
    const int row = (p / (kBn / 2)) * splits + rank;  // (rows interleaved over the cluster's blocks)
    const int c = 2 * (p % (kBn / 2));
    if (row >= rows) break;
    const int64_t col = n0 + c;
    if (col >= out) continue;
    float2 sum = make_float2(0.0f, 0.0f);
    for (int k = 0; k < splits; ++k) {
      const float2 v = *reinterpret_cast<const float2*>(cluster.map_shared_rank(sums, k) + row * kSumLd + c);
      sum = make_float2(sum.x + v.x, sum.y + v.y);
    }
    emit(row, col, sum.x, sum.y);
  }
  cluster.sync();  // no block leaves while the others read its sums
}

template <int MT>  // m16 tiles of rows
struct Shared {
  bf16 w[kWStages][kBn][kBk];  // dense 128-byte rows, 16-byte pieces swizzled: piece p of row r at p ^ (r % 8)
  bf16 x[kXStages][16 * MT][kLd];
  uint64_t full[kWStages];  // each weight stage's copies landed
};

template <int MT>
__global__ void __launch_bounds__(kBlockThreads, 1) SkinnyKernel(const SkinnyArgs a, const __grid_constant__ CUtensorMap w_map) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  // (the 128-byte swizzle repeats every 1024 bytes: the ring starts on such a boundary)
  auto& sh = *reinterpret_cast<Shared<MT>*>(
      shared_raw + ((1024 - (SharedAddress(shared_raw) & 1023)) & 1023));
  __shared__ unsigned int arrived;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int rows = static_cast<int>(a.rows);
  const int64_t in = a.in, out = a.out, n0 = static_cast<int64_t>(blockIdx.x) * kBn;
  const int splits = static_cast<int>(gridDim.y), split = static_cast<int>(blockIdx.y);
  const int64_t chunks = (in + kBk - 1) / kBk;
  const int64_t c0 = chunks * split / splits, nc = chunks * (split + 1) / splits - c0;
  if constexpr (!kBulkCopies) return;

  if (tid == 0) {
    for (int s = 0; s < kWStages; ++s) BarrierInit(&sh.full[s]);
  }
  __syncthreads();
  const uint64_t policy = EvictFirstPolicy();
  // Chunk c of the tile's weight rows into stage `stage`, by one thread (the tensor copy fills
  // rows past out and k past in with zeros, and counts the whole box).
  auto load_w = [&](int stage, int64_t c) {
    BarrierExpectBytes(&sh.full[stage], static_cast<uint32_t>(sizeof(sh.w[0])));
    TensorCopy(&sh.w[stage][0][0], &w_map, static_cast<int>(c * kBk), static_cast<int>(n0), &sh.full[stage], policy);
  };
  auto load_x = [&](int stage, int64_t c) {
#pragma unroll
    for (int i = 0; i < (16 * MT * kPieces + kBlockThreads - 1) / kBlockThreads; ++i) {
      const int p = tid + i * kBlockThreads, r = p / kPieces, q = p % kPieces;
      if (r >= 16 * MT) break;
      const int64_t k = c * kBk + q * 8;
      const bool valid = r < rows && k < in;
      CopyAsync16(&sh.x[stage][r][q * 8], valid ? a.x + r * in + k : a.x, valid);
    }
  };

  if (tid == 0) {
    for (int s = 0; s < kWStages - 1; ++s) {
      if (s < nc) load_w(s, c0 + s);
    }
  }
  WaitForPredecessor();
  AllowDependents();
  for (int s = 0; s < kXStages - 1; ++s) {
    if (s < nc) load_x(s, c0 + s);
    CopyAsyncCommit();
  }

  // Warps as WM x WN: over the columns alone at one m-tile, else two row halves x four column
  // quarters (fewer fragment reads of x per product). A warp: MW m-tiles x NW n8 tiles.
  constexpr int WM = MT >= 2 ? 2 : 1, WN = kWarps / WM, MW = MT / WM, NW = kBn / WN / 8;
  const int warp_m = warp / WN, warp_n = warp % WN;
  float acc[MW][NW][4];
#pragma unroll
  for (int m = 0; m < MW; ++m) {
#pragma unroll
    for (int j = 0; j < NW; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f;
    }
  }
  for (int64_t i = 0; i < nc; ++i) {
    const int ws = static_cast<int>(i % kWStages), xs = static_cast<int>(i % kXStages);
    CopyAsyncWait<kXStages - 2>();
    BarrierWait(&sh.full[ws], static_cast<uint32_t>((i / kWStages) & 1));
    __syncthreads();  // chunk i in for every thread; every warp done with chunk i - 1's buffers
    if (tid == 0 && i + kWStages - 1 < nc) {
      FenceBeforeBulkCopy();
      load_w(static_cast<int>((i + kWStages - 1) % kWStages), c0 + i + kWStages - 1);
    }
    if (i + kXStages - 1 < nc) load_x(static_cast<int>((i + kXStages - 1) % kXStages), c0 + i + kXStages - 1);
    CopyAsyncCommit();
#pragma unroll
    for (int kk = 0; kk < kBk; kk += 16) {
      uint32_t af[MW][4];
#pragma unroll
      for (int m = 0; m < MW; ++m) LoadA(af[m], &sh.x[xs][0][0], kLd, (warp_m * MW + m) * 16, kk);
#pragma unroll
      for (int j = 0; j < NW; j += 2) {
        uint32_t b[4];  // LoadBTransposed's fragments of n8 tiles j, j + 1, through the swizzle
        const int r = warp_n * NW * 8 + j * 8 + (lane & 7) + (lane >> 4) * 8, piece = kk / 8 + ((lane >> 3) & 1);
        LdMatrixX4<false>(b, &sh.w[ws][r][((piece ^ (r & 7)) * 8)]);
#pragma unroll
        for (int m = 0; m < MW; ++m) {
          MmaBf16(acc[m][j], af[m], b[0], b[1]);
          MmaBf16(acc[m][j + 1], af[m], b[2], b[3]);
        }
      }
    }
  }

  // The output of (row, column pairs): stored, added, or stored in bf16.
  auto emit = [&](int row, int64_t col, float v0, float v1) {
    const int64_t at = row * out + col;
    if (a.y_bf16 != nullptr) {
      *reinterpret_cast<uint32_t*>(a.y_bf16 + at) = PackBf16x2(v0, v1);
    } else if (a.accumulate) {
      float2 y = *reinterpret_cast<const float2*>(a.y + at);
      *reinterpret_cast<float2*>(a.y + at) = make_float2(y.x + v0, y.y + v1);
    } else {
      *reinterpret_cast<float2*>(a.y + at) = make_float2(v0, v1);
    }
  };
  const int g = lane >> 2, t = lane & 3;
  float* const partial = a.partials + static_cast<int64_t>(split) * rows * out;
#pragma unroll
  for (int m = 0; m < MW; ++m) {
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      const int64_t col = n0 + warp_n * NW * 8 + j * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = (warp_m * MW + m) * 16 + g + 8 * h;
        if (row >= rows || col >= out) continue;
        if (splits == 1) {
          emit(row, col, acc[m][j][2 * h], acc[m][j][2 * h + 1]);
        } else {
          *reinterpret_cast<float2*>(partial + row * out + col) = make_float2(acc[m][j][2 * h], acc[m][j][2 * h + 1]);
        }
      }
    }
  }
  if (splits == 1) return;

  // The column tile's last split to finish adds the splits' sums in order.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    arrived = atomicAdd(a.counters + blockIdx.x, 1u);
  }
  __syncthreads();
  if (arrived != static_cast<unsigned int>(splits - 1)) return;
  __threadfence();
  for (int p = tid; p < rows * (kBn / 2); p += kBlockThreads) {
    const int row = p / (kBn / 2);
    const int64_t col = n0 + 2 * (p % (kBn / 2));
    if (col >= out) continue;
    float2 s = make_float2(0.0f, 0.0f);
    for (int k = 0; k < splits; ++k) {
      const float2 v = __ldcg(reinterpret_cast<const float2*>(a.partials + (static_cast<int64_t>(k) * rows + row) * out + col));
      s = make_float2(s.x + v.x, s.y + v.y);
    }
    emit(row, col, s.x, s.y);
  }
  if (tid == 0) a.counters[blockIdx.x] = 0;  // every split has arrived: ready for the next call
}

// The tensor map of W [out, in] bf16 in boxes of 128 rows x 64 k, 128-byte swizzle.
Result<CUtensorMap> Map(const bf16* base, int64_t cols, int64_t rows, int box_rows);

Result<CUtensorMap> WeightMap(const SkinnyArgs& a) { return Map(a.w, a.in, a.out, kBn); }

Result<CUtensorMap> Map(const bf16* base, int64_t cols, int64_t rows, int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return Status::Unavailable("SkinnyLinear: no cuTensorMapEncodeTiled in this driver");
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {kBk, static_cast<cuuint32_t>(box_rows)}, element_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16*>(base), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return Status::Internal("SkinnyLinear: cuTensorMapEncodeTiled failed (" + std::to_string(r) + ")");
  return map;
}

template <int MT>
Status Launch(const SkinnyArgs& a, int64_t splits, cudaStream_t stream) {
  LM2_ASSIGN_OR_RETURN(const CUtensorMap map, WeightMap(a));
  const std::size_t smem = sizeof(Shared<MT>) + 1024;  // (room to align the ring to 1024 bytes)
  LM2_RETURN_IF_ERROR(CudaStatus(cudaFuncSetAttribute(SkinnyKernel<MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      static_cast<int>(smem)),
                                 "cudaFuncSetAttribute (SkinnyKernel)"));
  const dim3 grid(static_cast<unsigned int>((a.out + kBn - 1) / kBn), static_cast<unsigned int>(splits));
  return CudaStatus(LaunchPdl(&SkinnyKernel<MT>, grid, kBlockThreads, smem, stream, a, map), "SkinnyKernel");
}

Status LaunchWgmma(const SkinnyArgs& a, int64_t splits, cudaStream_t stream) {
  LM2_ASSIGN_OR_RETURN(const CUtensorMap w_map, WeightMap(a));
  LM2_ASSIGN_OR_RETURN(const CUtensorMap x_map, Map(a.x, a.in, a.rows, 64));
  const std::size_t smem = sizeof(SharedW) + 1024;
  static const cudaError_t attribute = cudaFuncSetAttribute(  // once (not during a graph's capture)
      SkinnyWgmmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  LM2_RETURN_IF_ERROR(CudaStatus(attribute, "cudaFuncSetAttribute (SkinnyWgmmaKernel)"));
  cudaLaunchAttribute attributes[2];
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim = {1, static_cast<unsigned int>(splits), 1};
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned int>((a.out + kBn - 1) / kBn), static_cast<unsigned int>(splits));
  config.blockDim = dim3(kBlockThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = PdlEnabled() ? 2 : 1;
  return CudaStatus(cudaLaunchKernelEx(&config, SkinnyWgmmaKernel, a, w_map, x_map), "SkinnyWgmmaKernel");
}

LM2_CUDA_KERNEL_MODULE(SkinnyKernel<1>);

}  // namespace

bool SkinnySupports(int64_t rows, int64_t in, int64_t out) {
  return rows >= 1 && rows <= kSkinnyMaxRows && in > 0 && in % 8 == 0 && out > 0 && out % 8 == 0 &&
         in < (int64_t{1} << 31) && out < (int64_t{1} << 31);
}

int64_t SkinnySplits(int64_t in, int64_t out, int multiprocessors) {
  const int64_t tiles = (out + kBn - 1) / kBn, chunks = (in + kBk - 1) / kBk;
  int64_t splits = static_cast<int64_t>(multiprocessors) / tiles;
  splits = splits < 1 ? 1 : splits > 16 ? 16 : splits;
  return splits < chunks ? splits : chunks;
}

int64_t SkinnyScratchFloats(int64_t rows, int64_t in, int64_t out, int multiprocessors) {
  const int64_t splits = SkinnySplits(in, out, multiprocessors);
  return splits > 1 ? splits * rows * out : 0;
}

int64_t SkinnyCounters(int64_t out) { return (out + kBn - 1) / kBn; }

Status SkinnyLinear(const SkinnyArgs& a, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(a.rows, a.in, a.out));
  if (!SkinnySupports(a.rows, a.in, a.out)) {
    return Status::InvalidArgument("SkinnyLinear: rows=" + std::to_string(a.rows) + " (1.." +
                                   std::to_string(kSkinnyMaxRows) + ") in=" + std::to_string(a.in) +
                                   " out=" + std::to_string(a.out) + " (multiples of 8)");
  }
  LM2_RETURN_IF_ERROR(RequireNonNull("SkinnyLinear", {a.x, a.w}));
  if ((a.y == nullptr) == (a.y_bf16 == nullptr) || (a.y_bf16 != nullptr && a.accumulate)) {
    return Status::InvalidArgument("SkinnyLinear: one output, y (stored or added) or y_bf16 (stored)");
  }
  for (const void* p : {static_cast<const void*>(a.x), static_cast<const void*>(a.w)}) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
      return Status::InvalidArgument("SkinnyLinear: x and W must be 16-byte aligned");
    }
  }
  if (!SkinnyAvailable()) return Status::FailedPrecondition("SkinnyLinear: needs the sm_90a code on a 9.0 device");
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  const int64_t splits = SkinnySplits(a.in, a.out, sms);
#if defined(LM2_CUDA_SM90A)
  return LaunchWgmma(a, splits < 8 ? splits : 8, stream);  // EXPERIMENT: wgmma at every row count; split k as a cluster
#else
  (void)splits;
  return Status::FailedPrecondition("SkinnyLinear: not built (no sm_90a code)");
#endif
}

bool SkinnyAvailable() {
#if defined(LM2_CUDA_SM90A)
  return Sm90CodeOnCurrentDevice();
#else
  return false;
#endif
}

bool SkinnyRequested() {
  static const bool requested = [] {
    const char* v = std::getenv("LM2_SKINNY_GEMM");
    return v != nullptr && std::string_view(v) == "1";
  }();
  return requested;
}

}  // namespace lm2::runtime::cuda
