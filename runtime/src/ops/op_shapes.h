// Shape checks for the ops, in one place for every backend (docs/cuda.md, CONVENTIONS 7).
//
// Each function states the valid shapes of one op (the shapes themselves are documented
// beside the op in cpu/cpu_ops.h and cuda/cuda_ops.h) and returns InvalidArgument, naming
// the op and the offending values, when they are not. Zero-sized work (rows == 0, T == 0,
// n == 0) is valid and a no-op. Header-only C++17: it is compiled by nvcc as well.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "lm2/core/status.h"

namespace lm2::runtime::ops {

namespace detail {
inline Status Bad(const char* op, const std::string& what) {
  return Status::InvalidArgument(std::string(op) + ": " + what);
}
inline std::string Str(int64_t v) { return std::to_string(v); }
// GEMM libraries and CUDA grids take 32-bit dimensions.
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
}  // namespace detail

// y[rows, out] = x[rows, in] · W[out, in]ᵀ.
inline Status CheckLinear(int64_t rows, int64_t in, int64_t out) {
  using namespace detail;
  if (rows < 0 || in <= 0 || out <= 0) {
    return Bad("Linear", "rows=" + Str(rows) + " in=" + Str(in) + " out=" + Str(out) + " (need rows >= 0, in, out > 0)");
  }
  if (rows > kInt32Max || in > kInt32Max || out > kInt32Max) {
    return Bad("Linear", "dimensions above 2^31-1 (rows=" + Str(rows) + " in=" + Str(in) + " out=" + Str(out) + ")");
  }
  return Status::Ok();
}

// x[rows, d], weight[d].
inline Status CheckRmsNorm(int64_t rows, int64_t d, float eps) {
  using namespace detail;
  if (rows < 0 || d <= 0 || !(eps >= 0.0f)) {
    return Bad("RmsNorm", "rows=" + Str(rows) + " d=" + Str(d) + " eps=" + std::to_string(eps) +
                              " (need rows >= 0, d > 0, eps >= 0)");
  }
  if (rows > kInt32Max) return Bad("RmsNorm", "rows=" + Str(rows) + " above 2^31-1");
  return Status::Ok();
}

// x[rows, heads, head_dim], rotate-half pairs (i, i + head_dim/2).
inline Status CheckRope(int64_t rows, int64_t heads, int64_t head_dim, double theta) {
  using namespace detail;
  if (rows < 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || !(theta > 0.0)) {
    return Bad("Rope", "rows=" + Str(rows) + " heads=" + Str(heads) + " head_dim=" + Str(head_dim) +
                           " theta=" + std::to_string(theta) + " (need heads > 0, even head_dim > 0, theta > 0)");
  }
  return Status::Ok();
}

// q[T, heads*head_dim], k/v cache[S, kv_heads*head_dim]; the last T cache rows are the new tokens.
inline Status CheckCausalAttention(int64_t T, int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  using namespace detail;
  if (T < 0 || S < T || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || heads % kv_heads != 0) {
    return Bad("CausalAttention", "T=" + Str(T) + " S=" + Str(S) + " heads=" + Str(heads) + " kv_heads=" +
                                      Str(kv_heads) + " head_dim=" + Str(head_dim) +
                                      " (need 0 <= T <= S, head_dim > 0, kv_heads dividing heads)");
  }
  if (T * heads > kInt32Max || head_dim > kInt32Max) {
    return Bad("CausalAttention", "T*heads=" + Str(T * heads) + " above 2^31-1");
  }
  return Status::Ok();
}

// The memory ops: q/offer[T, d], mem_k/mem_v/acc/bank[N, d], attn[heads, T, N], mass[heads, N].
inline Status CheckMemory(const char* op, int64_t T, int64_t N, int64_t d, int64_t heads) {
  using namespace detail;
  if (T < 0 || N <= 0 || d <= 0 || heads <= 0 || d % heads != 0) {
    return Bad(op, "T=" + Str(T) + " N=" + Str(N) + " d=" + Str(d) + " heads=" + Str(heads) +
                       " (need T >= 0, N, d > 0, heads dividing d)");
  }
  if (T * heads > kInt32Max) return Bad(op, "T*heads=" + Str(T * heads) + " above 2^31-1");
  return Status::Ok();
}

// Elementwise ops over n values.
inline Status CheckCount(const char* op, int64_t n) {
  if (n < 0) return detail::Bad(op, "n=" + detail::Str(n) + " is negative");
  return Status::Ok();
}

}  // namespace lm2::runtime::ops
