#include <cuda_runtime.h>

#include "lm2/runtime/cuda_devices.h"

namespace lm2::runtime {

bool CudaBackendCompiled() { return true; }

Result<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  // No driver or no device is the ordinary CPU-only machine: an empty list, not an error.
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    (void)cudaGetLastError();  // clear the sticky error state
    return std::vector<CudaDeviceInfo>{};
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Status::Unavailable(std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err));
  }
  std::vector<CudaDeviceInfo> devices;
  devices.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    err = cudaGetDeviceProperties(&prop, i);
    if (err != cudaSuccess) {
      return Status::Unavailable(std::string("cudaGetDeviceProperties: ") + cudaGetErrorString(err));
    }
    devices.push_back(CudaDeviceInfo{i, prop.name, prop.major, prop.minor, prop.totalGlobalMem,
                                     prop.multiProcessorCount});
  }
  return devices;
}

}  // namespace lm2::runtime
