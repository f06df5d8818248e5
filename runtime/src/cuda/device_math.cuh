// Device helpers shared by the kernels: warp/block reductions, grid sizing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string_view>
#include <utility>

#include "cuda/cuda_check.h"

namespace lm2::runtime::cuda {

// Threads per block of the element-wise and row kernels.
constexpr int kThreads = 256;

// Grid-stride loops: this thread's first element, and the stride between its elements.
__device__ __forceinline__ int64_t FirstIndex() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridStride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Σ of the 8 products of two 16-byte pieces of bf16 (a weight row's and the input's), added
// to acc in order, in fp32.
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

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32;
// `scratch` is 32 floats of shared memory (reusable right after the call returns).
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  v = WarpSum(v);
  __syncthreads();  // an earlier reduction may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return WarpSum(lane < warps ? scratch[lane] : 0.0f);
}

// BlockSum of B values at once, behind one barrier: v[b] becomes the block's sum of v[b], the
// bits BlockSum(v[b]) gives. `scratch` (B x 32) must not be in use by an earlier reduction.
template <int B>
__device__ __forceinline__ void BlockSums(float (&v)[B], float (*scratch)[32]) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    v[b] = WarpSum(v[b]);
    if (lane == 0) scratch[b][warp] = v[b];
  }
  __syncthreads();
#pragma unroll
  for (int b = 0; b < B; ++b) v[b] = WarpSum(lane < warps ? scratch[b][lane] : 0.0f);
}

__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return WarpMax(lane < warps ? scratch[lane] : -INFINITY);
}

// Rotary embedding, rotate-half. The factors (cos, sin) of pair (i, i + D/2) at `position`:
// the angle position * theta^(-2i/D), its cosine and sine in double, rounded to fp32,
// exactly as the CPU backend does.
__device__ __forceinline__ float2 RopeFactors(int64_t i, int64_t head_dim, int64_t position, double theta) {
  const double inv_freq = pow(theta, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
  const double angle = static_cast<double>(position) * inv_freq;
  return make_float2(static_cast<float>(cos(angle)), static_cast<float>(sin(angle)));
}

// The pair (i, i + half) of src rotated by `f` (RopeFactors); RotateHalfPair stores it into
// dst (may be the same vector).
// Each product rounded, then the sum, as the CPU does: explicit roundings, so that no kernel's
// compilation fuses a multiply-add (contraction differs between kernels, and their results
// must agree bit for bit).
__device__ __forceinline__ float2 RotatedHalfPair(const float* src, int64_t i, int64_t half, float2 f) {
  const float a = src[i], b = src[i + half];
  return make_float2(__fsub_rn(__fmul_rn(a, f.x), __fmul_rn(b, f.y)), __fadd_rn(__fmul_rn(b, f.x), __fmul_rn(a, f.y)));
}
__device__ __forceinline__ void RotateHalfPair(const float* src, float* dst, int64_t i, int64_t half, float2 f) {
  const float2 r = RotatedHalfPair(src, i, half, f);
  dst[i] = r.x;
  dst[i + half] = r.y;
}

// The RMSNorm statistic, one definition for RmsNorm and the fused GEMV (their outputs must
// agree bit for bit). Its order: thread t of a kThreads-wide block sums the squares of the
// 8-column pieces t, t + kThreads, t + 2 kThreads, ... in order, each piece's columns in order
// (explicit fma: no kernel's contraction choice changes a bit); the block then reduces the
// threads' parts as BlockSum does. Pieces are what the GEMV stages x' in, so it sums the
// squares of the pieces it holds in registers anyway.
__device__ __forceinline__ float SumSquares8(const float4& a, const float4& b, float ss) {
  const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int j = 0; j < 8; ++j) ss = __fmaf_rn(v[j], v[j], ss);
  return ss;
}

// This thread's part of Σ x[0, d)² in that order (any d; 16-byte loads where x allows).
__device__ __forceinline__ float SumSquaresPart(const float* x, int64_t d) {
  float ss = 0.0f;
  const int64_t first = 8 * static_cast<int64_t>(threadIdx.x);
  if (d % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    for (int64_t c = first; c < d; c += 8 * kThreads) {
      ss = SumSquares8(*reinterpret_cast<const float4*>(x + c), *reinterpret_cast<const float4*>(x + c + 4), ss);
    }
    return ss;
  }
  for (int64_t c = first; c < d; c += 8 * kThreads) {
    for (int64_t j = c; j < c + 8 && j < d; ++j) ss = __fmaf_rn(x[j], x[j], ss);
  }
  return ss;
}

// 1 / sqrt(mean(x²) + eps) from the block's Σ x² over d columns.
__device__ __forceinline__ float InvRmsOf(float sum_squares, int64_t d, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(d) + eps);
}

// 1 / sqrt(mean(x[0, d)²) + eps), reduced over a block of kThreads threads and returned to
// every thread. `scratch` as BlockSum's.
__device__ __forceinline__ float InvRms(const float* x, int64_t d, float eps, float* scratch) {
  return InvRmsOf(BlockSum(SumSquaresPart(x, d), scratch), d, eps);
}

__device__ __forceinline__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// silu(g) * up: the SwiGLU activation, one definition for the elementwise kernels, the
// GEMV's fused output and LinearSwiGlu's epilogue (their results agree bit for bit). The
// exponential and the division are the fast hardware forms (a few ulp of fp32, far below
// the bf16 the prefill and decode round the result to): LinearSwiGlu's epilogue pays for
// every instruction here while its warpgroups' tensor products wait. For g below about -88
// the exponential is +inf and the quotient 0, silu's limit.
__device__ __forceinline__ float SwiGluOf(float g, float up) { return __fdividef(g, 1.0f + __expf(-g)) * up; }

// h + a + sigmoid(gate_pre + bias) ⊙ e for one element: the memory output gate with both
// residual adds, one definition for GatedResidual and the GEMV's fused output.
__device__ __forceinline__ float GatedResidualOf(float h, float a, float gate_pre, float bias, float e) {
  return h + (a + Sigmoid(gate_pre + bias) * e);
}

// ---- Programmatic dependent launch (sm_90 and later) -------------------------------------
//
// A kernel launched by LaunchPdl may start while the kernel before it on the stream still
// runs, so its launch and any work that reads only what no kernel of the step writes
// (weights, the segment's memory K/V) overlap the predecessor. Such a kernel calls
// WaitForPredecessor() before it reads or writes anything else (it returns once the
// predecessor has finished and its writes are visible), and AllowDependents() right after
// that wait, never before: its successor may then launch early, but only once every block
// of this kernel has waited, so when any kernel launches, everything before its direct
// predecessor has finished. (Triggering at the very start instead lets launches run several
// kernels ahead; a kernel then read stale results of one three kernels back, seen on the
// H200 as nondeterministic memory writes.) Both are no-ops in an ordinary launch and before
// sm_90.
__device__ __forceinline__ void WaitForPredecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A float's bits as an unsigned number in the float's order (negatives flipped, the others'
// sign bit set; -0 taken as +0, so that the two compare equal), and back (-0 comes back as
// +0). Not for NaN.
__device__ __forceinline__ unsigned int OrderedBits(float v) {
  const unsigned int u = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float FloatOfOrderedBits(unsigned int ordered) {
  return __uint_as_float((ordered & 0x80000000u) != 0 ? (ordered & 0x7FFFFFFFu) : ~ordered);
}

// A greedy-pick key (ArgmaxKeyToken in cuda_ops.h): the float's OrderedBits, then the index
// counted down so that equal values favour the smaller.
// Not for NaN values (never candidates); kArgmaxFirstNaN stands for a NaN first entry.
__device__ __forceinline__ unsigned long long ArgmaxKey(float v, int64_t i) {
  return (static_cast<unsigned long long>(OrderedBits(v)) << 32) | (0xFFFFFFFFu - static_cast<unsigned int>(i));
}
constexpr unsigned long long kArgmaxFirstNaN = ~0ull;

// The key entry i of a row offers: ArgmaxKey for a number; none (0) for a NaN, except a NaN
// first entry, which std::max_element answers (kArgmaxFirstNaN).
__device__ __forceinline__ unsigned long long CandidateKey(float v, int64_t i) {
  return isnan(v) ? (i == 0 ? kArgmaxFirstNaN : 0ull) : ArgmaxKey(v, i);
}

// Whether LaunchPdl asks for the overlap: yes unless the environment sets LM2_CUDA_PDL=0
// (a diagnostic: every kernel then waits for the one before, as in an ordinary launch).
inline bool PdlEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LM2_CUDA_PDL");
    return v == nullptr || std::string_view(v) != "0";
  }();
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization
// allowed (the kernel must follow the rules above) where the device runs the sm_90 code.
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = PdlEnabled() && Sm90CodeOnCurrentDevice() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Four floats as four bf16 (round to nearest even, as __float2bfloat16_rn), 8 bytes: the
// four-element kernels' bf16 stores.
__device__ __forceinline__ uint2 PackBf16x4(float4 v) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  return make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}

// Whether the pointers are 16-byte aligned: with widths and row strides multiples of 4
// elements, the four-element kernels' condition.
inline bool Aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Blocks for a grid-stride loop over n elements: enough to fill the device, never more
// than the work needs (the loop covers any n).
inline unsigned int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  constexpr int64_t kMaxBlocks = 65536;  // a grid-stride loop covers the rest
  return static_cast<unsigned int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

}  // namespace lm2::runtime::cuda
