// CPU backend benchmark: prefill and decode tokens/s on a model directory.
//
//   bench/run_cpu_bench            (makes the random models, builds, runs; docs/benchmarks.md)
//   lm2_cpu_bench MODEL_DIR [--prefill 128] [--decode 64] [--repeat 3] [--threads 1]
//
// Prefill: one Forward of P tokens (last-token logits). Decode: D single-token Forwards
// after it, each with last-token logits (what generation does). Reports the best of
// --repeat runs, and the weight bytes each decoded token streams.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cblas.h>

#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/model_files.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// The machine's read bandwidth, the decode roofline: the best of 5 passes summing a
// 512 MiB array (larger than any cache) on one thread, as decode's GEMVs stream weights.
double ReadBandwidthGBs() {
  std::vector<float> buf(std::size_t{128} << 20, 1.0f);
  double best = 1e30;
  volatile float sink = 0.0f;
  for (int r = 0; r < 5; ++r) {
    auto a = Clock::now();
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t i = 0; i < buf.size(); i += 8)
      for (std::size_t k = 0; k < 8; ++k) acc[k] += buf[i + k];
    best = std::min(best, Seconds(a, Clock::now()));
    sink = sink + acc[0] + acc[7];
  }
  return static_cast<double>(buf.size() * sizeof(float)) / best / 1e9;
}

int Fail(const lm2::Status& s) {
  std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
  return 1;
}

// fp32 GEMM rate of this machine through the same BLAS, the prefill ceiling: best of 3
// [512 x 1024] x [1024 x 2048] products, in GFLOP/s.
double GemmGflops() {
  const int m = 512, k = 1024, n = 2048;
  std::vector<float> a(static_cast<std::size_t>(m) * k, 0.5f), b(static_cast<std::size_t>(k) * n, 0.25f),
      c(static_cast<std::size_t>(m) * n);
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    auto t = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
    best = std::min(best, Seconds(t, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

// Multiply-adds per token of the matrix weights (every tensor but the embedding lookup
// and the norm gains): 2 FLOPs each. Attention over the context comes on top.
double MatrixParams(const lm2::runtime::ModelFiles& files) {
  double n = 0;
  const auto& cfg = files.config();
  for (const auto& spec : files.specs()) {
    if (spec.shape.size() != 2 || spec.name.find(".memory.init") != std::string::npos) continue;
    if (spec.name == "model.embed_tokens.weight" && !cfg.tie_word_embeddings) continue;
    n += static_cast<double>(lm2::runtime::NumElements(spec.shape));
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [--prefill N] [--decode N] [--repeat N] [--threads N (0: all)]\n",
                 argv[0]);
    return argc < 2 ? 2 : 0;
  }
  int prefill = 128, decode = 64, repeat = 3, threads = 1;
  for (int i = 2; i + 1 < argc; i += 2) {
    const int v = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--prefill") == 0) prefill = v;
    else if (std::strcmp(argv[i], "--decode") == 0) decode = v;
    else if (std::strcmp(argv[i], "--repeat") == 0) repeat = v;
    else if (std::strcmp(argv[i], "--threads") == 0) threads = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  auto t0 = Clock::now();
  auto files = lm2::runtime::ModelFiles::Open(argv[1]);
  if (!files.ok()) return Fail(files.status());
  std::shared_ptr<const lm2::runtime::ModelFiles> shared(std::move(files).value());
  const uint64_t weight_bytes = shared->weight_bytes();
  const double matrix_params = MatrixParams(*shared);
  lm2::runtime::CpuOptions cpu;
  cpu.threads = threads;
  auto model = lm2::runtime::LoadCpuModel(shared, cpu);
  if (!model.ok()) return Fail(model.status());
  const auto& cfg = (*model)->config();
  std::printf("BLAS threads: %s\n", threads == 0 ? "OpenBLAS default" : std::to_string(threads).c_str());
  std::printf("model %s: d=%lld layers=%lld memory layers=%zu slots=%lld vocab=%lld, %.1f MB weights, load %.2fs\n",
              argv[1], static_cast<long long>(cfg.hidden_size), static_cast<long long>(cfg.num_layers),
              cfg.memory_layers.size(), static_cast<long long>(cfg.memory_slots),
              static_cast<long long>(cfg.vocab_size), static_cast<double>(weight_bytes) / 1e6,
              Seconds(t0, Clock::now()));
  if (prefill + decode > cfg.max_position_embeddings) {
    std::fprintf(stderr, "prefill + decode exceeds the context (%lld)\n", static_cast<long long>(cfg.max_position_embeddings));
    return 2;
  }
  std::vector<int32_t> prompt(static_cast<std::size_t>(prefill));
  for (int i = 0; i < prefill; ++i) prompt[static_cast<std::size_t>(i)] = static_cast<int32_t>(4 + (i * 7919) % (cfg.vocab_size - 4));
  double best_prefill = 1e30, best_decode = 1e30;
  std::vector<float> logits;
  for (int r = 0; r < repeat; ++r) {
    auto state = (*model)->NewState();
    if (!state.ok()) return Fail(state.status());
    auto a = Clock::now();
    lm2::Status st = (*model)->Forward(**state, prompt, lm2::runtime::LogitsMode::kLast, &logits);
    if (!st.ok()) return Fail(st);
    auto b = Clock::now();
    int32_t next = 5;
    for (int i = 0; i < decode; ++i) {
      st = (*model)->Forward(**state, std::vector<int32_t>{next}, lm2::runtime::LogitsMode::kLast, &logits);
      if (!st.ok()) return Fail(st);
      next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    auto c = Clock::now();
    st = (*model)->EndSegment(**state);
    if (!st.ok()) return Fail(st);
    best_prefill = std::min(best_prefill, Seconds(a, b));
    best_decode = std::min(best_decode, Seconds(b, c));
  }
  const double decode_tps = decode / best_decode;
  const double bandwidth = ReadBandwidthGBs();
  const double gemm = GemmGflops();
  const double prefill_gflops = 2.0 * matrix_params * prefill / best_prefill / 1e9;
  std::printf("prefill %d tokens: %.3f s, %.1f tokens/s, %.1f GFLOP/s in weight GEMMs = %.0f%% of the %.1f GFLOP/s "
              "sgemm rate measured now\n",
              prefill, best_prefill, prefill / best_prefill, prefill_gflops, 100.0 * prefill_gflops / gemm, gemm);
  const double streamed = decode_tps * static_cast<double>(weight_bytes) / 1e9;
  std::printf("decode %d tokens: %.3f s, %.1f tokens/s, %.2f GB/s of weights streamed = %.0f%% of the %.2f GB/s "
              "read bandwidth measured now (roofline %.1f tokens/s)\n",
              decode, best_decode, decode_tps, streamed, 100.0 * streamed / bandwidth, bandwidth,
              bandwidth * 1e9 / static_cast<double>(weight_bytes));
  return 0;
}
