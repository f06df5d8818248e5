// Discovery of CUDA devices, available in every build.
//
// In a build without the CUDA backend (LM2_CUDA=OFF, or AUTO without nvcc) the list is
// always empty; with it, the list is what the driver reports. A machine with the CUDA
// backend compiled in but no driver or no card (CI) also gets an empty list, not an
// error: "no GPU here" is a normal answer. Thread-safe; each call asks the driver.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "lm2/core/status.h"

namespace lm2::runtime {

struct CudaDeviceInfo {
  int ordinal = 0;                 // the CUDA device index
  std::string name;                // e.g. "NVIDIA H100 80GB HBM3"
  int compute_major = 0;           // compute capability, e.g. 9 for Hopper
  int compute_minor = 0;
  std::size_t total_memory = 0;    // bytes of device memory
  int multiprocessors = 0;
  // Whether this build's kernels run on it: compiled for its architecture or an earlier
  // one (LM2_CUDA_ARCHITECTURES; the default, 80 and 90, covers Ampere, Ada and Hopper).
  // Automatic backend choice takes the GPU only when device 0 is supported.
  bool supported = false;
};

// True when this build includes the CUDA backend.
bool CudaBackendCompiled();

// The CUDA devices the driver reports (each with whether this build's kernels run on it);
// empty when none (or no backend compiled in).
Result<std::vector<CudaDeviceInfo>> ListCudaDevices();

}  // namespace lm2::runtime
