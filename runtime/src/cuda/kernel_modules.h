// Loading every kernel of lm2's CUDA code when a model loads.
//
// Under CUDA's lazy loading (the default since CUDA 12.2, CUDA_MODULE_LOADING=LAZY) a
// kernel's code reaches the device at its first launch, which takes device memory: a kernel
// first launched on a full device (a batch of a size not run before: the GEMV's 2-8-row
// forms, the streamed batched read) could fail after the call's reservations and break the
// states it ran for. The driver keeps a little memory that allocations do not get (3.1 MiB
// on an H200 with driver 580, which covered such a launch in the out-of-memory test even
// without this); LoadAllKernels makes every kernel of every registered module resident at
// load (153 kernels in 13 modules, 5.9 ms there), so that nothing rests on that reserve.
// cuBLAS loads its own kernels as it needs them (the warm-up runs prompt chunks of every
// GEMM row count it pads to; docs/cuda.md).
#pragma once

#include <cstdint>

#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// Registers the module (one per .cu file) that holds `kernel`, any __global__ function of
// it. Each .cu file with kernels registers one through LM2_CUDA_KERNEL_MODULE, at static
// initialisation. Returns true (for the registering static).
bool RegisterKernelModule(const void* kernel);

struct KernelModuleCounts {
  int64_t modules = 0;     // registered modules with code for the current device
  int64_t functions = 0;   // kernels in them
  int64_t unloaded = 0;    // kernels whose code is not on the device (LoadAllKernels: before it ran)
  bool lazy = false;       // the process loads modules lazily (CUDA_MODULE_LOADING)
};

// Loads, on the current device, every kernel of the registered modules that is not loaded
// yet; the counts as found before loading. ResourceExhausted when the device has no memory
// left for the code. A no-op (beyond counting) under eager loading. Thread-safe.
Result<KernelModuleCounts> LoadAllKernels();

// The counts as they are now, loading nothing (tests).
Result<KernelModuleCounts> CountKernels();

}  // namespace lm2::runtime::cuda

// In a .cu file, at namespace scope after the kernel named (a __global__ function, or an
// instance of a template one that the file launches; variadic for the instance's commas):
// registers the file's module with LoadAllKernels.
#define LM2_CUDA_KERNEL_MODULE(...)                                  \
  [[maybe_unused]] static const bool lm2_kernel_module_registered_ = \
      ::lm2::runtime::cuda::RegisterKernelModule(reinterpret_cast<const void*>(&(__VA_ARGS__)))
