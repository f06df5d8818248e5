// Shared-memory transaction barriers (mbarrier, sm_90): a barrier's phase completes after
// the arrivals it was set up for and the bytes the arrivals announced (tensor and bulk
// copies count their bytes on it as they land). The warp-specialised memory read
// (memory_tiled_sm90.cu) and lm2_cuda_persistent_bench use them. Device code for sm_90 and
// later only: elsewhere the helpers compile to nothing, and callers must not be launched.
#pragma once

#include <cstdint>

#include "cuda/mma.cuh"  // SharedAddress

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LM2_MBARRIER 1
#else
#define LM2_MBARRIER 0
#endif

namespace lm2::runtime::cuda {

// Sets up `bar` for `count` arrivals a phase, made visible to the async proxy (the copies).
__device__ __forceinline__ void BarrierInit(uint64_t* bar, unsigned count) {
#if LM2_MBARRIER
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SharedAddress(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// This thread's arrival, announcing `bytes` that copies counted on the barrier will bring.
__device__ __forceinline__ void BarrierExpectBytes(uint64_t* bar, uint32_t bytes) {
#if LM2_MBARRIER
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SharedAddress(bar)), "r"(bytes)
               : "memory");
#endif
}

// This thread's arrival (release: its earlier accesses are seen by whoever waits).
__device__ __forceinline__ void BarrierArrive(uint64_t* bar) {
#if LM2_MBARRIER
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(SharedAddress(bar)) : "memory");
#endif
}

// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void BarrierWait(uint64_t* bar, uint32_t parity) {
#if LM2_MBARRIER
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(SharedAddress(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}

}  // namespace lm2::runtime::cuda

#undef LM2_MBARRIER
