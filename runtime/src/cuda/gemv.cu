// Small-batch linear layers (decode steps): y[rows, out] = x'[rows, in] · W[out, in]ᵀ for
// rows <= kGemvMaxRows, one pass over the bf16 weights (the bandwidth-bound part of a decode
// step), with the op before and after fused in: x' is made from x while it is staged in
// shared memory (a bf16 copy, an fp32 rounding, an RMSNorm, a SwiGLU), and the result is
// stored, added, or turned into the memory-gated residual update, or stored with each row's
// greedy pick (the LM head of a greedy decode step: no separate argmax pass over the logits).
//
// Layout: a persistent grid (one 256-thread block per multiprocessor at most). x' is staged
// whole in shared memory (rows * in <= kGemvStageElements). Each warp streams units of two
// weight rows x 2048 columns through its own ring of up to kMaxStages unit buffers in shared
// memory, filled by bulk copies (TMA, sm_90: one instruction per row piece, completing on the
// buffer's mbarrier) that its lane 0 issues a ring ahead of the multiply: up to 192 KiB in
// flight per multiprocessor without holding registers, the first ring's worth issued before
// the predecessor ends and x' is made. (The weights once went through two 8 KiB register
// buffers per warp: one unit in flight, so a warp with 3-4 units — the q|k|v and down
// projections — waited a memory round trip per unit.) Before sm_90 the warp copies each unit
// itself.
//
// Numerics: x' is bit-identical to what RmsNormBf16 / SwiGluBf16 / ConvertF32ToBf16 give
// (the same fp32 expressions; the RMS reduction has RmsNormKernel's order), products and
// sums in fp32. Each output's sum runs in an order that depends only on `in` and the lane
// layout, never on `rows`: a row's result is the same whether it is computed alone or with
// others (batched decode steps rely on that).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;  // rows of a unit
constexpr int kSegVecs = 8;      // 16-byte pieces per lane per row in a unit: 2048 columns
static_assert(kThreads == kWarps * 32, "the GEMV block is kThreads wide (the RMS reduction's order)");

using bf16 = __nv_bfloat16;

// Staging x': items of 8 columns (one 16-byte piece of x'), loads of kStageUnroll items in
// flight per thread before any is converted (the staging is latency-bound otherwise).
constexpr int kStageUnroll = 4;

// What an item's conversion needs, loaded: x (or gate) columns, and the norm weights or the
// up columns.
struct Item {
  float4 x0, x1, y0, y1;
  uint4 raw;  // kBf16: the piece as it is
};

template <GemvInput In>
__device__ __forceinline__ Item LoadItem(const GemvArgs& a, int b, int64_t c) {
  Item it{};
  if constexpr (In == GemvInput::kBf16) {
    it.raw = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(a.x) + b * a.x_ld + c);
  } else {
    const float* x = static_cast<const float*>(a.x) + b * a.x_ld + c;
    it.x0 = *reinterpret_cast<const float4*>(x);
    it.x1 = *reinterpret_cast<const float4*>(x + 4);
    if constexpr (In == GemvInput::kRmsNorm) {
      it.y0 = *reinterpret_cast<const float4*>(a.norm_weight + c);
      it.y1 = *reinterpret_cast<const float4*>(a.norm_weight + c + 4);
    }
    if constexpr (In == GemvInput::kSwiGlu) {
      it.y0 = *reinterpret_cast<const float4*>(x + a.in);
      it.y1 = *reinterpret_cast<const float4*>(x + a.in + 4);
    }
  }
  return it;
}

// One column of x' from its loaded values: the fp32 expressions of the unfused ops.
template <GemvInput In>
__device__ __forceinline__ bf16 Convert(float x, float y, float inv_rms) {
  if constexpr (In == GemvInput::kRmsNorm) return __float2bfloat16_rn(x * inv_rms * y);
  if constexpr (In == GemvInput::kSwiGlu) return __float2bfloat16_rn(SwiGluOf(x, y));
  return __float2bfloat16_rn(x);
}

template <GemvInput In>
__device__ __forceinline__ uint4 ConvertItem(const Item& it, float inv_rms) {
  if constexpr (In == GemvInput::kBf16) {
    return it.raw;
  } else {
    const float x[8] = {it.x0.x, it.x0.y, it.x0.z, it.x0.w, it.x1.x, it.x1.y, it.x1.z, it.x1.w};
    const float y[8] = {it.y0.x, it.y0.y, it.y0.z, it.y0.w, it.y1.x, it.y1.y, it.y1.z, it.y1.w};
    uint4 out;
    auto* o = reinterpret_cast<bf16*>(&out);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = Convert<In>(x[i], y[i], inv_rms);
    return out;
  }
}

// Σ of the 8 products of a 16-byte piece of a weight row and of x', added to acc in order.
__device__ __forceinline__ float Dot8(const uint4& w, const uint4& x, float acc) {
  const auto* wp = reinterpret_cast<const __nv_bfloat162*>(&w);
  const auto* xp = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 wf = __bfloat1622float2(wp[i]), xf = __bfloat1622float2(xp[i]);
    acc = fmaf(wf.x, xf.x, acc);
    acc = fmaf(wf.y, xf.y, acc);
  }
  return acc;
}

// ---- Bulk copies into shared memory (TMA, sm_90) ---------------------------------------

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kBulkCopies = true;
#else
constexpr bool kBulkCopies = false;
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

// L2 policy for weights streamed once per step: evicted first (they never fit; the step's
// activations, KV caches and memory K/V should stay).
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}

// bytes (a multiple of 16, both ends 16-byte aligned) from global src to shared dst,
// counted on `bar`.
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          SharedAddress(dst)),
      "l"(src), "r"(bytes), "r"(SharedAddress(bar)), "l"(policy)
      : "memory");
#endif
}

// Orders this thread's earlier shared-memory reads before the bulk copies it issues next.
__device__ __forceinline__ void FenceBeforeBulkCopy() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// ---- The kernel ---------------------------------------------------------------------------

constexpr int kSegCols = 32 * kSegVecs * 8;                // columns of a unit: 2048
constexpr int kUnitBytes = kRowsPerWarp * kSegCols * 2;    // 8 KiB
static_assert(kUnitBytes == 8192, "a unit: two rows x 2048 bf16 columns");
constexpr int kMaxStages = 3;                              // unit buffers per warp

// A warp's units: row groups blockIdx * kWarps + warp, then every gridDim * kWarps further
// (a group: kRowsPerWarp rows), each group's 2048-column segments in order.
struct WarpUnits {
  int64_t first, stride;
  int segs;
  __device__ int64_t Group(int64_t k) const { return first + (k / segs) * stride; }
  __device__ int Seg(int64_t k) const { return static_cast<int>(k % segs); }
};

// Starts unit k's copy into `buf` (the warp's lanes call it together; lane 0 issues).
__device__ __forceinline__ void FetchUnit(const GemvArgs& a, const WarpUnits& u, int64_t k, bf16* buf, uint64_t* bar,
                                          uint64_t policy, int lane) {
  const int64_t group = u.Group(k);
  const int64_t col = static_cast<int64_t>(u.Seg(k)) * kSegCols;
  const int64_t cols = a.in - col < kSegCols ? a.in - col : kSegCols;
  const int rows = a.out - group * kRowsPerWarp < kRowsPerWarp ? static_cast<int>(a.out - group * kRowsPerWarp)
                                                                : kRowsPerWarp;
  if constexpr (kBulkCopies) {
    if (lane == 0) {
      const auto bytes = static_cast<uint32_t>(cols * 2);
      FenceBeforeBulkCopy();  // the warp's reads of this buffer's last unit are done (__syncwarp before)
      BarrierExpectBytes(bar, bytes * static_cast<uint32_t>(rows));
      for (int r = 0; r < rows; ++r) {
        BulkCopy(buf + r * kSegCols, a.w + (group * kRowsPerWarp + r) * a.in + col, bytes, bar, policy);
      }
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const uint4* src = reinterpret_cast<const uint4*>(a.w + (group * kRowsPerWarp + r) * a.in + col);
      uint4* dst = reinterpret_cast<uint4*>(buf + r * kSegCols);
      for (int v = lane; v < cols / 8; v += 32) dst[v] = __ldcs(src + v);
    }
    __syncwarp();
  }
}

// Dynamic shared memory: the rings [kWarps][stages][kUnitBytes], x' [rows][in] bf16, then
// the rings' barriers [kWarps][stages].
__host__ __device__ int64_t GemvSharedBytes(int64_t rows, int64_t in, int stages) {
  const int64_t xs = (rows * in * 2 + 15) / 16 * 16;
  return int64_t{kWarps} * stages * kUnitBytes + xs + int64_t{kWarps} * stages * 8;
}

template <int B, GemvInput In, GemvOutput Out>
__global__ void __launch_bounds__(kThreads, 1) GemvKernel(const GemvArgs a, int stages) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float scratch[32];
  __shared__ float inv_rms[B];
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int rows = static_cast<int>(a.rows);
  const int vecs = static_cast<int>(a.in / 8);
  bf16* ring = reinterpret_cast<bf16*>(smem) + static_cast<int64_t>(warp) * stages * (kUnitBytes / 2);
  bf16* xs = reinterpret_cast<bf16*>(smem + int64_t{kWarps} * stages * kUnitBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + GemvSharedBytes(rows, a.in, stages) - kWarps * stages * 8) +
                   warp * stages;
  const int64_t groups = (a.out + kRowsPerWarp - 1) / kRowsPerWarp;
  const WarpUnits u{static_cast<int64_t>(blockIdx.x) * kWarps + warp, static_cast<int64_t>(gridDim.x) * kWarps,
                    (vecs + kSegCols / 8 - 1) / (kSegCols / 8)};
  const int64_t units = u.first < groups ? ((groups - 1 - u.first) / u.stride + 1) * u.segs : 0;
  const uint64_t policy = EvictFirstPolicy();

  // The ring's first units: in flight while the predecessor ends and x' is made.
  if (lane == 0) {
    for (int s = 0; s < stages; ++s) BarrierInit(&bars[s]);
  }
  __syncwarp();
  for (int64_t k = 0; k < units && k < stages; ++k) {
    FetchUnit(a, u, k, ring + k * (kUnitBytes / 2), &bars[k], policy, lane);
  }
  WaitForPredecessor();
  AllowDependents();

  if constexpr (In == GemvInput::kRmsNorm) {
    for (int b = 0; b < rows; ++b) {  // rows is uniform over the block: every thread reduces
      const float inv = InvRms(static_cast<const float*>(a.x) + b * a.x_ld, a.in, a.eps, scratch);
      if (tid == 0) inv_rms[b] = inv;
    }
    __syncthreads();
  }
  {
    const int per_row = vecs, items = rows * per_row;
    for (int base = tid; base < items; base += kThreads * kStageUnroll) {
      Item it[kStageUnroll];
#pragma unroll
      for (int v = 0; v < kStageUnroll; ++v) {
        const int i = base + v * kThreads;
        if (i < items) it[v] = LoadItem<In>(a, i / per_row, static_cast<int64_t>(i % per_row) * 8);
      }
#pragma unroll
      for (int v = 0; v < kStageUnroll; ++v) {
        const int i = base + v * kThreads;
        if (i >= items) break;
        const int b = i / per_row;
        reinterpret_cast<uint4*>(xs)[i] = ConvertItem<In>(it[v], In == GemvInput::kRmsNorm ? inv_rms[b] : 0.0f);
      }
    }
  }
  __syncthreads();

  unsigned long long best = 0;  // kStoreArgmax: lane b's best key of row b so far
  float acc[kRowsPerWarp][B];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;
  }
  int s = 0;
  uint32_t parity = 0;
  for (int64_t k = 0; k < units; ++k) {
    const int64_t group = u.Group(k);
    const int seg = u.Seg(k);
    bf16* buf = ring + s * (kUnitBytes / 2);
    BarrierWait(&bars[s], parity);
    const uint4* w = reinterpret_cast<const uint4*>(buf);
#pragma unroll
    for (int i = 0; i < kSegVecs; ++i) {
      const int v = seg * kSegCols / 8 + 32 * i + lane;
      if (v >= vecs) break;
      uint4 wv[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) wv[r] = w[r * (kSegCols / 8) + 32 * i + lane];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b >= rows) break;
        const uint4 xv = *reinterpret_cast<const uint4*>(&xs[b * a.in + static_cast<int64_t>(v) * 8]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][b] = Dot8(wv[r], xv, acc[r][b]);
      }
    }
    __syncwarp();  // every lane is done with buf
    if (k + stages < units) FetchUnit(a, u, k + stages, buf, &bars[s], policy, lane);
    if (++s == stages) {
      s = 0;
      parity ^= 1u;
    }
    if (seg == u.segs - 1) {  // the group's last segment: reduce and store
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t row = group * kRowsPerWarp + r;
#pragma unroll
        for (int b = 0; b < B; ++b) {
          const float sum = WarpSum(acc[r][b]);  // every lane holds the sum
          acc[r][b] = 0.0f;
          if (lane != b || b >= rows || row >= a.out) continue;
          float* y = a.y + b * a.out + row;
          if constexpr (Out == GemvOutput::kStore) *y = sum;
          if constexpr (Out == GemvOutput::kStoreArgmax) {
            *y = sum;
            const unsigned long long key = CandidateKey(sum, row);
            best = key > best ? key : best;
          }
          if constexpr (Out == GemvOutput::kAccumulate) *y += sum;
          if constexpr (Out == GemvOutput::kGatedResidual) {
            const int64_t i = b * a.out + row;
            *y = GatedResidualOf(*y, a.residual[i], sum, a.bias[row], a.gated[i]);
          }
        }
      }
    }
  }
  if constexpr (Out == GemvOutput::kStoreArgmax) {
    if (lane < rows && best != 0) atomicMax(reinterpret_cast<unsigned long long*>(a.argmax_keys) + lane, best);
  }
}

// The grid (one block per multiprocessor at most: the kernel is persistent) and each warp's
// ring depth: as many unit buffers as a warp has units, up to kMaxStages, within the
// device's shared memory per block.
struct GemvLaunch {
  unsigned int blocks = 0;
  int stages = 0;
  int64_t shared_bytes = 0;
};

Result<GemvLaunch> PlanGemv(const GemvArgs& a) {
  int device = 0, sms = 0, optin = 0;
  LM2_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  LM2_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  LM2_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t groups = (a.out + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t blocks = std::min<int64_t>((groups + kWarps - 1) / kWarps, sms);
  const int64_t segs = (a.in + kSegCols - 1) / kSegCols;
  const int64_t units = (groups + blocks * kWarps - 1) / (blocks * kWarps) * segs;  // the busiest warp's
  // Static shared memory (scratch, inv_rms) and the reserve the runtime keeps per block.
  const int64_t room = optin - 1024;
  int stages = static_cast<int>(std::min<int64_t>(units, kMaxStages));
  while (stages > 1 && GemvSharedBytes(a.rows, a.in, stages) > room) --stages;
  return GemvLaunch{static_cast<unsigned int>(blocks), stages, GemvSharedBytes(a.rows, a.in, stages)};
}

template <int B, GemvInput In, GemvOutput Out>
Status LaunchKernel(const GemvArgs& a, cudaStream_t stream) {
  LM2_ASSIGN_OR_RETURN(const GemvLaunch plan, PlanGemv(a));
  const auto kernel = &GemvKernel<B, In, Out>;
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), plan.shared_bytes, "Gemv"));
  return CudaStatus(LaunchPdl(kernel, plan.blocks, kThreads, static_cast<std::size_t>(plan.shared_bytes), stream, a,
                              plan.stages),
                    "GemvKernel");
}

template <int B, GemvInput In>
Status LaunchOut(const GemvArgs& a, cudaStream_t stream) {
  switch (a.output) {
    case GemvOutput::kStore: return LaunchKernel<B, In, GemvOutput::kStore>(a, stream);
    case GemvOutput::kAccumulate: return LaunchKernel<B, In, GemvOutput::kAccumulate>(a, stream);
    case GemvOutput::kGatedResidual: return LaunchKernel<B, In, GemvOutput::kGatedResidual>(a, stream);
    case GemvOutput::kStoreArgmax: return LaunchKernel<B, In, GemvOutput::kStoreArgmax>(a, stream);
  }
  return Status::InvalidArgument("Gemv: unknown output kind");
}

template <int B>
Status LaunchIn(const GemvArgs& a, cudaStream_t stream) {
  switch (a.input) {
    case GemvInput::kBf16: return LaunchOut<B, GemvInput::kBf16>(a, stream);
    case GemvInput::kF32: return LaunchOut<B, GemvInput::kF32>(a, stream);
    case GemvInput::kRmsNorm: return LaunchOut<B, GemvInput::kRmsNorm>(a, stream);
    case GemvInput::kSwiGlu: return LaunchOut<B, GemvInput::kSwiGlu>(a, stream);
  }
  return Status::InvalidArgument("Gemv: unknown input kind");
}

}  // namespace

bool GemvSupports(int64_t rows, int64_t in) {
  return rows >= 0 && rows <= kGemvMaxRows && in > 0 && in % 8 == 0 && rows * in <= kGemvStageElements;
}

Status Gemv(const GemvArgs& a, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(a.rows, a.in, a.out));
  const int64_t min_ld = a.input == GemvInput::kSwiGlu ? 2 * a.in : a.in;
  if (!GemvSupports(a.rows, a.in) || a.x_ld < min_ld || a.x_ld % 8 != 0 || a.out >= (int64_t{1} << 31) ||
      reinterpret_cast<std::uintptr_t>(a.w) % 16 != 0 || reinterpret_cast<std::uintptr_t>(a.x) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(a.norm_weight) % 16 != 0) {
    return Status::InvalidArgument("Gemv: rows=" + std::to_string(a.rows) + " (at most " +
                                   std::to_string(kGemvMaxRows) + ") in=" + std::to_string(a.in) +
                                   " (a multiple of 8, rows * in <= " + std::to_string(kGemvStageElements) +
                                   ") x_ld=" + std::to_string(a.x_ld) + " (a multiple of 8) out=" +
                                   std::to_string(a.out) + ", x, weights and norm weights 16-byte aligned");
  }
  if (a.rows == 0 || a.out == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("Gemv", {a.x, a.w, a.y}));
  if (a.input == GemvInput::kRmsNorm) {
    LM2_RETURN_IF_ERROR(ops::CheckRmsNorm(a.rows, a.in, a.eps));
    LM2_RETURN_IF_ERROR(RequireNonNull("Gemv (RMSNorm input)", {a.norm_weight}));
  }
  if (a.output == GemvOutput::kStoreArgmax) {
    LM2_RETURN_IF_ERROR(RequireNonNull("Gemv (argmax)", {a.argmax_keys}));
  }
  if (a.output == GemvOutput::kGatedResidual) {
    LM2_RETURN_IF_ERROR(RequireNonNull("Gemv (gated residual)", {a.bias, a.residual, a.gated}));
  }
  if (a.rows == 1) return LaunchIn<1>(a, stream);
  if (a.rows == 2) return LaunchIn<2>(a, stream);
  if (a.rows <= 4) return LaunchIn<4>(a, stream);
  return LaunchIn<8>(a, stream);
}

}  // namespace lm2::runtime::cuda
