#include <cuda_runtime.h>

#include <atomic>

#include "lm2/runtime/cuda_devices.h"

namespace lm2::runtime {
namespace {

// The virtual architectures the kernels were compiled for (nvcc's list, e.g. 800,900), each
// as PTX beside its machine code (CMake's plain "80;90"), in ascending order.
constexpr int kCompiledArchs[] = {__CUDA_ARCH_LIST__};

// The architecture whose code runs on a device of compute capability major.minor: the
// highest compiled one not above it (its machine code, or its PTX compiled by the driver);
// 0 when none.
int CompiledArchFor(int major, int minor) {
  const int cc = 100 * major + 10 * minor;
  int best = 0;
  for (int arch : kCompiledArchs) {
    if (arch <= cc && arch > best) best = arch;
  }
  return best;
}

}  // namespace

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
                                     prop.multiProcessorCount, CompiledArchFor(prop.major, prop.minor) > 0});
  }
  return devices;
}

}  // namespace lm2::runtime

namespace lm2::runtime::cuda {
namespace {

constexpr int kMaxDevices = 64;

// `holds(major, minor)` for the current device's compute capability, asked once per device
// (`cached`: 0 not asked yet, 1 yes, -1 no); false where the device cannot be queried.
template <typename Holds>
bool CachedPerDevice(std::atomic<signed char> (&cached)[kMaxDevices], Holds holds) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const signed char v = cached[device].load(std::memory_order_relaxed);
    if (v != 0) return v > 0;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const bool yes = holds(major, minor);
  if (cacheable) cached[device].store(yes ? 1 : -1, std::memory_order_relaxed);
  return yes;
}

}  // namespace

bool Sm90CodeOnCurrentDevice() {
  static std::atomic<signed char> cached[kMaxDevices];
  return CachedPerDevice(cached, [](int major, int minor) { return CompiledArchFor(major, minor) >= 900; });
}

bool ComputeCapability90OnCurrentDevice() {
  static std::atomic<signed char> cached[kMaxDevices];
  return CachedPerDevice(cached, [](int major, int minor) { return major == 9 && minor == 0; });
}

}  // namespace lm2::runtime::cuda
