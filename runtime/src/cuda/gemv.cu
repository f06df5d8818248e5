// Small-batch linear layers (decode steps): y[rows, out] = x'[rows, in] · W[out, in]ᵀ for
// rows <= kGemvMaxRows, one pass over the bf16 weights (the bandwidth-bound part of a decode
// step), with the op before and after fused in: x' is made from x while it is staged in
// shared memory (a bf16 copy, an fp32 rounding, an RMSNorm), and the result is stored, added,
// turned into the memory-gated residual update, stored with each row's greedy pick (the LM
// head of a greedy decode step: no separate argmax pass over the logits), or, for the stacked
// gate | up layer, turned into the SwiGLU activation in bf16 (the down projection's x').
//
// Layout: a persistent grid (one 256-thread block per multiprocessor at most). x' is staged
// whole in shared memory (rows * in <= kGemvStageElements). Each warp streams units of two
// weight rows x 2048 columns, 16-byte pieces per lane (coalesced), and loads the next unit
// into registers while it multiplies the current one; the first unit's loads go out before
// x' is staged.
//
// Numerics: x' is bit-identical to what RmsNormBf16 / ConvertF32ToBf16 give, the SwiGLU
// output to what SwiGluBf16 gives from the stored gate | up rows (the same fp32 expressions;
// the RMS reduction has RmsNormKernel's order), products and sums in fp32. Each output's sum
// runs in an order that depends only on `in` and the lane layout, never on `rows`: a row's
// result is the same whether it is computed alone or with others (batched decode steps rely
// on that).
#include <cuda_bf16.h>

#include <cstdint>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
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

// What an item's conversion needs, loaded: x columns, and (kRmsNorm) the norm weights.
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
  }
  return it;
}

// One column of x' from its loaded values: the fp32 expressions of the unfused ops.
template <GemvInput In>
__device__ __forceinline__ bf16 Convert(float x, float y, float inv_rms) {
  if constexpr (In == GemvInput::kRmsNorm) return __float2bfloat16_rn(x * inv_rms * y);
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

// x' of kF32 / kBf16 inputs into xs: kStageUnroll items in flight per thread.
template <GemvInput In>
__device__ __forceinline__ void Stage(const GemvArgs& a, int tid, bf16* xs) {
  const int per_row = static_cast<int>(a.in / 8), items = static_cast<int>(a.rows) * per_row;
  for (int base = tid; base < items; base += kThreads * kStageUnroll) {
    Item it[kStageUnroll];
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i < items) it[u] = LoadItem<In>(a, i / per_row, static_cast<int64_t>(i % per_row) * 8);
    }
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i >= items) break;
      reinterpret_cast<uint4*>(xs)[i] = ConvertItem<In>(it[u], 0.0f);
    }
  }
}

// x' of a kRmsNorm input into xs, around the PDL wait. Thread t owns pieces (8 columns) t,
// t + kThreads, ... of each row: InvRms's order, so the squares are summed from the pieces as
// loaded. Its first piece of each row and of the norm weights stay in registers (the whole
// row at in <= 8 kThreads, every decode projection of the paper's model): the norm weights
// load before the wait, x once after it, and one barrier reduces every row's sum. Further
// pieces are loaded again for the conversion (L1 hits).
template <int B>
__device__ __forceinline__ void StageRmsNorm(const GemvArgs& a, int tid, bf16* xs, float (*scratch)[32]) {
  const int rows = static_cast<int>(a.rows);
  const int64_t first = 8 * static_cast<int64_t>(tid), stride = 8 * kThreads;
  const bool holds = first < a.in;  // this thread owns a piece of each row
  float4 y0{}, y1{};
  if (holds) {
    y0 = *reinterpret_cast<const float4*>(a.norm_weight + first);
    y1 = *reinterpret_cast<const float4*>(a.norm_weight + first + 4);
  }
  WaitForPredecessor();
  AllowDependents();
  float4 x0[B], x1[B];
  float ss[B];
#pragma unroll
  for (int b = 0; b < B; ++b) {
    ss[b] = 0.0f;
    if (b >= rows || !holds) continue;
    const float* xr = static_cast<const float*>(a.x) + b * a.x_ld;
    x0[b] = *reinterpret_cast<const float4*>(xr + first);
    x1[b] = *reinterpret_cast<const float4*>(xr + first + 4);
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
    if (b >= rows || !holds) continue;
    ss[b] = SumSquares8(x0[b], x1[b], 0.0f);
    const float* xr = static_cast<const float*>(a.x) + b * a.x_ld;
    for (int64_t c = first + stride; c < a.in; c += stride) {
      ss[b] = SumSquares8(*reinterpret_cast<const float4*>(xr + c), *reinterpret_cast<const float4*>(xr + c + 4),
                          ss[b]);
    }
  }
  BlockSums<B>(ss, scratch);
#pragma unroll
  for (int b = 0; b < B; ++b) {
    if (b >= rows || !holds) continue;
    const float inv_rms = InvRmsOf(ss[b], a.in, a.eps);
    Item it{.x0 = x0[b], .x1 = x1[b], .y0 = y0, .y1 = y1, .raw = {}};
    reinterpret_cast<uint4*>(xs + b * a.in)[tid] = ConvertItem<GemvInput::kRmsNorm>(it, inv_rms);
    for (int64_t c = first + stride; c < a.in; c += stride) {
      it = LoadItem<GemvInput::kRmsNorm>(a, b, c);
      *reinterpret_cast<uint4*>(xs + b * a.in + c) = ConvertItem<GemvInput::kRmsNorm>(it, inv_rms);
    }
  }
}

// A warp's work is a sequence of units (a group of kRowsPerWarp rows, a 2048-column segment
// of them): row groups blockIdx * kWarps + warp, then every gridDim * kWarps further; each
// group's segments in order. Group g is rows 2g and 2g + 1, or, for kSwiGluBf16, rows g and
// out/2 + g (a gate row and its up row, whose SwiGLU the warp stores). The warp loads the
// next unit while it multiplies the current one, so its weight stream never waits on a
// multiply; x' sits whole in shared memory.
template <int B, GemvInput In, GemvOutput Out>
__global__ void __launch_bounds__(kThreads, 1) GemvKernel(const GemvArgs a) {
  __shared__ __align__(16) bf16 xs[kGemvStageElements];  // x' [rows][in]
  __shared__ float scratch[B][32];  // kRmsNorm: the rows' sums of squares
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int rows = static_cast<int>(a.rows);
  const int vecs = static_cast<int>(a.in / 8);
  const int segs = (vecs + 32 * kSegVecs - 1) / (32 * kSegVecs);
  constexpr bool kPairs = Out == GemvOutput::kSwiGluBf16;
  static_assert(!kPairs || kRowsPerWarp == 2, "a SwiGLU group is a gate row and its up row");
  const int64_t groups = kPairs ? a.out / 2 : (a.out + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t group_stride = static_cast<int64_t>(gridDim.x) * kWarps;

  uint4 cur[kRowsPerWarp][kSegVecs], nxt[kRowsPerWarp][kSegVecs];
  auto load = [&](uint4 (&buf)[kRowsPerWarp][kSegVecs], int64_t group, int seg) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      int64_t row = kPairs ? group + r * (a.out / 2) : group * kRowsPerWarp + r;
      row = row < a.out ? row : a.out - 1;  // past the end: read the last row again, store nothing
      const uint4* w = reinterpret_cast<const uint4*>(a.w + row * a.in);
#pragma unroll
      for (int i = 0; i < kSegVecs; ++i) {
        const int v = seg * 32 * kSegVecs + 32 * i + lane;
        buf[r][i] = v < vecs ? __ldcs(w + v) : make_uint4(0, 0, 0, 0);
      }
    }
  };

  int64_t group = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  int seg = 0;
  if (group < groups) load(cur, group, 0);  // weights: in flight while the predecessor ends and x' is made
  if constexpr (In == GemvInput::kRmsNorm) {
    StageRmsNorm<B>(a, tid, xs, scratch);
  } else {
    WaitForPredecessor();
    AllowDependents();
    Stage<In>(a, tid, xs);
  }
  __syncthreads();

  unsigned long long best = 0;  // kStoreArgmax: lane b's best key of row b so far
  float acc[kRowsPerWarp][B];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;
  }
  while (group < groups) {
    int64_t next_group = group;
    int next_seg = seg + 1;
    if (next_seg == segs) {
      next_seg = 0;
      next_group += group_stride;
    }
    if (next_group < groups) load(nxt, next_group, next_seg);
#pragma unroll
    for (int i = 0; i < kSegVecs; ++i) {
      const int v = seg * 32 * kSegVecs + 32 * i + lane;
      if (v >= vecs) break;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b >= rows) break;
        const uint4 xv = *reinterpret_cast<const uint4*>(&xs[b * a.in + static_cast<int64_t>(v) * 8]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][b] = Dot8(cur[r][i], xv, acc[r][b]);
      }
    }
    if (kPairs && next_seg == 0) {  // the group's last segment: gate and up, their SwiGLU
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const float gate = WarpSum(acc[0][b]), up = WarpSum(acc[1][b]);  // every lane holds both
        acc[0][b] = acc[1][b] = 0.0f;
        if (lane == b && b < rows) a.y_bf16[b * (a.out / 2) + group] = __float2bfloat16_rn(SwiGluOf(gate, up));
      }
    } else if (next_seg == 0) {  // the group's last segment: reduce and store
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
            const unsigned long long k = CandidateKey(sum, row);
            best = k > best ? k : best;
          }
          if constexpr (Out == GemvOutput::kAccumulate) *y += sum;
          if constexpr (Out == GemvOutput::kGatedResidual) {
            const int64_t i = b * a.out + row;
            *y = GatedResidualOf(*y, a.residual[i], sum, a.bias[row], a.gated[i]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int i = 0; i < kSegVecs; ++i) cur[r][i] = nxt[r][i];
    }
    group = next_group;
    seg = next_seg;
  }
  if constexpr (Out == GemvOutput::kStoreArgmax) {
    if (lane < rows && best != 0) atomicMax(reinterpret_cast<unsigned long long*>(a.argmax_keys) + lane, best);
  }
}

template <int B, GemvInput In>
Status LaunchOut(const GemvArgs& a, cudaStream_t stream) {
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());  // one block each: the kernel is persistent
  const int64_t warps_needed = (a.out + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t blocks_needed = (warps_needed + kWarps - 1) / kWarps;
  const auto blocks = static_cast<unsigned int>(blocks_needed < sms ? blocks_needed : sms);
  switch (a.output) {
    case GemvOutput::kStore:
      return CudaStatus(LaunchPdl(&GemvKernel<B, In, GemvOutput::kStore>, blocks, kThreads, 0, stream, a), "GemvKernel");
    case GemvOutput::kAccumulate:
      return CudaStatus(LaunchPdl(&GemvKernel<B, In, GemvOutput::kAccumulate>, blocks, kThreads, 0, stream, a),
                        "GemvKernel");
    case GemvOutput::kGatedResidual:
      return CudaStatus(LaunchPdl(&GemvKernel<B, In, GemvOutput::kGatedResidual>, blocks, kThreads, 0, stream, a),
                        "GemvKernel");
    case GemvOutput::kStoreArgmax:
      return CudaStatus(LaunchPdl(&GemvKernel<B, In, GemvOutput::kStoreArgmax>, blocks, kThreads, 0, stream, a),
                        "GemvKernel");
    case GemvOutput::kSwiGluBf16:
      return CudaStatus(LaunchPdl(&GemvKernel<B, In, GemvOutput::kSwiGluBf16>, blocks, kThreads, 0, stream, a),
                        "GemvKernel");
  }
  return Status::InvalidArgument("Gemv: unknown output kind");
}

template <int B>
Status LaunchIn(const GemvArgs& a, cudaStream_t stream) {
  switch (a.input) {
    case GemvInput::kBf16: return LaunchOut<B, GemvInput::kBf16>(a, stream);
    case GemvInput::kF32: return LaunchOut<B, GemvInput::kF32>(a, stream);
    case GemvInput::kRmsNorm: return LaunchOut<B, GemvInput::kRmsNorm>(a, stream);
  }
  return Status::InvalidArgument("Gemv: unknown input kind");
}

// ---- FfnGemv: the decode step's FFN as one kernel (cuda_ops.h) ----------------------------
//
// A warp's units, per slice of kFfnSlice SwiGLU columns: kFfnPairsPerWarp gate | up pairs (the
// GEMV's units, a gate row and its up row by 2048-column segments), then its down units: 64
// rows of W_down by the slice's 64 columns, 8 lanes a row, 4 rows a load, 16 loads. The
// weight stream runs on across the phases and slices (the next unit is always in flight);
// only the SwiGLU columns wait for the block's barrier.

constexpr int kFfnPairsPerWarp = static_cast<int>(kFfnSlice) / kWarps;
constexpr int kDownUnitRows = 64;
constexpr int kUnitVecs = kRowsPerWarp * kSegVecs;  // 16-byte pieces a lane holds of a unit, either kind
static_assert(kFfnSlice == 64 && kUnitVecs == 16, "a down unit: 8 lanes x 8 columns a row, 16 loads of 4 rows");

// Each lane holds v[i] = its 8 columns' share of row 4i + lane/8 of a down unit; summed over
// the 8 lanes of each row (the lanes differing in bits 0-2) by halving exchanges: afterwards
// lane l holds the sums of rows indexed DownSumIndex(l) and DownSumIndex(l) + 1 in v[0], v[1].
__device__ __forceinline__ void ButterflySum16(float (&v)[16], int lane) {
#pragma unroll
  for (int step = 0; step < 3; ++step) {
    const int m = 4 >> step, half = 8 >> step;
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j >= half) break;
      const float send = upper ? v[j] : v[j + half];
      const float keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, m);
    }
  }
}

__device__ __forceinline__ int DownSumIndex(int lane) { return (lane & 4) * 2 + (lane & 2) * 2 + (lane & 1) * 2; }

// out[c] (+)= Σ_j src[j * stride + c] for c < n (a multiple of 4), j in order, through L2 (the
// sources were written by other blocks). A thread takes two float4 columns a pass and has
// kSumBatch sources of each in flight before it adds them: the sum is on the kernel's tail,
// where its latency is what counts.
constexpr int kSumBatch = 8;
__device__ __forceinline__ float4 Add4(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

__device__ __forceinline__ void SumRows(const float* src, int64_t count, int64_t stride, int64_t n, float* out,
                                        bool add, int tid) {
  for (int64_t c0 = 4 * static_cast<int64_t>(tid); c0 < n; c0 += 8 * kThreads) {
    const int64_t c[2] = {c0, c0 + 4 * kThreads};
    const bool has[2] = {true, c[1] < n};
    float4 s[2] = {make_float4(0.0f, 0.0f, 0.0f, 0.0f), make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
    for (int64_t j0 = 0; j0 < count; j0 += kSumBatch) {
      float4 t[2][kSumBatch];
#pragma unroll
      for (int u = 0; u < kSumBatch; ++u) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          if (j0 + u < count && has[k]) t[k][u] = __ldcg(reinterpret_cast<const float4*>(src + (j0 + u) * stride + c[k]));
        }
      }
#pragma unroll
      for (int u = 0; u < kSumBatch; ++u) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          if (j0 + u < count && has[k]) s[k] = Add4(s[k], t[k][u]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (!has[k]) continue;
      auto* o = reinterpret_cast<float4*>(out + c[k]);
      __stcg(o, add ? Add4(__ldcg(o), s[k]) : s[k]);
    }
  }
}

template <int B>
__global__ void __launch_bounds__(kThreads, 1) FfnGemvKernel(const FfnGemvArgs a) {
  __shared__ __align__(16) bf16 xs[kGemvStageElements];  // x' = bf16(RMSNorm(h)) [rows][d]
  __shared__ float scratch[B][32];
  __shared__ __align__(16) bf16 hs[B][kFfnSlice];  // the slice's SwiGLU columns
  __shared__ unsigned int arrived;                 // thread 0's counter reading, for the block
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int rows = static_cast<int>(a.rows);  // <= B
  const int64_t d = a.d, F = a.F, slices = (F + kFfnSlice - 1) / kFfnSlice, rd = rows * d;
  const int64_t groups = (slices + kFfnGroup - 1) / kFfnGroup;
  const int vecs = static_cast<int>(d / 8);
  const int segs = (vecs + 32 * kSegVecs - 1) / (32 * kSegVecs);
  const int gu_units = kFfnPairsPerWarp * segs;
  const int down_total = static_cast<int>((d + kDownUnitRows - 1) / kDownUnitRows);
  const int units = gu_units + (warp < down_total ? (down_total - warp + kWarps - 1) / kWarps : 0);
  float* const group_sums = a.partials + slices * rd;  // [groups][rows][d] after the slices' [slices][rows][d]

  auto load = [&](uint4 (&buf)[kUnitVecs], int64_t slice, int k) {
    if (k < gu_units) {
      int64_t g = slice * kFfnSlice + warp + kWarps * (k / segs);
      g = g < F ? g : F - 1;  // a short last slice: read the last pair again, its column is 0
      const int seg = k % segs;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const uint4* w = reinterpret_cast<const uint4*>(a.gate_up + (g + r * F) * d);
#pragma unroll
        for (int i = 0; i < kSegVecs; ++i) {
          const int v = seg * 32 * kSegVecs + 32 * i + lane;
          buf[r * kSegVecs + i] = v < vecs ? __ldcs(w + v) : make_uint4(0, 0, 0, 0);
        }
      }
    } else {
      const int64_t row0 = static_cast<int64_t>(warp + kWarps * (k - gu_units)) * kDownUnitRows + (lane >> 3);
      const int64_t column = slice * kFfnSlice + 8 * (lane & 7);
#pragma unroll
      for (int i = 0; i < kUnitVecs; ++i) {
        const int64_t row = a.ablate >= 2 ? d : row0 + 4 * i;  // past d or F: zeros (nothing stored, or a zero column)
        buf[i] = row < d && column < F ? __ldcs(reinterpret_cast<const uint4*>(a.down + row * F + column))
                                       : make_uint4(0, 0, 0, 0);
      }
    }
  };

  uint4 cur[kUnitVecs], nxt[kUnitVecs];
  int64_t slice = blockIdx.x;  // the grid is at most `slices` blocks
  load(cur, slice, 0);         // weights: in flight while the predecessor ends and x' is made
  const GemvArgs stage{.input = GemvInput::kRmsNorm, .x = a.h, .x_ld = d, .norm_weight = a.norm_weight,
                       .eps = a.eps, .rows = rows, .in = d};
  StageRmsNorm<B>(stage, tid, xs, scratch);
  __syncthreads();

  for (; slice < slices; slice += gridDim.x) {
    float acc[kRowsPerWarp][B];
#pragma unroll
    for (int b = 0; b < B; ++b) acc[0][b] = acc[1][b] = 0.0f;
    uint4 hv[B];  // this lane's 8 SwiGLU columns of each row, for the down units
    for (int k = 0; k < units; ++k) {
      int64_t next_slice = slice;
      int next_k = k + 1;
      if (next_k == units) {
        next_k = 0;
        next_slice += gridDim.x;
      }
      if (next_slice < slices) load(nxt, next_slice, next_k);
      if (k < gu_units) {
        const int seg = k % segs;
#pragma unroll
        for (int i = 0; i < kSegVecs; ++i) {
          const int v = seg * 32 * kSegVecs + 32 * i + lane;
          if (v >= vecs) break;
#pragma unroll
          for (int b = 0; b < B; ++b) {
            if (b >= rows) break;
            const uint4 xv = *reinterpret_cast<const uint4*>(&xs[b * d + static_cast<int64_t>(v) * 8]);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) acc[r][b] = Dot8(cur[r * kSegVecs + i], xv, acc[r][b]);
          }
        }
        if (seg == segs - 1) {  // the pair's last segment: its SwiGLU column (Gemv's kSwiGluBf16)
          const int column = warp + kWarps * (k / segs);
#pragma unroll
          for (int b = 0; b < B; ++b) {
            if (b >= rows) break;
            const float gate = WarpSum(acc[0][b]), up = WarpSum(acc[1][b]);
            acc[0][b] = acc[1][b] = 0.0f;
            const bool in_f = slice * kFfnSlice + column < F;
            if (lane == b) hs[b][column] = __float2bfloat16_rn(in_f ? SwiGluOf(gate, up) : 0.0f);
          }
        }
        if (k == gu_units - 1) {  // every warp's columns are in: the down units read them
          __syncthreads();
#pragma unroll
          for (int b = 0; b < B; ++b) {
            if (b < rows) hv[b] = *reinterpret_cast<const uint4*>(&hs[b][(lane & 7) * 8]);
          }
        }
      } else {
        const int64_t row = static_cast<int64_t>(warp + kWarps * (k - gu_units)) * kDownUnitRows + (lane >> 3) +
                            4 * DownSumIndex(lane);
#pragma unroll
        for (int b = 0; b < B; ++b) {  // one row of x at a time: 16 sums in registers, not 16 B
          if (b >= rows) break;
          float v[kUnitVecs];
#pragma unroll
          for (int i = 0; i < kUnitVecs; ++i) v[i] = Dot8(cur[i], hv[b], 0.0f);
          ButterflySum16(v, lane);
          float* p = a.partials + slice * rd + b * d + row;
          if (row < d) p[0] = v[0];
          if (row + 4 < d) p[4] = v[1];
        }
      }
#pragma unroll
      for (int i = 0; i < kUnitVecs; ++i) cur[i] = nxt[i];
    }

    // The slice's partial sums are stored. The last of its group's slices to be sums the
    // group; the last group to be summed, the groups into h.
    __syncthreads();
    if (a.ablate >= 1) continue;
    const int64_t group = slice / kFfnGroup, first = group * kFfnGroup;
    const int64_t in_group = slices - first < kFfnGroup ? slices - first : kFfnGroup;
    if (tid == 0) {
      __threadfence();
      arrived = atomicAdd(a.counters + group, 1u);
    }
    __syncthreads();
    if (arrived != in_group - 1) continue;
    __threadfence();
    SumRows(a.partials + first * rd, in_group, rd, rd, group_sums + group * rd, false, tid);
    __syncthreads();
    if (tid == 0) {
      a.counters[group] = 0;  // every slice of the group has arrived: ready for the next call
      __threadfence();
      arrived = atomicAdd(a.counters + groups, 1u);
    }
    __syncthreads();
    if (arrived != groups - 1) continue;
    __threadfence();
    SumRows(group_sums, groups, rd, rd, a.h, true, tid);
    if (tid == 0) a.counters[groups] = 0;
  }
}

LM2_CUDA_KERNEL_MODULE(GemvKernel<1, GemvInput::kBf16, GemvOutput::kStore>);

}  // namespace

bool GemvSupports(int64_t rows, int64_t in) {
  return rows >= 0 && rows <= kGemvMaxRows && in > 0 && in % 8 == 0 && rows * in <= kGemvStageElements;
}

Status Gemv(const GemvArgs& a, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(a.rows, a.in, a.out));
  if (!GemvSupports(a.rows, a.in) || a.x_ld < a.in || a.x_ld % 8 != 0 || a.out >= (int64_t{1} << 31) ||
      reinterpret_cast<std::uintptr_t>(a.w) % 16 != 0 || reinterpret_cast<std::uintptr_t>(a.x) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(a.norm_weight) % 16 != 0) {
    return Status::InvalidArgument("Gemv: rows=" + std::to_string(a.rows) + " (at most " +
                                   std::to_string(kGemvMaxRows) + ") in=" + std::to_string(a.in) +
                                   " (a multiple of 8, rows * in <= " + std::to_string(kGemvStageElements) +
                                   ") x_ld=" + std::to_string(a.x_ld) + " (a multiple of 8) out=" +
                                   std::to_string(a.out) + ", x, weights and norm weights 16-byte aligned");
  }
  if (a.rows == 0 || a.out == 0) return Status::Ok();
  if (a.output == GemvOutput::kSwiGluBf16) {
    if (a.out % 2 != 0) {
      return Status::InvalidArgument("Gemv (SwiGLU output): out=" + std::to_string(a.out) + ", not even");
    }
    LM2_RETURN_IF_ERROR(RequireNonNull("Gemv (SwiGLU output)", {a.x, a.w, a.y_bf16}));
  } else {
    LM2_RETURN_IF_ERROR(RequireNonNull("Gemv", {a.x, a.w, a.y}));
  }
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

bool FfnGemvSupports(int64_t rows, int64_t d, int64_t F) {
  return rows >= 1 && rows <= kFfnMaxRows && d > 0 && F > 0 && d % 8 == 0 && F % 8 == 0 &&
         rows * d <= kGemvStageElements;
}

int64_t FfnGemvScratchFloats(int64_t rows, int64_t d, int64_t F) {
  const int64_t slices = (F + kFfnSlice - 1) / kFfnSlice, groups = (slices + kFfnGroup - 1) / kFfnGroup;
  return (slices + groups) * rows * d;
}

int64_t FfnGemvCounters(int64_t F) { return ((F + kFfnSlice - 1) / kFfnSlice + kFfnGroup - 1) / kFfnGroup + 1; }

Status FfnGemv(const FfnGemvArgs& a, cudaStream_t stream) {
  if (!FfnGemvSupports(a.rows, a.d, a.F) || a.F >= (int64_t{1} << 31)) {
    return Status::InvalidArgument("FfnGemv: rows=" + std::to_string(a.rows) + " (1.." + std::to_string(kFfnMaxRows) +
                                   ") d=" + std::to_string(a.d) + " F=" + std::to_string(a.F) +
                                   " (multiples of 8, rows * d <= " +
                                   std::to_string(kGemvStageElements) + ")");
  }
  LM2_RETURN_IF_ERROR(RequireNonNull("FfnGemv", {a.h, a.norm_weight, a.gate_up, a.down, a.partials, a.counters}));
  LM2_RETURN_IF_ERROR(ops::CheckRmsNorm(a.rows, a.d, a.eps));
  for (const void* p : {static_cast<const void*>(a.h), static_cast<const void*>(a.norm_weight),
                        static_cast<const void*>(a.gate_up), static_cast<const void*>(a.down),
                        static_cast<const void*>(a.partials)}) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
      return Status::InvalidArgument("FfnGemv: h, norm weights, weights and partials must be 16-byte aligned");
    }
  }
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  const int64_t slices = (a.F + kFfnSlice - 1) / kFfnSlice;
  const auto blocks = static_cast<unsigned int>(slices < sms ? slices : sms);
  const auto launch = [&](auto kernel) { return CudaStatus(LaunchPdl(kernel, blocks, kThreads, 0, stream, a), "FfnGemvKernel"); };
  if (a.rows == 1) return launch(&FfnGemvKernel<1>);
  if (a.rows == 2) return launch(&FfnGemvKernel<2>);
  if (a.rows <= 4) return launch(&FfnGemvKernel<4>);
  return launch(&FfnGemvKernel<8>);
}

}  // namespace lm2::runtime::cuda
