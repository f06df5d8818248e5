// CUDA backend benchmark (issue 7): decode, prefill, concurrent sessions and memory-bank
// transfer on one GPU, each next to the physical limit measured in the same run.
//
//   bench/cuda/run_cuda_bench      (device machine: makes the paper-size model, runs this and
//                                   the PyTorch baseline, writes the report; docs/benchmarks.md)
//   lm2_cuda_bench --model DIR [--decode-tokens 128] [--prompt-tokens 32] [--prefill 512,4096]
//                  [--sessions 8,32,64] [--repeats 3] [--json OUT] [--profile-prefill T [--profile-reused 1]]
//                  [--tiled 0|1] [--chunk N] [--side-read 0|1] [--read-leads 0|1] [--defer-write 0|1] [--warm-up 0|1]
//                  [--profile-decode N] [--bank-threads N] [--kv-at-end 0|1] [--batcher-wait US]
//                  [--flush-tokens N]
//                                                  (--decode-tokens 0: prefill only)
//
//   --tiled 0: multi-token chunks read memory and attend through the cuBLAS GEMM forms
//   instead of the tensor-core tile kernels (CudaOptions::tiled_memory, tiled_attention);
//   --chunk: CudaOptions::max_chunk_tokens; --side-read 0: the memory reads on the main
//   stream (CudaOptions::concurrent_memory_read); --read-leads 0: one-session decode steps keep
//   attention on the main stream and the read beside it (CudaOptions::memory_read_leads);
//   --split-attention 0: decode attention a block per (row, head) over all its keys
//   (CudaOptions::split_decode_attention);
//   --defer-write 0: a tiled chunk's memory write sums before the output gate's join, with
//   the read (CudaOptions::defer_memory_write, default on: past the join);
//   --warm-up 0: no warm-up turn at load
//   (CudaOptions::warm_up), so the first turn's figure shows the kernels' first-use costs.
//   --bank-threads N: CudaOptions::bank_transfer_threads (bank export / import).
//   --kv-at-end 0: a segment's memory K/V made by its first forward, not at the end of the
//   segment before (CudaOptions::memory_kv_at_segment_end).
//   --batcher-wait US: the sessions lines' DecodeBatcher waits at most US microseconds for
//   the conversations still decoding (DecodeBatcherOptions::wait_for_decoding; 0: not at all).
//   --flush-tokens N: decode steps add their staged write terms to the write sums every N
//   tokens (CudaOptions::write_flush_tokens).
//
//   --profile-prefill T: only a warm-up prefill of T tokens and then one more between
//   cudaProfilerStart and cudaProfilerStop, for a profiler that starts off, e.g.
//     ncu --profile-from-start off --metrics gpu__time_duration.sum --csv lm2_cuda_bench ...
//   (bench/cuda/profile_prefill sums the kernels of that run by name; bench/cuda/trace_prefill
//   traces it as it runs). On a fresh state, or with --profile-reused 1 on the warm-up's state
//   after EndSegment and ResetContext, the device idle first (the prefill table's "reused").
//   --profile-decode N: only a 32-token prompt, 32 warm-up greedy decode steps, then N more
//   between cudaProfilerStart and cudaProfilerStop (bench/cuda/profile_decode: Nsight
//   Compute's figures for each kernel of a step).
//
// Breakdowns (printed first): each kernel of a decode step, of a batched step, and of a
// prefill chunk (each distinct chunk length of --prefill: min(T, --chunk)), timed back to
// back on one stream at the model's shapes, with GB/s or TFLOP/s.
//
// Figures:
//   copy bandwidth    device-to-device cudaMemcpy of 1 GiB, bytes read + written per second
//   gemm rate         bf16 x bf16 -> fp32 GEMM (the backend's Linear op), 8192^3, TFLOP/s
//   decode batch 1    one token per call through ForwardBatchGreedy (what generation does for
//                     greedy decoding: the argmax on the device); tokens/s, and the ratio to
//                     the roofline: copy bandwidth / bytes the model must move per token.
//                     (the matrices a token multiplies by: all but the embedding table and
//                     the per-segment memory K/V and write-gate weights; the KV cache and
//                     the segment's memory K/V read). Also with Forward's logits copied to
//                     the host for the argmax, and sampled (temperature 0.8, top-p 0.95)
//                     through ForwardBatchSample on the device and by Sampler on the host.
//   prefill T         one Forward of T tokens (segment opening included) per fresh state,
//                     and on a reused state (after EndSegment and ResetContext, the device
//                     idle: a chat's next turn);
//                     tokens/s and achieved TFLOP/s / gemm rate; also the time NewState
//                     took for that state (the session's buffers, its banks initialised)
//   late prompt       64 tokens after a context of max_position_embeddings - 64
//   new lengths       prompts of lengths nothing else here uses (kNewPromptLengths), each
//                     twice on a warmed state: the first time pays a call shape's first use
//   turns             a new state's prompt, 32 greedy steps and segment end right after the
//                     load, again on another new state, then that state's next turn
//   sessions B        B states decoding together, one ForwardBatchGreedy per step; total
//                     tokens/s; the first two steps of a new batch size, and of one session
//                     fewer; then the same states on B threads through a DecodeBatcher
//                     (what concurrent chats do), every reply as long, then replies ending
//                     one by one
//   bank export/import one session's banks device <-> host through pinned staging: export
//                     into a kept MemoryState (ExportMemoryInto, as a chat session does after
//                     each turn) and into a new one (ExportMemory: its fresh host memory's
//                     first touch included), import from host memory already touched
//   setup costs       what a new state's resources cost each: streams, events, cuBLAS
//                     handles, device buffers from the pool (new, and from memory it
//                     kept), pinned host buffers; a GEMM's first call on a new cuBLAS
//                     handle, its second, and one on another new stream
//   state memory      a state's device buffers (from the pool's use): new, after a prompt
//                     and decode steps, after its segment end
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <span>
#include <numeric>
#include <random>
#include <cmath>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cuda/cuda_ops.h"
#include "cuda/cuda_resources.h"
#include "lm2/runtime/cuda_backend.h"
#include "lm2/runtime/cuda_devices.h"
#include "lm2/runtime/decode_batcher.h"
#include "lm2/runtime/forwarding_model.h"
#include "lm2/runtime/model_files.h"
#include "lm2/runtime/sampler.h"

namespace {

using Clock = std::chrono::steady_clock;

// The prompt of the late-turn figure (LatePrompt).
constexpr int64_t kLatePromptTokens = 64;
// Prompt lengths no other figure uses (the "prompts of new lengths" line).
constexpr int64_t kNewPromptLengths[] = {37, 100, 203, 301, 450};
using lm2::runtime::DecodeBatcher;
using lm2::runtime::DecodeBatcherOptions;
using lm2::runtime::LogitsMode;
using lm2::runtime::Model;
using lm2::runtime::SequenceState;
using lm2::runtime::TokenRule;
namespace cuda = lm2::runtime::cuda;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// The model a DecodeBatcher runs on in the sessions lines, timing each batched call (the
// batcher runs one at a time) with its batch size: the wall time of a batched line is split
// into the calls at the full size, the others (sessions joining or leaving: new shapes) and
// the time between calls.
class TimedCalls final : public lm2::runtime::ForwardingModel {
 public:
  explicit TimedCalls(const Model& inner) : ForwardingModel(inner) {}
  lm2::Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                                 std::span<const TokenRule> rules, std::vector<int32_t>* next) const override {
    const auto t0 = Clock::now();
    lm2::Status st = inner().ForwardBatchSample(states, tokens, rules, next);
    calls_.push_back({static_cast<int64_t>(states.size()), Seconds(t0, Clock::now())});
    return st;
  }
  // "a call of B: median / 90th percentile / max ms (n); other sizes: n calls, total ms".
  std::string Summary(int64_t B) const {
    std::vector<double> full;
    double other = 0.0;
    int64_t others = 0;
    for (const auto& [size, seconds] : calls_) {
      if (size == B) {
        full.push_back(seconds * 1e3);
      } else {
        other += seconds * 1e3;
        ++others;
      }
    }
    std::sort(full.begin(), full.end());
    auto at = [&](double q) { return full.empty() ? 0.0 : full[static_cast<std::size_t>(q * static_cast<double>(full.size() - 1))]; };
    char line[256];
    std::snprintf(line, sizeof line, "calls of %lld: median %.2f / 90th percentile %.2f / max %.2f ms (%zu); other sizes: %lld calls, %.1f ms in all",
                  static_cast<long long>(B), at(0.5), at(0.9), full.empty() ? 0.0 : full.back(), full.size(),
                  static_cast<long long>(others), other);
    return line;
  }

 private:
  mutable std::vector<std::pair<int64_t, double>> calls_;
};

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "lm2_cuda_bench: %s\n", what.c_str());
  std::exit(1);
}

void Check(const lm2::Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.ToString());
}

template <typename T>
T Take(lm2::Result<T> r, const char* what) {
  Check(r.status(), what);
  return std::move(r).value();
}

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(std::stoll(item));
  }
  return out;
}

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// Seconds for `n` back-to-back calls of `fn` (which enqueues on `stream` and returns a
// Status), between two events on that stream.
template <typename Fn>
double Elapsed(cudaStream_t stream, Fn&& fn, int n) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0, stream);
  for (int i = 0; i < n; ++i) Check(fn(), "timed op");
  cudaEventRecord(e1, stream);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return static_cast<double>(ms) / 1e3;
}

// The best of `runs` single timed calls after `warmup` untimed ones: a rate's denominator.
template <typename Fn>
double BestSeconds(cudaStream_t stream, Fn&& fn, int warmup, int runs) {
  for (int i = 0; i < warmup; ++i) Check(fn(), "warm-up");
  double best = 1e30;
  for (int r = 0; r < runs; ++r) best = std::min(best, Elapsed(stream, fn, 1));
  return best;
}

// The breakdowns' set-up (fills, pointer tables and other uploads, on the legacy default
// stream) finished before their ops run on a stream of their own: lm2's streams are
// non-blocking, so they do not wait for the legacy stream, and a kernel that reads its
// pointer table before its PDL wait could read it before the upload lands (seen on branch
// bank-read as an illegal address, in a breakdown whose first op was the streamed read).
void SetUpDone() { Check(cuda::CudaStatus(cudaDeviceSynchronize(), "the set-up's copies"), "set-up"); }

// The mean of `reps` back-to-back calls after 5 untimed ones: an op's cost in a sequence.
template <typename Fn>
double TimeOp(cudaStream_t stream, Fn&& fn, int reps = 200) {
  for (int i = 0; i < 5; ++i) Check(fn(), "warm-up");
  return Elapsed(stream, fn, reps) / reps;
}

// The weights of call `call` among the copies of `elems` elements that fit in a buffer of
// `total` (bf16 elements; elems a multiple of 8, so each copy is 16-byte aligned): timed
// back to back, each call streams other weights than the call before, as a forward streams
// its layers'. With one copy for every call, weights of up to the L2's ~50 MB were partly
// found there: the 8 MB GEMVs (o_proj, out_gate) and the memory read timed 0.5 µs faster.
const __nv_bfloat16* WeightCopy(const __nv_bfloat16* base, int64_t total, int64_t elems, int64_t call) {
  const int64_t copies = std::max<int64_t>(1, total / elems);
  return base + (call % copies) * elems;
}

// The decode attention's split scratch as a decode step of B rows has it, zeroed (none where
// the step does not split: data() null), by the model's rule (SplitsDecodeAttention).
cuda::DeviceBuffer<float> SplitScratch(const lm2::runtime::ModelConfig& c, const lm2::runtime::CudaOptions& options,
                                       int64_t B) {
  const int64_t gemv_rows =
      cuda::GemvRowsFor(options.gemv_max_rows, {c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size});
  const bool split = options.split_decode_attention &&
                     cuda::SplitsDecodeAttention(B, gemv_rows, c.num_heads, c.num_kv_heads);
  const int64_t n = split ? cuda::AttentionDecodeSplitScratch(c.num_heads, c.head_dim) : 0;
  if (n == 0) return {};
  auto b = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(n)), "alloc");
  Check(b.FillBytes(0, nullptr), "fill");
  return b;
}

// Device-to-device copy rate of 1 GiB, counting bytes read and written: best of 10.
double CopyBandwidth() {
  const std::size_t bytes = std::size_t{1} << 30;
  auto a = Take(cuda::DeviceBuffer<char>::Allocate(bytes), "alloc");
  auto b = Take(cuda::DeviceBuffer<char>::Allocate(bytes), "alloc");
  Check(a.FillBytes(1, nullptr), "fill");
  const double best = BestSeconds(nullptr, [&] {
    return cuda::CudaStatus(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice), "copy");
  }, 2, 10);
  return 2.0 * static_cast<double>(bytes) / best;
}

// The backend's Linear (bf16 x bf16, fp32 accumulate and output) at m = n = k = 8192: best of 6.
double GemmRate() {
  const int64_t n = 8192;
  auto x = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(n * n)), "alloc");
  auto w = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(n * n)), "alloc");
  auto y = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(n * n)), "alloc");
  Check(x.FillBytes(0x3c, nullptr), "fill");  // 0x3c3c as bf16: about 0.0115, finite
  Check(w.FillBytes(0x3c, nullptr), "fill");
  auto handle = Take(cuda::CublasHandle::Create(), "cublas");
  const double best = BestSeconds(nullptr, [&] {
    return cuda::Linear(handle.get(), x.data(), n, n, w.data(), n, y.data(), false, nullptr);
  }, 2, 6);
  return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / best;
}

struct Shape {
  double d, qdim, kvdim, F, N, V, Hm;
  int64_t layers, memory_layers;
  bool last_layer_memory;
};

// Bytes one decoded token must move at context length S: every matrix but the embedding
// table (one row of it), the KV cache rows read (fp32), each memory layer's K and V (fp32).
constexpr double kMemoryKvBytes = 2.0;  // bytes per element of the cached memory K and V (bf16)

double DecodeBytes(const Shape& s, double S) {
  const double per_layer = 2.0 * (s.d * s.qdim * 2 + s.d * s.kvdim * 2 + 3 * s.d * s.F) + 4.0 * 2 * S * s.kvdim;
  // Per token a memory layer reads its query, write-offer and output-gate weights (the
  // read K/V and the two write gates run once per segment, not per token) and the
  // segment's memory K and V.
  const double memory = 2.0 * 3 * s.d * s.d + kMemoryKvBytes * 2 * s.N * s.d;
  return static_cast<double>(s.layers) * per_layer + static_cast<double>(s.memory_layers) * memory + 2.0 * s.V * s.d;
}

// The FLOPs of a T-token prefill from an empty context; with segment_kv, also the bank's
// memory K/V (2 N d² a layer, twice), which only a call that makes them does: a fresh state
// reads the ones the model made once at load (CudaOptions::share_initial_memory_kv), a
// reused state's were made at its last segment's end (CudaOptions::memory_kv_at_segment_end)
// or are made by the call.
double PrefillFlops(const Shape& s, double T, bool segment_kv) {
  const double gemm = 2.0 * T * (s.d * s.qdim * 2 + s.d * s.kvdim * 2 + 3 * s.d * s.F);
  const double attention = 2.0 * 2 * (T * T / 2) * s.qdim;  // QK and PV over the causal half
  const double mem_tokens = 2.0 * T * 3 * s.d * s.d + 2.0 * 2 * T * s.N * s.d + 2.0 * T * s.N * s.d;  // q,offer,gate; read; write
  const double mem_segment = segment_kv ? 2.0 * 2 * s.N * s.d * s.d : 0.0;  // memory K and V of the bank
  return static_cast<double>(s.layers) * (gemm + attention) +
         static_cast<double>(s.memory_layers) * (mem_tokens + mem_segment) + 2.0 * s.V * s.d;
}

// The FLOPs of PrefillFlops a prompt read for its last logits does not run: its last layer
// takes the attention output, the output gate and the FFN for the last row only (ChunkRows
// in the runtime). PrefillFlops counts the whole forward, as a model-FLOPs ratio does.
double PrefillSkippedFlops(const Shape& s, double T) {
  const double per_row = 2.0 * (s.qdim * s.d + 3 * s.d * s.F + (s.last_layer_memory ? s.d * s.d : 0.0));
  const double attention = 2.0 * 2 * (T * T / 2) * s.qdim - 2.0 * 2 * T * s.qdim;  // all rows' but the last's
  return (T - 1) * per_row + attention;
}

std::vector<int32_t> Tokens(int64_t n, int64_t vocab, int64_t seed) {
  std::vector<int32_t> t(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<std::size_t>(i)] = static_cast<int32_t>((seed * 7919 + i * 104729) % vocab);
  return t;
}

// How a decode step's token is chosen.
enum class Pick {
  kGreedyDevice,   // ForwardBatchGreedy: the argmax on the GPU (Generate's greedy decoding)
  kGreedyHost,     // Forward's logits to the host, the argmax there (Sampler, greedy)
  kSampledDevice,  // ForwardBatchSample: temperature 0.8, top-p 0.95 on the GPU (Generate's sampling)
  kSampledHost,    // Forward's logits to the host, the same rule there (Sampler)
};

// Decodes `steps` tokens on a state that already holds a prompt (its last logits in
// `logits`); seconds.
double Decode(const Model& m, SequenceState& s, int64_t steps, std::vector<float>& logits, Pick pick) {
  SequenceState* const one[] = {&s};
  std::vector<int32_t> next = {Argmax(logits)};
  lm2::runtime::Sampler sampler(lm2::runtime::SamplingOptions{.temperature = 0.8f, .top_p = 0.95f, .seed = 1});
  lm2::runtime::Sampler greedy(lm2::runtime::SamplingOptions{});  // the host's argmax (PickToken)
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < steps; ++i) {
    const std::vector<int32_t> token = {next[0]};
    switch (pick) {
      case Pick::kGreedyDevice:
        Check(m.ForwardBatchGreedy(one, token, &next), "decode");
        break;
      case Pick::kSampledDevice: {
        const lm2::runtime::TokenRule rule = sampler.Rule({});
        Check(m.ForwardBatchSample(one, token, std::span(&rule, 1), &next), "decode");
        break;
      }
      case Pick::kGreedyHost:
      case Pick::kSampledHost:
        Check(m.Forward(s, token, LogitsMode::kLast, &logits), "decode");
        next[0] = (pick == Pick::kGreedyHost ? greedy : sampler).Sample(logits, {});
        break;
    }
  }
  return Seconds(t0, Clock::now());
}

// One op's mean time, how often it runs (per step or per layer), and the bytes it must
// stream (weights or memory K/V; 0: not shown).
struct OpTime {
  const char* name;
  double count;
  double s;
  double bytes = 0;
  double flops = 0;
};

// Prints each op's time x count (and GB/s or TFLOP/s where bytes or FLOPs are known);
// returns Σ time x count.
double PrintOpTimes(const std::vector<OpTime>& ops) {
  double total = 0;
  for (const OpTime& op : ops) {
    std::printf("  %-55s %8.1f us x %4.0f = %7.3f ms", op.name, op.s * 1e6, op.count, op.s * op.count * 1e3);
    if (op.bytes > 0) std::printf("  (%.0f GB/s)", op.bytes / op.s / 1e9);
    if (op.flops > 0) std::printf("  (%.0f TFLOP/s)", op.flops / op.s / 1e12);
    std::printf("\n");
    total += op.s * op.count;
  }
  return total;
}

// Whether the model's decode steps stage their tokens' memory queries (MemoryStage::staged)
// rather than their probabilities: the breakdowns below run the read and flush that way.
bool StagesTokens(const lm2::runtime::ModelConfig& c, const lm2::runtime::CudaOptions& options) {
  return options.tiled_memory && cuda::DecodeStagesTokens(c.hidden_size, c.memory_heads);
}

// Each op of one decode step at the model's shapes (one token, context S), back to back on
// one stream: where a decode step's time goes, and the sum over a step's op counts.
void DecodeOpBreakdown(const lm2::runtime::ModelConfig& c, const lm2::runtime::CudaOptions& options, int64_t S) {
  const int64_t d = c.hidden_size, F = c.intermediate_size, N = c.memory_slots, Hm = c.memory_heads;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads, Dh = c.head_dim, qdim = H * Dh, kvdim = Hkv * Dh;
  const int64_t big = std::max({N * d, 2 * F * d, c.vocab_size * d, 8 * d * d});
  auto w = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(big)), "alloc");
  auto xb = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(8 * std::max({F, qdim, d}))),
                 "alloc");
  auto f1 = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(N * d)), "alloc");
  auto f2 = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(N * d)), "alloc");
  auto f3 = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(N * d)), "alloc");
  auto kv = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(S * kvdim)), "alloc");
  auto ys = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(std::max({2 * F, c.vocab_size, Hm * N, 8 * d}))),
                 "alloc");
  auto pos = Take(cuda::DeviceBuffer<int64_t>::Allocate(1), "alloc");
  auto ids = Take(cuda::DeviceBuffer<int32_t>::Allocate(1), "alloc");
  for (auto* b : {&f1, &f2, &f3, &kv, &ys}) Check(b->FillBytes(0, nullptr), "fill");
  Check(w.FillBytes(0, nullptr), "fill");
  Check(pos.FillBytes(0, nullptr), "fill");
  Check(ids.FillBytes(0, nullptr), "fill");
  // One session's staging pointers (device arrays of one pointer each) for StageWriteBatch.
  auto slot = Take(cuda::DeviceBuffer<int64_t>::Allocate(1), "alloc");
  Check(slot.FillBytes(0, nullptr), "fill");
  auto pointer_to = [](float* p) {
    auto b = Take(cuda::DeviceBuffer<float*>::Allocate(1), "alloc");
    Check(b.CopyFromHost(&p, 1, nullptr), "copy");
    return b;
  };
  auto stage_attn = pointer_to(f2.data());  // 16 staged tokens fit in N x d floats
  auto stage_offer = pointer_to(f3.data());
  auto stage_mass = pointer_to(f1.data() + N * d / 2);  // past the read's output and scratch
  // One session's memory K and V (bf16) for MemoryReadBatch: kv_copies copies of the pair in
  // w, one pointer pair each.
  const int64_t kv_copies = std::max<int64_t>(1, big / (2 * N * d));
  std::vector<const __nv_bfloat16*> k_ptrs, v_ptrs;
  for (int64_t i = 0; i < kv_copies; ++i) {
    k_ptrs.push_back(w.data() + 2 * i * N * d);
    v_ptrs.push_back(w.data() + (2 * i + 1) * N * d);
  }
  auto mem_k = Take(cuda::DeviceBuffer<const __nv_bfloat16*>::Allocate(k_ptrs.size()), "alloc");
  auto mem_v = Take(cuda::DeviceBuffer<const __nv_bfloat16*>::Allocate(v_ptrs.size()), "alloc");
  Check(mem_k.CopyFromHost(k_ptrs.data(), k_ptrs.size(), nullptr), "copy");
  Check(mem_v.CopyFromHost(v_ptrs.data(), v_ptrs.size(), nullptr), "copy");
  // The KV cache for the decode attention: S rows, this token at the last.
  auto kv_ptr = pointer_to(kv.data());
  auto last_pos = Take(cuda::DeviceBuffer<int64_t>::Allocate(1), "alloc");
  const int64_t last = S - 1;
  Check(last_pos.CopyFromHost(&last, 1, nullptr), "copy");
  auto rope = Take(cuda::DeviceBuffer<float2>::Allocate(static_cast<std::size_t>(Dh / 2)), "alloc");
  Check(cuda::RopeFactorsBatch(last_pos.data(), 1, Dh, c.rope_theta, rope.data(), nullptr), "rope factors");
  auto attn_split = SplitScratch(c, options, 1);
  // Or its staged tokens, when the model stages those (its flush interval's slots).
  const bool tokens = StagesTokens(c, options);
  const int64_t flush = options.write_flush_tokens;
  auto staged = Take(cuda::DeviceBuffer<float>::Allocate(
                         static_cast<std::size_t>(tokens ? cuda::StagedTokensFloats(flush, d, Hm) : 1)),
                     "alloc");
  if (tokens) Check(cuda::ClearStagedTokens(staged.data(), 1, flush, d, Hm, nullptr), "clear");
  auto stage_tokens = pointer_to(staged.data());
  const cuda::MemoryStage stage =
      tokens ? cuda::MemoryStage{.offer = f3.data(), .offer_ld = d, .slots = slot.data(),
                                 .staged = stage_tokens.data(), .capacity = flush}
             : cuda::MemoryStage{.offer = f3.data(), .offer_ld = d, .slots = slot.data(),
                                 .pending_attn = stage_attn.data(), .pending_offer = stage_offer.data(),
                                 .mass = stage_mass.data()};
  auto stream = Take(cuda::CudaStream::Create(), "stream");
  auto blas = Take(cuda::CublasHandle::Create(), "cublas");
  const cudaStream_t st = stream.get();
  cublasHandle_t h = blas.get();
  SetUpDone();
  float* x = f1.data();
  const double L = static_cast<double>(c.num_layers), M = static_cast<double>(c.memory_layers.size());
  const int64_t P = qdim + 2 * kvdim + (c.has_memory() ? 2 * d : 0);  // the stacked x projection
  // The decode step's linear layers as the model runs them (gemv.cu), one token.
  auto gemv_args = [&](cuda::GemvInput in_kind, int64_t in, int64_t out, cuda::GemvOutput out_kind) {
    return cuda::GemvArgs{
        .input = in_kind,
        .x = in_kind == cuda::GemvInput::kBf16 ? static_cast<const void*>(xb.data()) : static_cast<const void*>(x),
        .x_ld = in,
        .norm_weight = f2.data(),
        .eps = 1e-5f,
        .w = w.data(),
        .rows = 1,
        .in = in,
        .out = out,
        .output = out_kind,
        .y = ys.data(),
        .bias = f2.data(),
        .residual = f3.data(),
        .gated = f3.data(),
        .y_bf16 = xb.data()};
  };
  int64_t call = 0;  // rotates the weight copies (WeightCopy)
  auto run_gemv = [&](cuda::GemvArgs g) {
    g.w = WeightCopy(w.data(), big, g.in * g.out, call++);
    return cuda::Gemv(g, st);
  };
  auto gemv = [&](cuda::GemvInput in_kind, int64_t in, int64_t out, cuda::GemvOutput out_kind) {
    const cuda::GemvArgs g = gemv_args(in_kind, in, out, out_kind);
    return TimeOp(st, [&] { return run_gemv(g); });
  };
  // One session's memory read with its write terms staged, as a decode step runs it (each
  // call on another copy of the K/V, as the layers' reads are).
  auto read_memory = [&] {
    const int64_t copy = call++ % kv_copies;
    return cuda::MemoryReadBatch(x, d, mem_k.data() + copy, mem_v.data() + copy, 1, N, d, Hm, ys.data(),
                                 f1.data() + d, f1.data() + 2 * d, &stage, st);
  };
  auto wbytes = [](int64_t in, int64_t out) { return 2.0 * static_cast<double>(in) * static_cast<double>(out); };
  using cuda::GemvInput;
  using cuda::GemvOutput;
  const std::vector<OpTime> rows = {
      {"EmbeddingLookup", 1,
       TimeOp(st, [&] { return cuda::EmbeddingLookup(w.data(), c.vocab_size, d, ids.data(), 1, x, st); })},
      {"Gemv RMSNorm -> q|k|v|mem q|offer (stacked)", L, gemv(GemvInput::kRmsNorm, d, P, GemvOutput::kStore),
       wbytes(d, P)},
      {"RopeFactorsBatch (rotary factors of the step)", 1,
       TimeOp(st, [&] { return cuda::RopeFactorsBatch(last_pos.data(), 1, Dh, c.rope_theta, rope.data(), st); })},
      {"RopeAttentionDecodeBatch (RoPE, cache append, attention)", L,
       TimeOp(st, [&] {
         return cuda::RopeAttentionDecodeBatch(ys.data(), P, last_pos.data(), rope.data(), kv_ptr.data(),
                                               kv_ptr.data(), 1, H, Hkv, Dh, f2.data(), attn_split.data(), S, st);
       })},
      {"Gemv fp32 -> o_proj", L, gemv(GemvInput::kF32, qdim, d, GemvOutput::kStore), wbytes(qdim, d)},
      {"MemoryReadBatch (one session, write terms staged)", M, TimeOp(st, read_memory),
       4.0 * static_cast<double>(N * d)},
      {"Gemv fp32 -> out_gate, gated residual", M, gemv(GemvInput::kF32, d, d, GemvOutput::kGatedResidual),
       wbytes(d, d)},
      tokens ? OpTime{"FlushStagedTokens (write_flush_tokens), per token", M / static_cast<double>(flush),
                      TimeOp(st, [&] {
                        return cuda::FlushStagedTokens(w.data(), staged.data(), flush, flush, N, d, Hm, f2.data(),
                                                       f1.data(), st);
                      })}
             : OpTime{"FlushStagedWrites (16 tokens), per token", M / 16.0,
                      TimeOp(st, [&] {
                        return cuda::FlushStagedWrites(h, f2.data(), f3.data(), 16, N, d, Hm, f1.data(), st);
                      })},
      {"Gemv RMSNorm -> gate|up (stacked) -> SwiGLU", L, gemv(GemvInput::kRmsNorm, d, 2 * F, GemvOutput::kSwiGluBf16),
       wbytes(d, 2 * F)},
      {"Gemv bf16 -> down, accumulate", L, gemv(GemvInput::kBf16, F, d, GemvOutput::kAccumulate), wbytes(F, d)},
      {"Gemv RMSNorm -> LM head", 1, gemv(GemvInput::kRmsNorm, d, c.vocab_size, GemvOutput::kStore),
       wbytes(d, c.vocab_size)},
  };
  std::printf("decode step by op (context %lld; mean of 200 back-to-back launches each, each on other weights; counts "
              "per step):\n",
              static_cast<long long>(S));
  const double total = PrintOpTimes(rows);
  std::printf("  %-55s %30.3f ms\n", "sum (one decode step's ops, no host work)", total * 1e3);
  // The same shapes through cuBLAS (the path of longer chunks), for comparison.
  const std::pair<const char*, std::pair<int64_t, int64_t>> blas_rows[] = {
      {"cuBLAS Linear 1 x d -> stacked q|k|v|mem q|offer", {d, P}},
      {"cuBLAS Linear 1 x d -> 2F", {d, 2 * F}},
      {"cuBLAS Linear 1 x F -> d", {F, d}},
      {"cuBLAS Linear 1 x d -> V", {d, c.vocab_size}}};
  for (const auto& [name, shape] : blas_rows) {
    const auto [in, out] = shape;
    const double t = TimeOp(st, [&] {
      return cuda::Linear(h, xb.data(), 1, in, WeightCopy(w.data(), big, in * out, call++), out, ys.data(), false, st);
    });
    std::printf("  %-55s %8.1f us  (%.0f GB/s of weights)\n", name, t * 1e6, wbytes(in, out) / t / 1e9);
  }
  // What staging the input costs the GEMVs that make it by an RMSNorm (a block-wide
  // reduction before the conversion): the same layers from an fp32 input (a rounding).
  {
    const double t_qkv = gemv(GemvInput::kF32, d, P, GemvOutput::kStore);
    const double t_gu = gemv(GemvInput::kF32, d, 2 * F, GemvOutput::kSwiGluBf16);
    std::printf("  the RMSNorm GEMVs from an fp32 input instead: q|k|v|... %6.1f us (%.0f GB/s), "
                "gate|up %6.1f us (%.0f GB/s)\n",
                t_qkv * 1e6, wbytes(d, P) / t_qkv / 1e9, t_gu * 1e6, wbytes(d, 2 * F) / t_gu / 1e9);
  }
  // The projection GEMV and then the memory read, chained as a one-session step runs them
  // (the read leads: programmatic dependent launch lets its blocks start, where they fit,
  // while the projection ends), against the two apart: how much of the read the chain hides.
  if (c.has_memory()) {
    const cuda::GemvArgs proj = gemv_args(GemvInput::kRmsNorm, d, P, GemvOutput::kStore);
    const double t_proj = TimeOp(st, [&] { return run_gemv(proj); });
    const double t_read = TimeOp(st, read_memory);
    const double t_pair = TimeOp(st, [&] {
      const lm2::Status s = run_gemv(proj);
      return s.ok() ? read_memory() : s;
    });
    std::printf("  the q|k|v GEMV, then the memory read (chained as at batch 1): %6.1f us; apart %6.1f + %6.1f us\n",
                t_pair * 1e6, t_proj * 1e6, t_read * 1e6);
  }
  // Batched decode steps: the gate|up layer for B rows, GEMV (up to its row limit) and cuBLAS.
  for (int64_t B = 2; B <= cuda::kGemvMaxRows; B *= 2) {
    const cuda::GemvArgs g{.input = cuda::GemvInput::kRmsNorm, .x = x, .x_ld = d, .norm_weight = f3.data(),
                           .eps = 1e-5f, .w = w.data(), .rows = B, .in = d, .out = 2 * F, .y = f2.data()};
    const double tg = TimeOp(st, [&] { return run_gemv(g); });
    const double tb = TimeOp(st, [&] {
      return cuda::Linear(h, xb.data(), B, d, WeightCopy(w.data(), big, d * 2 * F, call++), 2 * F, f2.data(), false,
                          st);
    });
    std::printf("  %lld rows d -> 2F: Gemv %6.1f us (%.0f GB/s), cuBLAS %6.1f us (%.0f GB/s)\n",
                static_cast<long long>(B), tg * 1e6, wbytes(d, 2 * F) / tg / 1e9, tb * 1e6, wbytes(d, 2 * F) / tb / 1e9);
  }
}

// The parts of one batched decode step of B sessions (context S each), per layer, back to
// back on one stream: where a many-session step's time goes. Each session has its own
// memory K/V (bf16) and KV cache; the linear layers run cuBLAS at B rows (past the GEMV
// limit). Printed after the batch-1 breakdown.
void BatchedStepParts(const lm2::runtime::ModelConfig& c, const lm2::runtime::CudaOptions& options, int64_t S,
                      int64_t B) {
  const int64_t d = c.hidden_size, F = c.intermediate_size, N = c.memory_slots, Hm = c.memory_heads;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads, Dh = c.head_dim, qdim = H * Dh, kvdim = Hkv * Dh;
  const int64_t P = qdim + 2 * kvdim + (c.has_memory() ? 2 * d : 0);
  auto kv = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(B * 2 * N * d)), "alloc");
  auto caches = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * 2 * S * kvdim)), "alloc");
  const int64_t big = std::max({2 * F * d, P * d, c.vocab_size * d});
  auto w = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(big)), "alloc");
  auto xb = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(B * std::max(F, d))), "alloc");
  auto y = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * std::max({2 * F, P, c.vocab_size}))),
                "alloc");
  auto attn = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * Hm * N)), "alloc");
  auto q = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * std::max(P, qdim))), "alloc");
  auto e = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * d)), "alloc");
  auto scratch = Take(cuda::DeviceBuffer<float>::Allocate(
                          static_cast<std::size_t>(cuda::MemoryReadDecodeScratch(B, N, d, Hm))), "alloc");
  auto pos = Take(cuda::DeviceBuffer<int64_t>::Allocate(static_cast<std::size_t>(B)), "alloc");
  for (auto* buf : {&caches, &y, &attn, &q, &e}) Check(buf->FillBytes(0, nullptr), "fill");
  Check(kv.FillBytes(0x3c, nullptr), "fill");
  Check(w.FillBytes(0x3c, nullptr), "fill");
  Check(xb.FillBytes(0x3c, nullptr), "fill");
  std::vector<int64_t> positions(static_cast<std::size_t>(B), S - 1);
  Check(pos.CopyFromHost(positions.data(), positions.size(), nullptr), "copy");
  std::vector<const __nv_bfloat16*> kp, vp;
  std::vector<float*> kc, vc;
  for (int64_t b = 0; b < B; ++b) {
    kp.push_back(kv.data() + (2 * b) * N * d);
    vp.push_back(kv.data() + (2 * b + 1) * N * d);
    kc.push_back(caches.data() + (2 * b) * S * kvdim);
    vc.push_back(caches.data() + (2 * b + 1) * S * kvdim);
  }
  auto upload = [](const auto& host) {
    using T = typename std::decay_t<decltype(host)>::value_type;
    auto b = Take(cuda::DeviceBuffer<T>::Allocate(host.size()), "alloc");
    Check(b.CopyFromHost(host.data(), host.size(), nullptr), "copy");
    return b;
  };
  auto dkp = upload(kp), dvp = upload(vp);
  auto dkc = upload(kc), dvc = upload(vc);
  // The read stages each session's token as the model's steps do (slot 0 of a flush
  // interval's), or, where the model stages probabilities, leaves them in attn (the same
  // bytes written).
  const bool tokens = StagesTokens(c, options);
  const int64_t flush = options.write_flush_tokens, per_session = cuda::StagedTokensFloats(flush, d, Hm);
  auto staged = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(tokens ? B * per_session : 1)),
                     "alloc");
  std::vector<float*> sp;
  for (int64_t b = 0; b < B && tokens; ++b) sp.push_back(staged.data() + b * per_session);
  if (tokens) Check(cuda::ClearStagedTokens(staged.data(), B, flush, d, Hm, nullptr), "clear");
  auto dsp = upload(sp.empty() ? std::vector<float*>{nullptr} : sp);
  auto slots = upload(std::vector<int64_t>(static_cast<std::size_t>(B), 0));
  const cuda::MemoryStage stage{.offer = q.data(), .offer_ld = P, .slots = slots.data(), .staged = dsp.data(),
                                .capacity = flush};
  auto rope = Take(cuda::DeviceBuffer<float2>::Allocate(static_cast<std::size_t>(B * Dh / 2)), "alloc");
  Check(cuda::RopeFactorsBatch(pos.data(), B, Dh, c.rope_theta, rope.data(), nullptr), "rope factors");
  auto attn_split = SplitScratch(c, options, B);
  auto stream = Take(cuda::CudaStream::Create(), "stream");
  auto blas = Take(cuda::CublasHandle::Create(), "cublas");
  const cudaStream_t st = stream.get();
  cublasHandle_t h = blas.get();
  SetUpDone();
  int64_t call = 0;  // rotates the weight copies (WeightCopy)
  auto linear = [&](int64_t in, int64_t out) {
    return TimeOp(st, [&] {
      return cuda::Linear(h, xb.data(), B, in, WeightCopy(w.data(), big, in * out, call++), out, y.data(), false, st);
    }, 50);
  };
  const double wb = 2.0;  // bf16
  const std::vector<OpTime> parts = {
      {"cuBLAS B x d -> q|k|v|mem q|offer", 1, linear(d, P), wb * static_cast<double>(d * P)},
      {"RopeAttentionDecodeBatch", 1,
       TimeOp(st, [&] {
         return cuda::RopeAttentionDecodeBatch(y.data(), P, pos.data(), rope.data(), dkc.data(), dvc.data(), B, H,
                                               Hkv, Dh, q.data(), attn_split.data(), S, st);
       }, 50), 4.0 * static_cast<double>(B * 2 * S * kvdim)},
      {"cuBLAS B x qdim -> d (o_proj) and B x d -> d (out_gate)", 2, linear(qdim, d), wb * static_cast<double>(d * qdim)},
      {"MemoryReadBatch (B sessions' K/V)", 1,
       TimeOp(st, [&] {
         return cuda::MemoryReadBatch(q.data(), P, dkp.data(), dvp.data(), B, N, d, Hm, attn.data(), e.data(),
                                      scratch.data(), tokens ? &stage : nullptr, st);
       }, 20), wb * static_cast<double>(B * 2 * N * d)},
      {"cuBLAS B x d -> 2F (gate|up)", 1, linear(d, 2 * F), wb * static_cast<double>(d * 2 * F)},
      {"cuBLAS B x F -> d (down)", 1, linear(F, d), wb * static_cast<double>(F * d)},
  };
  const double L = static_cast<double>(c.num_layers);
  std::printf("a batched decode step of %lld sessions by part (context %lld; counts per layer):\n",
              static_cast<long long>(B), static_cast<long long>(S));
  const double per_layer = PrintOpTimes(parts);
  const double head = TimeOp(st, [&] { return cuda::Linear(h, xb.data(), B, d, w.data(), c.vocab_size, y.data(), false, st); }, 20);
  std::printf("  %-55s %8.1f us\n", "cuBLAS B x d -> V (LM head, once)", head * 1e6);
  std::printf("  %-55s %8.3f ms (+ elementwise kernels, staging and flushes)\n", "sum over the layers and the head",
              (per_layer * L + head) * 1e3);
}

// What a new state's first call pays before its kernels run, one resource kind at a time
// (the mean of `n` of each, made and then released): streams, events, cuBLAS handles, device
// buffers from lm2's pool, pinned host buffers. Printed in microseconds each.
void SetupCosts(int n) {
  const auto mean_us = [n](auto make) {
    std::vector<decltype(make())> held;
    const auto t0 = Clock::now();
    for (int i = 0; i < n; ++i) held.push_back(make());
    const double s = Seconds(t0, Clock::now());
    return s / n * 1e6;
  };
  const double stream = mean_us([] { return Take(cuda::CudaStream::Create(), "stream"); });
  const double event = mean_us([] { return Take(cuda::CudaEvent::Create(), "event"); });
  const double blas = mean_us([] { return Take(cuda::CublasHandle::Create(), "cublas"); });
  const double dev_1m = mean_us([] { return Take(cuda::DeviceBuffer<float>::Allocate(1 << 18), "alloc"); });
  const double dev_16m = mean_us([] { return Take(cuda::DeviceBuffer<float>::Allocate(1 << 22), "alloc"); });
  const double pin_4k = mean_us([] { return Take(cuda::PinnedBuffer<int32_t>::Allocate(1 << 10), "pinned"); });
  const double pin_1m = mean_us([] { return Take(cuda::PinnedBuffer<float>::Allocate(1 << 18), "pinned"); });
  // The same buffers again, now from memory the pool kept: what a new state's first call
  // pays per scratch buffer once earlier states have come and gone.
  const double dev_1m_kept = mean_us([] { return Take(cuda::DeviceBuffer<float>::Allocate(1 << 18), "alloc"); });
  // A GEMM (512 x 2048 x 2048, bf16) on a new cuBLAS handle with its own 8 MiB workspace, as
  // a state's (cuda_model.cc's Blas): its first call on a new stream, its second, and a third
  // on another new stream.
  const auto gemm_us = [] {
    constexpr int64_t dim = 2048, rows = 512;
    auto x = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(rows * dim), "alloc");
    auto w = Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(dim * dim), "alloc");
    auto y = Take(cuda::DeviceBuffer<float>::Allocate(rows * dim), "alloc");
    auto workspace = Take(cuda::DeviceBuffer<char>::Allocate(std::size_t{8} << 20), "alloc");
    Check(cuda::CudaStatus(cudaMemset(x.data(), 0, x.bytes()), "memset"), "memset");
    Check(cuda::CudaStatus(cudaMemset(w.data(), 0, w.bytes()), "memset"), "memset");
    auto handle = Take(cuda::CublasHandle::Create(), "cublas");
    Check(cuda::CublasStatus(cublasSetWorkspace(handle.get(), workspace.data(), workspace.bytes()), "workspace"),
          "workspace");
    auto first = Take(cuda::CudaStream::Create(), "stream"), other = Take(cuda::CudaStream::Create(), "stream");
    std::array<double, 3> us{};
    const cudaStream_t on[3] = {first.get(), first.get(), other.get()};
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      Check(cuda::Linear(handle.get(), x.data(), rows, dim, w.data(), dim, y.data(), false, on[i]), "gemm");
      Check(cuda::CudaStatus(cudaStreamSynchronize(on[i]), "sync"), "sync");
      us[static_cast<std::size_t>(i)] = Seconds(t0, Clock::now()) * 1e6;
    }
    return us;
  }();
  std::printf("setup costs (us each, mean of %d): stream %.1f, event %.1f, cuBLAS handle %.1f, device buffer from the "
              "pool 1 MiB %.1f / 16 MiB %.1f (1 MiB again, from kept memory: %.1f), pinned host buffer 4 KiB %.1f / "
              "1 MiB %.1f; a GEMM (512 x 2048 x 2048) on a new cuBLAS handle: its first call %.1f, its second %.1f, "
              "on another new stream %.1f\n",
              n, stream, event, blas, dev_1m, dev_16m, dev_1m_kept, pin_4k, pin_1m, gemm_us[0], gemm_us[1], gemm_us[2]);
}

// A state's device memory at the model's shape, from lm2's device pool (its buffers; what
// the CUDA streams, events, graphs and cuBLAS handles keep for themselves is not counted):
// new; after a 512-token prompt (or the longest the model takes) and 32 greedy decode steps
// (KV cache and scratch grown; a decode step's buffers are the lead state's); after its
// segment end (the write's buffers and the next segment's own memory K/V).
void StateMemory(const Model& model, int device) {
  const auto& cfg = model.config();
  const auto used = [device] { return static_cast<double>(cuda::DevicePoolUsedBytes(device)); };
  const double base = used();
  auto s = Take(model.NewState(), "state");
  const double fresh = used() - base;
  const int64_t prompt = std::min<int64_t>(512, cfg.max_position_embeddings - 33);
  std::vector<float> logits;
  Check(model.Forward(*s, Tokens(prompt, cfg.vocab_size, 11), LogitsMode::kLast, &logits), "prompt");
  lm2::runtime::SequenceState* const one[] = {s.get()};
  std::vector<int32_t> next = {Argmax(logits)};
  for (int i = 0; i < 32; ++i) Check(model.ForwardBatchGreedy(one, std::vector<int32_t>(next), &next), "step");
  const double prompted = used() - base;
  Check(model.EndSegment(*s), "end");
  const double ended = used() - base;
  constexpr double kMiB = 1 << 20;
  std::printf("a state's device memory (lm2's pool): new %.1f MiB; after a %lld-token prompt and 32 steps %.1f MiB; "
              "after its segment end %.1f MiB\n",
              fresh / kMiB, static_cast<long long>(prompt), prompted / kMiB, ended / kMiB);
}

// The best time of a `tokens`-token prompt after `context` tokens in the same segment (each
// repeat on a state reset to an empty context first; the first run warms up).
double LatePrompt(const Model& model, int64_t context, int64_t tokens, int64_t repeats) {
  const auto& cfg = model.config();
  auto s = Take(model.NewState(), "state");
  std::vector<float> logits;
  double best = 1e30;
  for (int64_t r = 0; r < repeats + 1; ++r) {
    model.ResetContext(*s);
    Check(model.Forward(*s, Tokens(context, cfg.vocab_size, 300 + r), LogitsMode::kNone, nullptr), "context");
    const auto t0 = Clock::now();
    Check(model.Forward(*s, Tokens(tokens, cfg.vocab_size, 7), LogitsMode::kLast, &logits), "prompt");
    if (r > 0) best = std::min(best, Seconds(t0, Clock::now()));
  }
  return best;
}

// Each kernel of one prefill chunk of T tokens (from an empty cache) at the model's shapes,
// back to back on one stream, per layer: where a prefill's time goes, without the profiler
// (Nsight Compute runs kernels one at a time at whatever clock the card idles at). The
// memory read and write sums and attention are timed alone here; in the model they run on
// two streams side by side.
void PrefillChunkParts(const lm2::runtime::ModelConfig& c, int64_t T) {
  const int64_t d = c.hidden_size, F = c.intermediate_size, N = c.memory_slots, Hm = c.memory_heads;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads, Dh = c.head_dim, qdim = H * Dh, kvdim = Hkv * Dh;
  const int64_t P = qdim + 2 * kvdim + (c.has_memory() ? 2 * d : 0);
  auto alloc_f = [](int64_t n) { return Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(n)), "alloc"); };
  auto alloc_b = [](int64_t n) {
    return Take(cuda::DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(n)), "alloc");
  };
  const int64_t widest = std::max({P, 2 * F, qdim});
  const int64_t w_elems = 4 * std::max({d * P, 2 * F * d, 2 * N * d});  // 4 copies of the largest (WeightCopy)
  auto w = alloc_b(w_elems);
  auto xb = alloc_b(T * std::max({F, qdim, d}));
  auto x = alloc_f(T * d), y = alloc_f(T * widest), q = alloc_f(T * qdim), kc = alloc_f(T * kvdim),
       vc = alloc_f(T * kvdim), e = alloc_f(T * d), a = alloc_f(T * d), norm = alloc_f(d);
  auto kvb = alloc_b(4 * T * kvdim);  // K and V of up to 2T positions
  auto mass = alloc_f(Hm * N), acc = alloc_f(N * d), scratch = alloc_f(cuda::MemoryReadWriteScratch(T, d, Hm));
  auto rope = Take(cuda::DeviceBuffer<float2>::Allocate(static_cast<std::size_t>(T * Dh / 2)), "alloc");
  auto pos = Take(cuda::DeviceBuffer<int64_t>::Allocate(static_cast<std::size_t>(T)), "alloc");
  std::vector<int64_t> positions(static_cast<std::size_t>(T));
  std::iota(positions.begin(), positions.end(), int64_t{0});
  Check(pos.CopyFromHost(positions.data(), positions.size(), nullptr), "copy");
  Check(cuda::RopeFactorsBatch(pos.data(), T, Dh, c.rope_theta, rope.data(), nullptr), "rope factors");
  // Small finite values everywhere (0x3c3c: about 0.0115 as bf16; fp32 buffers the same bytes).
  for (auto* b : {&x, &y, &q, &kc, &vc, &e, &a, &norm, &mass, &acc}) Check(b->FillBytes(0x3c, nullptr), "fill");
  for (auto* b : {&w, &xb, &kvb}) Check(b->FillBytes(0x3c, nullptr), "fill");
  auto stream = Take(cuda::CudaStream::Create(), "stream");
  auto blas = Take(cuda::CublasHandle::Create(), "cublas");
  const cudaStream_t st = stream.get();
  cublasHandle_t h = blas.get();
  SetUpDone();
  const auto D = [](int64_t v) { return static_cast<double>(v); };
  const double t = D(T), reps = 20;
  const bool pair = c.has_memory() && qdim == d;
  int64_t call = 0;
  auto linear = [&](int64_t in, int64_t out) {
    return TimeOp(st, [&] {
      return cuda::Linear(h, xb.data(), T, in, WeightCopy(w.data(), w_elems, in * out, call++), out, y.data(), false,
                          st);
    }, 20);
  };
  auto gemm_flops_rows = [](int64_t rows, int64_t in, int64_t out) { return 2.0 * static_cast<double>(rows * in * out); };
  auto gemm_flops = [&](int64_t in, int64_t out) { return gemm_flops_rows(T, in, out); };
  const __nv_bfloat16* mem_k = w.data();
  const __nv_bfloat16* mem_v = w.data() + N * d;
  // A memory layer whose o_proj pairs with the output gate (OutputGateWithO) takes the FFN's
  // norm in the gated residual's kernel (GatedResidualRmsNormBf16): one RmsNormBf16 a layer.
  const bool gated_norm = c.has_memory() && pair;
  std::vector<OpTime> parts = {
      {"RmsNormBf16", gated_norm ? 1.0 : 2.0,
       TimeOp(st, [&] { return cuda::RmsNormBf16(x.data(), norm.data(), T, d, 1e-5f, xb.data(), st); }),
       t * D(d) * (4.0 + 2.0)},
      {"cuBLAS T x d -> q|k|v|mem q|offer", 1, linear(d, P), 0, gemm_flops(d, P)},
      {"SplitQkvRope (and the K and V rows in bf16)", 1,
       TimeOp(st, [&] {
         return cuda::SplitQkvRope(y.data(), T, P, H, Hkv, Dh, rope.data(), q.data(), kc.data(), vc.data(), st,
                                   kvb.data(), kvb.data() + T * kvdim);
       }),
       4.0 * t * static_cast<double>(2 * (qdim + 2 * kvdim)) + 2.0 * t * static_cast<double>(2 * kvdim)},
      // The cache rows before the chunk (none here: a later chunk's, a layer's two).
      {"ConvertF32ToBf16 (T earlier K or V cache rows)", 0,
       TimeOp(st, [&] { return cuda::ConvertF32ToBf16(kc.data(), T * kvdim, kvb.data(), st); }), 6.0 * t * D(kvdim)},
      {"CausalAttentionTiled (bf16 out)", 1,
       TimeOp(st, [&] {
         return cuda::CausalAttentionTiled(q.data(), kvb.data(), kvb.data() + T * kvdim, T, T, H, Hkv, Dh, xb.data(), st);
       }, reps),
       0, 2.0 * 2 * (t * t / 2) * static_cast<double>(qdim)},
      {"CausalAttentionTiled, a second chunk (T after T cached)", 0,
       TimeOp(st, [&] {
         return cuda::CausalAttentionTiled(q.data(), kvb.data(), kvb.data() + 2 * T * kvdim, T, 2 * T, H, Hkv, Dh,
                                           xb.data(), st);
       }, reps),
       0, 2.0 * 2 * (t * t * 1.5) * static_cast<double>(qdim)},
      // Apart (counted where the model has no pair: o_proj's width is not d), and as the
      // one strided-batched GEMM the model runs in memory layers (OutputGateWithO).
      {"cuBLAS T x qdim -> d (o_proj), T x d -> d (out_gate)", pair ? 0.0 : 2.0, linear(qdim, d), 0,
       gemm_flops(qdim, d)},
  };
  if (pair) {
    parts.push_back({"cuBLAS o_proj and out_gate as one batched GEMM (LinearTwo)", 1,
                     TimeOp(st, [&] {
                       return cuda::LinearTwo(h, xb.data(), T, d, WeightCopy(w.data(), w_elems, 2 * d * d, call++), d,
                                              y.data(), st);
                     }, 20),
                     0, 2 * gemm_flops(d, d)});
  }
  if (c.has_memory()) {
    // (e in bf16 too where the output gate's GEMM pairs with o_proj's: OutputGateWithO.)
    parts.push_back({"MemoryReadWrite (read and write sums)", 1,
                     TimeOp(st, [&] {
                       const float* mq = y.data() + qdim + 2 * kvdim;  // the memory query, then the offer
                       return cuda::MemoryReadWrite(mq, P, mq + d, P, mem_k, mem_v, T, N, d, Hm, a.data(), true,
                                                    mass.data(), acc.data(), scratch.data(), st,
                                                    cuda::MemoryReadWriteParts::kBoth, pair ? xb.data() : nullptr);
                     }, reps),
                     0, 2.0 * 3 * t * static_cast<double>(N * d)});
    parts.push_back({"MemoryReadWrite, a segment's first chunk (sums stored)", 0,
                     TimeOp(st, [&] {
                       const float* mq = y.data() + qdim + 2 * kvdim;
                       return cuda::MemoryReadWrite(mq, P, mq + d, P, mem_k, mem_v, T, N, d, Hm, a.data(), false,
                                                    mass.data(), acc.data(), scratch.data(), st);
                     }, reps),
                     0, 2.0 * 3 * t * static_cast<double>(N * d)});
    // A segment's opening (once a segment, not a layer of the chunk: count 0): the bank's
    // memory K and V as one batched GEMM, against the two GEMMs it replaced.
    auto bank_b = alloc_b(N * d), kv_out = alloc_b(2 * N * d);
    Check(bank_b.FillBytes(0x3c, nullptr), "fill");
    parts.push_back({"segment opening: memory K|V, one batched GEMM (a layer)", 0,
                     TimeOp(st, [&] {
                       return cuda::LinearPairToBf16(h, bank_b.data(), N, d, w.data(), d, kv_out.data(), st);
                     }, 20),
                     0, 2 * gemm_flops_rows(N, d, d)});
    parts.push_back({"segment opening: the same as two GEMMs (a layer)", 0,
                     TimeOp(st, [&] {
                       lm2::Status k = cuda::LinearToBf16(h, bank_b.data(), N, d, w.data(), d, kv_out.data(), st);
                       if (!k.ok()) return k;
                       return cuda::LinearToBf16(h, bank_b.data(), N, d, w.data() + d * d, d, kv_out.data() + N * d, st);
                     }, 20),
                     0, 2 * gemm_flops_rows(N, d, d)});
    parts.push_back({"GatedResidual", gated_norm ? 0.0 : 1.0,
                     TimeOp(st, [&] { return cuda::GatedResidual(x.data(), a.data(), y.data(), norm.data(), T, d, e.data(), st); }),
                     t * D(d) * 4.0 * 5});
    if (gated_norm) {
      parts.push_back({"GatedResidualRmsNormBf16 (and the FFN's norm)", 1,
                       TimeOp(st, [&] {
                         return cuda::GatedResidualRmsNormBf16(x.data(), a.data(), y.data(), norm.data(), T, d,
                                                               e.data(), norm.data(), 1e-5f, xb.data(), st);
                       }),
                       t * D(d) * (4.0 * 5 + 2.0)});
    }
  }
  // gate | up in bf16, as the model stores it (in y's bytes), then the activation from it;
  // on Hopper the model runs the two as one GEMM with the SwiGLU as its epilogue (the
  // unfused pair shown, not counted).
  auto* gate_up = reinterpret_cast<__nv_bfloat16*>(y.data());
  const double unfused = cuda::LinearSwiGluSupported(T, d, F) ? 0 : 1;
  parts.push_back({"cuBLAS T x d -> 2F (gate|up, bf16 out)", unfused,
                   TimeOp(st, [&] { return cuda::LinearToBf16(h, xb.data(), T, d, w.data(), 2 * F, gate_up, st); }, 20),
                   0, gemm_flops(d, 2 * F)});
  parts.push_back({"SwiGluBf16 (from bf16)", unfused,
                   TimeOp(st, [&] { return cuda::SwiGluBf16(gate_up, T, F, xb.data(), st); }), t * D(F) * (4.0 + 2.0)});
  if (unfused == 0) {
    parts.push_back({"LinearSwiGlu (gate|up GEMM, SwiGLU epilogue)", 1,
                     TimeOp(st, [&] { return cuda::LinearSwiGlu(xb.data(), T, d, w.data(), F, gate_up, st); }, 20), 0,
                     gemm_flops(d, 2 * F)});
  }
  parts.push_back({"cuBLAS T x F -> d (down)", 1, linear(F, d), 0, gemm_flops(F, d)});
  std::printf("a prefill chunk of %lld tokens by kernel (empty cache; mean of back-to-back launches, GEMMs each on "
              "other weights; counts per layer):\n",
              static_cast<long long>(T));
  const double per_layer = PrintOpTimes(parts);
  std::printf("  %-55s %8.3f ms for %lld layers (+ the segment opening and the LM head)\n", "sum over the layers",
              per_layer * static_cast<double>(c.num_layers) * 1e3, static_cast<long long>(c.num_layers));
}

// SampleRows (the device sampler) at the model's vocabulary, 1 and B rows, per rule kind, on
// two logit shapes: "peaked" (logit = -1.5 ln rank over a shuffled vocabulary: a language
// model's long tail; top-p 0.95 keeps ~a hundred tokens) and "flat" (normal, sigma 1: top-p
// keeps most of the vocabulary, so the rows take the whole-row sort).
void SamplingOps(int64_t V, int64_t B) {
  std::vector<float> peaked(static_cast<std::size_t>(V)), flat(peaked.size());
  std::vector<int32_t> perm(peaked.size());
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 rng(5);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < V; ++i) {
    peaked[static_cast<std::size_t>(perm[static_cast<std::size_t>(i)])] = -1.5f * std::log(static_cast<float>(i + 1));
    flat[static_cast<std::size_t>(i)] = normal(rng);
  }
  auto stream = Take(cuda::CudaStream::Create(), "stream");
  const cudaStream_t st = stream.get();
  auto logits = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * V)), "alloc");
  auto keys = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * V)), "alloc");
  auto sorted_keys = Take(cuda::DeviceBuffer<float>::Allocate(static_cast<std::size_t>(B * V)), "alloc");
  auto ids = Take(cuda::DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(B * V)), "alloc");
  auto sorted_ids = Take(cuda::DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(B * V)), "alloc");
  auto segments = Take(cuda::DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(2 * B)), "alloc");
  auto plans = Take(cuda::DeviceBuffer<cuda::SampleRowPlan>::Allocate(static_cast<std::size_t>(B)), "alloc");
  auto rules = Take(cuda::DeviceBuffer<cuda::DeviceTokenRule>::Allocate(static_cast<std::size_t>(B)), "alloc");
  auto history = Take(cuda::DeviceBuffer<int32_t>::Allocate(64), "alloc");
  auto out = Take(cuda::DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(B)), "alloc");
  const std::size_t temp_bytes = Take(cuda::SampleRowsTempBytes(B, V), "temp bytes");
  auto temp = Take(cuda::DeviceBuffer<char>::Allocate(std::max<std::size_t>(temp_bytes, 1)), "alloc");
  std::vector<int32_t> hist(64);
  std::iota(hist.begin(), hist.end(), 100);
  Check(history.CopyFromHost(hist.data(), hist.size(), nullptr), "copy");
  const cuda::SampleRowsScratch scratch{.keys = keys.data(), .ids = ids.data(), .sorted_keys = sorted_keys.data(),
                                        .sorted_ids = sorted_ids.data(), .segment_begin = segments.data(),
                                        .segment_end = segments.data() + B, .plans = plans.data(),
                                        .temp = temp.data(), .temp_bytes = temp_bytes};
  struct Kind {
    const char* name;
    cuda::DeviceTokenRule rule;
  };
  const Kind kinds[] = {
      {"greedy, repetition penalty 1.1 (64 ids)", {.repetition_penalty = 1.1f, .history_end = 64}},
      {"temperature 0.8", {.draw = 0.5, .temperature = 0.8f}},
      {"temperature 0.8, top-k 40", {.draw = 0.5, .temperature = 0.8f, .top_k = 40}},
      {"temperature 0.8, top-p 0.95", {.draw = 0.5, .temperature = 0.8f, .top_p = 0.95f}},
  };
  std::printf("SampleRows over %lld logits per row (mean of back-to-back calls):\n", static_cast<long long>(V));
  for (const auto* shape : {&peaked, &flat}) {
    std::vector<float> all;
    for (int64_t b = 0; b < B; ++b) all.insert(all.end(), shape->begin(), shape->end());
    Check(logits.CopyFromHost(all.data(), all.size(), nullptr), "copy");
    for (const Kind& k : kinds) {
      for (int64_t rows : {int64_t{1}, B}) {
        const std::vector<cuda::DeviceTokenRule> host_rules(static_cast<std::size_t>(rows), k.rule);
        Check(rules.CopyFromHost(host_rules.data(), host_rules.size(), nullptr), "copy");
        Check(cuda::CudaStatus(cudaStreamSynchronize(nullptr), "sync"), "sync");
        const cuda::SampleRowKinds row_kinds{
            .temperature = k.rule.temperature != 0,
            .sorts = k.rule.temperature != 0 && (k.rule.top_k > 0 || k.rule.top_p < 1),
            .penalty = k.rule.history_end > 0};
        const double t = TimeOp(st, [&] {
          return cuda::SampleRows(logits.data(), rows, V, rules.data(), history.data(), row_kinds, scratch, out.data(), st);
        }, 50);
        std::printf("  %-6s %-42s %3lld rows: %8.1f us\n", shape == &peaked ? "peaked" : "flat", k.name,
                    static_cast<long long>(rows), t * 1e6);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, json_path;
  int64_t decode_tokens = 128, prompt_tokens = 32, repeats = 3, profile_prefill = 0, profile_decode = 0;
  bool profile_reused = false;
  lm2::runtime::CudaOptions options;
  std::vector<int64_t> prefill = {512, 4096}, sessions = {8, 32, 64};
  std::chrono::microseconds batcher_wait = DecodeBatcherOptions{}.wait_for_decoding;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) Die("missing value after " + k);
    const std::string v = argv[++i];
    if (k == "--model") model_dir = v;
    else if (k == "--json") json_path = v;
    else if (k == "--decode-tokens") decode_tokens = std::stoll(v);
    else if (k == "--prompt-tokens") prompt_tokens = std::stoll(v);
    else if (k == "--repeats") repeats = std::stoll(v);
    else if (k == "--prefill") prefill = ParseList(v);
    else if (k == "--sessions") sessions = ParseList(v);
    else if (k == "--profile-prefill") profile_prefill = std::stoll(v);
    else if (k == "--profile-decode") profile_decode = std::stoll(v);
    else if (k == "--profile-reused") profile_reused = v != "0";
    else if (k == "--tiled") options.tiled_memory = options.tiled_attention = v != "0";
    else if (k == "--chunk") options.max_chunk_tokens = std::stoll(v);
    else if (k == "--side-read") options.concurrent_memory_read = v != "0";
    else if (k == "--read-leads") options.memory_read_leads = v != "0";
    else if (k == "--split-attention") options.split_decode_attention = v != "0";
    else if (k == "--defer-write") options.defer_memory_write = v != "0";
    else if (k == "--warm-up") options.warm_up = v != "0";
    else if (k == "--bank-threads") options.bank_transfer_threads = std::stoi(v);
    else if (k == "--kv-at-end") options.memory_kv_at_segment_end = v != "0";
    else if (k == "--flush-tokens") options.write_flush_tokens = std::stoll(v);
    else if (k == "--batcher-wait") batcher_wait = std::chrono::microseconds(std::stoll(v));
    else Die("unknown option " + k);
  }
  if (model_dir.empty()) Die("usage: lm2_cuda_bench --model DIR [options] (see the source's header)");
  auto devices = Take(lm2::runtime::ListCudaDevices(), "devices");
  if (devices.empty()) Die("no CUDA device");
  const auto& dev = devices[0];
  std::printf("device: %s (sm_%d%d, %d SMs, %.1f GiB)\n", dev.name.c_str(), dev.compute_major, dev.compute_minor,
              dev.multiprocessors, static_cast<double>(dev.total_memory) / (1 << 30));

  const double bw = CopyBandwidth();
  const double gemm = GemmRate();
  std::printf("copy bandwidth (read+write): %.0f GB/s\n", bw / 1e9);
  std::printf("bf16 GEMM rate (8192^3, fp32 accumulate and output): %.0f TFLOP/s\n", gemm / 1e12);

  auto t_load = Clock::now();
  auto files = std::shared_ptr<const lm2::runtime::ModelFiles>(
      Take(lm2::runtime::ModelFiles::Open(model_dir), "open model"));
  auto model = Take(lm2::runtime::LoadCudaModel(files, options), "load model");
  const auto& cfg = model->config();
  std::printf("model: %s: %lld layers, d=%lld, FFN %lld, %lld heads / %lld KV heads, %lld slots x %lld memory heads "
              "in %zu layers, vocab %lld; loaded in %.1f s\n",
              model_dir.c_str(), static_cast<long long>(cfg.num_layers), static_cast<long long>(cfg.hidden_size),
              static_cast<long long>(cfg.intermediate_size), static_cast<long long>(cfg.num_heads),
              static_cast<long long>(cfg.num_kv_heads), static_cast<long long>(cfg.memory_slots),
              static_cast<long long>(cfg.memory_heads), cfg.memory_layers.size(),
              static_cast<long long>(cfg.vocab_size), Seconds(t_load, Clock::now()));
  double first_turn = 0, second_turn = 0, next_turn = 0;
  {  // A session's first turn right after the load, a new session's the same again (what a
     // new or resumed session's first reply pays), and that session's next turn (a chat's
     // every later reply: its state, buffers and decode graph kept).
    auto turn = [&](lm2::runtime::SequenceState& s, int64_t seed) {
      const auto t0 = Clock::now();
      std::vector<float> logits;
      Check(model->Forward(s, Tokens(prompt_tokens, cfg.vocab_size, seed), LogitsMode::kLast, &logits), "prompt");
      lm2::runtime::SequenceState* const one[] = {&s};
      std::vector<int32_t> next = {Argmax(logits)};
      for (int64_t i = 0; i < 32; ++i) Check(model->ForwardBatchGreedy(one, std::vector<int32_t>(next), &next), "step");
      Check(model->EndSegment(s), "end");
      return Seconds(t0, Clock::now());
    };
    auto new_session_turn = [&](std::unique_ptr<lm2::runtime::SequenceState>& s) {
      const auto t0 = Clock::now();
      s = Take(model->NewState(), "state");
      return Seconds(t0, Clock::now()) + turn(*s, 7);
    };
    // A turn's tokens, and the next turn's after it, within the model's positions (a long
    // --prompt-tokens leaves out what does not fit; 0 in the JSON).
    const int64_t turn_tokens = prompt_tokens + 32;
    std::unique_ptr<lm2::runtime::SequenceState> s;
    if (turn_tokens <= cfg.max_position_embeddings) {
      first_turn = new_session_turn(s);
      second_turn = new_session_turn(s);
      if (2 * turn_tokens <= cfg.max_position_embeddings) next_turn = turn(*s, 8);
    }
    std::printf("first turn after the load (new state, %lld-token prompt, 32 greedy steps, segment end; warm-up %s): "
                "%.1f ms; the same again: %.1f ms; that session's next turn: %.1f ms%s\n",
                static_cast<long long>(prompt_tokens), options.warm_up ? "on" : "off", first_turn * 1e3,
                second_turn * 1e3, next_turn * 1e3,
                2 * turn_tokens > cfg.max_position_embeddings ? " (past max_position_embeddings: 0 = skipped)" : "");
  }
  SetupCosts(32);
  StateMemory(*model, options.device);
  const Shape shape{static_cast<double>(cfg.hidden_size),
                    static_cast<double>(cfg.num_heads * cfg.head_dim),
                    static_cast<double>(cfg.num_kv_heads * cfg.head_dim),
                    static_cast<double>(cfg.intermediate_size),
                    static_cast<double>(cfg.memory_slots),
                    static_cast<double>(cfg.vocab_size),
                    static_cast<double>(cfg.memory_heads),
                    cfg.num_layers,
                    static_cast<int64_t>(cfg.memory_layers.size()),
                    cfg.layer_has_memory(cfg.num_layers - 1)};
  if (profile_prefill > 0) {
    std::vector<float> logits;
    std::unique_ptr<SequenceState> s;
    for (int r = 0; r < 2; ++r) {
      if (profile_reused && s != nullptr) {  // as the prefill table's reused state: the device idle first
        Check(model->EndSegment(*s), "end");
        model->ResetContext(*s);
        Check(cuda::CudaStatus(cudaDeviceSynchronize(), "sync"), "sync");
      } else {
        s = Take(model->NewState(), "state");
      }
      const auto tokens = Tokens(profile_prefill, cfg.vocab_size, 100 + r);
      if (r == 1) Check(cuda::CudaStatus(cudaProfilerStart(), "cudaProfilerStart"), "profiler");
      const auto t0 = Clock::now();
      Check(model->Forward(*s, tokens, LogitsMode::kLast, &logits), "prefill");
      if (r == 1) {
        Check(cuda::CudaStatus(cudaProfilerStop(), "cudaProfilerStop"), "profiler");
        std::printf("profiled prefill %lld: %.1f ms\n", static_cast<long long>(profile_prefill),
                    Seconds(t0, Clock::now()) * 1e3);
      }
    }
    return 0;
  }
  if (profile_decode > 0) {
    auto s = Take(model->NewState(), "state");
    std::vector<float> logits;
    Check(model->Forward(*s, Tokens(prompt_tokens, cfg.vocab_size, 1), LogitsMode::kLast, &logits), "prompt");
    // Warm-up past the first write flush (its first run loads kernels and allocates).
    Decode(*model, *s, 2 * options.write_flush_tokens, logits, Pick::kGreedyDevice);
    Check(cuda::CudaStatus(cudaProfilerStart(), "cudaProfilerStart"), "profiler");
    const double t = Decode(*model, *s, profile_decode, logits, Pick::kGreedyDevice);
    Check(cuda::CudaStatus(cudaProfilerStop(), "cudaProfilerStop"), "profiler");
    std::printf("profiled decode: %lld steps, %.3f ms per step\n", static_cast<long long>(profile_decode),
                t / static_cast<double>(profile_decode) * 1e3);
    return 0;
  }
  if (decode_tokens == 0) sessions.clear();  // prefill only
  {  // The kernels of each distinct prefill chunk length.
    std::vector<int64_t> chunks;
    for (int64_t T : prefill) {
      const int64_t chunk = std::min(T, options.max_chunk_tokens);
      if (T <= cfg.max_position_embeddings && std::find(chunks.begin(), chunks.end(), chunk) == chunks.end()) {
        chunks.push_back(chunk);
        PrefillChunkParts(cfg, chunk);
      }
    }
  }
  if (decode_tokens > 0) {
    DecodeOpBreakdown(cfg, options, prompt_tokens + decode_tokens / 2);
    if (!sessions.empty()) BatchedStepParts(cfg, options, prompt_tokens + decode_tokens / 2, sessions.back());
    SamplingOps(cfg.vocab_size, sessions.empty() ? 64 : sessions.back());
  }
  std::ostringstream json;
  json << "{\"device\": \"" << dev.name << "\", \"copy_bandwidth_Bps\": " << bw << ", \"gemm_flops\": " << gemm
       << ", \"first_turn_s\": " << first_turn << ", \"second_turn_s\": " << second_turn
       << ", \"next_turn_s\": " << next_turn;

  // ---- batch-1 decode ------------------------------------------------------------------
  if (decode_tokens > 0) {
    auto s = Take(model->NewState(), "state");
    std::vector<float> logits;
    // Warm-up turn (cuBLAS heuristics, allocations), then a timed turn after a context reset.
    Check(model->Forward(*s, Tokens(prompt_tokens, cfg.vocab_size, 1), LogitsMode::kLast, &logits), "prompt");
    constexpr Pick kPicks[] = {Pick::kGreedyDevice, Pick::kGreedyHost, Pick::kSampledDevice, Pick::kSampledHost};
    for (Pick pick : kPicks) Decode(*model, *s, 8, logits, pick);
    Check(model->EndSegment(*s), "end");
    model->ResetContext(*s);
    double best[4] = {1e30, 1e30, 1e30, 1e30};
    double end_segment = 1e30;
    for (int64_t r = 0; r < repeats; ++r) {
      for (Pick pick : kPicks) {
        model->ResetContext(*s);
        Check(model->Forward(*s, Tokens(prompt_tokens, cfg.vocab_size, 2 + r), LogitsMode::kLast, &logits), "prompt");
        double& b = best[static_cast<int>(pick)];
        b = std::min(b, Decode(*model, *s, decode_tokens, logits, pick));
        const auto t0 = Clock::now();
        Check(model->EndSegment(*s), "end");
        end_segment = std::min(end_segment, Seconds(t0, Clock::now()));
      }
    }
    double tps_of[4];
    for (int i = 0; i < 4; ++i) tps_of[i] = static_cast<double>(decode_tokens) / best[i];
    const double tps = tps_of[0];
    const double mid_context = static_cast<double>(prompt_tokens) + static_cast<double>(decode_tokens) / 2;
    const double bytes = DecodeBytes(shape, mid_context);
    const double roofline = bw / bytes;
    std::printf("decode batch 1: %.1f tokens/s (%.3f ms/token); roofline %.1f tokens/s (%.2f GB per token at context "
                "%.0f): %.1f%% of roofline\n",
                tps, 1e3 / tps, roofline, bytes / 1e9, mid_context, 100.0 * tps / roofline);
    std::printf("decode batch 1 with the logits copied to the host for the argmax: %.1f tokens/s (%.3f ms/token)\n",
                tps_of[1], 1e3 / tps_of[1]);
    std::printf("decode batch 1 sampled (temperature 0.8, top-p 0.95) on the device: %.1f tokens/s (%.3f ms/token); "
                "on the host from copied logits: %.1f tokens/s (%.3f ms/token)\n",
                tps_of[2], 1e3 / tps_of[2], tps_of[3], 1e3 / tps_of[3]);
    std::printf("end of segment (memory write, %zu layers): %.2f ms\n", cfg.memory_layers.size(), end_segment * 1e3);
    json << ", \"decode_tps\": " << tps << ", \"decode_host_argmax_tps\": " << tps_of[1]
         << ", \"decode_sampled_tps\": " << tps_of[2] << ", \"decode_host_sampled_tps\": " << tps_of[3]
         << ", \"decode_bytes_per_token\": " << bytes
         << ", \"decode_roofline_tps\": " << roofline << ", \"end_segment_s\": " << end_segment;

    // ---- memory bank export / import -------------------------------------------------------
    if (cfg.has_memory()) {
      double best_export = 1e30, best_fresh = 1e30, best_import = 1e30;
      lm2::MemoryState kept;
      for (int r = 0; r < 5; ++r) {
        auto t0 = Clock::now();
        auto fresh = Take(model->ExportMemory(*s), "export");
        auto t1 = Clock::now();
        Check(model->ExportMemoryInto(*s, kept), "export into a kept bank");
        auto t2 = Clock::now();
        Check(model->ImportMemory(*s, kept), "import");
        auto t3 = Clock::now();
        best_fresh = std::min(best_fresh, Seconds(t0, t1));
        best_export = std::min(best_export, Seconds(t1, t2));
        best_import = std::min(best_import, Seconds(t2, t3));
      }
      const double mib = static_cast<double>(cfg.memory_layers.size()) * shape.N * shape.d * 4 / (1 << 20);
      const double bank_bytes = mib * (1 << 20);
      std::printf("memory bank (%.0f MiB fp32): export %.2f ms (%.1f GB/s) into a kept MemoryState, %.2f ms (%.1f GB/s) "
                  "into a new one; import %.2f ms (%.1f GB/s)\n",
                  mib, best_export * 1e3, bank_bytes / best_export / 1e9, best_fresh * 1e3,
                  bank_bytes / best_fresh / 1e9, best_import * 1e3, bank_bytes / best_import / 1e9);
      json << ", \"bank_bytes\": " << bank_bytes << ", \"export_s\": " << best_export
           << ", \"export_fresh_s\": " << best_fresh << ", \"import_s\": " << best_import;
    }
  }

  // ---- prefill ---------------------------------------------------------------------------
  json << ", \"prefill\": {";
  bool first = true;
  for (int64_t T : prefill) {
    if (T > cfg.max_position_embeddings) {
      std::printf("prefill %lld: skipped (max_position_embeddings %lld)\n", static_cast<long long>(T),
                  static_cast<long long>(cfg.max_position_embeddings));
      continue;
    }
    double best = 1e30, new_state = 1e30;
    std::vector<float> logits;
    for (int64_t r = 0; r < repeats + 1; ++r) {
      const auto s0 = Clock::now();
      auto s = Take(model->NewState(), "state");
      const auto tokens = Tokens(T, cfg.vocab_size, 100 + r);
      const auto t0 = Clock::now();
      Check(model->Forward(*s, tokens, LogitsMode::kLast, &logits), "prefill");
      if (r > 0) {  // run 0 warms up (cuBLAS, allocations)
        best = std::min(best, Seconds(t0, Clock::now()));
        new_state = std::min(new_state, Seconds(s0, t0));
      }
    }
    const double flops = PrefillFlops(shape, static_cast<double>(T), !options.share_initial_memory_kv);
    // A reused state's call makes its memory K/V unless the last segment's end made them.
    const double reused_flops = PrefillFlops(shape, static_cast<double>(T), !options.memory_kv_at_segment_end);
    const double run_flops = flops - PrefillSkippedFlops(shape, static_cast<double>(T));
    std::printf("prefill %lld: %.0f tokens/s (%.1f ms), %.0f TFLOP/s = %.1f%% of the GEMM rate (%.1f%% over the "
                "FLOPs run); the state made before it in %.2f ms\n",
                static_cast<long long>(T), static_cast<double>(T) / best, best * 1e3, flops / best / 1e12,
                100.0 * flops / best / gemm, 100.0 * run_flops / best / gemm, new_state * 1e3);
    double reused = 1e30;
    {  // The same on a state that has run it before (its buffers allocated): a session's next turn.
      auto s = Take(model->NewState(), "state");
      for (int64_t r = 0; r < repeats + 1; ++r) {
        Check(model->EndSegment(*s), "end");  // the timed call opens a segment, as on a fresh state
        model->ResetContext(*s);
        // The device idle first, as when a chat's next prompt arrives: work the segment's end
        // left running (its memory K/V) is not timed.
        Check(cuda::CudaStatus(cudaDeviceSynchronize(), "sync"), "sync");
        const auto tokens = Tokens(T, cfg.vocab_size, 100 + r);
        const auto t0 = Clock::now();
        Check(model->Forward(*s, tokens, LogitsMode::kLast, &logits), "prefill");
        if (r > 0) reused = std::min(reused, Seconds(t0, Clock::now()));
      }
      std::printf("prefill %lld on a reused state: %.0f tokens/s (%.1f ms), %.1f%% of the GEMM rate\n",
                  static_cast<long long>(T), static_cast<double>(T) / reused, reused * 1e3,
                  100.0 * reused_flops / reused / gemm);
    }
    json << (first ? "" : ", ") << "\"" << T << "\": {\"tps\": " << static_cast<double>(T) / best
         << ", \"flops\": " << flops << ", \"run_flops\": " << run_flops << ", \"s\": " << best << ", \"reused_flops\": " << reused_flops
         << ", \"reused_s\": " << reused
         << ", \"new_state_s\": " << new_state << "}";
    first = false;
  }
  json << "}";
  {  // A short prompt late in a conversation: the cache's rows up to the last position already there.
    const int64_t context = cfg.max_position_embeddings - kLatePromptTokens;
    if (context > 0) {
      const double late = LatePrompt(*model, context, kLatePromptTokens, repeats);
      std::printf("a %lld-token prompt after %lld cached tokens: %.2f ms\n", static_cast<long long>(kLatePromptTokens),
                  static_cast<long long>(context), late * 1e3);
      json << ", \"late_prompt\": {\"context\": " << context << ", \"tokens\": " << kLatePromptTokens
           << ", \"s\": " << late << "}";
    }
  }
  {  // Prompts of lengths nothing before used, each twice on one warmed state: the first time
     // pays whatever a call shape's first use in the process costs (cuBLAS's set-up).
    auto s = Take(model->NewState(), "state");
    std::vector<float> logits;
    Check(model->Forward(*s, Tokens(512, cfg.vocab_size, 3), LogitsMode::kLast, &logits), "prefill");
    double first_s = 0, again_s = 0;
    std::printf("prompts of new lengths, first time / again (ms):");
    for (const int64_t T : kNewPromptLengths) {
      if (T > cfg.max_position_embeddings) continue;
      double t[2];
      for (double& ti : t) {
        model->ResetContext(*s);
        const auto t0 = Clock::now();
        Check(model->Forward(*s, Tokens(T, cfg.vocab_size, 5), LogitsMode::kLast, &logits), "prefill");
        ti = Seconds(t0, Clock::now());
      }
      std::printf(" %lld: %.2f / %.2f;", static_cast<long long>(T), t[0] * 1e3, t[1] * 1e3);
      first_s += t[0];
      again_s += t[1];
    }
    std::printf(" all: %.2f / %.2f\n", first_s * 1e3, again_s * 1e3);
    json << ", \"new_lengths\": {\"first_s\": " << first_s << ", \"again_s\": " << again_s << "}";
  }

  // ---- concurrent sessions -----------------------------------------------------------------
  json << ", \"sessions\": {";
  first = true;
  for (int64_t B : sessions) {
    std::vector<std::unique_ptr<SequenceState>> states;
    std::vector<std::vector<float>> logits(static_cast<std::size_t>(B));
    bool fits = true;
    for (int64_t b = 0; b < B && fits; ++b) {
      auto s = model->NewState();
      if (!s.ok()) {
        std::printf("sessions %lld: %s\n", static_cast<long long>(B), s.status().ToString().c_str());
        fits = false;
        break;
      }
      Check(model->Forward(**s, Tokens(prompt_tokens, cfg.vocab_size, 200 + b), LogitsMode::kLast,
                           &logits[static_cast<std::size_t>(b)]),
            "prompt");
      states.push_back(std::move(s).value());
    }
    if (!fits) continue;
    // One ForwardBatch per step over all B sessions; greedy next tokens from each row.
    std::vector<SequenceState*> ptrs;
    for (auto& st : states) ptrs.push_back(st.get());
    std::vector<int32_t> next(static_cast<std::size_t>(B));
    for (int64_t b = 0; b < B; ++b) next[static_cast<std::size_t>(b)] = Argmax(logits[static_cast<std::size_t>(b)]);
    auto step = [&] { Check(model->ForwardBatchGreedy(ptrs, std::vector<int32_t>(next), &next), "ForwardBatch"); };
    // Two steps, each timed (ms).
    auto two_steps = [&](double (&ms)[2]) {
      for (double& f : ms) {
        const auto w0 = Clock::now();
        step();
        f = Seconds(w0, Clock::now()) * 1e3;
      }
    };
    // decode_tokens batched steps (ms a step).
    auto batched_steps = [&] {
      const auto t0 = Clock::now();
      for (int64_t i = 0; i < decode_tokens; ++i) step();
      return Seconds(t0, Clock::now()) / static_cast<double>(decode_tokens) * 1e3;
    };
    // Every state's segment ended, its context reset and the same prompt run again: each line
    // below starts from there, at the same context (a decode step's attention grows with it)
    // and with the states' staged write terms added to the write sums in the same steps.
    auto restart = [&] {
      ptrs.clear();
      next.resize(static_cast<std::size_t>(B));
      for (int64_t b = 0; b < B; ++b) {
        SequenceState& state = *states[static_cast<std::size_t>(b)];
        Check(model->EndSegment(state), "EndSegment");
        model->ResetContext(state);
        std::vector<float>& row = logits[static_cast<std::size_t>(b)];
        Check(model->Forward(state, Tokens(prompt_tokens, cfg.vocab_size, 200 + b), LogitsMode::kLast, &row), "prompt");
        next[static_cast<std::size_t>(b)] = Argmax(row);
        ptrs.push_back(&state);
      }
    };
    // The first two steps of a batch size the process has not run: the first grows the
    // scratch and pointer table and makes cuBLAS's first calls of its shapes (above the
    // GEMV's row limit) without a graph; the second captures the step's graph. Then new
    // states' steps: their banks are the model's initial one, whose memory K/V they share
    // (CudaOptions::share_initial_memory_kv), so B sessions' memory reads stream one copy,
    // largely from L2: not what B conversations with memories of their own cost.
    double first_steps[2];
    two_steps(first_steps);
    const double new_ms = batched_steps();
    const double new_tps = static_cast<double>(B) / new_ms * 1e3;
    std::printf("sessions %lld, new states (one batched forward per step, the initial bank's memory K/V shared): "
                "%.1f tokens/s in total, %.2f ms per step\n",
                static_cast<long long>(B), new_tps, new_ms);
    // The figure: the same states after a segment end, each bank its own, as sessions after
    // their first turn or resumed ones.
    restart();
    const double step_ms = batched_steps();
    const double tps = static_cast<double>(B) / step_ms * 1e3;
    std::printf("sessions %lld (one batched forward per step, each session's own memory): %.1f tokens/s in total, "
                "%.2f ms per step\n",
                static_cast<long long>(B), tps, step_ms);
    // One session fewer: a new shape over buffers that are big enough (its graph and GEMM
    // shapes only).
    double fewer[2] = {0, 0};
    if (B > 1) {
      ptrs.pop_back();
      next.pop_back();
      two_steps(fewer);
    }
    std::printf("sessions %lld: first steps %.2f / %.2f ms; then %lld sessions' first steps %.2f / %.2f ms\n",
                static_cast<long long>(B), first_steps[0], first_steps[1], static_cast<long long>(B - 1), fewer[0], fewer[1]);
    // The same sessions through a DecodeBatcher, one thread each (what the SDK's concurrent
    // chats do): a batch is whatever steps wait when the last one ends. Every reply as long
    // (decode_tokens steps each), then replies ending one by one (the
    // b-th after decode_tokens * (B + b) / 2B steps: each batch past the middle a session
    // smaller than the one before, as when chats of different lengths end).
    auto through_batcher = [&](bool staggered) {
      restart();
      DecodeBatcherOptions batcher_options;
      batcher_options.wait_for_decoding = batcher_wait;
      const TimedCalls timed(*model);
      DecodeBatcher batcher(timed, batcher_options);
      std::vector<std::thread> threads;
      std::vector<int64_t> steps(static_cast<std::size_t>(B), decode_tokens);
      if (staggered) {
        for (int64_t b = 0; b < B; ++b) steps[static_cast<std::size_t>(b)] = decode_tokens * (B + b) / (2 * B);
      }
      const auto b0 = Clock::now();
      for (int64_t b = 0; b < B; ++b) {
        threads.emplace_back([&, b] {
          SequenceState& state = *ptrs[static_cast<std::size_t>(b)];
          int32_t token = next[static_cast<std::size_t>(b)];
          for (int64_t i = 0; i < steps[static_cast<std::size_t>(b)]; ++i) {
            Check(batcher.Step(state, token, TokenRule{}, &token), "DecodeBatcher::Step");
          }
          batcher.Leave(state);
        });
      }
      for (auto& t : threads) t.join();
      const double took = Seconds(b0, Clock::now());
      const DecodeBatcher::Stats bs = batcher.stats();
      const double rate = static_cast<double>(std::accumulate(steps.begin(), steps.end(), int64_t{0})) / took;
      const double calls = static_cast<double>(std::max<int64_t>(bs.batches, 1));
      const double running = std::chrono::duration<double>(bs.running).count();
      const double gathering = std::chrono::duration<double>(bs.gathering).count();
      std::printf("sessions %lld through a DecodeBatcher (a thread each%s): %.1f tokens/s in total, %lld batched "
                  "calls of %.1f steps on average (largest %lld); a call %.2f ms, the wait for its steps %.3f ms "
                  "(%lld ran to the limit), between calls %.3f ms\n",
                  static_cast<long long>(B), staggered ? ", replies ending one by one" : "", rate,
                  static_cast<long long>(bs.batches), static_cast<double>(bs.steps) / calls,
                  static_cast<long long>(bs.largest), running / calls * 1e3, gathering / calls * 1e3,
                  static_cast<long long>(bs.waits_timed_out), (took - running - gathering) / calls * 1e3);
      std::printf("  %s\n", timed.Summary(B).c_str());
      return rate;
    };
    const double batcher_tps = through_batcher(false);
    const double staggered_tps = through_batcher(true);
    json << (first ? "" : ", ") << "\"" << B << "\": {\"tps\": " << tps << ", \"new_states_tps\": " << new_tps
         << ", \"batcher_tps\": " << batcher_tps
         << ", \"batcher_staggered_tps\": " << staggered_tps << "}";
    first = false;
  }
  json << "}}";
  if (!json_path.empty()) {
    std::ofstream(json_path) << json.str() << "\n";
    std::printf("json: %s\n", json_path.c_str());
  }
  return 0;
}
