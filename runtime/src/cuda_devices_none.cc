// ListCudaDevices for builds without the CUDA backend.
#include "lm2/runtime/cuda_devices.h"

namespace lm2::runtime {

bool CudaBackendCompiled() { return false; }

Result<std::vector<CudaDeviceInfo>> ListCudaDevices() { return std::vector<CudaDeviceInfo>{}; }

}  // namespace lm2::runtime
