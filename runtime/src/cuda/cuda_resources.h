// RAII owners for the CUDA backend: device buffers, streams and the cuBLAS handle.
//
// Each is created by a static factory returning Result (no exceptions, no aborts), is
// move-only, and frees its resource in the destructor (errors there cannot be reported
// and are ignored: a failed free at teardown changes nothing for the caller). None is
// thread-safe; a stream or handle belongs to one session at a time. Copies between host
// and device are explicit calls.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "cuda/cuda_check.h"
#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// `count` elements of T in device memory (cudaMalloc; contents undefined until written).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, std::size_t{0})) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, std::size_t{0});
    }
    return *this;
  }

  static Result<DeviceBuffer> Allocate(std::size_t count) {
    DeviceBuffer b;
    if (count == 0) return b;
    void* p = nullptr;
    LM2_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc"));
    b.ptr_ = static_cast<T*>(p);
    b.count_ = count;
    return b;
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }

  // Copies `count` (<= size()) elements in on `stream`. With pageable host memory the call
  // returns once the source has been staged; with pinned memory the source must stay
  // untouched until the stream reaches the copy.
  Status CopyFromHost(const T* src, std::size_t count, cudaStream_t stream) {
    if (count > count_) return Status::InvalidArgument("DeviceBuffer::CopyFromHost: more elements than the buffer");
    if (count == 0) return Status::Ok();
    return CudaStatus(cudaMemcpyAsync(ptr_, src, count * sizeof(T), cudaMemcpyHostToDevice, stream),
                      "cudaMemcpyAsync(host to device)");
  }
  // Copies `count` (<= size()) elements out and waits for `stream` to finish them.
  Status CopyToHost(T* dst, std::size_t count, cudaStream_t stream) const {
    if (count > count_) return Status::InvalidArgument("DeviceBuffer::CopyToHost: more elements than the buffer");
    if (count == 0) return Status::Ok();
    LM2_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dst, ptr_, count * sizeof(T), cudaMemcpyDeviceToHost, stream),
                                   "cudaMemcpyAsync(device to host)"));
    return CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
  // Sets every byte to `byte` on `stream` (0 to zero; 0xFF poisons floats with NaN).
  Status FillBytes(unsigned char byte, cudaStream_t stream) {
    if (count_ == 0) return Status::Ok();
    return CudaStatus(cudaMemsetAsync(ptr_, byte, bytes(), stream), "cudaMemsetAsync");
  }

 private:
  void Reset() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

// `count` elements of T in page-locked host memory (cudaMallocHost): the staging area of
// asynchronous copies (they overlap with host work and run at full PCIe rate). Contents
// undefined until written.
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { Reset(); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  PinnedBuffer(PinnedBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, std::size_t{0})) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, std::size_t{0});
    }
    return *this;
  }

  static Result<PinnedBuffer> Allocate(std::size_t count) {
    PinnedBuffer b;
    if (count == 0) return b;
    void* p = nullptr;
    LM2_RETURN_IF_ERROR(CudaStatus(cudaMallocHost(&p, count * sizeof(T)), "cudaMallocHost"));
    b.ptr_ = static_cast<T*>(p);
    b.count_ = count;
    return b;
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  std::size_t size() const { return count_; }

 private:
  void Reset() {
    if (ptr_ != nullptr) (void)cudaFreeHost(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
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
class CudaStream {
 public:
  CudaStream() = default;
  ~CudaStream() {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  CudaStream(CudaStream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)) {}
  CudaStream& operator=(CudaStream&& o) noexcept {
    if (this != &o) {
      if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
      stream_ = std::exchange(o.stream_, nullptr);
    }
    return *this;
  }

  static Result<CudaStream> Create() {
    CudaStream s;
    LM2_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&s.stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    return s;
  }
  cudaStream_t get() const { return stream_; }
  Status Synchronize() const { return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  cudaStream_t stream_ = nullptr;
};

// A cuBLAS handle (its workspace is cuBLAS's own). Linear sets the stream on each call.
class CublasHandle {
 public:
  CublasHandle() = default;
  ~CublasHandle() {
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  CublasHandle(CublasHandle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  CublasHandle& operator=(CublasHandle&& o) noexcept {
    if (this != &o) {
      if (handle_ != nullptr) (void)cublasDestroy(handle_);
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }

  static Result<CublasHandle> Create() {
    CublasHandle h;
    LM2_RETURN_IF_ERROR(CublasStatus(cublasCreate(&h.handle_), "cublasCreate"));
    return h;
  }
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// An executable CUDA graph, made by capturing the work a function enqueues on a stream
// (thread-local capture mode: other threads' CUDA calls are unaffected). Replaying it
// launches the whole sequence at once. The captured work refers to buffers by address:
// whoever owns the graph must capture again when any of them moves.
class CudaGraph {
 public:
  CudaGraph() = default;
  ~CudaGraph() { Reset(); }
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  CudaGraph(CudaGraph&& o) noexcept : exec_(std::exchange(o.exec_, nullptr)) {}
  CudaGraph& operator=(CudaGraph&& o) noexcept {
    if (this != &o) {
      Reset();
      exec_ = std::exchange(o.exec_, nullptr);
    }
    return *this;
  }

  // Captures what `enqueue` (returning Status) puts on `stream`. A failure inside ends the
  // capture and is returned; nothing ran.
  template <typename Fn>
  static Result<CudaGraph> Capture(cudaStream_t stream, Fn&& enqueue) {
    LM2_RETURN_IF_ERROR(
        CudaStatus(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture"));
    Status enqueued = enqueue();
    cudaGraph_t graph = nullptr;
    Status ended = CudaStatus(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    if (enqueued.ok() && !ended.ok()) enqueued = ended;
    if (!enqueued.ok()) {
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      return enqueued;
    }
    CudaGraph g;
    Status made = CudaStatus(cudaGraphInstantiate(&g.exec_, graph, 0), "cudaGraphInstantiate");
    (void)cudaGraphDestroy(graph);
    if (!made.ok()) return made;
    return g;
  }

  bool empty() const { return exec_ == nullptr; }
  Status Launch(cudaStream_t stream) const { return CudaStatus(cudaGraphLaunch(exec_, stream), "cudaGraphLaunch"); }

 private:
  void Reset() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
  }
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace lm2::runtime::cuda
