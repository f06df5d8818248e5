// CPU backend benchmark: prefill and decode tokens/s on a model directory.
//
//   bench/run_cpu_bench            (makes the random models, builds, runs; docs/benchmarks.md)
//   lm2_cpu_bench MODEL_DIR [--prefill 128] [--decode 64] [--repeat 3]
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

#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/model_files.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

int Fail(const lm2::Status& s) {
  std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [--prefill N] [--decode N] [--repeat N]\n", argv[0]);
    return argc < 2 ? 2 : 0;
  }
  int prefill = 128, decode = 64, repeat = 3;
  for (int i = 2; i + 1 < argc; i += 2) {
    const int v = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--prefill") == 0) prefill = v;
    else if (std::strcmp(argv[i], "--decode") == 0) decode = v;
    else if (std::strcmp(argv[i], "--repeat") == 0) repeat = v;
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
  auto model = lm2::runtime::LoadCpuModel(shared);
  if (!model.ok()) return Fail(model.status());
  const auto& cfg = (*model)->config();
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
  std::printf("prefill %d tokens: %.3f s, %.1f tokens/s\n", prefill, best_prefill, prefill / best_prefill);
  std::printf("decode %d tokens: %.3f s, %.1f tokens/s, %.2f GB/s of weights streamed\n", decode, best_decode,
              decode_tps, decode_tps * static_cast<double>(weight_bytes) / 1e9);
  return 0;
}
