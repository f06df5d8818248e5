// Entry point of the GPU test executable. Without a usable CUDA device it prints why and
// exits 77, which ctest reports as "Skipped" (SKIP_RETURN_CODE): CI has no GPU, the
// device machine runs these for real.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "lm2/runtime/cuda_devices.h"

int main(int argc, char** argv) {
  if (!lm2::runtime::CudaBackendCompiled()) {
    std::printf("SKIPPED: GPU tests: this build has no CUDA backend (LM2_CUDA=OFF or nvcc not found)\n");
    return 77;
  }
  auto devices = lm2::runtime::ListCudaDevices();
  if (!devices.ok()) {
    std::printf("SKIPPED: GPU tests: %s\n", devices.status().ToString().c_str());
    return 77;
  }
  if (devices->empty()) {
    std::printf("SKIPPED: GPU tests: no CUDA device present\n");
    return 77;
  }
  for (const auto& d : *devices) {
    std::printf("GPU %d: %s, sm_%d%d, %.1f GiB%s\n", d.ordinal, d.name.c_str(), d.compute_major,
                d.compute_minor, static_cast<double>(d.total_memory) / (1024.0 * 1024.0 * 1024.0),
                d.supported ? "" : " (not supported by this build's LM2_CUDA_ARCHITECTURES)");
  }
  if (!devices->front().supported) {
    std::printf("SKIPPED: GPU tests: device 0 is not among this build's CUDA architectures\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
