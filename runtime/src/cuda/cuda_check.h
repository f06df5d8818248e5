// CUDA and cuBLAS errors as lm2::Status, for the launchers and the RAII layer.
//
// Out-of-memory becomes ResourceExhausted, a missing driver or device Unavailable, anything
// else Internal (a bad launch configuration is a bug in lm2, not the caller's input: shapes
// are checked before any launch).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// A failed call's error is consumed here (cudaGetLastError): it is reported once, as this
// status, and not again by the next launch check of whatever runs after it (an allocation
// refused for want of memory would otherwise fail the next kernel's CheckLaunch). Sticky
// errors (a fault in a kernel) stay with the context whatever is consumed.
inline Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  (void)cudaGetLastError();
  const std::string msg = std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(msg);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) return Status::Unavailable(msg);
  return Status::Internal(msg);
}

// After a kernel launch: a bad configuration (grid, shared memory) is reported here. Faults
// inside the kernel surface later, at the next synchronising call.
inline Status CheckLaunch(const char* kernel) { return CudaStatus(cudaGetLastError(), kernel); }

inline Status CublasStatus(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  const std::string msg = std::string(what) + ": " + cublasGetStatusName(st) + " (" + cublasGetStatusString(st) + ")";
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return Status::ResourceExhausted(msg);
  if (st == CUBLAS_STATUS_NOT_INITIALIZED || st == CUBLAS_STATUS_ARCH_MISMATCH) return Status::Unavailable(msg);
  return Status::Internal(msg);
}

// Launchers check their pointers before launching: a null pointer with non-empty work is
// the caller's mistake, reported as InvalidArgument rather than a device fault.
inline Status RequireNonNull(const char* op, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p == nullptr) return Status::InvalidArgument(std::string(op) + ": null device pointer");
  }
  return Status::Ok();
}

// Raises `kernel`'s dynamic shared-memory limit when `bytes` needs more than the default
// 48 KiB, or reports (InvalidArgument, naming `op`) that the device cannot give that much.
// Each (kernel, device) is raised once: launchers call this before every launch.
inline Status EnsureSharedMemory(const void* kernel, int64_t bytes, const char* op) {
  constexpr int64_t kDefault = 48 * 1024;
  if (bytes <= kDefault) return Status::Ok();
  int device = 0;
  if (Status st = CudaStatus(cudaGetDevice(&device), "cudaGetDevice"); !st.ok()) return st;
  static std::mutex mu;
  static auto* raised = new std::map<std::pair<const void*, int>, int64_t>();  // never destroyed: used at exit
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = raised->find({kernel, device});
    if (it != raised->end() && it->second >= bytes) return Status::Ok();
  }
  int optin = 0;
  if (Status st = CudaStatus(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                             "cudaDeviceGetAttribute");
      !st.ok()) {
    return st;
  }
  if (bytes > optin) {
    return Status::InvalidArgument(std::string(op) + ": needs " + std::to_string(bytes) +
                                   " bytes of shared memory per block, the device has " + std::to_string(optin));
  }
  if (Status st = CudaStatus(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "cudaFuncSetAttribute");
      !st.ok()) {
    return st;
  }
  std::lock_guard<std::mutex> lock(mu);
  int64_t& at = (*raised)[{kernel, device}];
  at = std::max(at, bytes);
  return Status::Ok();
}

}  // namespace lm2::runtime::cuda

#define LM2_CUDA_RETURN_IF_ERROR(call) LM2_RETURN_IF_ERROR(::lm2::runtime::cuda::CudaStatus((call), #call))
#define LM2_CUBLAS_RETURN_IF_ERROR(call) LM2_RETURN_IF_ERROR(::lm2::runtime::cuda::CublasStatus((call), #call))

namespace lm2::runtime::cuda {

// An attribute of the current device.
inline Result<int> CurrentDeviceAttribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  LM2_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  LM2_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

inline Result<int> Multiprocessors() { return CurrentDeviceAttribute(cudaDevAttrMultiProcessorCount); }

// Whether the current device runs this library's sm_90 code (compute capability 9.0 or
// later with 90 among the compiled architectures): what programmatic dependent launch and
// thread block clusters need. A Hopper card running PTX of an earlier architecture has the
// hardware but not the code: its kernels' griddepcontrol instructions are compiled out and
// its cluster kernels trap. Cached per device (cuda_devices.cu).
bool Sm90CodeOnCurrentDevice();

// Whether the current device has compute capability 9.0 exactly: where the sm_90a kernels
// (wgmma, tensor copies: memory_tiled_sm90.cu, gemm_sm90.cu) run, in a build that has them.
// Cached per device (cuda_devices.cu).
bool ComputeCapability90OnCurrentDevice();

}  // namespace lm2::runtime::cuda
