#include <catch2/catch.hpp>

#include "lm2/runtime/cuda_devices.h"

TEST_CASE("CUDA devices report sane properties", "[gpu]") {
  auto devices = lm2::runtime::ListCudaDevices();
  REQUIRE(devices.ok());
  REQUIRE_FALSE(devices->empty());  // gpu_main skips before we get here otherwise
  for (const auto& d : *devices) {
    CHECK_FALSE(d.name.empty());
    CHECK(d.compute_major >= 7);
    CHECK(d.total_memory > (std::size_t{1} << 30));
    CHECK(d.multiprocessors > 0);
  }
  CHECK(devices->front().supported);  // gpu_main skips before we get here otherwise
}
