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
//
// Page-locked host memory (PinnedAlloc / PinnedFree) is cached the same way, process-wide:
// cudaHostAlloc took 0.6-0.7 ms for a few KiB on the H200's host (a new session's first
// prompt paid 1.3 ms for its token ids' and positions' staging), so freed blocks are kept,
// up to kPinnedCacheBytes in all, and a request takes the smallest kept block of at least
// its size and at most twice it. LM2_CUDA_POOL=0 turns this off too.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

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

// Freed page-locked blocks kept for reuse, and the size of every block handed out.
struct PinnedCache {
  std::mutex mu;
  std::multimap<std::size_t, void*> kept;         // size -> block
  std::unordered_map<void*, std::size_t> issued;  // block -> size
  std::size_t kept_bytes = 0;
};
constexpr std::size_t kPinnedCacheBytes = std::size_t{256} << 20;

PinnedCache& Pinned() {
  static auto* cache = new PinnedCache();  // never destroyed, as the device pools
  return *cache;
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

cudaError_t PinnedAlloc(void** p, std::size_t bytes) {
  if (!PoolWanted()) return cudaMallocHost(p, bytes);
  PinnedCache& c = Pinned();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (auto it = c.kept.lower_bound(bytes); it != c.kept.end() && it->first / 2 <= bytes) {
      *p = it->second;
      c.issued.emplace(it->second, it->first);
      c.kept_bytes -= it->first;
      c.kept.erase(it);
      return cudaSuccess;
    }
  }
  const cudaError_t e = cudaHostAlloc(p, bytes, cudaHostAllocPortable);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(c.mu);
  c.issued.emplace(*p, bytes);
  return cudaSuccess;
}

void PinnedFree(void* p) {
  if (!PoolWanted()) {
    (void)cudaFreeHost(p);
    return;
  }
  (void)cudaDeviceSynchronize();  // as cudaFreeHost: no queued copy may still use the block
  PinnedCache& c = Pinned();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    const auto it = c.issued.find(p);
    if (it != c.issued.end()) {
      const std::size_t bytes = it->second;
      c.issued.erase(it);
      if (c.kept_bytes + bytes <= kPinnedCacheBytes) {
        c.kept.emplace(bytes, p);
        c.kept_bytes += bytes;
        return;
      }
    }
  }
  (void)cudaFreeHost(p);
}

void TrimDevicePool(int device) {
  OnDevice(device, [&] {
    const DevicePool dp = PoolOf(device);
    if (dp.pool == nullptr) return;
    DeviceCallScope scope(CaptureExclusion());
    (void)cudaStreamSynchronize(dp.stream);
    (void)cudaMemPoolTrimTo(dp.pool, 0);
  });
  std::vector<void*> kept;
  {
    PinnedCache& c = Pinned();
    std::lock_guard<std::mutex> lock(c.mu);
    for (const auto& [bytes, block] : c.kept) kept.push_back(block);
    c.kept.clear();
    c.kept_bytes = 0;
  }
  DeviceCallScope scope(CaptureExclusion());
  for (void* block : kept) (void)cudaFreeHost(block);
}

std::size_t DevicePoolUsedBytes(int device) {
  std::uint64_t used = 0;
  OnDevice(device, [&] {
    const DevicePool dp = PoolOf(device);
    if (dp.pool == nullptr) return;
    DeviceCallScope scope(CaptureExclusion());
    (void)cudaStreamSynchronize(dp.stream);
    if (cudaMemPoolGetAttribute(dp.pool, cudaMemPoolAttrUsedMemCurrent, &used) != cudaSuccess) {
      (void)cudaGetLastError();
      used = 0;
    }
  });
  return static_cast<std::size_t>(used);
}

std::size_t KeptPinnedBytes() {
  PinnedCache& c = Pinned();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.kept_bytes;
}

}  // namespace lm2::runtime::cuda
