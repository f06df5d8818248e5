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

#include <algorithm>
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

LM2_CUDA_KERNEL_MODULE(GemvKernel<1, GemvInput::kBf16, GemvOutput::kStore>);

}  // namespace

bool GemvSupports(int64_t rows, int64_t in) {
  return rows >= 0 && rows <= kGemvMaxRows && in > 0 && in % 8 == 0 && rows * in <= kGemvStageElements;
}

int64_t GemvRowsFor(int64_t max_rows, std::initializer_list<int64_t> widths) {
  for (int64_t rows = max_rows; rows > 0; --rows) {
    if (std::all_of(widths.begin(), widths.end(), [&](int64_t in) { return GemvSupports(rows, in); })) return rows;
  }
  return 0;
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

}  // namespace lm2::runtime::cuda
