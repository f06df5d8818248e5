#include "cuda/kernel_modules.h"

// The driver API's types only: its functions come through cudaGetDriverEntryPointByVersion,
// so nothing links libcuda (the CPU machines that run the CPU tests have no driver).
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"

namespace lm2::runtime::cuda {
namespace {

std::mutex& RegistryMutex() {
  static auto* mu = new std::mutex();  // never destroyed: registration runs at static initialisation
  return *mu;
}

std::vector<const void*>& Registry() {
  static auto* kernels = new std::vector<const void*>();
  return *kernels;
}

// The driver calls used here (cuModuleEnumerateFunctions and cuFuncLoad are CUDA 12.4's).
struct DriverApi {
  CUresult (*get_loading_mode)(CUmoduleLoadingMode*) = nullptr;
  CUresult (*func_get_module)(CUmodule*, CUfunction) = nullptr;
  CUresult (*module_function_count)(unsigned int*, CUmodule) = nullptr;
  CUresult (*module_functions)(CUfunction*, unsigned int, CUmodule) = nullptr;
  CUresult (*func_is_loaded)(CUfunctionLoadingState*, CUfunction) = nullptr;
  CUresult (*func_load)(CUfunction) = nullptr;
};

constexpr unsigned int kDriverApiVersion = 12040;

template <typename Fn>
Status Resolve(const char* name, Fn* fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found{};
  LM2_RETURN_IF_ERROR(CudaStatus(
      cudaGetDriverEntryPointByVersion(name, &p, kDriverApiVersion, cudaEnableDefault, &found), name));
  if (found != cudaDriverEntryPointSuccess || p == nullptr) {
    return Status::Unavailable(std::string(name) + ": not in this driver (a CUDA 12.4 or newer driver is needed)");
  }
  *fn = reinterpret_cast<Fn>(p);
  return Status::Ok();
}

Result<DriverApi> ResolveDriverApi() {
  DriverApi api;
  LM2_RETURN_IF_ERROR(Resolve("cuModuleGetLoadingMode", &api.get_loading_mode));
  LM2_RETURN_IF_ERROR(Resolve("cuFuncGetModule", &api.func_get_module));
  LM2_RETURN_IF_ERROR(Resolve("cuModuleGetFunctionCount", &api.module_function_count));
  LM2_RETURN_IF_ERROR(Resolve("cuModuleEnumerateFunctions", &api.module_functions));
  LM2_RETURN_IF_ERROR(Resolve("cuFuncIsLoaded", &api.func_is_loaded));
  LM2_RETURN_IF_ERROR(Resolve("cuFuncLoad", &api.func_load));
  return api;
}

Status DriverStatus(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return Status::Ok();
  const std::string msg = std::string(what) + ": CUresult " + std::to_string(static_cast<int>(r));
  return r == CUDA_ERROR_OUT_OF_MEMORY ? Status::ResourceExhausted(msg + " (out of memory)") : Status::Internal(msg);
}

// Counts the registered modules' kernels on the current device, loading the unloaded ones
// when `load`.
Result<KernelModuleCounts> Visit(bool load) {
  static const Result<DriverApi> resolved = ResolveDriverApi();
  LM2_RETURN_IF_ERROR(resolved.status());
  const DriverApi& api = *resolved;
  std::lock_guard<std::mutex> lock(RegistryMutex());
  KernelModuleCounts counts;
  CUmoduleLoadingMode mode{};
  LM2_RETURN_IF_ERROR(DriverStatus(api.get_loading_mode(&mode), "cuModuleGetLoadingMode"));
  counts.lazy = mode == CU_MODULE_LAZY_LOADING;
  std::set<CUmodule> seen;
  std::vector<CUfunction> functions;
  for (const void* kernel : Registry()) {
    cudaFunction_t f = nullptr;
    const cudaError_t err = cudaGetFuncBySymbol(&f, kernel);
    // A module with no code for this device (the sm_90a kernels on another architecture)
    // is never launched here.
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
      (void)cudaGetLastError();
      continue;
    }
    LM2_RETURN_IF_ERROR(CudaStatus(err, "cudaGetFuncBySymbol"));
    CUmodule module = nullptr;
    LM2_RETURN_IF_ERROR(DriverStatus(api.func_get_module(&module, reinterpret_cast<CUfunction>(f)), "cuFuncGetModule"));
    if (!seen.insert(module).second) continue;
    unsigned int n = 0;
    LM2_RETURN_IF_ERROR(DriverStatus(api.module_function_count(&n, module), "cuModuleGetFunctionCount"));
    functions.assign(n, nullptr);
    LM2_RETURN_IF_ERROR(DriverStatus(api.module_functions(functions.data(), n, module), "cuModuleEnumerateFunctions"));
    counts.modules += 1;
    counts.functions += n;
    for (CUfunction fn : functions) {
      CUfunctionLoadingState state{};
      LM2_RETURN_IF_ERROR(DriverStatus(api.func_is_loaded(&state, fn), "cuFuncIsLoaded"));
      if (state == CU_FUNCTION_LOADING_STATE_LOADED) continue;
      counts.unloaded += 1;
      if (load) LM2_RETURN_IF_ERROR(DriverStatus(api.func_load(fn), "cuFuncLoad"));
    }
  }
  return counts;
}

}  // namespace

bool RegisterKernelModule(const void* kernel) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry().push_back(kernel);
  return true;
}

Result<KernelModuleCounts> LoadAllKernels() { return Visit(true); }

Result<KernelModuleCounts> CountKernels() { return Visit(false); }

}  // namespace lm2::runtime::cuda
