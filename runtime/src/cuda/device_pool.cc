// Device memory for DeviceBuffer: a stream-ordered memory pool per device (cudaMemPool),
// private to lm2 (the device's default pool, which the embedding application may use, is
// left alone), that keeps what is freed for the next allocation instead of handing it back
// to the driver. A fresh session's buffers then come from memory an earlier one released,
// without cudaMalloc's mapping of new pages. LM2_CUDA_POOL=0 in the environment (read once),
// or a device without memory pools, gives plain cudaMalloc / cudaFree.
//
// Ordering: an allocation is made on the pool's own stream and waited for there, so the
// memory is usable from every stream when the call returns (the pool may have handed out
// memory whose release it ordered on that stream). A free first waits for the device to
// finish its queued work, as cudaFree does, since any stream may still use the memory.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string_view>

#include "cuda/cuda_resources.h"

namespace lm2::runtime::cuda {
namespace {

struct DevicePool {
  cudaMemPool_t pool = nullptr;   // null: the device allocates with cudaMalloc
  cudaStream_t stream = nullptr;  // where the pool's allocations and frees are ordered
};

bool PoolWanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("LM2_CUDA_POOL");
    return v == nullptr || std::string_view(v) != "0";
  }();
  return wanted;
}

// The pool of `device` (the current device), made on first use. Pools and their streams
// live as long as the process: they are never destroyed (a static destructor would run
// after the CUDA runtime may have gone), only trimmed (TrimDevicePool).
DevicePool PoolOf(int device) {
  static std::mutex mu;
  static auto* pools = new std::map<int, DevicePool>();
  std::lock_guard<std::mutex> lock(mu);
  auto [it, fresh] = pools->try_emplace(device);
  if (!fresh || !PoolWanted()) return it->second;
  int supported = 0;
  if (cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess || supported == 0) {
    (void)cudaGetLastError();
    return it->second;
  }
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.handleTypes = cudaMemHandleTypeNone;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  cudaStream_t stream = nullptr;
  if (cudaMemPoolCreate(&pool, &props) != cudaSuccess) {
    (void)cudaGetLastError();
    return it->second;
  }
  std::uint64_t keep = UINT64_MAX;  // what is freed stays in the pool until trimmed
  if (cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) != cudaSuccess ||
      cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaMemPoolDestroy(pool);
    return it->second;
  }
  it->second = DevicePool{pool, stream};
  return it->second;
}

// Runs fn with `device` current, restoring the caller's device after.
template <typename Fn>
void OnDevice(int device, Fn&& fn) {
  int current = device;
  (void)cudaGetDevice(&current);
  if (current != device) (void)cudaSetDevice(device);
  fn();
  if (current != device) (void)cudaSetDevice(current);
}

}  // namespace

cudaError_t DeviceAlloc(void** p, std::size_t bytes) {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const DevicePool dp = PoolOf(device);
  if (dp.pool == nullptr) return cudaMalloc(p, bytes);
  cudaError_t e = cudaMallocFromPoolAsync(p, bytes, dp.pool, dp.stream);
  if (e != cudaSuccess) return e;
  e = cudaStreamSynchronize(dp.stream);
  if (e != cudaSuccess) {
    (void)cudaFreeAsync(*p, dp.stream);
    *p = nullptr;
  }
  return e;
}

void DeviceFree(void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaFree(p);
    return;
  }
  OnDevice(attr.device, [&] {
    const DevicePool dp = PoolOf(attr.device);
    if (dp.pool == nullptr) {
      (void)cudaFree(p);
      return;
    }
    (void)cudaDeviceSynchronize();  // as cudaFree: no queued work may still use the memory
    (void)cudaFreeAsync(p, dp.stream);
  });
}

void TrimDevicePool(int device) {
  OnDevice(device, [&] {
    const DevicePool dp = PoolOf(device);
    if (dp.pool == nullptr) return;
    DeviceCallScope scope(CaptureExclusion());
    (void)cudaStreamSynchronize(dp.stream);
    (void)cudaMemPoolTrimTo(dp.pool, 0);
  });
}

}  // namespace lm2::runtime::cuda
