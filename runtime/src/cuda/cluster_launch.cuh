// Launches of thread-block clusters (sm_90): the launch configuration of a grid grouped in
// clusters along z, optionally with programmatic dependent launch (device_math.cuh's rules),
// and how many such clusters the device holds at once. Used by the split memory read
// (memory_tiled.cu) and the split-k GEMM (gemm_sm90.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/device_math.cuh"
#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// A launch of `grid` blocks of `threads` with `smem` bytes of dynamic shared memory on
// `stream`, grouped in clusters of `size` blocks along z (no cluster attribute for 1), with
// LaunchPdl's programmatic stream serialization where `pdl` asks for it and LaunchPdl would:
// a launch (cudaLaunchKernelEx(&launch.config, ...)), or the shape asked of
// cudaOccupancyMaxActiveClusters. The config points at the attributes: not copied.
struct ClusterLaunch {
  ClusterLaunch(dim3 grid, int threads, int smem, cudaStream_t stream, int size, bool pdl = false) {
    config.gridDim = grid;
    config.blockDim = dim3(static_cast<unsigned int>(threads));
    config.dynamicSmemBytes = static_cast<std::size_t>(smem);
    config.stream = stream;
    config.attrs = attributes;
    if (size > 1) {
      cudaLaunchAttribute& a = attributes[config.numAttrs++];
      a.id = cudaLaunchAttributeClusterDimension;
      a.val.clusterDim = {1, 1, static_cast<unsigned int>(size)};
    }
    if (pdl && PdlEnabled() && Sm90CodeOnCurrentDevice()) {
      cudaLaunchAttribute& a = attributes[config.numAttrs++];
      a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      a.val.programmaticStreamSerializationAllowed = 1;
    }
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;

  cudaLaunchAttribute attributes[2];
  cudaLaunchConfig_t config{};
};

// How many clusters of `size` blocks of `kernel` (`threads` threads, `smem` bytes of dynamic
// shared memory each) the current device holds at once (cudaOccupancyMaxActiveClusters:
// a cluster's blocks share one GPC, so it is fewer than multiprocessors x residency / size
// where a GPC's blocks do not divide evenly: 30 clusters of 8 of the read kernel on an
// H200, 240 blocks, not 264). Cached per device, kernel and size (memory_tiled.cu).
Result<int> MaxActiveClusters(const void* kernel, int size, int threads, int smem);

}  // namespace lm2::runtime::cuda
