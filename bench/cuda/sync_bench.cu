// What a dependency between two steps of a decode step costs on the GPU, with no weights to
// stream: the floor under each of the ~100 kernel boundaries of a step (docs/benchmarks.md,
// "Where decode time goes"), against a grid barrier inside one persistent kernel (what a
// persistent decode kernel would pay instead).
//
//   lm2_cuda_sync_bench [--steps 200] [--repeats 20]
//
// Each figure is the mean per step over `repeats` replays of `steps` steps (a CUDA graph of
// the launches; the persistent kernel: one cooperative launch), one block of 256 threads per
// multiprocessor:
//   - empty kernels, a CUDA graph of ordinary launches, and of launches with programmatic
//     dependent launch (PDL: each waits for its predecessor with griddepcontrol.wait, as the
//     model's kernels do);
//   - relay kernels (PDL): each block reads the 2,048 floats the previous kernel wrote, sums
//     them over the block and writes its share of the next 2,048: a full-vector dependency,
//     as between a decode step's linear layers;
//   - the same relay as rounds of one persistent kernel, separated by a grid barrier (an
//     atomic counter in global memory, polled with acquire loads).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/device_math.cuh"
#include "event_timing.h"

namespace {

using lm2::runtime::cuda::AllowDependents;
using lm2::runtime::cuda::BlockSum;
using lm2::runtime::cuda::kThreads;
using lm2::runtime::cuda::LaunchPdl;
using lm2::runtime::cuda::WaitForPredecessor;

constexpr int kWidth = 2048;  // the relayed vector: the model's hidden size

void Check(cudaError_t e, const char* what) { lm2::bench::CheckCuda("lm2_cuda_sync_bench", e, what); }

__global__ void EmptyKernel() {
  WaitForPredecessor();
  AllowDependents();
}

// out[i] = in[i] + Σ in, for this block's share of the kWidth entries; every block reads all
// of `in`.
__device__ __forceinline__ void Relay(const float* in, float* out, float* scratch) {
  float s = 0.0f;
  // Through L2 (other blocks wrote it).
  for (int i = static_cast<int>(threadIdx.x); i < kWidth; i += kThreads) s += __ldcg(in + i);
  s = BlockSum(s, scratch);
  const int per_block = (kWidth + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  for (int i = static_cast<int>(threadIdx.x); i < per_block; i += kThreads) {
    const int at = static_cast<int>(blockIdx.x) * per_block + i;
    if (at < kWidth) out[at] = __ldcg(in + at) + s * 1e-6f;
  }
}

__global__ void RelayKernel(const float* in, float* out) {
  __shared__ float scratch[32];
  WaitForPredecessor();
  AllowDependents();
  Relay(in, out, scratch);
}

// Every block of the grid has arrived `round` + 1 times.
__device__ __forceinline__ void GridBarrier(unsigned int* counter, unsigned int round) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    const unsigned int want = (round + 1) * gridDim.x;
    unsigned int seen = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < want);
  }
  __syncthreads();
}

__global__ void PersistentRelayKernel(float* a, float* b, unsigned int* counter, int rounds) {
  __shared__ float scratch[32];
  for (int r = 0; r < rounds; ++r) {
    Relay(r % 2 == 0 ? a : b, r % 2 == 0 ? b : a, scratch);
    GridBarrier(counter, static_cast<unsigned int>(r));
  }
}

// The mean milliseconds per call of `enqueue` (lm2::bench::MeanMs).
template <typename Enqueue>
float MeanMs(cudaStream_t stream, int repeats, Enqueue enqueue) {
  return lm2::bench::MeanMs("lm2_cuda_sync_bench", stream, repeats, enqueue);
}

template <typename Enqueue>
cudaGraphExec_t Capture(cudaStream_t stream, Enqueue enqueue) {
  cudaGraph_t graph = nullptr;
  Check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  enqueue();
  Check(cudaStreamEndCapture(stream, &graph), "end capture");
  cudaGraphExec_t exec = nullptr;
  Check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  Check(cudaGraphDestroy(graph), "graph");
  return exec;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 200, repeats = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--steps") steps = std::atoi(argv[i + 1]);
    else if (k == "--repeats") repeats = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: lm2_cuda_sync_bench [--steps N] [--repeats N]\n");
      return 2;
    }
  }
  if (steps < 1 || repeats < 1) {
    std::fprintf(stderr, "lm2_cuda_sync_bench: --steps and --repeats must be positive\n");
    return 2;
  }
  int device = 0, sms = 0;
  cudaDeviceProp prop{};
  Check(cudaGetDevice(&device), "cudaGetDevice");
  Check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  sms = prop.multiProcessorCount;
  std::printf("device: %s (sm_%d%d, %d SMs); %d steps, %d blocks of %d threads, mean of %d replays\n", prop.name,
              prop.major, prop.minor, sms, steps, sms, kThreads, repeats);

  cudaStream_t stream = nullptr;
  Check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  float *a = nullptr, *b = nullptr;
  unsigned int* counter = nullptr;
  Check(cudaMalloc(&a, kWidth * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&b, kWidth * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&counter, sizeof(unsigned int)), "cudaMalloc");
  Check(cudaMemset(a, 0, kWidth * sizeof(float)), "memset");
  Check(cudaMemset(b, 0, kWidth * sizeof(float)), "memset");

  const auto grid = static_cast<unsigned int>(sms);
  auto report = [&](const char* what, float ms_per_replay) {
    std::printf("  %-62s %7.2f us per step\n", what, 1000.0f * ms_per_replay / static_cast<float>(steps));
  };
  auto report_graph = [&](const char* what, cudaGraphExec_t g) {
    report(what, MeanMs(stream, repeats, [&] { Check(cudaGraphLaunch(g, stream), "cudaGraphLaunch"); }));
    Check(cudaGraphExecDestroy(g), "destroy");
  };
  report_graph("empty kernels, ordinary launches", Capture(stream, [&] {
                 for (int i = 0; i < steps; ++i) EmptyKernel<<<grid, kThreads, 0, stream>>>();
                 Check(cudaGetLastError(), "EmptyKernel");
               }));
  report_graph("empty kernels, PDL", Capture(stream, [&] {
                 for (int i = 0; i < steps; ++i) {
                   Check(LaunchPdl(&EmptyKernel, grid, kThreads, 0, stream), "EmptyKernel");
                 }
               }));
  report_graph("relay kernels (2,048 floats, full-vector dependency), PDL", Capture(stream, [&] {
                 for (int i = 0; i < steps; ++i) {
                   Check(LaunchPdl(&RelayKernel, grid, kThreads, 0, stream, i % 2 == 0 ? a : b, i % 2 == 0 ? b : a),
                         "RelayKernel");
                 }
               }));
  void* args[] = {&a, &b, &counter, &steps};  // one cooperative launch per replay: every block resident
  report("the relay as rounds of one persistent kernel, grid barriers", MeanMs(stream, repeats, [&] {
           Check(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream), "memset");
           Check(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(&PersistentRelayKernel), dim3(grid),
                                             dim3(kThreads), args, 0, stream),
                 "PersistentRelayKernel");
         }));
  Check(cudaStreamSynchronize(stream), "sync");
  Check(cudaFree(a), "cudaFree");
  Check(cudaFree(b), "cudaFree");
  Check(cudaFree(counter), "cudaFree");
  Check(cudaStreamDestroy(stream), "stream");
  return 0;
}
