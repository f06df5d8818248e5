// Hopper's tensor copies (TMA) for the sm_90a kernels (memory_tiled_sm90.cu, gemm_sm90.cu):
// a 2-D box of a bf16 row-major matrix copied into shared memory in the 128-byte swizzle
// (wgmma.cuh: the layout, and the descriptor wgmma reads such a tile by). A box of 64 columns
// is one swizzled row per matrix row: what cuTensorMapEncodeTiled's
// CU_TENSOR_MAP_SWIZZLE_128B stores.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/mma.cuh"  // SharedAddress
#include "cuda/wgmma.cuh"  // the swizzle, LM2_WGMMA
#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// The box of `map` at column x, row y into 1 KiB-aligned shared `dst`, counted on `bar`
// (mbarrier.cuh: the box's bytes complete a transaction the barrier was told to expect).
__device__ __forceinline__ void TensorTile(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
#if LM2_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
          "r"(SharedAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(SharedAddress(bar))
      : "memory");
#endif
}

// The driver's cuTensorMapEncodeTiled (a host function: it only fills the map), looked up
// once per process; null where the driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // a failed lookup leaves no error behind for the next launch
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The map of the [rows, cols] bf16 matrix at `base` (row stride `ld` elements, a multiple
// of 8) in boxes of 64 columns x box_rows rows, 128-byte swizzle; boxes past the matrix's
// end read zeros. `op` names the caller in errors.
inline Result<CUtensorMap> SwizzledRowsMap(const __nv_bfloat16* base, int64_t rows, int64_t cols, int64_t ld,
                                           int box_rows, const char* op) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return Status::Unavailable(std::string(op) + ": no cuTensorMapEncodeTiled in this driver");
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {kSwizzleRowBytes / 2, static_cast<cuuint32_t>(box_rows)}, element_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(base), dims, strides,
                            box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return Status::Internal(std::string(op) + ": cuTensorMapEncodeTiled failed (" + std::to_string(r) + ")");
  }
  return map;
}

}  // namespace lm2::runtime::cuda

