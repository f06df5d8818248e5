// The prefill GEMMs of the paper's model at the row counts of short and mid prompts: how
// fast cuBLAS's default algorithm (`cublasGemmEx` with an 8 MiB workspace, as Linear calls
// it) runs each shape, against every candidate cuBLASLt's heuristic offers for it (with the
// same workspace), and whether a candidate gives the default's bits.
//
//   lm2_cuda_gemm_bench [--rows 64,128,256,512] [--candidates 16] [--reps 20] [--shape NAME]
//
// Each time is the best of 3 means over `reps` calls, each call on another copy of the
// weights (the copies span 1 GiB: no call finds its weights in L2, as in a forward). The
// weight bytes over the time give each call's streaming rate; `x` and the weights are random
// bf16 in [-1, 1).
//
// Then, where the device runs it (LinearSwiGluSupported), the FFN's gate|up GEMM with its
// SwiGLU as one kernel (LinearSwiGlu, gemm_sm90.cu) against what it replaces: the default
// GEMM into bf16 followed by SwiGluBf16, at each row count, with the share of outputs whose
// bits agree. `--shape none` runs only that table.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/cuda_ops.h"

namespace {

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "lm2_cuda_gemm_bench: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void Check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "lm2_cuda_gemm_bench: %s: cuBLAS status %d\n", what, static_cast<int>(s));
    std::exit(1);
  }
}

// Element i's value: uniform in [-1, 1) times 2^-4 .. 2^3, i.e. over eight binades. Without
// the spread, every fp32 sum of bf16 products here is exact, whatever its order, and the
// "same bits" column would call any algorithm the default's.
__device__ float SpreadRandom(std::size_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return ldexpf(static_cast<float>(h >> 8) / 8388608.0f - 1.0f, static_cast<int>(h % 8) - 4);
}

// A starting y for the accumulating GEMMs (fp32).
__global__ void FillRandomF32(float* p, std::size_t n, uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = SpreadRandom(i, seed);
  }
}

__global__ void FillRandom(__nv_bfloat16* p, std::size_t n, uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = __float2bfloat16(SpreadRandom(i, seed));
  }
}

struct Shape {
  const char* name;
  int64_t in, out;
  bool bf16_out, accumulate;
};

// The model's five GEMMs (paper configuration: d = 2048, FFN 8192, 8 KV heads of 64). In
// memory layers the model runs o_proj and out_gate as one strided-batched call (LinearTwo),
// which this bench times as the two GEMMs apart.
constexpr Shape kShapes[] = {
    {"q|k|v|mq|offer", 2048, 7168, false, false},
    {"o_proj", 2048, 2048, false, false},
    {"out_gate", 2048, 2048, false, false},
    {"gate|up", 2048, 16384, true, false},
    {"down", 8192, 2048, false, true},
    // The down projection into a zeroed y (beta 0): cuBLAS's heuristic may pick another kernel
    // than for the accumulating call, and the residual's add could move into the next norm.
    {"down-beta0", 8192, 2048, false, false},
};

constexpr std::size_t kWorkspace = std::size_t{8} << 20;  // a state's, as in cuda_model.cc
constexpr std::size_t kWeightPool = std::size_t{1} << 30;  // bytes of weight copies

struct Timer {
  cudaEvent_t start, stop;
  Timer() {
    Check(cudaEventCreate(&start), "event");
    Check(cudaEventCreate(&stop), "event");
  }
  template <typename Call>
  double BestMeanUs(int reps, Call&& call) {
    double best = 1e30;
    call(0);  // warm-up (loads the kernel)
    for (int round = 0; round < 3; ++round) {
      Check(cudaEventRecord(start), "record");
      for (int r = 0; r < reps; ++r) call(r + 1);
      Check(cudaEventRecord(stop), "record");
      Check(cudaEventSynchronize(stop), "sync");
      float ms = 0;
      Check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
      best = std::min(best, 1e3 * ms / reps);
    }
    return best;
  }
};

std::vector<int64_t> ParseList(const char* s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stoll(item));
  return v;
}

// The gate|up GEMM and SwiGLU: cuBLAS then SwiGluBf16 (`y` holds the [rows, 2F] products)
// against LinearSwiGlu, each call on another copy of the weights.
void FusedSwiGluTable(cublasHandle_t handle, const __nv_bfloat16* pool, const __nv_bfloat16* x, __nv_bfloat16* y,
                      __nv_bfloat16* y_ref, const std::vector<int64_t>& rows_list, int reps, Timer& timer) {
  namespace rt = lm2::runtime::cuda;
  constexpr int64_t d = 2048, F = 8192;
  if (!rt::LinearSwiGluSupported(2048, d, F)) {
    std::printf("\nLinearSwiGlu: not supported on this device or build: no fused gate|up table\n");
    return;
  }
  const std::size_t w_bytes = static_cast<std::size_t>(2 * F * d * 2), copies = kWeightPool / w_bytes;
  auto weight = [&](int r) { return pool + (static_cast<std::size_t>(r) % copies) * (w_bytes / 2); };
  auto ok = [](const lm2::Status& st) {
    if (!st.ok()) {
      std::fprintf(stderr, "lm2_cuda_gemm_bench: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  };
  std::printf("\n| gate\\|up + SwiGLU | rows | cuBLAS + SwiGluBf16 us | LinearSwiGlu us | TFLOP/s | ratio | same bits |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- |\n");
  // y_ref holds 4 x max_rows x F bf16: the unfused activation, then the fused one.
  __nv_bfloat16* y_fused = y_ref + *std::max_element(rows_list.begin(), rows_list.end()) * F;
  for (const int64_t rows : rows_list) {
    __nv_bfloat16* act = y_ref;  // [rows, F]
    auto unfused = [&](int r) {
      ok(rt::LinearToBf16(handle, x, rows, d, weight(r), 2 * F, y, nullptr));
      ok(rt::SwiGluBf16(y, rows, F, act, nullptr));
    };
    if (!rt::LinearSwiGluSupported(rows, d, F)) {  // the model runs the pair at this row count
      std::printf("| gate\\|up + SwiGLU | %lld | (unfused: its tiles would leave a round part-empty) | | | | |\n",
                  static_cast<long long>(rows));
      continue;
    }
    auto fused = [&](int r) { ok(rt::LinearSwiGlu(x, rows, d, weight(r), F, y_fused, nullptr)); };
    unfused(0);
    fused(0);
    Check(cudaDeviceSynchronize(), "swiglu");
    const std::size_t n = static_cast<std::size_t>(rows * F);
    std::vector<uint16_t> a(n), b(n);
    Check(cudaMemcpy(a.data(), act, n * 2, cudaMemcpyDeviceToHost), "copy");
    Check(cudaMemcpy(b.data(), y_fused, n * 2, cudaMemcpyDeviceToHost), "copy");
    std::size_t same = 0;
    for (std::size_t i = 0; i < n; ++i) same += a[i] == b[i];
    const double unfused_us = timer.BestMeanUs(reps, unfused), fused_us = timer.BestMeanUs(reps, fused);
    std::printf("| gate\\|up + SwiGLU | %lld | %.1f | %.1f | %.0f | %.3f | %.4f |\n", static_cast<long long>(rows),
                unfused_us, fused_us, 2.0 * rows * 2 * F * d / fused_us * 1e-6, unfused_us / fused_us,
                static_cast<double>(same) / static_cast<double>(n));
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> rows_list = {64, 128, 256, 512};
  int candidates = 16, reps = 20;
  std::string only;  // --shape: one GEMM of kShapes by name
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--rows")) rows_list = ParseList(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--candidates")) candidates = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--shape")) only = argv[i + 1];
    else {
      std::fprintf(stderr,
                   "usage: lm2_cuda_gemm_bench [--rows 64,128,256,512] [--candidates 16] [--reps 20] [--shape NAME]\n");
      return 2;
    }
  }
  cudaDeviceProp prop{};
  Check(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);

  const int64_t max_rows = *std::max_element(rows_list.begin(), rows_list.end());
  __nv_bfloat16 *pool = nullptr, *x = nullptr;
  void *y = nullptr, *y_ref = nullptr, *workspace = nullptr;
  Check(cudaMalloc(&pool, kWeightPool), "malloc");
  Check(cudaMalloc(&x, max_rows * 8192 * 2), "malloc");
  Check(cudaMalloc(&y, max_rows * 16384 * 4), "malloc");
  Check(cudaMalloc(&y_ref, max_rows * 16384 * 4), "malloc");
  Check(cudaMalloc(&workspace, kWorkspace), "malloc");
  FillRandom<<<1024, 256>>>(pool, kWeightPool / 2, 1u);
  FillRandom<<<1024, 256>>>(x, max_rows * 8192, 2u);
  Check(cudaDeviceSynchronize(), "fill");

  cublasHandle_t handle;
  Check(cublasCreate(&handle), "cublasCreate");
  Check(cublasSetWorkspace(handle, workspace, kWorkspace), "workspace");
  cublasLtHandle_t lt;
  Check(cublasLtCreate(&lt), "cublasLtCreate");
  Timer timer;

  std::printf("| GEMM | rows | default us | default GB/s | best us | best GB/s | best split-k | same bits | candidates (us, split-k, bits [algo id:tile:stages:cluster]) |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const Shape& s : kShapes) {
    if (!only.empty() && only != s.name) continue;
    const std::size_t w_bytes = static_cast<std::size_t>(s.in * s.out * 2);
    const std::size_t copies = kWeightPool / w_bytes;
    auto weight = [&](int r) { return pool + (static_cast<std::size_t>(r) % copies) * (w_bytes / 2); };
    const cudaDataType_t y_type = s.bf16_out ? CUDA_R_16BF : CUDA_R_32F;
    const float alpha = 1.0f, beta = s.accumulate ? 1.0f : 0.0f;
    for (const int64_t rows : rows_list) {
      const std::size_t y_bytes = static_cast<std::size_t>(rows * s.out) * (s.bf16_out ? 2 : 4);
      const int m = static_cast<int>(s.out), n = static_cast<int>(rows), k = static_cast<int>(s.in);
      auto default_call = [&](int r, void* out) {
        Check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, weight(r), CUDA_R_16BF, k, x,
                           CUDA_R_16BF, k, &beta, out, y_type, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx");
      };
      // An accumulating GEMM's bits are checked from a starting y that is not zero: a kernel
      // may add y at its end or start its sums from it, and only a non-zero y tells.
      const auto start_y = [&](void* out) {
        if (s.accumulate) {
          FillRandomF32<<<256, 256>>>(static_cast<float*>(out), y_bytes / 4, 3u);
        } else {
          Check(cudaMemset(out, 0, y_bytes), "memset");
        }
      };
      start_y(y_ref);
      default_call(0, y_ref);
      std::vector<unsigned char> ref(y_bytes), got(y_bytes);
      Check(cudaMemcpy(ref.data(), y_ref, y_bytes, cudaMemcpyDeviceToHost), "copy");
      const double default_us = timer.BestMeanUs(reps, [&](int r) { default_call(r, y); });

      cublasLtMatmulDesc_t op;
      Check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      Check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "attr");
      Check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "attr");
      cublasLtMatrixLayout_t la, lb, lc;
      Check(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, m, k), "layout");
      Check(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, n, k), "layout");
      Check(cublasLtMatrixLayoutCreate(&lc, y_type, m, n, m), "layout");
      cublasLtMatmulPreference_t pref;
      Check(cublasLtMatmulPreferenceCreate(&pref), "pref");
      const uint64_t ws = kWorkspace;
      Check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
            "pref");
      std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<std::size_t>(candidates));
      int count = 0;
      Check(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, candidates, found.data(), &count),
            "heuristic");
      double best_us = default_us;
      int best_split = 0;
      bool best_same = true;
      std::string list;
      for (int c = 0; c < count; ++c) {
        if (found[c].state != CUBLAS_STATUS_SUCCESS) continue;
        const cublasLtMatmulAlgo_t& algo = found[c].algo;
        int split = 1;
        std::size_t written = 0;
        cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split), &written);
        // Which kernel: the algorithm id, tile, stages and cluster shape (cublasLt's enums).
        int algo_id = 0, tile = 0, stages = 0, cluster = 0;
        cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_ID, &algo_id, sizeof(algo_id), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof(cluster),
                                             &written);
        auto lt_call = [&](int r, void* out) {
          Check(cublasLtMatmul(lt, op, &alpha, weight(r), la, x, lb, &beta, out, lc, out, lc, &algo, workspace,
                               kWorkspace, nullptr),
                "cublasLtMatmul");
        };
        start_y(y);
        lt_call(0, y);
        Check(cudaMemcpy(got.data(), y, y_bytes, cudaMemcpyDeviceToHost), "copy");
        const bool same = std::memcmp(got.data(), ref.data(), y_bytes) == 0;
        const double us = timer.BestMeanUs(reps, [&](int r) { lt_call(r, y); });
        char item[96];
        std::snprintf(item, sizeof item, "%s%.1f/%d/%s[%d:%d:%d:%d]", list.empty() ? "" : " ", us, split,
                      same ? "=" : "x", algo_id, tile, stages, cluster);
        list += item;
        if (us < best_us) {
          best_us = us;
          best_split = split;
          best_same = same;
        }
      }
      std::printf("| %s | %lld | %.1f | %.0f | %.1f | %.0f | %d | %s | %s |\n", s.name, static_cast<long long>(rows),
                  default_us, w_bytes / default_us * 1e-3, best_us, w_bytes / best_us * 1e-3, best_split,
                  best_same ? "yes" : "no", list.c_str());
      std::fflush(stdout);
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(lc);
      cublasLtMatmulDescDestroy(op);
    }
  }
  FusedSwiGluTable(handle, pool, x, static_cast<__nv_bfloat16*>(y), static_cast<__nv_bfloat16*>(y_ref), rows_list,
                   reps, timer);
  return 0;
}
