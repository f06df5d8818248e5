// What a persistent decode kernel would gain on a decode layer's linear layers, measured
// before one is built: the layer's chain of GEMVs at the paper's shapes, streamed
//   (a) as the decode step streams them now: the runtime's Gemv kernel, one launch per layer
//       (programmatic dependent launch, a CUDA graph), o_proj on a second stream beside the
//       read's stand-in;
//   (b) as rounds of one persistent kernel (one block per multiprocessor, a grid barrier
//       between dependent rounds), whose weights one producer lane copies into a ring of
//       shared-memory stages (TMA bulk copies) while eight warps multiply: the producer runs
//       ahead across the grid barriers (`--runahead 1`, the point of the design) or waits at
//       each one as the multiplying warps do (`--runahead 0`).
//
//   lm2_cuda_persistent_bench [--layers 16] [--repeats 10] [--stages 6] [--runahead 1]
//                             [--combine-barrier 1] [--persistent 1]
//
// (--persistent 0 leaves (b) out.) Then the launch chain (a) again, by the read's form (its
// stand-in, the runtime's MemoryReadOneToken, none), with and without o_proj, with the
// step's own GEMV forms, and with the decode attention over 1,024 cached positions
// (RopeAttentionDecodeBatch, split over key ranges as a decode step runs it) before o_proj.
//
// A layer here is the batch-1 decode step's bandwidth-bound chain without its small kernels:
// the q|k|v|memory-query|offer projection (7,168 x 2,048), then the memory read's 16 MiB of
// K/V (stood in for by a 4,096 x 2,048 GEMV) beside o_proj (2,048 x 2,048), with
// `--combine-barrier 1` an empty round after them (the read's combine), then the output gate
// (2,048 x 2,048), gate|up (16,384 x 2,048) and down (2,048 x 8,192): 163.6 MB a layer, each
// round needing the whole vector the round before wrote. Every op's input is an earlier op's
// fp32 output taken as bf16 (the Gemv's kF32 input), its output fp32. After timing, every op
// of the persistent run is checked against the runtime's Gemv on the same input (fp32 sums in
// another order: max |difference| / max |reference| must stay below 1e-4).
//
// Figures: µs per layer and the weights' GB/s against the device-to-device copy bandwidth
// (bytes read + written, as lm2_cuda_bench's roofline) measured in the same run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/cuda_ops.h"
#include "cuda/device_math.cuh"
#include "cuda/mbarrier.cuh"
#include "event_timing.h"

namespace {

using bf16 = __nv_bfloat16;
using lm2::runtime::cuda::BarrierArrive;
using lm2::runtime::cuda::BarrierExpectBytes;
using lm2::runtime::cuda::BarrierInit;
using lm2::runtime::cuda::BarrierWait;
using lm2::runtime::cuda::Gemv;
using lm2::runtime::cuda::GemvInput;
using lm2::runtime::cuda::GemvOutput;
using lm2::runtime::cuda::SharedAddress;
using lm2::runtime::cuda::WarpSum;

void Check(cudaError_t e, const char* what) { lm2::bench::CheckCuda("lm2_cuda_persistent_bench", e, what); }

void CheckStatus(const lm2::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "lm2_cuda_persistent_bench: %s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// One linear layer of the chain: y[out] = bf16(x[in]) · W[out, in]ᵀ. `round` is the op's
// round: ops of one round run together, a round waits for every op of the rounds before.
struct Op {
  const bf16* w;
  const float* x;
  float* y;
  int in, out;
  int round;
};

constexpr int kConsumerWarps = 8;
constexpr int kThreadsPerBlock = (kConsumerWarps + 1) * 32;  // + the producer warp
constexpr int kStageBytes = 32 * 1024;                       // a ring stage: 8 units of 2,048 columns
constexpr int kMaxIn = 8192;
constexpr int kMaxStages = 6;

// The device helpers, for the sm_90 pass only (the kernel is empty in the others).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kSegCols = 2048;  // a unit: one row's 2,048 columns

__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy = 0;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          SharedAddress(dst)),
      "l"(src), "r"(bytes), "r"(SharedAddress(bar)), "l"(policy)
      : "memory");
}
__device__ __forceinline__ unsigned int LoadAcquire(const unsigned int* p) {
  unsigned int v = 0;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Among the consumer warps only (named barrier 1; the producer warp never joins).
__device__ __forceinline__ void ConsumerSync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumerWarps * 32) : "memory"); }

// This block's rows of an op: [first, last).
__device__ __forceinline__ void BlockRows(const Op& op, int& first, int& last) {
  const int per_block = (op.out + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  first = min(op.out, static_cast<int>(blockIdx.x) * per_block);
  last = min(op.out, first + per_block);
}

// Rows of a ring stage for an op's width.
__device__ __forceinline__ int StageRows(int in) { return kStageBytes / (2 * in); }

// Every round before `round` has been finished by every block (the counter counts each
// block's arrival once per finished round).
__device__ __forceinline__ void WaitRounds(const unsigned int* counter, int round) {
  const unsigned int want = static_cast<unsigned int>(round) * gridDim.x;
  while (LoadAcquire(counter) < want) {
  }
}
#endif

__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    PersistentChainKernel(const Op* ops, int num_ops, int stages, int runahead, unsigned int* counter) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  auto* ring = smem;                                                             // [stages][kStageBytes]
  auto* xs = reinterpret_cast<bf16*>(smem + kMaxStages * kStageBytes);          // x' [kMaxIn]
  auto* partial = reinterpret_cast<float*>(xs + kMaxIn);                        // [2][kConsumerWarps]
  auto* full = reinterpret_cast<uint64_t*>(partial + 2 * kConsumerWarps);       // [kMaxStages]
  uint64_t* empty = full + kMaxStages;                                           // [kMaxStages]
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) {
      BarrierInit(&full[s], 1);
      BarrierInit(&empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kConsumerWarps) {  // the producer: one lane copies every stage of every op
    if (lane != 0) return;
    const uint64_t policy = EvictFirstPolicy();
    int k = 0;  // stages issued
    for (int i = 0; i < num_ops; ++i) {
      const Op op = ops[i];
      if (!runahead) WaitRounds(counter, op.round);
      int first = 0, last = 0;
      BlockRows(op, first, last);
      const int rows_per_stage = StageRows(op.in);
      for (int r = first; r < last; r += rows_per_stage, ++k) {
        const int s = k % stages;
        const uint32_t parity = static_cast<uint32_t>(k / stages) & 1u;
        BarrierWait(&empty[s], parity ^ 1u);
        const auto bytes = static_cast<uint32_t>(min(rows_per_stage, last - r)) * static_cast<uint32_t>(op.in) * 2u;
        BarrierExpectBytes(&full[s], bytes);
        BulkCopy(ring + static_cast<size_t>(s) * kStageBytes, op.w + static_cast<int64_t>(r) * op.in, bytes, &full[s],
                 policy);
      }
    }
    return;
  }

  // The consumers: eight warps, a unit (a row's 2,048-column segment) each per stage.
  int k = 0, chunk = 0, round = 0;
  for (int i = 0; i < num_ops; ++i) {
    const Op op = ops[i];
    ConsumerSync();  // every warp is done with x' of the op before
    if (op.round != round) {  // arrive for the rounds finished, wait for every block's
      if (tid == 0) {
        __threadfence();
        atomicAdd(counter, static_cast<unsigned int>(op.round - round));
        WaitRounds(counter, op.round);
      }
      round = op.round;
      ConsumerSync();
    }
    // x' = bf16(x), through L2 (other blocks wrote x).
    for (int c = 4 * tid; c < op.in; c += 4 * kConsumerWarps * 32) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(op.x + c));
      *reinterpret_cast<uint2*>(xs + c) = lm2::runtime::cuda::PackBf16x4(v);
    }
    ConsumerSync();
    int first = 0, last = 0;
    BlockRows(op, first, last);
    const int rows_per_stage = StageRows(op.in), segs = op.in / kSegCols;
    for (int r = first; r < last; r += rows_per_stage, ++k, ++chunk) {
      const int s = k % stages;
      BarrierWait(&full[s], static_cast<uint32_t>(k / stages) & 1u);
      const int rows = min(rows_per_stage, last - r);
      const int row = warp / segs, seg = warp % segs;
      float sum = 0.0f;
      if (row < rows) {
        const auto* w = reinterpret_cast<const uint4*>(ring + static_cast<size_t>(s) * kStageBytes) +
                        (static_cast<int64_t>(row) * op.in + seg * kSegCols) / 8;
        const auto* x = reinterpret_cast<const uint4*>(xs + seg * kSegCols);
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < kSegCols / 8 / 32; ++j) {
          acc = lm2::runtime::cuda::Dot8(w[32 * j + lane], x[32 * j + lane], acc);
        }
        sum = WarpSum(acc);
      }
      __syncwarp();
      if (lane == 0) BarrierArrive(&empty[s]);  // the stage's bytes are in registers
      if (segs == 1) {
        if (lane == 0 && row < rows) op.y[r + row] = sum;
      } else {  // a row's segments were summed by `segs` warps: added in order by warp 0
        float* part = partial + (chunk & 1) * kConsumerWarps;
        if (lane == 0) part[warp] = sum;
        ConsumerSync();
        if (warp == 0 && lane < rows) {
          float y = 0.0f;
          for (int q = 0; q < segs; ++q) y += part[lane * segs + q];
          op.y[r + lane] = y;
        }
      }
    }
  }
#else
  (void)ops, (void)num_ops, (void)stages, (void)runahead, (void)counter;
#endif
}

// Random bf16 in [-a, a] (a hash of the index: the same weights every run).
__global__ void FillUniform(bf16* p, int64_t n, float a, uint32_t seed) {
  for (int64_t i = lm2::runtime::cuda::FirstIndex(); i < n; i += lm2::runtime::cuda::GridStride()) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    h *= 3266489917u;
    h ^= h >> 16;
    p[i] = __float2bfloat16_rn(a * (static_cast<float>(h) * (2.0f / 4294967296.0f) - 1.0f));
  }
}

// The mean milliseconds per call of `enqueue` (lm2::bench::MeanMs).
template <typename Enqueue>
float MeanMs(cudaStream_t stream, int repeats, Enqueue enqueue) {
  return lm2::bench::MeanMs("lm2_cuda_persistent_bench", stream, repeats, enqueue);
}

// Device-to-device copy of 1 GiB, bytes read + written per second: best of 10.
double CopyBandwidth(cudaStream_t stream) {
  const std::size_t bytes = std::size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  Check(cudaMalloc(&a, bytes), "cudaMalloc");
  Check(cudaMalloc(&b, bytes), "cudaMalloc");
  Check(cudaMemsetAsync(a, 1, bytes, stream), "memset");
  float best = 1e30f;
  for (int i = 0; i < 10; ++i) {
    best = std::min(best, MeanMs(stream, 1, [&] {
                      Check(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream), "copy");
                    }));
  }
  Check(cudaFree(a), "cudaFree");
  Check(cudaFree(b), "cudaFree");
  return 2.0 * static_cast<double>(bytes) / (best * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 16, repeats = 10, stages = kMaxStages, runahead = 1, combine_barrier = 1, persistent_runs = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--layers") layers = v;
    else if (k == "--repeats") repeats = v;
    else if (k == "--stages") stages = v;
    else if (k == "--runahead") runahead = v;
    else if (k == "--combine-barrier") combine_barrier = v;
    else if (k == "--persistent") persistent_runs = v;
    else {
      std::fprintf(stderr,
                   "usage: lm2_cuda_persistent_bench [--layers N] [--repeats N] [--stages 2-%d] [--runahead 0|1] "
                   "[--combine-barrier 0|1] [--persistent 0|1]\n",
                   kMaxStages);
      return 2;
    }
  }
  if (layers < 1 || repeats < 1 || stages < 2 || stages > kMaxStages) {
    std::fprintf(stderr, "lm2_cuda_persistent_bench: --layers and --repeats positive, --stages in [2, %d]\n",
                 kMaxStages);
    return 2;
  }
  int device = 0;
  cudaDeviceProp prop{};
  Check(cudaGetDevice(&device), "cudaGetDevice");
  Check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  if (prop.major < 9) {
    std::printf("SKIPPED: the persistent kernel needs sm_90 (bulk copies); %s is sm_%d%d\n", prop.name, prop.major,
                prop.minor);
    return 0;
  }
  const int sms = prop.multiProcessorCount;
  cudaStream_t stream = nullptr, side = nullptr;
  Check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  Check(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), "stream");

  // The layer's ops: weights, inputs and outputs (each op's output its own buffer).
  constexpr int d = 2048, F = 8192, P = 7168, kRead = 4096;
  struct Shape {
    int in, out, round, input;  // input: index of the op (in this layer) whose output is x; -1: the layer's input
    int x_offset;
  };
  const int rb = combine_barrier ? 1 : 0;
  const std::vector<Shape> shapes = {
      {d, P, 0, -1, 0},           // q|k|v|memory q|offer
      {d, kRead, 1, 0, 3072},     // the memory read's K/V (stand-in), from the memory query
      {d, d, 1, 0, 0},            // o_proj, from q (beside the read)
      {d, d, 2 + rb, 1, 0},       // the output gate, from the read
      {d, 2 * F, 3 + rb, 3, 0},   // gate|up
      {F, d, 4 + rb, 4, 0},       // down: the next layer's input
  };
  const int rounds_per_layer = 5 + rb;
  std::size_t weight_elems = 0, out_elems = d;  // + the first layer's input
  for (const Shape& s : shapes) {
    weight_elems += static_cast<std::size_t>(s.in) * s.out;
    out_elems += s.out;
  }
  const double layer_bytes = 2.0 * static_cast<double>(weight_elems);
  bf16* weights = nullptr;
  float* outs = nullptr;
  Check(cudaMalloc(&weights, weight_elems * layers * sizeof(bf16)), "cudaMalloc weights");
  Check(cudaMalloc(&outs, out_elems * layers * sizeof(float)), "cudaMalloc outputs");
  std::vector<Op> ops;
  std::vector<int> ops_per_layer;
  {
    std::size_t w_at = 0, y_at = d;  // outs[0, d): the first layer's input
    const float* layer_in = outs;
    for (int l = 0; l < layers; ++l) {
      const std::size_t first = ops.size();
      for (const Shape& s : shapes) {
        Op op{};
        op.w = weights + w_at;
        FillUniform<<<1024, 256, 0, stream>>>(weights + w_at, static_cast<int64_t>(s.in) * s.out,
                                              std::sqrt(3.0f / static_cast<float>(s.in)),
                                              static_cast<uint32_t>(ops.size() * 7919 + 1));
        Check(cudaGetLastError(), "FillUniform");
        w_at += static_cast<std::size_t>(s.in) * s.out;
        op.x = (s.input < 0 ? layer_in : ops[first + static_cast<std::size_t>(s.input)].y) + s.x_offset;
        op.y = outs + y_at;
        y_at += static_cast<std::size_t>(s.out);
        op.in = s.in;
        op.out = s.out;
        op.round = l * rounds_per_layer + s.round;
        ops.push_back(op);
      }
      layer_in = ops.back().y;
    }
  }
  {  // the first layer's input, about unit scale
    std::vector<float> h(d);
    for (int i = 0; i < d; ++i) h[static_cast<std::size_t>(i)] = std::sin(0.37f * static_cast<float>(i)) * 1.7f;
    Check(cudaMemcpy(outs, h.data(), d * sizeof(float), cudaMemcpyHostToDevice), "upload");
  }
  Op* ops_dev = nullptr;
  unsigned int* counter = nullptr;
  Check(cudaMalloc(&ops_dev, ops.size() * sizeof(Op)), "cudaMalloc ops");
  Check(cudaMemcpy(ops_dev, ops.data(), ops.size() * sizeof(Op), cudaMemcpyHostToDevice), "upload ops");
  Check(cudaMalloc(&counter, sizeof(unsigned int)), "cudaMalloc");
  Check(cudaStreamSynchronize(stream), "fill");

  const double copy_bw = CopyBandwidth(stream);
  std::printf("device: %s (sm_%d%d, %d SMs); %d layers of %.1f MB (%zu ops), mean of %d runs\n", prop.name, prop.major,
              prop.minor, sms, layers, layer_bytes / 1e6, ops.size(), repeats);
  std::printf("copy bandwidth (read+write): %.0f GB/s; a layer's weights at it: %.2f us\n", copy_bw / 1e9,
              1e6 * layer_bytes / copy_bw);
  auto report = [&](const char* what, float ms) {
    const double us_layer = 1000.0 * ms / layers;
    const double rate = layer_bytes / (us_layer * 1e-6);
    std::printf("  %-64s %7.2f us a layer, %6.0f GB/s = %5.1f%% of the copy bandwidth\n", what, us_layer, rate / 1e9,
                100.0 * rate / copy_bw);
  };

  // (a) The runtime's Gemv, one launch per op, as a CUDA graph (o_proj on the side stream),
  // with the read as its GEMV stand-in, as the runtime's memory read (MemoryReadOneToken:
  // its partial and combine kernels over a K and a V of 2,048 slots, 32 heads; the output
  // gate then takes its output), or left out (the output gate takes the memory query).
  cudaEvent_t fork = nullptr, join = nullptr;
  Check(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "event");
  Check(cudaEventCreateWithFlags(&join, cudaEventDisableTiming), "event");
  auto gemv = [&](const Op& op, cudaStream_t on) {
    CheckStatus(Gemv({.input = GemvInput::kF32, .x = op.x, .x_ld = op.in, .w = op.w, .rows = 1, .in = op.in,
                      .out = op.out, .output = GemvOutput::kStore, .y = op.y},
                     on),
                "Gemv");
  };
  constexpr int kSlots = 2048, kMemoryHeads = 32;
  bf16* mem_kv = nullptr;
  float *attn = nullptr, *e = nullptr, *read_scratch = nullptr;
  const auto kv_elems = static_cast<int64_t>(kSlots) * d;
  Check(cudaMalloc(&mem_kv, 2 * kv_elems * sizeof(bf16)), "cudaMalloc memory K/V");
  FillUniform<<<1024, 256, 0, stream>>>(mem_kv, 2 * kv_elems, 1.0f, 12345u);
  Check(cudaGetLastError(), "FillUniform");
  Check(cudaMalloc(&attn, static_cast<std::size_t>(kMemoryHeads) * kSlots * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&e, d * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&read_scratch,
                   static_cast<std::size_t>(lm2::runtime::cuda::MemoryReadDecodeScratch(1, kSlots, d, kMemoryHeads)) *
                       sizeof(float)),
        "cudaMalloc");
  // The real step's forms (`io`): the projection and gate|up normalise their input (kRmsNorm),
  // the output gate adds the gated residual into the residual stream h, gate|up stores the
  // SwiGLU in bf16 and down adds into h; with `attend`, RoPE, the KV cache append and
  // attention over 1,024 cached positions (RopeAttentionDecodeBatch) run on the side stream
  // before o_proj, as in a decode step.
  constexpr int kHeads = 32, kKvHeads = 8, kHeadDim = 64, kContext = 1024;
  float *h = nullptr, *norm = nullptr, *bias = nullptr, *attn_out = nullptr, *kv_caches = nullptr;
  bf16* act = nullptr;
  float2* factors = nullptr;
  int64_t* position = nullptr;
  float** cache_ptrs = nullptr;
  float* attn_split = nullptr;  // the attention's key ranges, as a decode step splits them
  const int64_t split_floats = lm2::runtime::cuda::AttentionDecodeSplitScratch(kHeads, kHeadDim);
  Check(cudaMalloc(&attn_split, static_cast<std::size_t>(split_floats) * sizeof(float)), "cudaMalloc");
  Check(cudaMemset(attn_split, 0, static_cast<std::size_t>(split_floats) * sizeof(float)), "memset");
  const std::size_t cache_elems = static_cast<std::size_t>(kContext + 1) * kKvHeads * kHeadDim;
  Check(cudaMalloc(&h, d * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&norm, d * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&bias, d * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&attn_out, d * sizeof(float)), "cudaMalloc");
  Check(cudaMalloc(&act, F * sizeof(bf16)), "cudaMalloc");
  Check(cudaMalloc(&factors, kHeadDim / 2 * sizeof(float2)), "cudaMalloc");
  Check(cudaMalloc(&position, sizeof(int64_t)), "cudaMalloc");
  Check(cudaMalloc(&kv_caches, 2 * layers * cache_elems * sizeof(float)), "cudaMalloc KV caches");
  Check(cudaMalloc(&cache_ptrs, 2 * layers * sizeof(float*)), "cudaMalloc");
  {
    std::vector<float> ones(d, 1.0f);
    Check(cudaMemcpy(norm, ones.data(), d * sizeof(float), cudaMemcpyHostToDevice), "upload");
    Check(cudaMemcpy(h, outs, d * sizeof(float), cudaMemcpyDeviceToDevice), "copy");
    Check(cudaMemset(bias, 0, d * sizeof(float)), "memset");
    Check(cudaMemset(kv_caches, 0, 2 * layers * cache_elems * sizeof(float)), "memset");
    const int64_t at = kContext;
    Check(cudaMemcpy(position, &at, sizeof(at), cudaMemcpyHostToDevice), "upload");
    std::vector<float*> ptrs(2 * static_cast<std::size_t>(layers));
    for (std::size_t i = 0; i < ptrs.size(); ++i) ptrs[i] = kv_caches + i * cache_elems;
    Check(cudaMemcpy(cache_ptrs, ptrs.data(), ptrs.size() * sizeof(float*), cudaMemcpyHostToDevice), "upload");
    CheckStatus(lm2::runtime::cuda::RopeFactorsBatch(position, 1, kHeadDim, 500000.0, factors, stream), "rope");
  }
  enum class Read { kGemv, kKernel, kNone };
  auto chain = [&](Read read, bool with_o_proj, bool io, bool attend) {
    cudaGraph_t graph = nullptr;
    Check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
    for (int l = 0; l < layers; ++l) {
      const Op* lo = &ops[static_cast<std::size_t>(l) * shapes.size()];
      const float eps = 1e-5f;
      if (io) {
        CheckStatus(Gemv({.input = GemvInput::kRmsNorm, .x = h, .x_ld = d, .norm_weight = norm, .eps = eps,
                          .w = lo[0].w, .rows = 1, .in = d, .out = P, .output = GemvOutput::kStore, .y = lo[0].y},
                         stream),
                    "Gemv");
      } else {
        gemv(lo[0], stream);
      }
      if (with_o_proj) {
        Check(cudaEventRecord(fork, stream), "fork");
        Check(cudaStreamWaitEvent(side, fork), "fork");
        Op o = lo[2];
        if (attend) {
          CheckStatus(lm2::runtime::cuda::RopeAttentionDecodeBatch(lo[0].y, P, position, factors, cache_ptrs + 2 * l,
                                                                   cache_ptrs + 2 * l + 1, 1, kHeads, kKvHeads,
                                                                   kHeadDim, attn_out, attn_split, kContext + 1,
                                                                   side),
                      "RopeAttentionDecodeBatch");
          o.x = attn_out;
        }
        gemv(o, side);
        Check(cudaEventRecord(join, side), "join");
      }
      Op gate = lo[3];
      if (read == Read::kGemv) gemv(lo[1], stream);
      if (read == Read::kKernel) {
        CheckStatus(lm2::runtime::cuda::MemoryReadOneToken(lo[1].x, P, mem_kv, mem_kv + kv_elems, kSlots, d,
                                                           kMemoryHeads, attn, e, read_scratch, stream),
                    "MemoryReadOneToken");
        gate.x = e;
      }
      if (read == Read::kNone) gate.x = lo[1].x;
      if (with_o_proj) Check(cudaStreamWaitEvent(stream, join), "join");
      if (io) {
        CheckStatus(Gemv({.input = GemvInput::kF32, .x = gate.x, .x_ld = d, .w = gate.w, .rows = 1, .in = d, .out = d,
                          .output = GemvOutput::kGatedResidual, .y = h, .bias = bias, .residual = lo[2].y,
                          .gated = gate.x},
                         stream),
                    "Gemv");
        CheckStatus(Gemv({.input = GemvInput::kRmsNorm, .x = h, .x_ld = d, .norm_weight = norm, .eps = eps,
                          .w = lo[4].w, .rows = 1, .in = d, .out = 2 * F, .output = GemvOutput::kSwiGluBf16,
                          .y_bf16 = act},
                         stream),
                    "Gemv");
        CheckStatus(Gemv({.input = GemvInput::kBf16, .x = act, .x_ld = F, .w = lo[5].w, .rows = 1, .in = F, .out = d,
                          .output = GemvOutput::kAccumulate, .y = h},
                         stream),
                    "Gemv");
      } else {
        gemv(gate, stream);
        for (std::size_t i = 4; i < shapes.size(); ++i) gemv(lo[i], stream);
      }
    }
    Check(cudaStreamEndCapture(stream, &graph), "end capture");
    cudaGraphExec_t exec = nullptr;
    Check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    Check(cudaGraphDestroy(graph), "destroy");
    const float ms = MeanMs(stream, repeats, [&] { Check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch"); });
    Check(cudaGraphExecDestroy(exec), "destroy");
    return 1000.0f * ms / static_cast<float>(layers);
  };
  report("Gemv launches (PDL, a graph; o_proj on a second stream)", chain(Read::kGemv, true, false, false) *
                                                                        static_cast<float>(layers) / 1000.0f);
  std::printf("  the same chain, us a layer, by the read's form:           stand-in  runtime's  none\n");
  auto row = [&](const char* what, bool with_o_proj, bool io, bool attend) {
    const float a = chain(Read::kGemv, with_o_proj, io, attend), b = chain(Read::kKernel, with_o_proj, io, attend),
                c = chain(Read::kNone, with_o_proj, io, attend);
    std::printf("    %-56s %8.2f %9.2f %7.2f\n", what, a, b, c);
  };
  row("plain GEMVs (fp32 in, fp32 out), o_proj beside the read", true, false, false);
  row("plain GEMVs, no o_proj", false, false, false);
  row("the step's GEMV forms (RMSNorm in; gated residual, SwiGLU)", true, true, false);
  row("the step's GEMV forms, attention before o_proj", true, true, true);

  // (b) The persistent kernel, then every op of its last run against Gemv on the same input.
  auto run_persistent = [&]() -> bool {
    const std::size_t smem = kMaxStages * kStageBytes + kMaxIn * sizeof(bf16) + 2 * kConsumerWarps * sizeof(float) +
                             2 * kMaxStages * sizeof(uint64_t);
    Check(cudaFuncSetAttribute(&PersistentChainKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "smem attribute");
    int per_sm = 0;
    Check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, &PersistentChainKernel, kThreadsPerBlock, smem),
          "occupancy");
    if (per_sm < 1) {
      std::fprintf(stderr, "lm2_cuda_persistent_bench: the persistent kernel does not fit on a multiprocessor\n");
      return false;
    }
    int num_ops = static_cast<int>(ops.size());
    auto persistent = [&](int ring, int ahead) {
      void* args[] = {&ops_dev, &num_ops, &ring, &ahead, &counter};
      Check(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream), "memset");
      Check(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(&PersistentChainKernel), dim3(static_cast<unsigned>(sms)),
                                        dim3(kThreadsPerBlock), args, smem, stream),
            "PersistentChainKernel");
    };
    char what[128];
    std::snprintf(what, sizeof(what), "persistent, %d stages of 32 KiB, producer %s", stages,
                  runahead ? "running ahead across rounds" : "waiting at each round");
    report(what, MeanMs(stream, repeats, [&] { persistent(stages, runahead); }));
    std::snprintf(what, sizeof(what), "persistent, %d stages of 32 KiB, producer %s", stages,
                  runahead ? "waiting at each round" : "running ahead across rounds");
    report(what, MeanMs(stream, repeats, [&] { persistent(stages, 1 - runahead); }));

    // Every op of the last persistent run against Gemv on the same input.
    persistent(stages, runahead);
    Check(cudaStreamSynchronize(stream), "persistent run");
    float* ref = nullptr;
    Check(cudaMalloc(&ref, 2 * F * sizeof(float)), "cudaMalloc");
    double worst = 0.0;
    for (const Op& op : ops) {
      Op r = op;
      r.y = ref;
      gemv(r, stream);
      std::vector<float> got(static_cast<std::size_t>(op.out)), want(static_cast<std::size_t>(op.out));
      Check(cudaMemcpyAsync(got.data(), op.y, got.size() * sizeof(float), cudaMemcpyDeviceToHost, stream), "copy");
      Check(cudaMemcpyAsync(want.data(), ref, want.size() * sizeof(float), cudaMemcpyDeviceToHost, stream), "copy");
      Check(cudaStreamSynchronize(stream), "check");
      double diff = 0.0, scale = 0.0;
      for (std::size_t i = 0; i < got.size(); ++i) {
        diff = std::max(diff, static_cast<double>(std::fabs(got[i] - want[i])));
        scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
      }
      if (!(scale > 0.0) || !std::isfinite(diff)) worst = 1.0;
      else worst = std::max(worst, diff / scale);
    }
    std::printf("check: every op of the persistent run against Gemv, max |difference| / max |reference| = %.2e\n", worst);
    if (!(worst < 1e-4)) {
      std::fprintf(stderr, "lm2_cuda_persistent_bench: the persistent kernel's results differ from Gemv's\n");
      return false;
    }
    Check(cudaFree(ref), "cudaFree");
    return true;
  };
  if (persistent_runs != 0 && !run_persistent()) return 1;
  Check(cudaFree(mem_kv), "cudaFree");
  Check(cudaFree(attn), "cudaFree");
  Check(cudaFree(e), "cudaFree");
  Check(cudaFree(read_scratch), "cudaFree");
  for (void* p : {static_cast<void*>(h), static_cast<void*>(norm), static_cast<void*>(bias),
                  static_cast<void*>(attn_out), static_cast<void*>(act), static_cast<void*>(factors),
                  static_cast<void*>(position), static_cast<void*>(kv_caches), static_cast<void*>(cache_ptrs),
                  static_cast<void*>(attn_split)}) {
    Check(cudaFree(p), "cudaFree");
  }
  Check(cudaFree(ops_dev), "cudaFree");
  Check(cudaFree(counter), "cudaFree");
  Check(cudaFree(weights), "cudaFree");
  Check(cudaFree(outs), "cudaFree");
  return 0;
}
