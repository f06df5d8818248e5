// Elementwise ops: bf16 conversion, bias, the gated residual, SwiGLU, add. Grid-stride
// kernels over int64 counts, then their launchers. The conversions, the gated residual and
// SwiGLU (on a prefill's critical path) are launched by LaunchPdl: they wait for their
// predecessor at their very start (device_math.cuh's rule), so only their launch and their
// blocks' start overlap it.
#include <cuda_bf16.h>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/kernel_modules.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

// dst[r, c] = bf16(src[r * src_ld + c]), round to nearest even.
__global__ void F32ToBf16Kernel(const float* __restrict__ src, int64_t rows, int64_t cols, int64_t src_ld,
                                __nv_bfloat16* __restrict__ dst) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < rows * cols; i += GridStride()) {
    dst[i] = __float2bfloat16_rn(src[(i / cols) * src_ld + i % cols]);
  }
}

// The same four elements a thread (cols4, ld4: cols and src_ld in units of 4).
__global__ void F32ToBf16x4Kernel(const float4* __restrict__ src, int64_t rows, int64_t cols4, int64_t ld4,
                                  uint2* __restrict__ dst) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < rows * cols4; i += GridStride()) {
    dst[i] = PackBf16x4(src[(i / cols4) * ld4 + i % cols4]);
  }
}

__global__ void Bf16ToF32Kernel(const __nv_bfloat16* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = FirstIndex(); i < n; i += GridStride()) dst[i] = __bfloat162float(src[i]);
}

__global__ void AddBiasKernel(float* __restrict__ y, int64_t total, int64_t out, const float* __restrict__ bias) {
  for (int64_t i = FirstIndex(); i < total; i += GridStride()) y[i] += bias[i % out];
}

// Over [n / width, width]: four elements a thread (width a multiple of 4, 16-byte aligned).
__global__ void GatedResidualx4Kernel(float4* __restrict__ h, const float4* __restrict__ a,
                                      const float4* __restrict__ gate_pre, const float4* __restrict__ bias,
                                      int64_t width4, const float4* __restrict__ e, int64_t n4) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < n4; i += GridStride()) {
    float4 x = h[i];
    const float4 av = a[i], gv = gate_pre[i], bv = bias[i % width4], ev = e[i];
    x.x = GatedResidualOf(x.x, av.x, gv.x, bv.x, ev.x);
    x.y = GatedResidualOf(x.y, av.y, gv.y, bv.y, ev.y);
    x.z = GatedResidualOf(x.z, av.z, gv.z, bv.z, ev.z);
    x.w = GatedResidualOf(x.w, av.w, gv.w, bv.w, ev.w);
    h[i] = x;
  }
}

__global__ void GatedResidualKernel(float* __restrict__ h, const float* __restrict__ a,
                                    const float* __restrict__ gate_pre, const float* __restrict__ bias, int64_t width,
                                    const float* __restrict__ e, int64_t n) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < n; i += GridStride()) {
    h[i] = GatedResidualOf(h[i], a[i], gate_pre[i], bias[i % width], e[i]);
  }
}

// out may alias gate: each element is read then written by the same thread.
__global__ void SwiGluKernel(const float* gate, const float* __restrict__ up, int64_t n, float* out) {
  for (int64_t i = FirstIndex(); i < n; i += GridStride()) out[i] = SwiGluOf(gate[i], up[i]);
}

// A block per token: out[t, :] = table[ids[t], :] widened to fp32. An id outside [0, V)
// (the caller validates ids on the host; this is a guard) gives a NaN row, never a read
// outside the table.
__global__ void EmbeddingLookupKernel(const __nv_bfloat16* __restrict__ table, int64_t V, int64_t d,
                                      const int32_t* __restrict__ ids, float* __restrict__ out) {
  WaitForPredecessor();
  AllowDependents();
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  float* row = out + t * d;
  if (id < 0 || id >= V) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) row[c] = __int_as_float(0x7fffffff);
    return;
  }
  const __nv_bfloat16* src = table + static_cast<int64_t>(id) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) row[c] = __bfloat162float(src[c]);
}

__device__ __forceinline__ float Wide(float v) { return v; }
__device__ __forceinline__ float Wide(__nv_bfloat16 v) { return __bfloat162float(v); }

// gate_up[t] = [gate (F) | up (F)] (fp32 or bf16); out[t, c] = bf16(silu(gate) * up).
template <typename T>
__global__ void SwiGluBf16Kernel(const T* __restrict__ gate_up, int64_t rows, int64_t F,
                                 __nv_bfloat16* __restrict__ out) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < rows * F; i += GridStride()) {
    const int64_t t = i / F, c = i % F;
    out[i] = __float2bfloat16_rn(SwiGluOf(Wide(gate_up[t * 2 * F + c]), Wide(gate_up[t * 2 * F + F + c])));
  }
}

// The same four elements a thread (F4 = F / 4).
__global__ void SwiGluBf16x4Kernel(const float4* __restrict__ gate_up, int64_t rows, int64_t F4,
                                   uint2* __restrict__ out) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < rows * F4; i += GridStride()) {
    const int64_t t = i / F4, c = i % F4;
    const float4 g = gate_up[t * 2 * F4 + c], u = gate_up[t * 2 * F4 + F4 + c];
    out[i] = PackBf16x4(make_float4(SwiGluOf(g.x, u.x), SwiGluOf(g.y, u.y), SwiGluOf(g.z, u.z), SwiGluOf(g.w, u.w)));
  }
}

// The same from bf16 rows, eight elements a thread (F8 = F / 8): 16-byte loads.
__global__ void SwiGluFromBf16x8Kernel(const uint4* __restrict__ gate_up, int64_t rows, int64_t F8,
                                       uint4* __restrict__ out) {
  WaitForPredecessor();  // (LaunchPdl: nothing read before it)
  AllowDependents();
  for (int64_t i = FirstIndex(); i < rows * F8; i += GridStride()) {
    const int64_t t = i / F8, c = i % F8;
    const uint4 g = gate_up[t * 2 * F8 + c], u = gate_up[t * 2 * F8 + F8 + c];
    const auto* gp = reinterpret_cast<const __nv_bfloat162*>(&g);
    const auto* up = reinterpret_cast<const __nv_bfloat162*>(&u);
    uint4 o;
    auto* op = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 gf = __bfloat1622float2(gp[k]), uf = __bfloat1622float2(up[k]);
      op[k] = __floats2bfloat162_rn(SwiGluOf(gf.x, uf.x), SwiGluOf(gf.y, uf.y));
    }
    out[i] = o;
  }
}

__global__ void AddInPlaceKernel(float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  for (int64_t i = FirstIndex(); i < n; i += GridStride()) x[i] += y[i];
}

// SwiGluBf16 of either input type: the checks, then `launch_vec` (`vec` elements a thread;
// it returns the launch's cudaError_t) where F and the pointers allow, else one element a
// thread.
template <typename T, typename LaunchVec>
Status SwiGluBf16Rows(const T* gate_up, int64_t rows, int64_t F, __nv_bfloat16* out, cudaStream_t stream,
                      int64_t vec, const char* vec_kernel, LaunchVec&& launch_vec) {
  if (rows < 0 || F <= 0) {
    return Status::InvalidArgument("SwiGluBf16: rows=" + std::to_string(rows) + " F=" + std::to_string(F));
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SwiGluBf16", {gate_up, out}));
  if (F % vec == 0 && Aligned16({gate_up, out})) {
    return CudaStatus(launch_vec(GridFor(rows * F / vec, kThreads)), vec_kernel);
  }
  return CudaStatus(LaunchPdl(&SwiGluBf16Kernel<T>, GridFor(rows * F, kThreads), kThreads, 0, stream, gate_up, rows, F,
                              out),
                    "SwiGluBf16Kernel");
}

LM2_CUDA_KERNEL_MODULE(F32ToBf16Kernel);

}  // namespace

Status ConvertF32ToBf16(const float* src, int64_t n, __nv_bfloat16* dst, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCount("ConvertF32ToBf16", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("ConvertF32ToBf16", {src, dst}));
  return ConvertRowsF32ToBf16(src, 1, n, n, dst, stream);
}

Status ConvertRowsF32ToBf16(const float* src, int64_t rows, int64_t cols, int64_t src_ld, __nv_bfloat16* dst,
                            cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCount("ConvertRowsF32ToBf16", rows * cols));
  if (rows < 0 || cols < 0 || src_ld < cols) {
    return Status::InvalidArgument("ConvertRowsF32ToBf16: rows=" + std::to_string(rows) + " cols=" +
                                   std::to_string(cols) + " src_ld=" + std::to_string(src_ld));
  }
  if (rows * cols == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("ConvertRowsF32ToBf16", {src, dst}));
  if (cols % 4 == 0 && src_ld % 4 == 0 && Aligned16({src, dst})) {
    return CudaStatus(LaunchPdl(&F32ToBf16x4Kernel, GridFor(rows * cols / 4, kThreads), kThreads, 0, stream,
                                reinterpret_cast<const float4*>(src), rows, cols / 4, src_ld / 4,
                                reinterpret_cast<uint2*>(dst)),
                      "F32ToBf16x4Kernel");
  }
  return CudaStatus(
      LaunchPdl(&F32ToBf16Kernel, GridFor(rows * cols, kThreads), kThreads, 0, stream, src, rows, cols, src_ld, dst),
      "F32ToBf16Kernel");
}

Status ConvertBf16ToF32(const __nv_bfloat16* src, int64_t n, float* dst, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCount("ConvertBf16ToF32", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("ConvertBf16ToF32", {src, dst}));
  Bf16ToF32Kernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(src, n, dst);
  return CheckLaunch("Bf16ToF32Kernel");
}

Status AddBias(float* y, int64_t rows, int64_t out, const float* bias, cudaStream_t stream) {
  if (rows < 0 || out <= 0) {
    return Status::InvalidArgument("AddBias: rows=" + std::to_string(rows) + " out=" + std::to_string(out));
  }
  if (rows == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("AddBias", {y, bias}));
  AddBiasKernel<<<GridFor(rows * out, kThreads), kThreads, 0, stream>>>(y, rows * out, out, bias);
  return CheckLaunch("AddBiasKernel");
}

Status GatedResidual(float* h, const float* a, const float* gate_pre, const float* gate_bias, int64_t rows,
                     int64_t width, const float* e, cudaStream_t stream) {
  if (rows < 0 || width <= 0) {
    return Status::InvalidArgument("GatedResidual: rows=" + std::to_string(rows) + " width=" + std::to_string(width));
  }
  const int64_t n = rows * width;
  LM2_RETURN_IF_ERROR(ops::CheckCount("GatedResidual", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("GatedResidual", {h, a, gate_pre, gate_bias, e}));
  if (width % 4 == 0 && Aligned16({h, a, gate_pre, gate_bias, e})) {
    return CudaStatus(LaunchPdl(&GatedResidualx4Kernel, GridFor(n / 4, kThreads), kThreads, 0, stream,
                                reinterpret_cast<float4*>(h), reinterpret_cast<const float4*>(a),
                                reinterpret_cast<const float4*>(gate_pre), reinterpret_cast<const float4*>(gate_bias),
                                width / 4, reinterpret_cast<const float4*>(e), n / 4),
                      "GatedResidualx4Kernel");
  }
  return CudaStatus(LaunchPdl(&GatedResidualKernel, GridFor(n, kThreads), kThreads, 0, stream, h, a, gate_pre,
                              gate_bias, width, e, n),
                    "GatedResidualKernel");
}

Status SwiGlu(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCount("SwiGlu", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("SwiGlu", {gate, up, out}));
  SwiGluKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(gate, up, n, out);
  return CheckLaunch("SwiGluKernel");
}

Status EmbeddingLookup(const __nv_bfloat16* table, int64_t V, int64_t d, const int32_t* ids, int64_t T, float* out,
                       cudaStream_t stream) {
  if (V <= 0 || d <= 0 || T < 0 || T > ops::detail::kInt32Max) {
    return Status::InvalidArgument("EmbeddingLookup: V=" + std::to_string(V) + " d=" + std::to_string(d) +
                                   " T=" + std::to_string(T));
  }
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("EmbeddingLookup", {table, ids, out}));
  return CudaStatus(
      LaunchPdl(&EmbeddingLookupKernel, static_cast<unsigned int>(T), kThreads, 0, stream, table, V, d, ids, out),
      "EmbeddingLookupKernel");
}

Status SwiGluBf16(const float* gate_up, int64_t rows, int64_t F, __nv_bfloat16* out, cudaStream_t stream) {
  return SwiGluBf16Rows(gate_up, rows, F, out, stream, 4, "SwiGluBf16x4Kernel", [&](unsigned int grid) {
    return LaunchPdl(&SwiGluBf16x4Kernel, grid, kThreads, 0, stream, reinterpret_cast<const float4*>(gate_up), rows,
                     F / 4, reinterpret_cast<uint2*>(out));
  });
}

Status SwiGluBf16(const __nv_bfloat16* gate_up, int64_t rows, int64_t F, __nv_bfloat16* out, cudaStream_t stream) {
  return SwiGluBf16Rows(gate_up, rows, F, out, stream, 8, "SwiGluFromBf16x8Kernel", [&](unsigned int grid) {
    return LaunchPdl(&SwiGluFromBf16x8Kernel, grid, kThreads, 0, stream, reinterpret_cast<const uint4*>(gate_up), rows,
                     F / 8, reinterpret_cast<uint4*>(out));
  });
}

Status AddInPlace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCount("AddInPlace", n));
  if (n == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("AddInPlace", {x, y}));
  AddInPlaceKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(x, y, n);
  return CheckLaunch("AddInPlaceKernel");
}

}  // namespace lm2::runtime::cuda
