// RAII owners for the CUDA backend: device and pinned buffers, streams, the cuBLAS handle and
// CUDA graphs (two templates in `detail`: one for arrays, one for handles).
//
// Each is created by a static factory returning Result (no exceptions, no aborts), is
// move-only, and frees its resource in the destructor (errors there cannot be reported
// and are ignored: a failed free at teardown changes nothing for the caller). None is
// thread-safe; a stream or handle belongs to one session at a time. Copies between host
// and device are explicit calls. Their synchronising, allocating and freeing calls keep
// clear of graph captures in other threads (CaptureExclusion).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>

#include "cuda/cuda_check.h"
#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// Graph capture and the CUDA calls that synchronise, allocate or free exclude each other
// in the process: the driver invalidates a capture when another thread synchronises with
// the device meanwhile, and fails that thread's call, whatever the capture mode (seen with
// sessions chatting on several threads). Captures are rare (a decode step's first run at a
// batch size or after its buffers moved) and short (enqueueing only); the other side costs
// an uncontended shared lock. Never nested: a holder makes no other call that takes it.
inline std::shared_mutex& CaptureExclusion() {
  static std::shared_mutex m;
  return m;
}
// Held around a synchronising, allocating or freeing call.
using DeviceCallScope = std::shared_lock<std::shared_mutex>;
// Held while a graph is captured.
using CaptureScope = std::unique_lock<std::shared_mutex>;

// Device memory (device_pool.cc): from lm2's stream-ordered pool of the current device,
// which keeps freed memory for the next allocation (LM2_CUDA_POOL=0: cudaMalloc). Usable
// from every stream when DeviceAlloc returns; DeviceFree waits for the device's queued work
// first, as cudaFree does. TrimDevicePool hands what the pool keeps unused back to the
// driver (when a model's weights are freed).
cudaError_t DeviceAlloc(void** p, std::size_t bytes);
void DeviceFree(void* p);
void TrimDevicePool(int device);
// Bytes of `device`'s pool that allocations hold now (cudaMemPoolAttrUsedMemCurrent, after
// the frees queued on the pool's stream; 0 without a pool).
std::size_t DevicePoolUsedBytes(int device);

// Page-locked host memory (device_pool.cc), cached process-wide the same way: freed blocks
// are kept (up to 256 MiB in all) for the next request of at least half their size
// (LM2_CUDA_POOL=0: cudaMallocHost / cudaFreeHost). PinnedFree waits for the current
// device's queued work first, as cudaFreeHost does. TrimDevicePool frees the kept blocks
// too; KeptPinnedBytes says how much is kept.
cudaError_t PinnedAlloc(void** p, std::size_t bytes);
void PinnedFree(void* p);
std::size_t KeptPinnedBytes();

namespace detail {

// Owns `count` elements of T in the memory of `Space` (Alloc / Free / kAlloc name):
// move-only, freed in the destructor. DeviceBuffer and PinnedBuffer below are its two uses.
template <typename T, typename Space>
class OwnedArray {
 public:
  OwnedArray() = default;
  ~OwnedArray() { Reset(); }
  OwnedArray(const OwnedArray&) = delete;
  OwnedArray& operator=(const OwnedArray&) = delete;
  OwnedArray(OwnedArray&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, std::size_t{0})) {}
  OwnedArray& operator=(OwnedArray&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, std::size_t{0});
    }
    return *this;
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }

 protected:
  // Takes `count` new elements (none for 0); the owner must be empty.
  Status Acquire(std::size_t count) {
    if (count == 0) return Status::Ok();
    void* p = nullptr;
    DeviceCallScope scope(CaptureExclusion());
    const std::size_t bytes = count * sizeof(T);
    if (const cudaError_t e = Space::Alloc(&p, bytes); e != cudaSuccess) {
      return CudaStatus(e, (std::string(Space::kAlloc) + " of " + std::to_string(bytes) + " bytes").c_str());
    }
    ptr_ = static_cast<T*>(p);
    count_ = count;
    return Status::Ok();
  }

  T* ptr_ = nullptr;
  std::size_t count_ = 0;

 private:
  void Reset() {
    if (ptr_ != nullptr) {
      DeviceCallScope scope(CaptureExclusion());
      Space::Free(ptr_);
    }
    ptr_ = nullptr;
    count_ = 0;
  }
};

struct DeviceSpace {
  static constexpr const char* kAlloc = "device memory allocation";
  static cudaError_t Alloc(void** p, std::size_t bytes) { return DeviceAlloc(p, bytes); }
  static void Free(void* p) { DeviceFree(p); }
};

struct PinnedSpace {
  static constexpr const char* kAlloc = "cudaHostAlloc";
  static cudaError_t Alloc(void** p, std::size_t bytes) { return PinnedAlloc(p, bytes); }
  static void Free(void* p) { PinnedFree(p); }
};

// Owns one handle of a CUDA library object, destroyed by `Destroy` in the destructor:
// move-only. CudaStream, CublasHandle and CudaGraph below are its uses.
template <typename H, auto Destroy>
class OwnedHandle {
 public:
  OwnedHandle() = default;
  ~OwnedHandle() { Reset(); }
  OwnedHandle(const OwnedHandle&) = delete;
  OwnedHandle& operator=(const OwnedHandle&) = delete;
  OwnedHandle(OwnedHandle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  OwnedHandle& operator=(OwnedHandle&& o) noexcept {
    if (this != &o) {
      Reset();
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }

 protected:
  H handle_ = nullptr;

 private:
  void Reset() {
    if (handle_ != nullptr) {
      DeviceCallScope scope(CaptureExclusion());
      (void)Destroy(handle_);
    }
    handle_ = nullptr;
  }
};

}  // namespace detail

// `count` elements of T in device memory (DeviceAlloc; contents undefined until written).
template <typename T>
class DeviceBuffer : public detail::OwnedArray<T, detail::DeviceSpace> {
 public:
  static Result<DeviceBuffer> Allocate(std::size_t count) {
    DeviceBuffer b;
    LM2_RETURN_IF_ERROR(b.Acquire(count));
    return b;
  }

  // Copies `count` (<= size()) elements in on `stream`. With pageable host memory the call
  // returns once the source has been staged (it synchronises: outside a capture, hold a
  // DeviceCallScope); with pinned memory the source must stay untouched until the stream
  // reaches the copy (capturable).
  Status CopyFromHost(const T* src, std::size_t count, cudaStream_t stream) {
    if (count > this->count_) {
      return Status::InvalidArgument("DeviceBuffer::CopyFromHost: more elements than the buffer");
    }
    if (count == 0) return Status::Ok();
    return CudaStatus(cudaMemcpyAsync(this->ptr_, src, count * sizeof(T), cudaMemcpyHostToDevice, stream),
                      "cudaMemcpyAsync(host to device)");
  }
  // Enqueues a copy of `count` (<= size()) elements out on `stream` (into pinned memory: the
  // call returns at once; the data is there when the stream reaches the copy).
  Status CopyToHostAsync(T* dst, std::size_t count, cudaStream_t stream) const {
    if (count > this->count_) return Status::InvalidArgument("DeviceBuffer::CopyToHost: more elements than the buffer");
    if (count == 0) return Status::Ok();
    return CudaStatus(cudaMemcpyAsync(dst, this->ptr_, count * sizeof(T), cudaMemcpyDeviceToHost, stream),
                      "cudaMemcpyAsync(device to host)");
  }
  // Copies `count` (<= size()) elements out and waits for `stream` to finish them.
  Status CopyToHost(T* dst, std::size_t count, cudaStream_t stream) const {
    LM2_RETURN_IF_ERROR(CopyToHostAsync(dst, count, stream));
    DeviceCallScope scope(CaptureExclusion());
    return CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
  // Sets every byte to `byte` on `stream` (0 to zero; 0xFF poisons floats with NaN).
  Status FillBytes(unsigned char byte, cudaStream_t stream) {
    if (this->count_ == 0) return Status::Ok();
    return CudaStatus(cudaMemsetAsync(this->ptr_, byte, this->bytes(), stream), "cudaMemsetAsync");
  }
};

// `count` elements of T in page-locked host memory (PinnedAlloc): the staging area of
// asynchronous copies (they overlap with host work and run at full PCIe rate). Contents
// undefined until written.
template <typename T>
class PinnedBuffer : public detail::OwnedArray<T, detail::PinnedSpace> {
 public:
  static Result<PinnedBuffer> Allocate(std::size_t count) {
    PinnedBuffer b;
    LM2_RETURN_IF_ERROR(b.Acquire(count));
    return b;
  }
};

// Grows `buffer` to at least `count` elements (contents are not kept); a no-op when it is
// already large enough. For scratch whose size follows the longest call seen.
template <typename Buffer>
Status EnsureCapacity(Buffer& buffer, std::size_t count) {
  if (buffer.size() >= count) return Status::Ok();
  buffer = Buffer();  // free first: the old and new buffers need not coexist
  LM2_ASSIGN_OR_RETURN(buffer, Buffer::Allocate(count));
  return Status::Ok();
}

// A CUDA stream on the current device (non-blocking with respect to the legacy default
// stream: work on it orders only with itself and explicit events).
class CudaStream : public detail::OwnedHandle<cudaStream_t, &cudaStreamDestroy> {
 public:
  static Result<CudaStream> Create() {
    CudaStream s;
    DeviceCallScope scope(CaptureExclusion());
    LM2_RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithFlags(&s.handle_, cudaStreamNonBlocking), "cudaStreamCreate"));
    return s;
  }
  cudaStream_t get() const { return handle_; }
  Status Synchronize() const {
    DeviceCallScope scope(CaptureExclusion());
    return CudaStatus(cudaStreamSynchronize(handle_), "cudaStreamSynchronize");
  }
};

// A CUDA event without timing: orders work between streams (record on one, wait on
// another), also inside a graph capture, where it becomes an edge of the graph.
class CudaEvent : public detail::OwnedHandle<cudaEvent_t, &cudaEventDestroy> {
 public:
  static Result<CudaEvent> Create() {
    CudaEvent e;
    DeviceCallScope scope(CaptureExclusion());
    LM2_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&e.handle_, cudaEventDisableTiming), "cudaEventCreate"));
    return e;
  }
  // Work enqueued on `waiter` from now on runs after what was enqueued on `signaller` so far.
  Status Order(cudaStream_t signaller, cudaStream_t waiter) const {
    LM2_RETURN_IF_ERROR(Record(signaller));
    return Wait(waiter);
  }
  // Marks what was enqueued on `stream` so far; Synchronize waits on the host until it ran.
  Status Record(cudaStream_t stream) const { return CudaStatus(cudaEventRecord(handle_, stream), "cudaEventRecord"); }
  // Work enqueued on `waiter` from now on runs after what the last Record marked.
  Status Wait(cudaStream_t waiter) const {
    return CudaStatus(cudaStreamWaitEvent(waiter, handle_, 0), "cudaStreamWaitEvent");
  }
  Status Synchronize() const {
    DeviceCallScope scope(CaptureExclusion());
    return CudaStatus(cudaEventSynchronize(handle_), "cudaEventSynchronize");
  }
};

// A cuBLAS handle (its workspace is cuBLAS's own unless set). Linear sets the stream on each
// call.
class CublasHandle : public detail::OwnedHandle<cublasHandle_t, &cublasDestroy> {
 public:
  static Result<CublasHandle> Create() {
    CublasHandle h;
    DeviceCallScope scope(CaptureExclusion());
    LM2_RETURN_IF_ERROR(CublasStatus(cublasCreate(&h.handle_), "cublasCreate"));
    return h;
  }
  cublasHandle_t get() const { return handle_; }
};

// An executable CUDA graph, made by capturing the work a function enqueues on a stream
// (thread-local capture mode: other threads' CUDA calls are unaffected). Replaying it
// launches the whole sequence at once. The captured work refers to buffers by address:
// whoever owns the graph must capture again when any of them moves.
class CudaGraph : public detail::OwnedHandle<cudaGraphExec_t, &cudaGraphExecDestroy> {
 public:
  // Captures what `enqueue` (returning Status) puts on `stream`. A failure inside ends the
  // capture and is returned; nothing ran. Unavailable when the driver invalidated the
  // capture because of other work on the device at the same time (a synchronising call
  // from another thread can do that, whatever the capture mode): the caller may run the
  // work without a graph and capture another time. ResourceExhausted when the device has no
  // memory left to instantiate the graph: nothing ran either.
  template <typename Fn>
  static Result<CudaGraph> Capture(cudaStream_t stream, Fn&& enqueue) {
    CaptureScope exclusive(CaptureExclusion());
    LM2_RETURN_IF_ERROR(
        CudaStatus(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture"));
    Status enqueued = enqueue();
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    if (end == cudaErrorStreamCaptureInvalidated) {
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      return Status::Unavailable("CUDA graph capture invalidated by concurrent device work");
    }
    Status ended = CudaStatus(end, "cudaStreamEndCapture");
    if (enqueued.ok() && !ended.ok()) enqueued = ended;
    if (!enqueued.ok()) {
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      return enqueued;
    }
    CudaGraph g;
    Status made = CudaStatus(cudaGraphInstantiate(&g.handle_, graph, 0), "cudaGraphInstantiate");
    (void)cudaGraphDestroy(graph);
    if (!made.ok()) return made;
    return g;
  }

  bool empty() const { return handle_ == nullptr; }
  Status Launch(cudaStream_t stream) const {
    DeviceCallScope scope(CaptureExclusion());
    return CudaStatus(cudaGraphLaunch(handle_, stream), "cudaGraphLaunch");
  }
};

}  // namespace lm2::runtime::cuda
