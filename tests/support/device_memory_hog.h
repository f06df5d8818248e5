// Tests that need a full device: DeviceMemoryHog takes all of it while it lives.
#pragma once

#include <cuda_runtime.h>

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdio>
#include <vector>

#include "cuda/cuda_resources.h"

namespace lm2::testing {

// Every byte of device memory that allocations can still get, held until destroyed: the
// pool trimmed first (what it keeps unused goes back to the driver), then blocks from 1 GiB
// down to 256 bytes taken through the pool until none of each size is left, then the same
// from cudaMalloc (what the pool's mappings cannot reach). What the driver keeps for itself
// stays (it reports ~3.1 MiB free after, on an H200 with driver 580).
class DeviceMemoryHog {
 public:
  DeviceMemoryHog() {
    lm2::runtime::cuda::TrimDevicePool(0);
    for (std::size_t block = std::size_t{1} << 30; block >= 256; block /= 4) {
      while (true) {
        auto b = lm2::runtime::cuda::DeviceBuffer<char>::Allocate(block);
        if (!b.ok()) {
          INFO(b.status().ToString());
          REQUIRE(b.status().code() == lm2::StatusCode::kResourceExhausted);
          break;
        }
        bytes_ += block;
        blocks_.push_back(std::move(b).value());
      }
    }
    for (std::size_t block = std::size_t{1} << 26; block >= 256; block /= 4) {
      while (true) {
        void* p = nullptr;
        if (cudaMalloc(&p, block) != cudaSuccess) {
          (void)cudaGetLastError();
          break;
        }
        raw_bytes_ += block;
        raw_.push_back(p);
      }
    }
    std::size_t free_bytes = 0, total = 0;
    (void)cudaMemGetInfo(&free_bytes, &total);
    (void)cudaGetLastError();
    std::printf("hog: %zu bytes from the pool, %zu by cudaMalloc, %zu free after\n", bytes_, raw_bytes_, free_bytes);
  }
  ~DeviceMemoryHog() {
    for (void* p : raw_) (void)cudaFree(p);
    blocks_.clear();
    lm2::runtime::cuda::TrimDevicePool(0);  // back to the driver, not kept by the pool
  }
  DeviceMemoryHog(const DeviceMemoryHog&) = delete;
  DeviceMemoryHog& operator=(const DeviceMemoryHog&) = delete;
  std::size_t bytes() const { return bytes_; }

 private:
  std::vector<lm2::runtime::cuda::DeviceBuffer<char>> blocks_;
  std::size_t bytes_ = 0;
  std::vector<void*> raw_;
  std::size_t raw_bytes_ = 0;
};

}  // namespace lm2::testing
