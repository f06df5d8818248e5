// Timing by CUDA events for the standalone CUDA benchmarks (lm2_cuda_sync_bench,
// lm2_cuda_persistent_bench): the mean per call of what a callback enqueues on a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace lm2::bench {

// Exits with "<program>: <what>: <CUDA's message>" unless e is cudaSuccess.
inline void CheckCuda(const char* program, cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s: %s\n", program, what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// Mean milliseconds per call of `enqueue` (work it puts on `stream`), after one call to
// warm up.
template <typename Enqueue>
float MeanMs(const char* program, cudaStream_t stream, int repeats, Enqueue enqueue) {
  enqueue();
  CheckCuda(program, cudaStreamSynchronize(stream), "sync");
  cudaEvent_t t0, t1;
  CheckCuda(program, cudaEventCreate(&t0), "event");
  CheckCuda(program, cudaEventCreate(&t1), "event");
  CheckCuda(program, cudaEventRecord(t0, stream), "record");
  for (int i = 0; i < repeats; ++i) enqueue();
  CheckCuda(program, cudaEventRecord(t1, stream), "record");
  CheckCuda(program, cudaEventSynchronize(t1), "sync");
  float ms = 0.0f;
  CheckCuda(program, cudaEventElapsedTime(&ms, t0, t1), "elapsed");
  CheckCuda(program, cudaEventDestroy(t0), "event");
  CheckCuda(program, cudaEventDestroy(t1), "event");
  return ms / static_cast<float>(repeats);
}

}  // namespace lm2::bench
