// Every CUDA op (runtime/src/cuda/cuda_ops.h) against a plain double-precision loop written
// from docs/lm2-spec.md, on fresh random inputs each run (the seed is printed), with every
// output buffer poisoned (all bytes 0xFF, a NaN) on the device beforehand, so a kernel that
// skips an element fails. Several shapes per op: odd sizes, T = 1 and T > 1, GQA groupings.
//
// Tolerances: relative error ||got - want|| / ||want|| over the whole output.
//   fp32 elementwise, RMSNorm, RoPE           1e-5
//   fp32 reductions (attention, memory ops)   5e-5  (sums of up to thousands of terms)
//   Linear vs the same bf16-rounded inputs    1e-4  (fp32 accumulation order only)
//   Linear vs the unrounded fp32 inputs       1e-2  (bf16 rounding of x and W: 2^-9 each)
//   Gemv vs the unfused ops' bf16 inputs      5e-5  (fp32 sums of up to 8200 products)
//   TF32 GEMM ops (write sums,                3e-3  (inputs rounded to 10-bit mantissas:
//   GEMM attention)                                  2^-11 each, fp32 accumulation)
//   MemoryRead (bf16 GEMMs: q and the         1e-2  (operands rounded to 8-bit mantissas;
//   probabilities rounded), MemoryReadWrite,         memory K/V are bf16 in both)
//   FlushStagedTokens
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/cuda_ops.h"
#include "cuda/cuda_resources.h"
#include "cuda/kernel_modules.h"
#include "lm2/runtime/sampler.h"
#include "support/random_data.h"

using namespace lm2::runtime::cuda;

namespace {

constexpr double kTolF32 = 1e-5;
constexpr double kTolReduce = 5e-5;
constexpr double kTolGemmRounded = 1e-4;
constexpr double kTolGemmBf16 = 1e-2;
constexpr double kTolTf32 = 3e-3;  // TF32 tensor-core GEMMs: inputs rounded to 10-bit mantissas
constexpr double kTolBf16Operands = 1e-2;  // bf16 GEMM operands rounded from fp32 (q, probabilities)

using lm2::testing::RelErr;
using lm2::testing::Rng;

std::vector<float> Random(std::size_t n, float scale = 1.0f) { return lm2::testing::RandomVector(n, scale); }

void RequireOk(const lm2::Status& s) {
  INFO(s.ToString());
  REQUIRE(s.ok());
}

cudaStream_t Stream() {
  static auto stream = CudaStream::Create();
  RequireOk(stream.status());
  return stream->get();
}

cublasHandle_t Cublas() {
  static auto handle = CublasHandle::Create();
  RequireOk(handle.status());
  return handle->get();
}

template <typename T>
DeviceBuffer<T> Upload(const std::vector<T>& host) {
  auto b = DeviceBuffer<T>::Allocate(host.size());
  RequireOk(b.status());
  RequireOk(b->CopyFromHost(host.data(), host.size(), Stream()));
  return std::move(b).value();
}

// A device buffer of n elements, every byte 0xFF (NaN for floats).
template <typename T>
DeviceBuffer<T> Poisoned(std::size_t n) {
  auto b = DeviceBuffer<T>::Allocate(n);
  RequireOk(b.status());
  RequireOk(b->FillBytes(0xFF, Stream()));
  return std::move(b).value();
}

// Waits for the stream (so a fault inside a kernel fails here) and copies out.
template <typename T>
std::vector<T> Download(const DeviceBuffer<T>& b) {
  RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "kernels"));
  std::vector<T> h(b.size());
  RequireOk(b.CopyToHost(h.data(), h.size(), Stream()));
  return h;
}

using lm2::testing::Sig;
using lm2::testing::SoftmaxRows;

// The relative error of what sums gained from `start` (got - start against want - start): a
// gain far smaller than the sums would hide in their own error. fp32 differences of the sums
// are exact enough against the 1e-2 / 1e-4 bounds the tests set.
double GainError(const std::vector<float>& got, const std::vector<float>& start, const std::vector<double>& want) {
  std::vector<float> got_gain(got.size());
  std::vector<double> want_gain(got.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    got_gain[i] = got[i] - start[i];
    want_gain[i] = want[i] - start[i];
  }
  return RelErr(got_gain, want_gain);
}

// bf16 by round-to-nearest-even on the bit pattern (finite inputs), as the upload kernel.
uint16_t Bf16Bits(float x) {
  uint32_t u = 0;
  std::memcpy(&u, &x, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float Bf16Value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x = 0;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
float RoundBf16(float x) { return Bf16Value(Bf16Bits(x)); }
float AsFloat(float x) { return x; }
float AsFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
uint16_t Bits(__nv_bfloat16 v) {
  uint16_t b = 0;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

}  // namespace

TEST_CASE("Device memory freed while another stream still writes it is not handed out before that ends",
          "[cuda][ops]") {
  // A buffer being filled on one stream is freed at once; a new buffer of the same size
  // (the pool's reuse makes it the same memory, as cudaMalloc may) is filled on another
  // stream. The free must wait for the first fill, or its tail lands in the new buffer.
  auto other = CudaStream::Create();
  RequireOk(other.status());
  const std::size_t n = std::size_t{1} << 28;  // 256 MiB: ~0.1 ms of memset
  for (int round = 0; round < 3; ++round) {
    auto old_buffer = DeviceBuffer<unsigned char>::Allocate(n);
    RequireOk(old_buffer.status());
    for (int i = 0; i < 8; ++i) RequireOk(old_buffer->FillBytes(1, other->get()));
    *old_buffer = DeviceBuffer<unsigned char>();
    auto fresh = DeviceBuffer<unsigned char>::Allocate(n);
    RequireOk(fresh.status());
    RequireOk(fresh->FillBytes(2, Stream()));
    const auto bytes = Download(*fresh);
    CHECK(std::count(bytes.begin(), bytes.end(), static_cast<unsigned char>(2)) == static_cast<std::ptrdiff_t>(n));
  }
  TrimDevicePool(0);  // hands the unused memory back; later allocations still work
  auto after = DeviceBuffer<float>::Allocate(1024);
  RequireOk(after.status());
  RequireOk(after->FillBytes(0, Stream()));
  CHECK(Download(*after) == std::vector<float>(1024, 0.0f));
}

TEST_CASE("Page-locked host buffers are kept for reuse, up to a bound, and stage copies correctly", "[cuda][ops]") {
  TrimDevicePool(0);  // nothing kept from earlier cases
  REQUIRE(KeptPinnedBytes() == 0);
  void* first = nullptr;
  {
    auto a = PinnedBuffer<int32_t>::Allocate(1000);
    RequireOk(a.status());
    first = a->data();
  }
  CHECK(KeptPinnedBytes() == 4000);
  auto small = PinnedBuffer<int32_t>::Allocate(100);  // 400 bytes: under half the kept block
  RequireOk(small.status());
  CHECK(static_cast<void*>(small->data()) != first);
  CHECK(KeptPinnedBytes() == 4000);
  auto b = PinnedBuffer<int32_t>::Allocate(600);  // 2400 bytes: takes the kept block
  RequireOk(b.status());
  CHECK(static_cast<void*>(b->data()) == first);
  CHECK(KeptPinnedBytes() == 0);
  // The reused block stages an asynchronous copy like a new one.
  std::iota(b->data(), b->data() + 600, 7);
  auto dev = DeviceBuffer<int32_t>::Allocate(600);
  RequireOk(dev.status());
  RequireOk(dev->CopyFromHost(b->data(), 600, Stream()));
  std::vector<int32_t> want(600);
  std::iota(want.begin(), want.end(), 7);
  CHECK(Download(*dev) == want);
  {  // a block past the bound on what is kept goes back at once
    auto big = PinnedBuffer<char>::Allocate(std::size_t{300} << 20);
    RequireOk(big.status());
  }
  CHECK(KeptPinnedBytes() == 0);
  *small = PinnedBuffer<int32_t>();
  CHECK(KeptPinnedBytes() == 400);
  *b = PinnedBuffer<int32_t>();
  CHECK(KeptPinnedBytes() == 4400);
  TrimDevicePool(0);  // every kept block freed (memcheck's leak check sees none)
  CHECK(KeptPinnedBytes() == 0);
}

TEST_CASE("ConvertF32ToBf16 rounds to nearest even, ConvertBf16ToF32 is exact", "[cuda][ops]") {
  const int64_t n = GENERATE(1, 1001, 4096, 70001);  // 4096: the four-element kernel
  auto x = Random(static_cast<std::size_t>(n), 10.0f);
  x[0] = 1.0f + 1.0f / 256.0f;  // exactly halfway between two bf16 values: rounds to even (1.0)
  auto dx = Upload(x);
  auto db = Poisoned<__nv_bfloat16>(x.size());
  RequireOk(ConvertF32ToBf16(dx.data(), n, db.data(), Stream()));
  auto back = Poisoned<float>(x.size());
  RequireOk(ConvertBf16ToF32(db.data(), n, back.data(), Stream()));
  const auto bits = Download(db);
  const auto got = Download(back);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    uint16_t b = 0;
    std::memcpy(&b, &bits[i], sizeof b);
    if (b != Bf16Bits(x[i]) || got[i] != RoundBf16(x[i])) ++wrong;
  }
  INFO("n=" << n);
  CHECK(wrong == 0);
  CHECK(got[0] == 1.0f);

  // ConvertRowsF32ToBf16: the first `cols` of each row of a wider matrix, packed (cols 12 of
  // 16: the four-element kernel; 7 of 9: one element a thread).
  for (const auto& [cols, ld] : {std::pair<int64_t, int64_t>{12, 16}, std::pair<int64_t, int64_t>{7, 9}}) {
    const int64_t rows = std::min<int64_t>(n, 37);
    INFO("rows of " << cols << " of " << ld);
    if (rows * ld > n) continue;
    auto packed = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(rows * cols));
    RequireOk(ConvertRowsF32ToBf16(dx.data(), rows, cols, ld, packed.data(), Stream()));
    const auto pbits = Download(packed);
    std::size_t wrong_rows = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        uint16_t b = 0;
        std::memcpy(&b, &pbits[static_cast<std::size_t>(r * cols + c)], sizeof b);
        if (b != Bf16Bits(x[static_cast<std::size_t>(r * ld + c)])) ++wrong_rows;
      }
    CHECK(wrong_rows == 0);
  }
}

TEST_CASE("Linear: bf16 weights and activations, fp32 accumulation (cuBLAS)", "[cuda][ops]") {
  const auto [rows, in, out] = GENERATE(std::make_tuple(int64_t{1}, int64_t{33}, int64_t{19}),
                                        std::make_tuple(int64_t{7}, int64_t{33}, int64_t{19}),
                                        std::make_tuple(int64_t{1}, int64_t{2048}, int64_t{2048}),
                                        std::make_tuple(int64_t{5}, int64_t{4097}, int64_t{3}),
                                        std::make_tuple(int64_t{64}, int64_t{512}, int64_t{1000}),
                                        std::make_tuple(int64_t{128}, int64_t{2048}, int64_t{512}));
  INFO("rows=" << rows << " in=" << in << " out=" << out);
  auto x = Random(static_cast<std::size_t>(rows * in)), w = Random(static_cast<std::size_t>(out * in));
  auto y0 = Random(static_cast<std::size_t>(rows * out));
  // Weights go up as fp32 and are converted on the device, as a model upload does.
  auto dx = Upload(x), dw32 = Upload(w);
  auto dw = Poisoned<__nv_bfloat16>(w.size()), dxb = Poisoned<__nv_bfloat16>(x.size());
  RequireOk(ConvertF32ToBf16(dw32.data(), out * in, dw.data(), Stream()));
  auto dy = Poisoned<float>(y0.size());
  RequireOk(LinearF32(Cublas(), dx.data(), rows, in, dw.data(), out, dy.data(), false, dxb.data(), Stream()));
  const auto y = Download(dy);

  std::vector<double> want_rounded(y0.size()), want_exact(y0.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc_r = 0, acc_e = 0;
      for (int64_t i = 0; i < in; ++i) {
        acc_r += static_cast<double>(RoundBf16(x[r * in + i])) * RoundBf16(w[o * in + i]);
        acc_e += static_cast<double>(x[r * in + i]) * w[o * in + i];
      }
      want_rounded[r * out + o] = acc_r;
      want_exact[r * out + o] = acc_e;
    }
  CHECK(RelErr(y, want_rounded) < kTolGemmRounded);
  CHECK(RelErr(y, want_exact) < kTolGemmBf16);

  // accumulate: y = y0 + x Wᵀ, through the bf16-activation entry point.
  auto dy2 = Upload(y0);
  RequireOk(Linear(Cublas(), dxb.data(), rows, in, dw.data(), out, dy2.data(), true, Stream()));
  const auto y2 = Download(dy2);
  for (std::size_t i = 0; i < y0.size(); ++i) want_rounded[i] += y0[i];
  CHECK(RelErr(y2, want_rounded) < kTolGemmRounded);

  // a and b stacked [2, n] and rounded to bf16 on the device.
  auto stacked_bf16 = [](const std::vector<float>& a, const std::vector<float>& b) {
    std::vector<float> both(a);
    both.insert(both.end(), b.begin(), b.end());
    auto d32 = Upload(both);
    auto d = Poisoned<__nv_bfloat16>(both.size());
    RequireOk(ConvertF32ToBf16(d32.data(), static_cast<int64_t>(both.size()), d.data(), Stream()));
    return d;
  };
  // xv [rows, in] · wv [out, in]ᵀ in double from the bf16-rounded operands.
  auto rounded_product = [&](const std::vector<float>& xv, const std::vector<float>& wv) {
    std::vector<double> p(static_cast<std::size_t>(rows * out));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) {
        double acc = 0;
        for (int64_t i = 0; i < in; ++i) {
          acc += static_cast<double>(RoundBf16(xv[r * in + i])) * RoundBf16(wv[o * in + i]);
        }
        p[r * out + o] = acc;
      }
    return p;
  };
  // The two halves [2, rows, out] of a pair's result, as floats.
  auto halves = [&](const auto& pair_out) {
    std::pair<std::vector<float>, std::vector<float>> h;
    for (std::size_t i = 0; i < y0.size(); ++i) {
      h.first.push_back(AsFloat(pair_out[i]));
      h.second.push_back(AsFloat(pair_out[y0.size() + i]));
    }
    return h;
  };

  // LinearPairToBf16: W and a second matrix stacked [2, out, in] against the one x; each
  // half rounded to bf16 from its fp32 sums (2^-9 at most).
  auto w1 = Random(w.size());
  auto dpair = stacked_bf16(w, w1);
  auto dyp = Poisoned<__nv_bfloat16>(2 * y0.size());
  RequireOk(LinearPairToBf16(Cublas(), dxb.data(), rows, in, dpair.data(), out, dyp.data(), Stream()));
  const auto [half0, half1] = halves(Download(dyp));
  const std::vector<double> want1 = rounded_product(x, w1);
  for (std::size_t i = 0; i < y0.size(); ++i) want_rounded[i] -= y0[i];
  CHECK(RelErr(half0, want_rounded) < kTolGemmBf16);
  CHECK(RelErr(half1, want1) < kTolGemmBf16);
  // LinearPair: the same in fp32.
  auto dyf = Poisoned<float>(2 * y0.size());
  RequireOk(LinearPair(Cublas(), dxb.data(), rows, in, dpair.data(), out, dyf.data(), Stream()));
  const auto [f0, f1] = halves(Download(dyf));
  CHECK(RelErr(f0, want_rounded) < kTolGemmRounded);
  CHECK(RelErr(f1, want1) < kTolGemmRounded);

  // LinearTwo: x against W and a second x against the second matrix, x stacked [2, rows, in].
  auto x1 = Random(x.size());
  auto dxs = stacked_bf16(x, x1);
  auto dyt = Poisoned<float>(2 * y0.size());
  RequireOk(LinearTwo(Cublas(), dxs.data(), rows, in, dpair.data(), out, dyt.data(), Stream()));
  const auto [t0, t1] = halves(Download(dyt));
  CHECK(RelErr(t0, want_rounded) < kTolGemmRounded);
  CHECK(RelErr(t1, rounded_product(x1, w1)) < kTolGemmRounded);
}

// Gemv's reference: the unfused device op makes x' (bf16), the product is taken in double
// from the downloaded x' and W, then the epilogue in double. So a prologue that differed from
// RmsNormBf16 / SwiGluBf16 / the bf16 rounding would show, besides the kernel's sums.
TEST_CASE("Gemv: fused small-batch linear layers equal the unfused ops", "[cuda][ops]") {
  const auto [rows, in, out] = GENERATE(std::make_tuple(int64_t{1}, int64_t{64}, int64_t{37}),
                                        std::make_tuple(int64_t{3}, int64_t{160}, int64_t{100}),
                                        std::make_tuple(int64_t{8}, int64_t{2048}, int64_t{2053}),
                                        std::make_tuple(int64_t{5}, int64_t{2112}, int64_t{300}),
                                        std::make_tuple(int64_t{2}, int64_t{8192}, int64_t{64}),
                                        std::make_tuple(int64_t{1}, int64_t{8200}, int64_t{33}),
                                        std::make_tuple(int64_t{1}, int64_t{2048}, int64_t{20000}),
                                        std::make_tuple(int64_t{3}, int64_t{5000}, int64_t{3001}));
  const GemvInput input = GENERATE(GemvInput::kBf16, GemvInput::kF32, GemvInput::kRmsNorm);
  const GemvOutput output =
      GENERATE(GemvOutput::kStore, GemvOutput::kAccumulate, GemvOutput::kGatedResidual, GemvOutput::kStoreArgmax);
  const bool stores = output == GemvOutput::kStore || output == GemvOutput::kStoreArgmax;
  INFO("rows=" << rows << " in=" << in << " out=" << out << " input=" << static_cast<int>(input)
               << " output=" << static_cast<int>(output));
  const int64_t x_ld = in;
  auto x = Random(static_cast<std::size_t>(rows * x_ld)), w = Random(static_cast<std::size_t>(out * in));
  auto norm = Random(static_cast<std::size_t>(in)), y0 = Random(static_cast<std::size_t>(rows * out));
  auto bias = Random(static_cast<std::size_t>(out)), res = Random(static_cast<std::size_t>(rows * out));
  auto gated = Random(static_cast<std::size_t>(rows * out));
  auto dx = Upload(x), dw32 = Upload(w), dnorm = Upload(norm), dbias = Upload(bias), dres = Upload(res);
  auto dgated = Upload(gated);
  auto dw = Poisoned<__nv_bfloat16>(w.size());
  RequireOk(ConvertF32ToBf16(dw32.data(), out * in, dw.data(), Stream()));

  // x' by the unfused ops.
  auto dxp = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(rows * in));
  constexpr float kEps = 1e-5f;
  switch (input) {
    case GemvInput::kBf16:
    case GemvInput::kF32: RequireOk(ConvertF32ToBf16(dx.data(), rows * in, dxp.data(), Stream())); break;
    case GemvInput::kRmsNorm: RequireOk(RmsNormBf16(dx.data(), dnorm.data(), rows, in, kEps, dxp.data(), Stream())); break;
  }
  const auto xp = Download(dxp);

  std::vector<uint64_t> keys;  // kStoreArgmax: the last run's
  auto run = [&](int64_t first, int64_t n) {
    auto dkeys = Upload(std::vector<uint64_t>(static_cast<std::size_t>(n), 0));
    auto dy = stores ? Poisoned<float>(static_cast<std::size_t>(n * out))
                                           : Upload(std::vector<float>(y0.begin() + first * out,
                                                                       y0.begin() + (first + n) * out));
    const GemvArgs g{.input = input,
                     .x = input == GemvInput::kBf16 ? static_cast<const void*>(dxp.data() + first * in)
                                                    : static_cast<const void*>(dx.data() + first * x_ld),
                     .x_ld = x_ld,
                     .norm_weight = dnorm.data(),
                     .eps = kEps,
                     .w = dw.data(),
                     .rows = n,
                     .in = in,
                     .out = out,
                     .output = output,
                     .y = dy.data(),
                     .bias = dbias.data(),
                     .residual = dres.data() + first * out,
                     .gated = dgated.data() + first * out,
                     .argmax_keys = dkeys.data()};
    RequireOk(Gemv(g, Stream()));
    if (output == GemvOutput::kStoreArgmax) {
      keys = Download(dkeys);
      // The same keys as ArgmaxRows over the stored logits.
      auto want_keys = Poisoned<uint64_t>(static_cast<std::size_t>(n));
      RequireOk(ArgmaxRows(dy.data(), n, out, want_keys.data(), Stream()));
      CHECK(keys == Download(want_keys));
    }
    return Download(dy);
  };
  const auto y = run(0, rows);

  std::vector<double> want(y0.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) {
        acc += static_cast<double>(Bf16Value(Bits(xp[r * in + i]))) * RoundBf16(w[o * in + i]);
      }
      const std::size_t k = r * out + o;
      if (stores) want[k] = acc;
      if (output == GemvOutput::kAccumulate) want[k] = y0[k] + acc;
      if (output == GemvOutput::kGatedResidual) want[k] = y0[k] + res[k] + Sig(acc + bias[o]) * gated[k];
    }
  }
  CHECK(RelErr(y, want) < kTolReduce);
  if (output == GemvOutput::kStoreArgmax) {  // each row's pick is std::max_element's
    for (int64_t r = 0; r < rows; ++r) {
      const float* yr = y.data() + r * out;
      CHECK(ArgmaxKeyToken(keys[static_cast<std::size_t>(r)]) == std::max_element(yr, yr + out) - yr);
    }
  }

  // Each row alone gives the same bits as in the batch.
  std::size_t differ = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const auto alone = run(r, 1);
    for (int64_t o = 0; o < out; ++o) differ += std::memcmp(&alone[o], &y[r * out + o], sizeof(float)) != 0;
  }
  CHECK(differ == 0);
}

TEST_CASE("Gemv's SwiGLU output: the bits of SwiGluBf16 over the stored gate | up rows", "[cuda][ops]") {
  const auto [rows, in, width] = GENERATE(std::make_tuple(int64_t{1}, int64_t{64}, int64_t{37}),
                                         std::make_tuple(int64_t{3}, int64_t{160}, int64_t{100}),
                                         std::make_tuple(int64_t{2}, int64_t{2048}, int64_t{4100}),
                                         std::make_tuple(int64_t{8}, int64_t{2048}, int64_t{300}),
                                         std::make_tuple(int64_t{1}, int64_t{5000}, int64_t{1500}));
  const GemvInput input = GENERATE(GemvInput::kF32, GemvInput::kRmsNorm);
  INFO("rows=" << rows << " in=" << in << " out=" << 2 * width << " input=" << static_cast<int>(input));
  const int64_t out = 2 * width;
  const auto x = Random(static_cast<std::size_t>(rows * in)), w = Random(static_cast<std::size_t>(out * in));
  const auto norm = Random(static_cast<std::size_t>(in));
  auto dx = Upload(x), dw32 = Upload(w), dnorm = Upload(norm);
  auto dw = Poisoned<__nv_bfloat16>(w.size());
  RequireOk(ConvertF32ToBf16(dw32.data(), out * in, dw.data(), Stream()));
  // The unfused way: gate | up stored in fp32, then SwiGluBf16.
  auto dr = Poisoned<float>(static_cast<std::size_t>(rows * out));
  GemvArgs g{.input = input, .x = dx.data(), .x_ld = in, .norm_weight = dnorm.data(), .eps = 1e-5f, .w = dw.data(),
             .rows = rows, .in = in, .out = out, .y = dr.data()};
  RequireOk(Gemv(g, Stream()));
  auto dwant = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(rows * width));
  RequireOk(SwiGluBf16(dr.data(), rows, width, dwant.data(), Stream()));
  const auto want = Download(dwant);
  auto run = [&](int64_t first, int64_t n) {
    auto dy = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(n * width));
    GemvArgs f = g;
    f.x = dx.data() + first * in;
    f.rows = n;
    f.output = GemvOutput::kSwiGluBf16;
    f.y = nullptr;
    f.y_bf16 = dy.data();
    RequireOk(Gemv(f, Stream()));
    return Download(dy);
  };
  const auto got = run(0, rows);
  REQUIRE(got.size() == want.size());
  CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(got[0])) == 0);
  for (int64_t r = 0; r < rows; ++r) {  // each row alone: the same bits
    const auto alone = run(r, 1);
    CHECK(std::memcmp(alone.data(), want.data() + r * width, alone.size() * sizeof(alone[0])) == 0);
  }
}

// The fused gate|up GEMM with its SwiGLU against the product in double from the same bf16
// operands (gate and up rounded to bf16, then the activation), and bit for bit on nearly
// every element against the unfused device ops (cuBLAS's GEMM into bf16, then SwiGluBf16):
// the two differ only where the sums' order moves a gate or up value across a rounding
// boundary. Rows past the last are left as they were.
TEST_CASE("LinearSwiGlu: the gate|up GEMM with the SwiGLU as its epilogue", "[cuda][ops]") {
  auto sms_or = Multiprocessors();
  RequireOk(sms_or.status());
  const int64_t sms = *sms_or;
  // (rows, d, F): tiles of 64 columns (rows of one tile, partly or wholly), at the most that
  // fit one round over the multiprocessors; tiles of 128 columns in two full rounds (each
  // block takes two tiles; the last rows part of a 64-row box).
  const std::tuple<int64_t, int64_t, int64_t> shapes[] = {
      {1, 64, 128}, {77, 192, 256}, {128, 2048, 128}, {100, 64, 128 * (sms / 2)}, {252, 64, 128 * sms}};
  const auto [rows, d, F] = shapes[GENERATE(0, 1, 2, 3, 4)];
  INFO("rows=" << rows << " d=" << d << " F=" << F << " on " << sms << " multiprocessors");
  if (!LinearSwiGluSupported(rows, d, F)) {
    WARN("LinearSwiGlu: not supported on this device or build (compute capability 9.0 and sm_90a code needed)");
    CHECK_FALSE(LinearSwiGluSupported(1, 64, 128));  // nor anywhere on it
    CHECK(LinearSwiGlu(nullptr, rows, d, nullptr, F, nullptr, Stream()).code() == lm2::StatusCode::kUnavailable);
    return;
  }
  const auto x = Random(static_cast<std::size_t>(rows * d)), w = Random(static_cast<std::size_t>(2 * F * d));
  auto dx32 = Upload(x), dw32 = Upload(w);
  auto dx = Poisoned<__nv_bfloat16>(x.size()), dw = Poisoned<__nv_bfloat16>(w.size());
  RequireOk(ConvertF32ToBf16(dx32.data(), rows * d, dx.data(), Stream()));
  RequireOk(ConvertF32ToBf16(dw32.data(), 2 * F * d, dw.data(), Stream()));
  auto dy = Poisoned<__nv_bfloat16>(static_cast<std::size_t>((rows + 1) * F));  // one row past
  RequireOk(LinearSwiGlu(dx.data(), rows, d, dw.data(), F, dy.data(), Stream()));
  const auto y = Download(dy);

  std::vector<float> got(static_cast<std::size_t>(rows * F));
  std::vector<double> want(got.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < F; ++c) {
      double gate = 0, up = 0;
      for (int64_t i = 0; i < d; ++i) {
        const double xi = RoundBf16(x[r * d + i]);
        gate += xi * RoundBf16(w[c * d + i]);
        up += xi * RoundBf16(w[(F + c) * d + i]);
      }
      const double g = RoundBf16(static_cast<float>(gate)), u = RoundBf16(static_cast<float>(up));
      want[r * F + c] = g / (1.0 + std::exp(-g)) * u;
      got[r * F + c] = AsFloat(y[r * F + c]);
    }
  CHECK(RelErr(got, want) < kTolGemmBf16);
  int64_t untouched = 0;
  for (int64_t c = 0; c < F; ++c) {
    uint16_t bits = 0;
    std::memcpy(&bits, &y[rows * F + c], sizeof(bits));
    untouched += bits == 0xFFFF;
  }
  CHECK(untouched == F);

  auto dgu = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(rows * 2 * F));
  auto dwant = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(rows * F));
  RequireOk(LinearToBf16(Cublas(), dx.data(), rows, d, dw.data(), 2 * F, dgu.data(), Stream()));
  RequireOk(SwiGluBf16(dgu.data(), rows, F, dwant.data(), Stream()));
  const auto unfused = Download(dwant);
  int64_t same = 0;
  for (int64_t i = 0; i < rows * F; ++i) same += std::memcmp(&unfused[i], &y[i], sizeof(y[i])) == 0;
  INFO(same << " of " << rows * F << " elements the unfused ops' bits");
  CHECK(same >= rows * F * 98 / 100);
}

TEST_CASE("LinearSwiGlu refuses shapes it has no tiles for, or whose last round of tiles runs part-empty",
          "[cuda][ops]") {
  CHECK_FALSE(LinearSwiGluSupported(64, 60, 128));   // d not a multiple of 64
  CHECK_FALSE(LinearSwiGluSupported(64, 64, 100));   // F not a multiple of 128
  CHECK_FALSE(LinearSwiGluSupported(64, 0, 128));
  CHECK_FALSE(LinearSwiGluSupported(0, 64, 128));
  CHECK(LinearSwiGlu(nullptr, 4, 64, nullptr, 100, nullptr, Stream()).code() == lm2::StatusCode::kUnavailable);
  if (!LinearSwiGluSupported(1, 64, 128)) {
    WARN("LinearSwiGlu: not supported on this device or build: only the refusals checked");
    return;
  }
  auto sms_or = Multiprocessors();
  RequireOk(sms_or.status());
  const int64_t sms = *sms_or;
  CHECK(LinearSwiGluSupported(128, 64, 128 * (sms / 2)));  // one round of 64-column tiles
  CHECK(LinearSwiGluSupported(256, 64, 128 * sms));        // two full rounds of 128 columns
  CHECK_FALSE(LinearSwiGluSupported(128, 64, 128 * (sms + 1)));  // a second round of one tile
  CHECK(LinearSwiGlu(nullptr, 128, 64, nullptr, 128 * (sms + 1), nullptr, Stream()).code() ==
        lm2::StatusCode::kUnavailable);
  // A supported shape with null or misaligned pointers: refused before any launch.
  const int64_t F = 128 * (sms / 2);
  auto buf = DeviceBuffer<__nv_bfloat16>::Allocate(static_cast<std::size_t>(2 * F * 64 + 16));
  RequireOk(buf.status());
  __nv_bfloat16* p = buf->data();
  CHECK(LinearSwiGlu(nullptr, 128, 64, p, F, p, Stream()).IsInvalidArgument());
  CHECK(LinearSwiGlu(p, 128, 64, p, F, nullptr, Stream()).IsInvalidArgument());
  CHECK(LinearSwiGlu(p + 1, 128, 64, p, F, p, Stream()).IsInvalidArgument());  // x 2 bytes off
  CHECK(LinearSwiGlu(p, 128, 64, p, F, p + 1, Stream()).IsInvalidArgument());  // y 2 bytes off
}

TEST_CASE("Gemv refuses what it cannot take", "[cuda][ops]") {
  auto buf = DeviceBuffer<float>::Allocate(1024);
  RequireOk(buf.status());
  auto wbuf = DeviceBuffer<__nv_bfloat16>::Allocate(1024);
  RequireOk(wbuf.status());
  const GemvArgs g{.x = buf->data(), .x_ld = 64, .w = wbuf->data(), .rows = 1, .in = 64, .out = 8, .y = buf->data()};
  CHECK(GemvSupports(kGemvMaxRows, 64));
  CHECK_FALSE(GemvSupports(kGemvMaxRows + 1, 64));
  CHECK_FALSE(GemvSupports(1, 60));
  CHECK(GemvSupports(2, kGemvStageElements / 2));
  CHECK_FALSE(GemvSupports(3, kGemvStageElements / 2));  // x' would not fit in shared memory
  // The GEMV path's rows: the most every width allows, up to the caller's limit.
  CHECK(GemvRowsFor(kGemvMaxRows, {2048, 2048, 8192}) == 2);  // the paper's shape: FFN 8192
  CHECK(GemvRowsFor(kGemvMaxRows, {64, 64, 160}) == kGemvMaxRows);
  CHECK(GemvRowsFor(4, {64, 64, 160}) == 4);
  CHECK(GemvRowsFor(0, {64}) == 0);
  CHECK(GemvRowsFor(kGemvMaxRows, {64, 60}) == 0);  // a width not a multiple of 8
  GemvArgs bad = g;
  bad.rows = kGemvMaxRows + 1;
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.in = 60;  // not a multiple of 8
  bad.x_ld = 60;
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.w = wbuf->data() + 1;  // misaligned weights
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.x = buf->data() + 2;  // misaligned input rows
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.x_ld = 56;  // rows of x narrower than in
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.output = GemvOutput::kGatedResidual;  // no bias, residual, gated
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.input = GemvInput::kRmsNorm;  // no norm weight
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.output = GemvOutput::kStoreArgmax;  // no keys for the picks
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.output = GemvOutput::kSwiGluBf16;  // no bf16 output
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad.y_bf16 = wbuf->data();
  bad.out = 7;  // gate and up rows must pair up
  CHECK(Gemv(bad, Stream()).IsInvalidArgument());
  bad = g;
  bad.rows = 0;
  bad.x = nullptr;
  CHECK(Gemv(bad, Stream()).ok());  // nothing to do
  RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "stream"));
}

TEST_CASE("ArgmaxRows picks what std::max_element picks: first maximum, NaNs skipped", "[cuda][ops]") {
  const int64_t cols = GENERATE(int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{128256});
  const int64_t rows = 8;
  INFO("cols=" << cols);
  auto x = Random(static_cast<std::size_t>(rows * cols));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto at = [&](int64_t r, int64_t c) -> float& { return x[static_cast<std::size_t>(r * cols + c)]; };
  if (cols > 1) {
    at(1, cols - 1) = 100.0f;  // a tie: the first wins
    at(1, cols / 2) = 100.0f;
    at(2, cols / 3) = nan;     // a NaN inside is skipped
    at(2, cols - 1) = 50.0f;
  }
  at(3, 0) = nan;  // a NaN first: std::max_element answers 0
  if (cols > 2) at(3, cols - 2) = 1e6f;
  for (int64_t c = 0; c < cols; ++c) at(4, c) = -std::numeric_limits<float>::infinity();  // all -inf: 0
  for (int64_t c = 0; c < cols; ++c) at(5, c) = 3.0f;  // all equal: 0
  for (int64_t c = 0; c < cols; ++c) at(6, c) = -1.0f;  // -0 and +0 are equal: the first wins
  if (cols > 5) {
    at(6, 2) = -0.0f;
    at(6, 5) = 0.0f;
  }
  for (int64_t c = 0; c < cols; ++c) at(7, c) = nan;  // all NaN: 0
  auto dx = Upload(x);
  auto dkeys = Poisoned<uint64_t>(static_cast<std::size_t>(rows));
  RequireOk(ArgmaxRows(dx.data(), rows, cols, dkeys.data(), Stream()));
  const auto got = Download(dkeys);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.data() + r * cols;
    INFO("row " << r);
    CHECK(ArgmaxKeyToken(got[static_cast<std::size_t>(r)]) == static_cast<int32_t>(std::max_element(row, row + cols) - row));
  }
  CHECK(ArgmaxRows(dx.data(), 1, 0, dkeys.data(), Stream()).IsInvalidArgument());
  CHECK(ArgmaxRows(nullptr, 0, 4, nullptr, Stream()).ok());
}

TEST_CASE("the sm_90 code runs where the build has it and the card takes it", "[cuda][ops]") {
  int device = 0, major = 0, minor = 0;
  RequireOk(CudaStatus(cudaGetDevice(&device), "device"));
  RequireOk(CudaStatus(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "major"));
  RequireOk(CudaStatus(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "minor"));
  // The highest configured architecture the card takes (e.g. "80,90" or "80-real,90a").
  const std::string archs = LM2_TEST_CUDA_ARCHITECTURES;
  int runs = 0;
  for (std::size_t at = 0; at < archs.size();) {
    const std::size_t end = std::min(archs.find(',', at), archs.size());
    const int arch = std::atoi(archs.substr(at, end - at).c_str());
    if (arch <= 10 * major + minor && arch > runs) runs = arch;
    at = end + 1;
  }
  INFO("architectures " << archs << ", compute capability " << major << "." << minor);
  CHECK(runs > 0);
  CHECK(Sm90CodeOnCurrentDevice() == (runs >= 90));
  CHECK(ComputeCapability90OnCurrentDevice() == (major == 9 && minor == 0));
  CHECK(ComputeCapability90OnCurrentDevice() == (major == 9 && minor == 0));  // cached: the same answer
}

TEST_CASE("LoadAllKernels puts every kernel of every .cu file on the device", "[cuda][ops][kernels]") {
  // The .cu files with kernels, each registering its module (LM2_CUDA_KERNEL_MODULE); the
  // two sm_90a files' modules have code only for compute capability 9.0.
  const int64_t modules = 12 + (Sm90CodeOnCurrentDevice() ? 2 : 0);
  auto before = CountKernels();
  RequireOk(before.status());
  const auto t0 = std::chrono::steady_clock::now();
  auto loaded = LoadAllKernels();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  RequireOk(loaded.status());
  std::printf("kernels: %lld modules, %lld kernels, %lld not yet loaded (%s loading), loaded in %.1f ms\n",
              static_cast<long long>(loaded->modules), static_cast<long long>(loaded->functions),
              static_cast<long long>(loaded->unloaded), loaded->lazy ? "lazy" : "eager", ms);
  CHECK(loaded->modules == modules);
  CHECK(loaded->functions > 100);
  CHECK(loaded->unloaded == before->unloaded);
  auto after = CountKernels();
  RequireOk(after.status());
  CHECK(after->modules == modules);
  CHECK(after->functions == loaded->functions);
  CHECK(after->unloaded == 0);
}

TEST_CASE("SampleRows picks what PickToken picks on the host", "[cuda][ops]") {
  using lm2::runtime::PickScratch;
  using lm2::runtime::PickToken;
  using lm2::runtime::TokenRule;
  const int64_t cols = GENERATE(int64_t{50}, int64_t{5000}, int64_t{128256});
  INFO("cols=" << cols);
  const std::vector<int32_t> history = {3, 3, 17, 40, 40, 40, 2, -1, static_cast<int32_t>(cols) + 5};
  // Every kind of rule; row 6's logits have many ties (the sort must keep them in id order)
  // and some -inf (at 128,256 columns its top-p 0.95 takes the whole-row sort).
  const std::vector<TokenRule> kinds = {
      TokenRule{.temperature = 1.0f},
      TokenRule{.temperature = 0.7f, .top_k = 40},
      TokenRule{.temperature = 1.3f, .top_p = 0.9f},
      TokenRule{.temperature = 0.8f, .top_k = 200, .top_p = 0.5f, .repetition_penalty = 1.3f, .history = history},
      TokenRule{.repetition_penalty = 1.5f, .history = history},  // greedy with a penalty
      TokenRule{.temperature = 1.0f, .top_k = 1},
      TokenRule{.temperature = 1.0f, .top_p = 0.95f},
      TokenRule{.temperature = 2.0f, .top_k = static_cast<int32_t>(cols) + 10},
      TokenRule{.temperature = 0.5f, .top_p = 1e-6f},
      TokenRule{.temperature = 0.9f, .repetition_penalty = 0.8f, .history = history},
      // Over 1,024 candidates at 5,000 columns (the pick's radix sort, not its rank sort);
      // too many for either at 128,256 (the whole-row sort).
      TokenRule{.temperature = 1.0f, .top_k = 1500},
  };
  const auto rows = static_cast<int64_t>(kinds.size());
  auto temp_bytes = SampleRowsTempBytes(rows, cols);
  RequireOk(temp_bytes.status());
  auto keys = DeviceBuffer<float>::Allocate(static_cast<std::size_t>(rows * cols));
  auto sorted_keys = DeviceBuffer<float>::Allocate(static_cast<std::size_t>(rows * cols));
  auto ids = DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(rows * cols));
  auto sorted_ids = DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(rows * cols));
  auto segments = DeviceBuffer<int32_t>::Allocate(static_cast<std::size_t>(2 * rows));
  auto plans = DeviceBuffer<SampleRowPlan>::Allocate(static_cast<std::size_t>(rows));
  auto temp = DeviceBuffer<char>::Allocate(std::max<std::size_t>(*temp_bytes, 1));
  RequireOk(keys.status());
  RequireOk(sorted_keys.status());
  RequireOk(ids.status());
  RequireOk(sorted_ids.status());
  RequireOk(segments.status());
  RequireOk(plans.status());
  RequireOk(temp.status());
  const SampleRowsScratch scratch{.keys = keys->data(), .ids = ids->data(), .sorted_keys = sorted_keys->data(),
                                  .sorted_ids = sorted_ids->data(), .segment_begin = segments->data(),
                                  .segment_end = segments->data() + rows, .plans = plans->data(),
                                  .temp = temp->data(), .temp_bytes = *temp_bytes};
  PickScratch host;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  // Which of the pick's sorts the sorting rows took (their plans): rank (at most 1,024
  // candidates), radix (more, up to 4,096), the whole row (SortSegmentsDescending).
  bool saw_rank = false, saw_radix = false, saw_whole = false;
  for (int trial = 0; trial < 8; ++trial) {
    INFO("trial " << trial);
    auto x = Random(static_cast<std::size_t>(rows * cols), 3.0f);
    for (int64_t c = 0; c < cols; ++c) {
      float& v = x[static_cast<std::size_t>(6 * cols + c)];
      v = c % 37 == 5 ? -std::numeric_limits<float>::infinity() : std::round(v * 2.0f) / 2.0f;
    }
    x[static_cast<std::size_t>(2 * cols + 1)] = -0.0f;  // -0 and +0 are one key
    x[static_cast<std::size_t>(2 * cols + 2)] = 0.0f;
    std::vector<TokenRule> rules = kinds;
    std::vector<DeviceTokenRule> device_rules;
    std::vector<int32_t> penalty_ids;
    for (TokenRule& r : rules) {
      r.draw = uniform(Rng());
      DeviceTokenRule d{.draw = r.draw, .temperature = r.temperature, .top_p = r.top_p,
                        .repetition_penalty = r.repetition_penalty, .top_k = r.top_k,
                        .history_begin = static_cast<int32_t>(penalty_ids.size()), .history_end = 0};
      if (r.repetition_penalty != 1.0f) lm2::runtime::AppendDistinctIds(r.history, penalty_ids);  // as the model uploads them
      d.history_end = static_cast<int32_t>(penalty_ids.size());
      device_rules.push_back(d);
    }
    auto dx = Upload(x);
    auto drules = Upload(device_rules);
    auto dhistory = Upload(penalty_ids);
    auto dout = Poisoned<int32_t>(static_cast<std::size_t>(rows));
    RequireOk(SampleRows(dx.data(), rows, cols, drules.data(), dhistory.data(), SampleRowKinds{}, scratch, dout.data(),
                         Stream()));
    const auto got = Download(dout);
    std::vector<SampleRowPlan> row_plans(static_cast<std::size_t>(rows));
    RequireOk(plans->CopyToHost(row_plans.data(), row_plans.size(), Stream()));
    for (int64_t r = 0; r < rows; ++r) {
      INFO("row " << r << " draw " << rules[static_cast<std::size_t>(r)].draw);
      const std::span<const float> row(x.data() + r * cols, static_cast<std::size_t>(cols));
      CHECK(got[static_cast<std::size_t>(r)] == PickToken(row, rules[static_cast<std::size_t>(r)], host));
      if (!rules[static_cast<std::size_t>(r)].sorts()) continue;
      const int32_t n = row_plans[static_cast<std::size_t>(r)].candidates;
      saw_rank = saw_rank || (n >= 0 && n <= 1024);
      saw_radix = saw_radix || n > 1024;
      saw_whole = saw_whole || n < 0;
    }
  }
  CHECK(saw_rank);
  if (cols == 5000) CHECK(saw_radix);
  if (cols == 128256) CHECK(saw_whole);

  // Greedy rows alone (with and without a penalty), their launches skipped as the model
  // skips them: PlanKernel's picks.
  {
    const std::vector<TokenRule> greedy = {TokenRule{.repetition_penalty = 1.5f, .history = history}, TokenRule{},
                                           TokenRule{.repetition_penalty = 0.7f, .history = history}};
    const auto n = static_cast<int64_t>(greedy.size());
    std::vector<DeviceTokenRule> device_rules;
    std::vector<int32_t> penalty_ids;
    for (const TokenRule& r : greedy) {
      DeviceTokenRule d{.repetition_penalty = r.repetition_penalty,
                        .history_begin = static_cast<int32_t>(penalty_ids.size())};
      if (r.repetition_penalty != 1.0f) lm2::runtime::AppendDistinctIds(r.history, penalty_ids);
      d.history_end = static_cast<int32_t>(penalty_ids.size());
      device_rules.push_back(d);
    }
    const auto x = Random(static_cast<std::size_t>(n * cols), 3.0f);
    auto dx = Upload(x);
    auto drules = Upload(device_rules);
    auto dhistory = Upload(penalty_ids);
    auto dout = Poisoned<int32_t>(static_cast<std::size_t>(n));
    RequireOk(SampleRows(dx.data(), n, cols, drules.data(), dhistory.data(),
                         SampleRowKinds{.temperature = false, .sorts = false, .penalty = true}, scratch, dout.data(),
                         Stream()));
    const auto got = Download(dout);
    for (int64_t r = 0; r < n; ++r) {
      INFO("greedy row " << r);
      const std::span<const float> row(x.data() + r * cols, static_cast<std::size_t>(cols));
      CHECK(got[static_cast<std::size_t>(r)] == PickToken(row, greedy[static_cast<std::size_t>(r)], host));
    }
  }
  // A temp buffer below SampleRowsTempBytes is refused before any launch.
  {
    SampleRowsScratch short_temp = scratch;
    short_temp.temp_bytes = 16;
    auto dx = Upload(Random(static_cast<std::size_t>(rows * cols)));
    std::vector<DeviceTokenRule> device_rules(static_cast<std::size_t>(rows), DeviceTokenRule{.temperature = 1.0f});
    auto drules = Upload(device_rules);
    auto dout = Poisoned<int32_t>(static_cast<std::size_t>(rows));
    CHECK(SampleRows(dx.data(), rows, cols, drules.data(), nullptr, SampleRowKinds{.penalty = false}, short_temp,
                     dout.data(), Stream())
              .IsInvalidArgument());
  }
  CHECK(SampleRows(nullptr, 0, cols, nullptr, nullptr, SampleRowKinds{}, scratch, nullptr, Stream()).ok());
  CHECK(SampleRows(nullptr, 1, 0, nullptr, nullptr, SampleRowKinds{}, scratch, nullptr, Stream()).IsInvalidArgument());
  CHECK(SampleRowsTempBytes(70000, 10).status().IsInvalidArgument());
  RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "stream"));
}

TEST_CASE("SortSegmentsDescending: std::stable_sort's descending order, empty segments untouched", "[cuda][ops]") {
  // Rows of a vocabulary's width, each one segment: ties, -inf, -0 and +0, one key, all keys
  // equal, a range not a multiple of the sort's tile, keys that differ in 1, 2 or 3 of the 4
  // radix passes' bytes (the others skipped), and an empty segment.
  const int64_t cols = 128256, rows = 9;
  const auto total = static_cast<std::size_t>(rows * cols);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> keys = Random(total, 3.0f);
  std::vector<int32_t> ids(total);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), Rng());  // distinct ids: the order of ties shows
  std::uniform_int_distribution<int> small(0, 7), wide(0, (1 << 15) - 1);
  std::uniform_real_distribution<float> one_two(1.0f, 2.0f);
  std::vector<int32_t> begin(static_cast<std::size_t>(rows)), end(begin.size());
  for (int64_t r = 0; r < rows; ++r) {
    float* k = keys.data() + r * cols;
    int64_t first = 0, last = cols;
    for (int64_t c = 0; c < cols; ++c) {
      switch (r) {
        case 0: k[c] = std::round(k[c] * 8.0f) / 8.0f; break;  // many ties, both signs
        case 1: if (c % 10 == 3) k[c] = -inf; break;             // -inf among distinct keys
        case 2: {  // -inf, ties, -0 and +0 (one key)
          const float v = std::round(k[c]);
          k[c] = c % 3 == 0 ? -inf : v == 0.0f && c % 2 == 0 ? -0.0f : v;
          break;
        }
        case 3: k[c] = 1.25f; break;                              // all equal
        case 5: k[c] = c % 5 == 0 ? 1.5f : one_two(Rng()); break;  // the top byte alone the same
        case 6: k[c] = 1.0f + static_cast<float>(small(Rng())) / 8.0f; break;  // one byte differs
        case 7: k[c] = 1.0f + static_cast<float>(wide(Rng())) / 32768.0f; break;  // two bytes differ
        default: break;
      }
    }
    if (r == 4) first = 5, last = 6;  // one key
    if (r == 5) first = 100, last = 100 + 2 * 8192 + 37;
    if (r == 8) last = 0;  // empty
    begin[static_cast<std::size_t>(r)] = static_cast<int32_t>(r * cols + first);
    end[static_cast<std::size_t>(r)] = static_cast<int32_t>(r * cols + last);
  }
  // The wanted outputs: every byte 0xFF outside the segments, as the poisoned buffers.
  std::vector<uint32_t> want_bits(total, 0xFFFFFFFFu);
  std::vector<int32_t> want_ids(total, -1);
  std::vector<int32_t> order;
  for (std::size_t r = 0; r < begin.size(); ++r) {
    order.resize(static_cast<std::size_t>(end[r] - begin[r]));
    std::iota(order.begin(), order.end(), begin[r]);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return keys[static_cast<std::size_t>(a)] > keys[static_cast<std::size_t>(b)];
    });
    for (std::size_t j = 0; j < order.size(); ++j) {
      const auto at = static_cast<std::size_t>(begin[r]) + j;
      const float key = keys[static_cast<std::size_t>(order[j])] + 0.0f;  // -0 comes out as +0
      std::memcpy(&want_bits[at], &key, sizeof key);
      want_ids[at] = ids[static_cast<std::size_t>(order[j])];
    }
  }
  std::vector<int32_t> segments = begin;
  segments.insert(segments.end(), end.begin(), end.end());
  auto dkeys = Upload(keys);
  auto dids = Upload(ids);
  auto dsegments = Upload(segments);
  auto sorted_keys = Poisoned<float>(total);
  auto sorted_ids = Poisoned<int32_t>(total);
  auto alt_keys = Poisoned<float>(total);
  auto alt_ids = Poisoned<int32_t>(total);
  const auto n = static_cast<int64_t>(total);
  RequireOk(SortSegmentsDescending(dkeys.data(), dids.data(), n, rows, dsegments.data(), dsegments.data() + rows,
                                   sorted_keys.data(), sorted_ids.data(), alt_keys.data(), alt_ids.data(), Stream()));
  const auto got_keys = Download(sorted_keys);
  std::vector<uint32_t> got_bits(total);
  std::memcpy(got_bits.data(), got_keys.data(), total * sizeof(float));
  const bool keys_equal = got_bits == want_bits, ids_equal = Download(sorted_ids) == want_ids;
  CHECK(keys_equal);
  CHECK(ids_equal);

  CHECK(SortSegmentsDescending(dkeys.data(), dids.data(), -1, rows, dsegments.data(), dsegments.data() + rows,
                               sorted_keys.data(), sorted_ids.data(), alt_keys.data(), alt_ids.data(), Stream())
            .IsInvalidArgument());
  CHECK(SortSegmentsDescending(dkeys.data(), dids.data(), n, rows, dsegments.data(), dsegments.data() + rows,
                               sorted_keys.data(), sorted_ids.data(), nullptr, alt_ids.data(), Stream())
            .IsInvalidArgument());
  CHECK(SortSegmentsDescending(nullptr, nullptr, 0, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, Stream())
            .ok());
  RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "stream"));
}

TEST_CASE("RmsNorm", "[cuda][ops]") {
  const auto [rows, d] = GENERATE(std::make_pair(int64_t{1}, int64_t{7}), std::make_pair(int64_t{5}, int64_t{96}),
                                  std::make_pair(int64_t{3}, int64_t{2048}),
                                  std::make_pair(int64_t{17}, int64_t{4097}),
                                  std::make_pair(int64_t{64}, int64_t{8192}));
  INFO("rows=" << rows << " d=" << d);
  const float eps = 1e-5f;
  auto x = Random(static_cast<std::size_t>(rows * d), 3.0f), w = Random(static_cast<std::size_t>(d));
  std::vector<double> want(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[r * d + i]) * x[r * d + i];
    const double s = 1.0 / std::sqrt(ss / static_cast<double>(d) + 1e-5);
    for (int64_t i = 0; i < d; ++i) want[r * d + i] = x[r * d + i] * s * w[i];
  }
  auto dx = Upload(x), dw = Upload(w);
  auto dy = Poisoned<float>(x.size());
  RequireOk(RmsNorm(dx.data(), dw.data(), rows, d, eps, dy.data(), Stream()));
  CHECK(RelErr(Download(dy), want) < kTolF32);
  // in place (out aliases x)
  RequireOk(RmsNorm(dx.data(), dw.data(), rows, d, eps, dx.data(), Stream()));
  CHECK(RelErr(Download(dx), want) < kTolF32);
}

TEST_CASE("Rope rotates pairs (i, i + D/2) by pos * theta^(-2i/D)", "[cuda][ops]") {
  const auto [rows, heads, D] = GENERATE(std::make_tuple(int64_t{1}, int64_t{1}, int64_t{2}),
                                         std::make_tuple(int64_t{6}, int64_t{3}, int64_t{16}),
                                         std::make_tuple(int64_t{5}, int64_t{8}, int64_t{128}),
                                         std::make_tuple(int64_t{3}, int64_t{5}, int64_t{70}),
                                         std::make_tuple(int64_t{33}, int64_t{32}, int64_t{64}));
  const double theta = GENERATE(10000.0, 500000.0);
  INFO("rows=" << rows << " heads=" << heads << " D=" << D << " theta=" << theta);
  auto x = Random(static_cast<std::size_t>(rows * heads * D));
  std::uniform_int_distribution<int64_t> pos_dist(1, 131071);
  // Random positions, the first at 0 when there are several (a single row at 0 would be a
  // rotation by nothing, which a kernel that never ran would pass).
  std::vector<int64_t> pos(static_cast<std::size_t>(rows), 0);
  for (std::size_t i = rows > 1 ? 1 : 0; i < pos.size(); ++i) pos[i] = pos_dist(Rng());
  std::vector<double> want(x.size());
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double ang = static_cast<double>(pos[t]) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
        const std::size_t a = (t * heads + h) * D + i, b = a + D / 2;
        want[a] = x[a] * std::cos(ang) - x[b] * std::sin(ang);
        want[b] = x[b] * std::cos(ang) + x[a] * std::sin(ang);
      }
  auto dx = Upload(x);
  auto dpos = Upload(pos);
  RequireOk(Rope(dx.data(), rows, heads, D, dpos.data(), theta, Stream()));
  CHECK(RelErr(Download(dx), want) < kTolF32);
}

TEST_CASE("CausalAttention: decode and prefill kernels, GQA, over a KV cache", "[cuda][ops]") {
  // {T, S, heads, kv_heads, head_dim}
  const auto [T, S, H, Hkv, D] = GENERATE(
      std::make_tuple(int64_t{1}, int64_t{1}, int64_t{1}, int64_t{1}, int64_t{8}),
      std::make_tuple(int64_t{1}, int64_t{9}, int64_t{6}, int64_t{2}, int64_t{8}),
      std::make_tuple(int64_t{1}, int64_t{300}, int64_t{32}, int64_t{8}, int64_t{128}),
      std::make_tuple(int64_t{1}, int64_t{1000}, int64_t{8}, int64_t{1}, int64_t{64}),
      std::make_tuple(int64_t{4}, int64_t{4}, int64_t{4}, int64_t{4}, int64_t{64}),
      std::make_tuple(int64_t{5}, int64_t{12}, int64_t{6}, int64_t{2}, int64_t{8}),
      std::make_tuple(int64_t{37}, int64_t{37}, int64_t{8}, int64_t{2}, int64_t{64}),
      std::make_tuple(int64_t{33}, int64_t{100}, int64_t{12}, int64_t{3}, int64_t{128}),
      std::make_tuple(int64_t{70}, int64_t{70}, int64_t{4}, int64_t{1}, int64_t{96}),
      std::make_tuple(int64_t{17}, int64_t{50}, int64_t{3}, int64_t{3}, int64_t{40}),
      std::make_tuple(int64_t{16}, int64_t{16}, int64_t{2}, int64_t{1}, int64_t{256}),
      // several 64-query and 64-key tiles, a context longer than the chunk, odd widths
      std::make_tuple(int64_t{130}, int64_t{300}, int64_t{8}, int64_t{2}, int64_t{64}),
      // at head width 64 the tiled kernel's 64-query blocks (where they fit two waves, as in
      // the shapes above) and, up to 143 multiprocessors, 128-query blocks unpaired
      std::make_tuple(int64_t{300}, int64_t{310}, int64_t{8}, int64_t{2}, int64_t{64}),
      std::make_tuple(int64_t{520}, int64_t{600}, int64_t{36}, int64_t{4}, int64_t{64}),
      std::make_tuple(int64_t{64}, int64_t{64}, int64_t{4}, int64_t{4}, int64_t{16}),
      std::make_tuple(int64_t{100}, int64_t{229}, int64_t{6}, int64_t{3}, int64_t{30}),
      std::make_tuple(int64_t{129}, int64_t{129}, int64_t{4}, int64_t{2}, int64_t{128}),
      // more query blocks x heads than two waves' worth up to 143 multiprocessors: the tiled
      // kernel pairs them from both ends (9 blocks: the middle one alone), a first chunk and
      // one after a cache
      std::make_tuple(int64_t{1100}, int64_t{1100}, int64_t{32}, int64_t{8}, int64_t{64}),
      std::make_tuple(int64_t{1030}, int64_t{1290}, int64_t{36}, int64_t{4}, int64_t{64}));
  INFO("T=" << T << " S=" << S << " H=" << H << " Hkv=" << Hkv << " D=" << D);
  auto q = Random(static_cast<std::size_t>(T * H * D)), k = Random(static_cast<std::size_t>(S * Hkv * D)),
       v = Random(static_cast<std::size_t>(S * Hkv * D));
  const auto want = lm2::testing::CausalAttentionReference(q, k, v, T, S, H, Hkv, D);
  auto dq = Upload(q), dk = Upload(k), dv = Upload(v);
  using Fn = lm2::Status (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                             float*, cudaStream_t);
  const std::pair<const char*, Fn> kernels[] = {
      {"CausalAttention", &CausalAttention},
      {"CausalAttentionDecode", &CausalAttentionDecode},
      {"CausalAttentionPrefill", &CausalAttentionPrefill}};
  for (const auto& [name, fn] : kernels) {
    INFO(name);
    auto dout = Poisoned<float>(q.size());
    RequireOk(fn(dq.data(), dk.data(), dv.data(), T, S, H, Hkv, D, dout.data(), Stream()));
    CHECK(RelErr(Download(dout), want) < kTolReduce);
  }
  // The cuBLAS form: scores in a poisoned scratch (every entry, masked ones too, is written).
  INFO("CausalAttentionGemm");
  auto scores = Poisoned<float>(static_cast<std::size_t>(H * T * S));
  auto dout = Poisoned<float>(q.size());
  RequireOk(CausalAttentionGemm(Cublas(), dq.data(), dk.data(), dv.data(), T, S, H, Hkv, D, scores.data(), dout.data(),
                                Stream()));
  CHECK(RelErr(Download(dout), want) < kTolTf32);
  if (CausalAttentionTiledSupported(D)) {  // tensor cores: bf16 operands, over the cache rounded to bf16
    INFO("CausalAttentionTiled");
    auto kb = Poisoned<__nv_bfloat16>(k.size()), vb = Poisoned<__nv_bfloat16>(v.size());
    RequireOk(ConvertF32ToBf16(dk.data(), S * Hkv * D, kb.data(), Stream()));
    RequireOk(ConvertF32ToBf16(dv.data(), S * Hkv * D, vb.data(), Stream()));
    auto tout = Poisoned<float>(q.size());
    RequireOk(CausalAttentionTiled(dq.data(), kb.data(), vb.data(), T, S, H, Hkv, D, tout.data(), Stream()));
    CHECK(RelErr(Download(tout), want) < kTolBf16Operands);
    // The bf16 output: the fp32 one rounded as ConvertF32ToBf16 rounds it.
    auto bout = Poisoned<__nv_bfloat16>(q.size()), want_b = Poisoned<__nv_bfloat16>(q.size());
    RequireOk(CausalAttentionTiled(dq.data(), kb.data(), vb.data(), T, S, H, Hkv, D, bout.data(), Stream()));
    RequireOk(ConvertF32ToBf16(tout.data(), T * H * D, want_b.data(), Stream()));
    const auto a = Download(want_b), b = Download(bout);
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(__nv_bfloat16)) == 0);
  }
}

// A memory read's inputs (q [T, d] fp32, memory K and V [N, d] in bf16 on the device) and
// its double reference (probabilities [heads, T, N], e [T, d]) from the rounded K and V.
struct MemoryReadCase {
  DeviceBuffer<float> q;
  DeviceBuffer<__nv_bfloat16> k, v;
  std::vector<double> attn, e;
};

MemoryReadCase MakeMemoryReadCase(int64_t T, int64_t N, int64_t d, int64_t Hm) {
  const int64_t dh = d / Hm;
  auto q = Random(static_cast<std::size_t>(T * d)), mk = Random(static_cast<std::size_t>(N * d)),
       mv = Random(static_cast<std::size_t>(N * d));
  MemoryReadCase c{Upload(q), Poisoned<__nv_bfloat16>(mk.size()), Poisoned<__nv_bfloat16>(mv.size()), {}, {}};
  auto dmk32 = Upload(mk), dmv32 = Upload(mv);
  RequireOk(ConvertF32ToBf16(dmk32.data(), N * d, c.k.data(), Stream()));
  RequireOk(ConvertF32ToBf16(dmv32.data(), N * d, c.v.data(), Stream()));
  RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "convert"));  // the fp32 copies are freed next
  for (auto* m : {&mk, &mv}) {
    for (float& x : *m) x = RoundBf16(x);
  }
  c.attn.assign(static_cast<std::size_t>(Hm * T * N), 0.0);
  c.e.assign(static_cast<std::size_t>(T * d), 0.0);
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double dot = 0;
        for (int64_t i = 0; i < dh; ++i) dot += static_cast<double>(q[t * d + j * dh + i]) * mk[n * d + j * dh + i];
        c.attn[(j * T + t) * N + n] = dot / std::sqrt(static_cast<double>(dh));
      }
  SoftmaxRows(c.attn, static_cast<std::size_t>(Hm * T), static_cast<std::size_t>(N));
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < dh; ++i)
          c.e[t * d + j * dh + i] += c.attn[(j * T + t) * N + n] * mv[n * d + j * dh + i];
  return c;
}

TEST_CASE("MemoryRead: softmax over slots per memory head, attention-weighted values", "[cuda][ops]") {
  // {T, N, d, heads}
  const auto [T, N, d, Hm] = GENERATE(std::make_tuple(int64_t{1}, int64_t{12}, int64_t{16}, int64_t{4}),
                                      std::make_tuple(int64_t{5}, int64_t{12}, int64_t{16}, int64_t{4}),
                                      std::make_tuple(int64_t{7}, int64_t{33}, int64_t{96}, int64_t{3}),
                                      std::make_tuple(int64_t{3}, int64_t{2048}, int64_t{256}, int64_t{8}),
                                      std::make_tuple(int64_t{1}, int64_t{2048}, int64_t{2048}, int64_t{32}),
                                      std::make_tuple(int64_t{1}, int64_t{13}, int64_t{48}, int64_t{2}),
                                      std::make_tuple(int64_t{2}, int64_t{509}, int64_t{2048}, int64_t{16}));
  INFO("T=" << T << " N=" << N << " d=" << d << " heads=" << Hm);
  auto c = MakeMemoryReadCase(T, N, d, Hm);
  auto dattn = Poisoned<float>(c.attn.size()), de = Poisoned<float>(c.e.size());
  auto read_b = Poisoned<__nv_bfloat16>(static_cast<std::size_t>(MemoryReadScratch(T, N, d, Hm)));
  RequireOk(MemoryRead(Cublas(), c.q.data(), d, c.k.data(), c.v.data(), T, N, d, Hm, dattn.data(), de.data(),
                       read_b.data(), Stream()));
  CHECK(RelErr(Download(dattn), c.attn) < kTolBf16Operands);
  CHECK(RelErr(Download(de), c.e) < kTolBf16Operands);
}

// The decode kernels (q, scores and probabilities in fp32), without cuBLAS: racecheck runs
// this case (tools/device/run_gpu_tests.sh).
TEST_CASE("MemoryReadOneToken: the decode read kernels", "[cuda][ops]") {
  // {N, d, heads}: the one-pass read (dh / 8 a power of two: 8 ... 256, slot tails, d up to
  // 2048) and the general one (dh 4, 24; d 4096, once a launch failure of the one-pass read).
  const auto [N, d, Hm] = GENERATE(std::make_tuple(int64_t{12}, int64_t{16}, int64_t{4}),
                                   std::make_tuple(int64_t{100}, int64_t{4096}, int64_t{16}),
                                   std::make_tuple(int64_t{2048}, int64_t{2048}, int64_t{16}),
                                   std::make_tuple(int64_t{2048}, int64_t{2048}, int64_t{32}),
                                   std::make_tuple(int64_t{509}, int64_t{512}, int64_t{8}),
                                   std::make_tuple(int64_t{13}, int64_t{48}, int64_t{2}),
                                   std::make_tuple(int64_t{5000}, int64_t{256}, int64_t{8}),
                                   std::make_tuple(int64_t{700}, int64_t{64}, int64_t{8}),
                                   std::make_tuple(int64_t{300}, int64_t{512}, int64_t{2}));
  INFO("N=" << N << " d=" << d << " heads=" << Hm);
  auto c = MakeMemoryReadCase(1, N, d, Hm);
  auto dattn = Poisoned<float>(c.attn.size()), de = Poisoned<float>(c.e.size());
  auto scratch = Poisoned<float>(static_cast<std::size_t>(MemoryReadDecodeScratch(1, N, d, Hm)));
  RequireOk(MemoryReadOneToken(c.q.data(), d, c.k.data(), c.v.data(), N, d, Hm, dattn.data(), de.data(),
                               scratch.data(), Stream()));
  CHECK(RelErr(Download(dattn), c.attn) < kTolReduce);
  CHECK(RelErr(Download(de), c.e) < kTolReduce);
}

TEST_CASE("Memory write: streamed sums, write update, gated commit", "[cuda][ops]") {
  // {T1, T2, N, d, heads}: AccumulateWrite runs twice (T1 tokens, then T2) onto nonzero sums.
  const auto [T1, T2, N, d, Hm] = GENERATE(
      std::make_tuple(int64_t{1}, int64_t{1}, int64_t{12}, int64_t{16}, int64_t{4}),
      std::make_tuple(int64_t{3}, int64_t{2}, int64_t{33}, int64_t{96}, int64_t{3}),
      std::make_tuple(int64_t{40}, int64_t{24}, int64_t{256}, int64_t{512}, int64_t{8}),
      std::make_tuple(int64_t{1}, int64_t{7}, int64_t{2048}, int64_t{2048}, int64_t{16}));
  INFO("T1=" << T1 << " T2=" << T2 << " N=" << N << " d=" << d << " heads=" << Hm);
  const int64_t T = T1 + T2, dh = d / Hm;
  // attn[j, t, :] is a distribution over the slots, as MemoryRead produces.
  std::vector<double> a_d(static_cast<std::size_t>(Hm * T * N));
  {
    const auto r = Random(a_d.size(), 2.0f);
    for (std::size_t i = 0; i < a_d.size(); ++i) a_d[i] = r[i];
    SoftmaxRows(a_d, static_cast<std::size_t>(Hm * T), static_cast<std::size_t>(N));
  }
  std::vector<float> attn1(static_cast<std::size_t>(Hm * T1 * N)), attn2(static_cast<std::size_t>(Hm * T2 * N));
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        const auto a = static_cast<float>(a_d[(j * T + t) * N + n]);
        (t < T1 ? attn1[(j * T1 + t) * N + n] : attn2[(j * T2 + t - T1) * N + n]) = a;
      }
  auto offer = Random(static_cast<std::size_t>(T * d));
  auto mass0 = Random(static_cast<std::size_t>(Hm * N)), acc0 = Random(static_cast<std::size_t>(N * d));
  for (auto& m : mass0) m = std::abs(m);
  std::vector<double> want_mass(mass0.begin(), mass0.end()), want_acc(acc0.begin(), acc0.end());
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        const double a = t < T1 ? attn1[(j * T1 + t) * N + n] : attn2[(j * T2 + t - T1) * N + n];
        want_mass[j * N + n] += a;
        for (int64_t c = 0; c < dh; ++c) want_acc[n * d + j * dh + c] += a * offer[t * d + j * dh + c];
      }
  auto dattn1 = Upload(attn1), dattn2 = Upload(attn2), doffer = Upload(offer);
  auto dmass = Upload(mass0), dacc = Upload(acc0);
  RequireOk(AccumulateWrite(Cublas(), dattn1.data(), doffer.data(), d, T1, N, d, Hm, dmass.data(), dacc.data(), Stream()));
  RequireOk(AccumulateWrite(Cublas(), dattn2.data(), doffer.data() + T1 * d, d, T2, N, d, Hm, dmass.data(), dacc.data(), Stream()));
  RequireOk(AccumulateWrite(Cublas(), dattn2.data(), doffer.data(), d, 0, N, d, Hm, dmass.data(), dacc.data(), Stream()));  // no-op
  const auto mass = Download(dmass), acc = Download(dacc);
  CHECK(RelErr(mass, want_mass) < kTolReduce);
  CHECK(RelErr(acc, want_acc) < kTolTf32);
  if (T1 == 1) {  // the decode kernel on the first token alone: fp32
    auto m1 = Upload(mass0), a1 = Upload(acc0);
    RequireOk(AccumulateWriteOneToken(dattn1.data(), doffer.data(), N, d, Hm, m1.data(), a1.data(), Stream()));
    std::vector<double> wm(mass0.begin(), mass0.end()), wa(acc0.begin(), acc0.end());
    for (int64_t j = 0; j < Hm; ++j)
      for (int64_t n = 0; n < N; ++n) {
        const double a = attn1[j * N + n];
        wm[j * N + n] += a;
        for (int64_t c = 0; c < dh; ++c) wa[n * d + j * dh + c] += a * offer[j * dh + c];
      }
    CHECK(RelErr(Download(m1), wm) < kTolF32);
    CHECK(RelErr(Download(a1), wa) < kTolF32);
  }

  // u from the device's sums (so this checks WriteUpdate alone), with its bf16 rounding.
  auto du = Poisoned<float>(acc.size());
  auto du_b = Poisoned<__nv_bfloat16>(acc.size());
  RequireOk(WriteUpdate(dmass.data(), dacc.data(), N, d, Hm, du.data(), du_b.data(), Stream()));
  std::vector<double> want_u(acc.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < Hm; ++j)
      for (int64_t c = 0; c < dh; ++c)
        want_u[n * d + j * dh + c] = static_cast<double>(acc[n * d + j * dh + c]) / (mass[j * N + n] + 1.0);
  const auto u = Download(du);
  CHECK(RelErr(u, want_u) < kTolF32);
  const auto u_b = Download(du_b);
  std::size_t wrong_b = 0;
  for (std::size_t i = 0; i < u.size(); ++i) wrong_b += Bits(u_b[i]) != Bf16Bits(u[i]) ? 1 : 0;
  CHECK(wrong_b == 0);

  // The gated commit with the gates' biases [d] broadcast over the slots; the same bits as
  // AddBias first.
  auto in_pre = Random(u.size(), 2.0f), f_pre = Random(u.size(), 2.0f), bank = Random(u.size());
  auto in_b = Random(static_cast<std::size_t>(d)), f_b = Random(static_cast<std::size_t>(d));
  auto din = Upload(in_pre), dfg = Upload(f_pre), dbank = Upload(bank), dinb = Upload(in_b), dfb = Upload(f_b);
  RequireOk(GatedMemoryUpdate(du.data(), din.data(), dinb.data(), dfg.data(), dfb.data(), N, d, dbank.data(), Stream()));
  std::vector<double> want_bank(u.size());
  for (std::size_t i = 0; i < u.size(); ++i) {
    const std::size_t c = i % static_cast<std::size_t>(d);
    want_bank[i] = Sig(static_cast<double>(in_pre[i]) + in_b[c]) * std::tanh(static_cast<double>(u[i])) +
                   Sig(static_cast<double>(f_pre[i]) + f_b[c]) * bank[i];
  }
  const auto got_bank = Download(dbank);
  CHECK(RelErr(got_bank, want_bank) < kTolF32);
  auto zero = Upload(std::vector<float>(static_cast<std::size_t>(d), 0.0f));
  auto dbank2 = Upload(bank);
  RequireOk(AddBias(din.data(), N, d, dinb.data(), Stream()));
  RequireOk(AddBias(dfg.data(), N, d, dfb.data(), Stream()));
  RequireOk(GatedMemoryUpdate(du.data(), din.data(), zero.data(), dfg.data(), zero.data(), N, d, dbank2.data(), Stream()));
  CHECK(Download(dbank2) == got_bank);
}

TEST_CASE("MemoryReadWrite: the read and the write sums in tiles, without the probabilities", "[cuda][ops]") {
  // {T, N, d, heads, ramp}: head widths 16 / 12 (element loads: not 8-aligned) / 24 (padded
  // to 32) / 96 (padded to 128) / 128 / 64; token and slot counts off the 64-row tiles. On
  // sm_90 the mma.sync read of few (tokens, head) pairs is split over clusters of blocks
  // (ReadSplits): 2 (65 tokens, N 100), 4 (N 200 at width 16; N 300 at width 128: 5 tiles,
  // uneven). Head width 64 runs the wgmma kernels on compute capability 9.0
  // (memory_tiled_sm90.cu): the read a block per 64 tokens over 128-slot stages of a
  // three-stage ring (N 129 and 200: one valid slot, 72, in the last stage; 600 and 2,048:
  // the ring wraps), its blocks of padding rows only (64, 33, 130 and 700 tokens) staging
  // the write's rows and leaving. `ramp` scales slot n's keys by 1 + 8 n / N and q by 2, so
  // that the row maxima grow stage by stage past the online softmax's slack: the read
  // rescales its output while the product before is in flight.
  const auto [T, N, d, Hm, ramp] =
      GENERATE(std::make_tuple(int64_t{2}, int64_t{12}, int64_t{64}, int64_t{4}, false),
               std::make_tuple(int64_t{5}, int64_t{20}, int64_t{36}, int64_t{3}, false),
               std::make_tuple(int64_t{65}, int64_t{100}, int64_t{48}, int64_t{2}, false),
               std::make_tuple(int64_t{7}, int64_t{33}, int64_t{192}, int64_t{2}, false),
               std::make_tuple(int64_t{130}, int64_t{64}, int64_t{256}, int64_t{2}, false),
               std::make_tuple(int64_t{64}, int64_t{129}, int64_t{256}, int64_t{4}, false),
               std::make_tuple(int64_t{33}, int64_t{200}, int64_t{64}, int64_t{4}, false),
               std::make_tuple(int64_t{40}, int64_t{300}, int64_t{256}, int64_t{2}, false),
               std::make_tuple(int64_t{100}, int64_t{600}, int64_t{1024}, int64_t{16}, false),
               std::make_tuple(int64_t{130}, int64_t{2048}, int64_t{2048}, int64_t{32}, false),
               std::make_tuple(int64_t{700}, int64_t{200}, int64_t{2048}, int64_t{32}, false),
               std::make_tuple(int64_t{1100}, int64_t{129}, int64_t{1024}, int64_t{16}, false),
               std::make_tuple(int64_t{100}, int64_t{600}, int64_t{1024}, int64_t{16}, true),
               std::make_tuple(int64_t{70}, int64_t{300}, int64_t{128}, int64_t{2}, true));
  INFO("T=" << T << " N=" << N << " d=" << d << " heads=" << Hm << " ramp=" << ramp);
  REQUIRE(MemoryReadWriteSupported(d, Hm));
  // q and offer rows inside wider rows, as in the model's projection; for odd T rows 2 floats
  // off 16-byte alignment, so that the read stages them element by element (StageRowsByPieces).
  const int64_t dh = d / Hm, ld = d + 24 + 2 * (T % 2);
  auto q = Random(static_cast<std::size_t>(T * ld)), offer = Random(static_cast<std::size_t>(T * ld));
  auto mk = Random(static_cast<std::size_t>(N * d)), mv = Random(static_cast<std::size_t>(N * d));
  if (ramp) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < d; ++c) mk[n * d + c] *= 1.0f + 8.0f * static_cast<float>(n) / static_cast<float>(N);
    for (float& v : q) v *= 2.0f;
  }
  auto mass0 = Random(static_cast<std::size_t>(Hm * N)), acc0 = Random(static_cast<std::size_t>(N * d));
  for (auto& m : mass0) m = std::abs(m);
  auto dmk32 = Upload(mk), dmv32 = Upload(mv);
  auto dmk = Poisoned<__nv_bfloat16>(mk.size()), dmv = Poisoned<__nv_bfloat16>(mv.size());
  RequireOk(ConvertF32ToBf16(dmk32.data(), N * d, dmk.data(), Stream()));
  RequireOk(ConvertF32ToBf16(dmv32.data(), N * d, dmv.data(), Stream()));
  // The reference takes the kernel's bf16 operands: memory K/V, q and the offer rounded.
  for (auto* m : {&mk, &mv, &q, &offer}) {
    for (float& v : *m) v = RoundBf16(v);
  }
  std::vector<double> want_e(static_cast<std::size_t>(T * d), 0.0), want_mass(mass0.begin(), mass0.end()),
      want_acc(acc0.begin(), acc0.end()), a(static_cast<std::size_t>(N));
  for (int64_t j = 0; j < Hm; ++j)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t n = 0; n < N; ++n) {
        double dot = 0;
        for (int64_t c = 0; c < dh; ++c) dot += static_cast<double>(q[t * ld + j * dh + c]) * mk[n * d + j * dh + c];
        a[n] = dot / std::sqrt(static_cast<double>(dh));
      }
      SoftmaxRows(a, 1, static_cast<std::size_t>(N));
      for (int64_t n = 0; n < N; ++n) {
        want_mass[j * N + n] += a[n];
        for (int64_t c = 0; c < dh; ++c) {
          want_e[t * d + j * dh + c] += a[n] * mv[n * d + j * dh + c];
          want_acc[n * d + j * dh + c] += a[n] * offer[t * ld + j * dh + c];
        }
      }
    }
  auto dq = Upload(q), doffer = Upload(offer), dmass = Upload(mass0), dacc = Upload(acc0);
  auto de = Poisoned<float>(want_e.size());
  auto scratch = Poisoned<float>(static_cast<std::size_t>(MemoryReadWriteScratch(T, d, Hm)));
  RequireOk(MemoryReadWrite(dq.data(), ld, doffer.data(), ld, dmk.data(), dmv.data(), T, N, d, Hm, de.data(), true,
                            dmass.data(), dacc.data(), scratch.data(), Stream()));
  // e and acc: sums of products with the probabilities rounded to bf16 (2^-9 each); the
  // masses: fp32 probabilities.
  CHECK(RelErr(Download(de), want_e) < kTolBf16Operands);
  CHECK(RelErr(Download(dmass), want_mass) < kTolReduce);
  CHECK(RelErr(Download(dacc), want_acc) < kTolBf16Operands);
  // What the sums gained, alone (the starting values would hide a small error in them).
  CHECK(GainError(Download(dacc), acc0, want_acc) < kTolBf16Operands);
  CHECK(GainError(Download(dmass), mass0, want_mass) < 1e-4);

  // accumulate = false into poisoned sums: the bits of adding to zeroed ones.
  const auto e = Download(de);
  auto zmass = Poisoned<float>(mass0.size()), zacc = Poisoned<float>(acc0.size());
  RequireOk(zmass.FillBytes(0, Stream()));
  RequireOk(zacc.FillBytes(0, Stream()));
  auto smass = Poisoned<float>(mass0.size()), sacc = Poisoned<float>(acc0.size());
  RequireOk(MemoryReadWrite(dq.data(), ld, doffer.data(), ld, dmk.data(), dmv.data(), T, N, d, Hm, de.data(), true,
                            zmass.data(), zacc.data(), scratch.data(), Stream()));
  RequireOk(MemoryReadWrite(dq.data(), ld, doffer.data(), ld, dmk.data(), dmv.data(), T, N, d, Hm, de.data(), false,
                            smass.data(), sacc.data(), scratch.data(), Stream()));
  const auto zm = Download(zmass), sm = Download(smass), za = Download(zacc), sa = Download(sacc);
  CHECK(std::memcmp(zm.data(), sm.data(), zm.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(za.data(), sa.data(), za.size() * sizeof(float)) == 0);
  CHECK(Download(de) == e);

  // The read and the write as two calls (MemoryReadWriteParts; defer_memory_write): the bits
  // of one call, e from the first, the stored sums from the second. The read also leaves e
  // in bf16 (the wgmma read from its own stores, the others by a conversion): the bits
  // ConvertF32ToBf16 gives.
  auto pe = Poisoned<float>(want_e.size());
  auto pe_b = Poisoned<__nv_bfloat16>(want_e.size()), want_e_b = Poisoned<__nv_bfloat16>(want_e.size());
  auto pmass = Poisoned<float>(mass0.size()), pacc = Poisoned<float>(acc0.size());
  RequireOk(MemoryReadWrite(dq.data(), ld, doffer.data(), ld, dmk.data(), dmv.data(), T, N, d, Hm, pe.data(), false,
                            pmass.data(), pacc.data(), scratch.data(), Stream(), MemoryReadWriteParts::kRead,
                            pe_b.data()));
  const bool read_alone_same_e = Download(pe) == e;
  CHECK(read_alone_same_e);
  RequireOk(ConvertF32ToBf16(pe.data(), T * d, want_e_b.data(), Stream()));
  const auto got_e_b = Download(pe_b), wanted_e_b = Download(want_e_b);
  CHECK(std::memcmp(got_e_b.data(), wanted_e_b.data(), got_e_b.size() * sizeof(__nv_bfloat16)) == 0);
  // A bf16 e two bytes off 16-byte alignment: the read stays the same kernel (e's bits
  // unchanged) and e_bf16 is converted after it.
  auto odd_e_b = Poisoned<__nv_bfloat16>(want_e.size() + 1);
  RequireOk(MemoryReadWrite(dq.data(), ld, doffer.data(), ld, dmk.data(), dmv.data(), T, N, d, Hm, pe.data(), false,
                            pmass.data(), pacc.data(), scratch.data(), Stream(), MemoryReadWriteParts::kRead,
                            odd_e_b.data() + 1));
  const bool odd_bf16_same_e = Download(pe) == e;
  CHECK(odd_bf16_same_e);
  const auto got_odd = Download(odd_e_b);
  CHECK(std::memcmp(got_odd.data() + 1, wanted_e_b.data(), wanted_e_b.size() * sizeof(__nv_bfloat16)) == 0);
  RequireOk(MemoryReadWrite(dq.data(), ld, doffer.data(), ld, dmk.data(), dmv.data(), T, N, d, Hm, pe.data(), false,
                            pmass.data(), pacc.data(), scratch.data(), Stream(), MemoryReadWriteParts::kWrite));
  const auto pm = Download(pmass), pa = Download(pacc);
  CHECK(std::memcmp(pm.data(), sm.data(), pm.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(pa.data(), sa.data(), pa.size() * sizeof(float)) == 0);
}

TEST_CASE("GatedResidual, SwiGlu, AddInPlace, AddBias", "[cuda][ops]") {
  const int64_t n = GENERATE(1, 257, 4096, 100003);  // 4096: the four-element kernels
  INFO("n=" << n);
  const auto un = static_cast<std::size_t>(n);
  auto h = Random(un), a = Random(un), g = Random(un, 2.0f), e = Random(un), up = Random(un);
  auto dh = Upload(h), da = Upload(a), dg = Upload(g), de = Upload(e), dup = Upload(up);
  std::vector<double> want(un);

  {  // GatedResidual over [3, n] rows, the gate's bias (n) broadcast over them.
    const std::size_t rows = 3;
    auto h3 = Random(rows * un), a3 = Random(rows * un), g3 = Random(rows * un, 2.0f), e3 = Random(rows * un);
    auto dh3 = Upload(h3), da3 = Upload(a3), dg3 = Upload(g3), de3 = Upload(e3);
    RequireOk(GatedResidual(dh3.data(), da3.data(), dg3.data(), dup.data(), static_cast<int64_t>(rows), n, de3.data(),
                            Stream()));
    std::vector<double> want3(rows * un);
    for (std::size_t i = 0; i < rows * un; ++i) {
      want3[i] = static_cast<double>(h3[i]) + a3[i] + Sig(static_cast<double>(g3[i]) + up[i % un]) * e3[i];
    }
    CHECK(RelErr(Download(dh3), want3) < kTolF32);
  }

  auto dout = Poisoned<float>(un);
  RequireOk(SwiGlu(dg.data(), dup.data(), n, dout.data(), Stream()));
  for (std::size_t i = 0; i < un; ++i) want[i] = g[i] * Sig(g[i]) * up[i];
  CHECK(RelErr(Download(dout), want) < kTolF32);
  RequireOk(SwiGlu(dg.data(), dup.data(), n, dg.data(), Stream()));  // out aliases gate
  CHECK(RelErr(Download(dg), want) < kTolF32);

  auto dx = Upload(a);
  RequireOk(AddInPlace(dx.data(), de.data(), n, Stream()));
  for (std::size_t i = 0; i < un; ++i) want[i] = static_cast<double>(a[i]) + e[i];
  CHECK(RelErr(Download(dx), want) < kTolF32);

  // AddBias over [rows, out] with out = n and rows = 3.
  const int64_t rows = 3;
  auto y = Random(un * 3);
  auto dy = Upload(y);
  RequireOk(AddBias(dy.data(), rows, n, de.data(), Stream()));
  std::vector<double> want_y(y.size());
  for (std::size_t r = 0; r < 3; ++r)
    for (std::size_t i = 0; i < un; ++i) want_y[r * un + i] = static_cast<double>(y[r * un + i]) + e[i];
  CHECK(RelErr(Download(dy), want_y) < kTolF32);
}

TEST_CASE("EmbeddingLookup widens the bf16 rows of the ids; a bad id gives NaN, not a stray read", "[cuda][ops]") {
  const int64_t V = 301, d = GENERATE(int64_t{7}, int64_t{256}, int64_t{2049});
  INFO("d=" << d);
  const auto table_f = Random(static_cast<std::size_t>(V * d), 3.0f);
  std::vector<uint16_t> bits(table_f.size());
  for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = Bf16Bits(table_f[i]);
  std::vector<__nv_bfloat16> table(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = bits[i];
    table[i] = raw;
  }
  const std::vector<int32_t> ids = {0, 300, 17, 17, 5, -1, 301};
  const auto T = static_cast<int64_t>(ids.size());
  auto dt = Upload(table);
  auto di = Upload(ids);
  auto out = Poisoned<float>(static_cast<std::size_t>(T * d));
  RequireOk(EmbeddingLookup(dt.data(), V, d, di.data(), T, out.data(), Stream()));
  const auto got = Download(out);
  std::size_t wrong = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < d; ++c) {
      const float g = got[static_cast<std::size_t>(t * d + c)];
      if (ids[static_cast<std::size_t>(t)] < 0 || ids[static_cast<std::size_t>(t)] >= V) {
        if (!std::isnan(g)) ++wrong;
      } else if (g != Bf16Value(bits[static_cast<std::size_t>(ids[static_cast<std::size_t>(t)] * d + c)])) {
        ++wrong;
      }
    }
  }
  CHECK(wrong == 0);
  CHECK_FALSE(EmbeddingLookup(dt.data(), V, d, nullptr, T, out.data(), Stream()).ok());
  CHECK(EmbeddingLookup(dt.data(), V, d, di.data(), 0, out.data(), Stream()).ok());
}

TEST_CASE("GatedResidualRmsNormBf16 equals GatedResidual then RmsNormBf16, bit for bit", "[cuda][ops]") {
  // 2048: the model's rows, a piece of 8 columns a thread (kThreads = 256); 4088: two
  // pieces for most threads; 40: most threads without one; 36 (not a multiple of 8) and
  // 4104 (over two pieces a thread) by the unfused pair.
  const int64_t d = GENERATE(int64_t{2048}, int64_t{4088}, int64_t{40}, int64_t{36}, int64_t{4104});
  const int64_t rows = GENERATE(int64_t{1}, int64_t{5});
  INFO("d=" << d << " rows=" << rows);
  const auto n = static_cast<std::size_t>(rows * d);
  const auto h = Random(n), a = Random(n), g = Random(n, 3.0f), e = Random(n), bias = Random(static_cast<std::size_t>(d)),
             w = Random(static_cast<std::size_t>(d));
  auto dh_want = Upload(h), dh_got = Upload(h);
  auto da = Upload(a), dg = Upload(g), de = Upload(e), dbias = Upload(bias), dw = Upload(w);
  auto want = Poisoned<__nv_bfloat16>(n), got = Poisoned<__nv_bfloat16>(n);
  RequireOk(GatedResidual(dh_want.data(), da.data(), dg.data(), dbias.data(), rows, d, de.data(), Stream()));
  RequireOk(RmsNormBf16(dh_want.data(), dw.data(), rows, d, 1e-5f, want.data(), Stream()));
  RequireOk(GatedResidualRmsNormBf16(dh_got.data(), da.data(), dg.data(), dbias.data(), rows, d, de.data(), dw.data(),
                                     1e-5f, got.data(), Stream()));
  const auto h_want = Download(dh_want), h_got = Download(dh_got);
  CHECK(std::memcmp(h_want.data(), h_got.data(), n * sizeof(float)) == 0);
  const auto b_want = Download(want), b_got = Download(got);
  CHECK(std::memcmp(b_want.data(), b_got.data(), n * sizeof(__nv_bfloat16)) == 0);
  CHECK(h_got != h);  // (the residual was added)

  CHECK(GatedResidualRmsNormBf16(dh_got.data(), da.data(), dg.data(), dbias.data(), rows, d, de.data(), nullptr,
                                 1e-5f, got.data(), Stream())
            .IsInvalidArgument());  // no norm weight
  CHECK(GatedResidualRmsNormBf16(dh_got.data(), da.data(), dg.data(), dbias.data(), rows, 0, de.data(), dw.data(),
                                 1e-5f, got.data(), Stream())
            .IsInvalidArgument());  // no width
}

TEST_CASE("Fused forms: RmsNormBf16, SplitQkvRope, SwiGluBf16 equal the unfused ops", "[cuda][ops]") {
  const int64_t rows = GENERATE(int64_t{1}, int64_t{7});
  const int64_t F = GENERATE(int64_t{33}, int64_t{64});  // 64: SwiGluBf16's four-element kernel
  // Trailing columns of proj: 5 (rows not 16-byte aligned: SplitQkvRope's scalar kernel) or
  // 4 (its four-pair kernel).
  const int64_t trailing = GENERATE(int64_t{5}, int64_t{4});
  const int64_t H = 6, Hkv = 2, D = 16, d = 40;
  const int64_t qdim = H * D, kvdim = Hkv * D, P = qdim + 2 * kvdim + trailing;
  INFO("rows=" << rows << " F=" << F << " trailing=" << trailing);
  const auto ur = static_cast<std::size_t>(rows);
  // RmsNormBf16 = bf16(RmsNorm).
  auto x = Random(ur * d), w = Random(static_cast<std::size_t>(d));
  auto dx = Upload(x), dw = Upload(w);
  auto ref = Poisoned<float>(x.size());
  RequireOk(RmsNorm(dx.data(), dw.data(), rows, d, 1e-5f, ref.data(), Stream()));
  auto ref_b = Poisoned<__nv_bfloat16>(x.size()), got_b = Poisoned<__nv_bfloat16>(x.size());
  RequireOk(ConvertF32ToBf16(ref.data(), rows * d, ref_b.data(), Stream()));
  RequireOk(RmsNormBf16(dx.data(), dw.data(), rows, d, 1e-5f, got_b.data(), Stream()));
  auto want_bits = Download(ref_b), got_bits = Download(got_b);
  CHECK(std::memcmp(want_bits.data(), got_bits.data(), want_bits.size() * sizeof(__nv_bfloat16)) == 0);

  // SplitQkvRope = split + Rope on q and k, positions 5, 6, ...
  auto proj = Random(ur * P);
  std::vector<int64_t> pos(ur);
  for (std::size_t t = 0; t < ur; ++t) pos[t] = 5 + static_cast<int64_t>(t);
  std::vector<float> q(ur * qdim), k(ur * kvdim), v(ur * kvdim);
  for (std::size_t t = 0; t < ur; ++t) {
    std::copy_n(proj.begin() + static_cast<std::ptrdiff_t>(t * P), qdim, q.begin() + static_cast<std::ptrdiff_t>(t * qdim));
    std::copy_n(proj.begin() + static_cast<std::ptrdiff_t>(t * P + qdim), kvdim, k.begin() + static_cast<std::ptrdiff_t>(t * kvdim));
    std::copy_n(proj.begin() + static_cast<std::ptrdiff_t>(t * P + qdim + kvdim), kvdim, v.begin() + static_cast<std::ptrdiff_t>(t * kvdim));
  }
  auto dproj = Upload(proj), dq = Upload(q), dk = Upload(k);
  auto dpos = Upload(pos);
  RequireOk(Rope(dq.data(), rows, H, D, dpos.data(), 10000.0, Stream()));
  RequireOk(Rope(dk.data(), rows, Hkv, D, dpos.data(), 10000.0, Stream()));
  auto gq = Poisoned<float>(q.size()), gk = Poisoned<float>(k.size()), gv = Poisoned<float>(v.size());
  auto factors = Poisoned<float2>(ur * D / 2);  // the table SplitQkvRope rotates by: Rope's factors
  RequireOk(RopeFactorsBatch(dpos.data(), rows, D, 10000.0, factors.data(), Stream()));
  RequireOk(SplitQkvRope(dproj.data(), rows, P, H, Hkv, D, factors.data(), gq.data(), gk.data(), gv.data(), Stream()));
  CHECK(Download(gq) == Download(dq));
  CHECK(Download(gk) == Download(dk));
  CHECK(Download(gv) == v);
  // With bf16 copies: the same fp32 rows, and the copies as ConvertF32ToBf16 rounds them.
  auto kb = Poisoned<__nv_bfloat16>(k.size()), vb = Poisoned<__nv_bfloat16>(v.size());
  auto want_kb = Poisoned<__nv_bfloat16>(k.size()), want_vb = Poisoned<__nv_bfloat16>(v.size());
  auto gk2 = Poisoned<float>(k.size()), gv2 = Poisoned<float>(v.size());
  RequireOk(SplitQkvRope(dproj.data(), rows, P, H, Hkv, D, factors.data(), gq.data(), gk2.data(), gv2.data(), Stream(),
                         kb.data(), vb.data()));
  CHECK(Download(gk2) == Download(dk));
  CHECK(Download(gv2) == v);
  RequireOk(ConvertF32ToBf16(gk2.data(), rows * kvdim, want_kb.data(), Stream()));
  RequireOk(ConvertF32ToBf16(gv2.data(), rows * kvdim, want_vb.data(), Stream()));
  for (auto [got_dev, want_dev] : {std::pair{&kb, &want_kb}, std::pair{&vb, &want_vb}}) {
    const auto got_copy = Download(*got_dev), want_copy = Download(*want_dev);
    CHECK(std::memcmp(got_copy.data(), want_copy.data(), got_copy.size() * sizeof(__nv_bfloat16)) == 0);
  }
  CHECK(SplitQkvRope(dproj.data(), rows, P, H, Hkv, D, factors.data(), gq.data(), gk2.data(), gv2.data(), Stream(),
                     kb.data(), nullptr)
            .IsInvalidArgument());  // one bf16 copy without the other
  CHECK(SplitQkvRope(dproj.data(), rows, qdim, H, Hkv, D, factors.data(), gq.data(), gk.data(), gv.data(), Stream())
            .IsInvalidArgument());  // proj_ld narrower than q | k | v
  CHECK(SplitQkvRope(dproj.data(), rows, P, H, Hkv, D, nullptr, gq.data(), gk.data(), gv.data(), Stream())
            .IsInvalidArgument());  // no factors

  // SwiGluBf16 = bf16(SwiGlu(gate, up)) over [gate | up] rows.
  auto gu = Random(ur * 2 * F, 2.0f);
  std::vector<float> gate(ur * F), up(ur * F);
  for (std::size_t t = 0; t < ur; ++t)
    for (std::size_t c = 0; c < static_cast<std::size_t>(F); ++c) {
      gate[t * F + c] = gu[t * 2 * F + c];
      up[t * F + c] = gu[t * 2 * F + F + c];
    }
  auto dgate = Upload(gate), dup = Upload(up), dgu = Upload(gu);
  auto sw = Poisoned<float>(gate.size());
  RequireOk(SwiGlu(dgate.data(), dup.data(), rows * F, sw.data(), Stream()));
  auto sw_b = Poisoned<__nv_bfloat16>(gate.size()), fused = Poisoned<__nv_bfloat16>(gate.size());
  RequireOk(ConvertF32ToBf16(sw.data(), rows * F, sw_b.data(), Stream()));
  RequireOk(SwiGluBf16(dgu.data(), rows, F, fused.data(), Stream()));
  auto a = Download(sw_b), b = Download(fused);
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(__nv_bfloat16)) == 0);

  // From bf16 [gate | up] rows (64: the eight-element kernel) = the fp32 form over the same
  // rows widened (bf16 -> fp32 is exact).
  auto gu_b = Poisoned<__nv_bfloat16>(gu.size());
  RequireOk(ConvertF32ToBf16(dgu.data(), rows * 2 * F, gu_b.data(), Stream()));
  std::vector<float> gu_wide;
  for (__nv_bfloat16 x_b : Download(gu_b)) gu_wide.push_back(__bfloat162float(x_b));
  auto dgu_wide = Upload(gu_wide);
  auto want_b = Poisoned<__nv_bfloat16>(gate.size()), from_b = Poisoned<__nv_bfloat16>(gate.size());
  RequireOk(SwiGluBf16(dgu_wide.data(), rows, F, want_b.data(), Stream()));
  RequireOk(SwiGluBf16(gu_b.data(), rows, F, from_b.data(), Stream()));
  auto c = Download(want_b), e = Download(from_b);
  CHECK(std::memcmp(c.data(), e.data(), c.size() * sizeof(__nv_bfloat16)) == 0);
  CHECK(SwiGluBf16(gu_b.data(), rows, 0, from_b.data(), Stream()).IsInvalidArgument());
}

TEST_CASE("Batched decode ops over per-session caches equal the one-cache ops", "[cuda][ops]") {
  const int64_t H = 8, Hkv = 2, D = 64, kvdim = Hkv * D, qdim = H * D, P = qdim + 2 * kvdim;
  const std::vector<int64_t> pos = {0, 5, 130, 17};  // each session's position (its cache length before)
  const auto B = static_cast<int64_t>(pos.size());
  std::vector<DeviceBuffer<float>> kc, vc;
  std::vector<float*> kptr, vptr;
  for (int64_t p : pos) {
    kc.push_back(Upload(Random(static_cast<std::size_t>((p + 1) * kvdim))));
    vc.push_back(Upload(Random(static_cast<std::size_t>((p + 1) * kvdim))));
    kptr.push_back(kc.back().data());
    vptr.push_back(vc.back().data());
  }
  auto dk = Upload(kptr), dv = Upload(vptr);
  auto dpos = Upload(pos);
  auto proj = Random(static_cast<std::size_t>(B * P));
  auto dproj = Upload(proj);
  auto q = Poisoned<float>(static_cast<std::size_t>(B * qdim));
  auto factors = Poisoned<float2>(static_cast<std::size_t>(B * D / 2));
  RequireOk(RopeFactorsBatch(dpos.data(), B, D, 10000.0, factors.data(), Stream()));
  RequireOk(SplitQkvRopeBatch(dproj.data(), B, P, H, Hkv, D, dpos.data(), factors.data(), q.data(), dk.data(),
                              dv.data(), Stream()));
  auto out = Poisoned<float>(static_cast<std::size_t>(B * qdim));
  RequireOk(CausalAttentionDecodeBatch(q.data(), reinterpret_cast<const float* const*>(dk.data()),
                                       reinterpret_cast<const float* const*>(dv.data()), dpos.data(), B, H, Hkv, D,
                                       out.data(), /*split_scratch=*/nullptr, 0, Stream()));
  const auto got = Download(out);
  const auto got_q = Download(q);
  for (int64_t b = 0; b < B; ++b) {
    INFO("session " << b);
    // The same row through the one-cache ops: k and v into a copy of that cache, then decode.
    const auto ub = static_cast<std::size_t>(b);
    std::vector<float> k_host(static_cast<std::size_t>((pos[ub] + 1) * kvdim));
    std::vector<float> v_host(k_host.size());
    RequireOk(kc[ub].CopyToHost(k_host.data(), k_host.size(), Stream()));
    RequireOk(vc[ub].CopyToHost(v_host.data(), v_host.size(), Stream()));
    auto k1 = Upload(k_host), v1 = Upload(v_host);
    auto q1 = Poisoned<float>(static_cast<std::size_t>(qdim));
    auto one_pos = Upload(std::vector<int64_t>{pos[ub]});
    auto one_factors = Poisoned<float2>(static_cast<std::size_t>(D / 2));
    RequireOk(RopeFactorsBatch(one_pos.data(), 1, D, 10000.0, one_factors.data(), Stream()));
    auto proj1 = Upload(std::vector<float>(proj.begin() + b * P, proj.begin() + (b + 1) * P));
    RequireOk(SplitQkvRope(proj1.data(), 1, P, H, Hkv, D, one_factors.data(), q1.data(), k1.data() + pos[ub] * kvdim,
                           v1.data() + pos[ub] * kvdim, Stream()));
    auto o1 = Poisoned<float>(static_cast<std::size_t>(qdim));
    RequireOk(CausalAttentionDecode(q1.data(), k1.data(), v1.data(), 1, pos[ub] + 1, H, Hkv, D, o1.data(), Stream()));
    const auto want_q = Download(q1);
    const auto want = Download(o1);
    CHECK(std::equal(want_q.begin(), want_q.end(), got_q.begin() + b * qdim));
    CHECK(std::equal(want.begin(), want.end(), got.begin() + b * qdim));
    const auto k_after = Download(k1);
    CHECK(k_after == k_host);  // the batch op wrote the same row into the session's cache
  }
}

// Groups of 4, 1, 3, 2 and 8 query heads a KV head; 12 rows take the unsplit kernel's form
// with fewer warps (past kGemvMaxRows, never split).
TEST_CASE("RopeAttentionDecodeBatch (with RopeFactorsBatch) equals SplitQkvRopeBatch then CausalAttentionDecodeBatch, bit for bit",
          "[cuda][ops]") {
  const auto [H, Hkv, D] = GENERATE(std::make_tuple(int64_t{8}, int64_t{2}, int64_t{64}),
                                    std::make_tuple(int64_t{4}, int64_t{4}, int64_t{48}),
                                    std::make_tuple(int64_t{6}, int64_t{2}, int64_t{128}),
                                    std::make_tuple(int64_t{2}, int64_t{1}, int64_t{256}),
                                    std::make_tuple(int64_t{8}, int64_t{1}, int64_t{32}));
  const bool split = GENERATE(false, true);  // both ops split over key ranges (one scratch), or neither
  const std::size_t n_rows = GENERATE(std::size_t{6}, std::size_t{12});
  INFO("H=" << H << " Hkv=" << Hkv << " D=" << D << " split=" << split << " rows=" << n_rows);
  static_assert(kGemvMaxRows < 12);
  const int64_t kvdim = Hkv * D, qdim = H * D, P = qdim + 2 * kvdim + 24;  // proj rows carry more after v
  std::vector<int64_t> pos = {0, 5, 130, 17, 63, 2048, 1, 64, 129, 300, 7, 1000};
  pos.resize(n_rows);
  const auto B = static_cast<int64_t>(pos.size());
  // Two copies of every session's cache (filled up to its position; its row `pos` poisoned).
  std::vector<DeviceBuffer<float>> caches[2][2];
  std::vector<float*> ptrs[2][2];
  for (int64_t p : pos) {
    for (int kv = 0; kv < 2; ++kv) {
      auto rows = Random(static_cast<std::size_t>((p + 1) * kvdim));
      std::fill(rows.begin() + p * kvdim, rows.end(), std::numeric_limits<float>::quiet_NaN());
      for (int copy = 0; copy < 2; ++copy) {
        caches[copy][kv].push_back(Upload(rows));
        ptrs[copy][kv].push_back(caches[copy][kv].back().data());
      }
    }
  }
  auto dk0 = Upload(ptrs[0][0]), dv0 = Upload(ptrs[0][1]), dk1 = Upload(ptrs[1][0]), dv1 = Upload(ptrs[1][1]);
  auto dpos = Upload(pos);
  auto dproj = Upload(Random(static_cast<std::size_t>(B * P)));
  auto q = Poisoned<float>(static_cast<std::size_t>(B * qdim));
  auto want = Poisoned<float>(static_cast<std::size_t>(B * qdim));
  auto got = Poisoned<float>(static_cast<std::size_t>(B * qdim));
  auto factors = Poisoned<float2>(static_cast<std::size_t>(B * D / 2));
  RequireOk(RopeFactorsBatch(dpos.data(), B, D, 500000.0, factors.data(), Stream()));
  RequireOk(SplitQkvRopeBatch(dproj.data(), B, P, H, Hkv, D, dpos.data(), factors.data(), q.data(), dk0.data(),
                              dv0.data(), Stream()));
  auto scratch = Poisoned<float>(static_cast<std::size_t>(AttentionDecodeSplitScratch(H, D)));
  RequireOk(scratch.FillBytes(0, Stream()));
  float* split_scratch = split ? scratch.data() : nullptr;
  const int64_t max_keys = *std::max_element(pos.begin(), pos.end()) + 1;
  RequireOk(CausalAttentionDecodeBatch(q.data(), reinterpret_cast<const float* const*>(dk0.data()),
                                       reinterpret_cast<const float* const*>(dv0.data()), dpos.data(), B, H, Hkv, D,
                                       want.data(), split_scratch, max_keys, Stream()));
  RequireOk(RopeAttentionDecodeBatch(dproj.data(), P, dpos.data(), factors.data(), dk1.data(), dv1.data(), B, H, Hkv,
                                     D, got.data(), split_scratch, max_keys, Stream()));
  const auto w = Download(want), g = Download(got);
  CHECK(std::memcmp(w.data(), g.data(), w.size() * sizeof(float)) == 0);
  for (std::size_t b = 0; b < pos.size(); ++b) {
    for (int kv = 0; kv < 2; ++kv) {
      INFO("session " << b << (kv == 0 ? " keys" : " values"));
      const auto a = Download(caches[0][kv][b]), c = Download(caches[1][kv][b]);
      CHECK(std::memcmp(a.data(), c.data(), a.size() * sizeof(float)) == 0);  // the new row too (no NaN left)
      CHECK(std::none_of(c.begin(), c.end(), [](float x) { return std::isnan(x); }));
    }
  }
  CHECK(RopeAttentionDecodeBatch(dproj.data(), qdim, dpos.data(), factors.data(), dk1.data(), dv1.data(), B, H, Hkv,
                                 D, got.data(), split_scratch, max_keys, Stream())
            .IsInvalidArgument());  // proj_ld narrower than q | k | v
  CHECK(RopeAttentionDecodeBatch(nullptr, P, nullptr, nullptr, nullptr, nullptr, 0, H, Hkv, D, nullptr, nullptr, 0,
                                 Stream())
            .ok());
  CHECK(RopeFactorsBatch(dpos.data(), B, 7, 1e4, factors.data(), Stream()).IsInvalidArgument());  // odd head_dim
}

// 8 rows of groups of 4 query heads take the packed blocks (a KV head's 4 query heads a block),
// their rows alone a block a head: "the same bits alone" checks the packing too.
TEST_CASE("Decode attention split over key ranges: the reference's result, a row's bits at any batch size",
          "[cuda][ops]") {
  const auto [H, Hkv, D] = GENERATE(std::make_tuple(int64_t{8}, int64_t{2}, int64_t{64}),
                                    std::make_tuple(int64_t{4}, int64_t{1}, int64_t{128}),
                                    std::make_tuple(int64_t{2}, int64_t{2}, int64_t{256}));
  INFO("H=" << H << " Hkv=" << Hkv << " D=" << D);
  CHECK(AttentionDecodePacksHeads(H, Hkv) == (H / Hkv == 4));
  // Which decode steps split their attention: the GEMV path's, and up to 4 rows where a block
  // packs a KV head's 4 query heads (32 / 8 heads), not 2 (8 / 4).
  CHECK(SplitsDecodeAttention(2, 2, 32, 8));
  CHECK(SplitsDecodeAttention(4, 2, 32, 8));
  CHECK_FALSE(SplitsDecodeAttention(5, 2, 32, 8));
  CHECK_FALSE(SplitsDecodeAttention(3, 2, 8, 4));
  CHECK(SplitsDecodeAttention(8, 8, 8, 4));
  CHECK_FALSE(SplitsDecodeAttention(kGemvMaxRows + 1, kGemvMaxRows, 32, 8));
  CHECK(AttentionDecodePacksHeads(32, 4));
  CHECK_FALSE(AttentionDecodePacksHeads(6, 3));
  const int64_t kvdim = Hkv * D, qdim = H * D;
  // Rows of one range (up to 128 keys), of two, of several, of 16 with the last ones empty
  // (2,049 keys: 16 ranges of 192), and of 16 full ones: kGemvMaxRows rows in all.
  const std::vector<int64_t> pos = {0, 127, 128, 300, 1000, 2048, 4000, 5};
  const auto B = static_cast<int64_t>(pos.size());
  REQUIRE(B == kGemvMaxRows);
  std::vector<std::vector<float>> k_host, v_host;
  std::vector<DeviceBuffer<float>> kc, vc;
  std::vector<const float*> kptr, vptr;
  for (int64_t p : pos) {
    k_host.push_back(Random(static_cast<std::size_t>((p + 1) * kvdim)));
    v_host.push_back(Random(static_cast<std::size_t>((p + 1) * kvdim)));
    kc.push_back(Upload(k_host.back()));
    vc.push_back(Upload(v_host.back()));
    kptr.push_back(kc.back().data());
    vptr.push_back(vc.back().data());
  }
  auto dk = Upload(kptr), dv = Upload(vptr);
  auto dpos = Upload(pos);
  const auto q = Random(static_cast<std::size_t>(B * qdim));
  auto dq = Upload(q);
  // The scratch's counters zero (its first kGemvMaxRows x H words: B rows' are the first
  // B x H), its partial sums poisoned: every range writes its own before the merge reads it.
  const int64_t counters = kGemvMaxRows * H;
  auto scratch = Poisoned<float>(static_cast<std::size_t>(AttentionDecodeSplitScratch(H, D)));
  RequireOk(CudaStatus(cudaMemsetAsync(scratch.data(), 0, static_cast<std::size_t>(counters) * 4, Stream()), "zero"));
  const int64_t max_keys = *std::max_element(pos.begin(), pos.end()) + 1;
  auto out = Poisoned<float>(static_cast<std::size_t>(B * qdim)), plain = Poisoned<float>(out.size()),
       looped = Poisoned<float>(out.size());
  RequireOk(CausalAttentionDecodeBatch(dq.data(), dk.data(), dv.data(), dpos.data(), B, H, Hkv, D, out.data(),
                                       scratch.data(), max_keys, Stream()));
  RequireOk(CausalAttentionDecodeBatch(dq.data(), dk.data(), dv.data(), dpos.data(), B, H, Hkv, D, plain.data(),
                                       nullptr, 0, Stream()));
  // A grid sized for shorter rows than these (a block a row and head): its blocks loop over
  // the ranges, the same work in the same order.
  RequireOk(CausalAttentionDecodeBatch(dq.data(), dk.data(), dv.data(), dpos.data(), B, H, Hkv, D, looped.data(),
                                       scratch.data(), 1, Stream()));
  const auto got = Download(out), unsplit = Download(plain);
  CHECK(Download(looped) == got);
  const auto left = Download(scratch);
  CHECK(std::all_of(left.begin(), left.begin() + counters, [](float c) { return c == 0.0f; }));  // zero again
  for (int64_t b = 0; b < B; ++b) {
    const auto ub = static_cast<std::size_t>(b);
    INFO("row " << b << ": " << pos[ub] + 1 << " keys");
    const std::vector<float> qb(q.begin() + b * qdim, q.begin() + (b + 1) * qdim);
    const auto want = lm2::testing::CausalAttentionReference(qb, k_host[ub], v_host[ub], 1, pos[ub] + 1, H, Hkv, D);
    const std::vector<float> row(got.begin() + b * qdim, got.begin() + (b + 1) * qdim);
    CHECK(RelErr(row, want) < kTolReduce);
    if (pos[ub] + 1 <= 128) CHECK(std::equal(row.begin(), row.end(), unsplit.begin() + b * qdim));
    // The same row alone (a batch of one, the same scratch again): the same bits.
    auto one = Poisoned<float>(static_cast<std::size_t>(qdim));
    auto dk1 = Upload(std::vector<const float*>{kptr[ub]}), dv1 = Upload(std::vector<const float*>{vptr[ub]});
    auto pos1 = Upload(std::vector<int64_t>{pos[ub]});
    RequireOk(CausalAttentionDecodeBatch(dq.data() + b * qdim, dk1.data(), dv1.data(), pos1.data(), 1, H, Hkv, D,
                                         one.data(), scratch.data(), pos[ub] + 1, Stream()));
    const auto alone = Download(one);
    CHECK(std::equal(alone.begin(), alone.end(), row.begin()));
    // The same row over its cache as a single one (a prompt's last row in its last layer).
    auto single = Poisoned<float>(static_cast<std::size_t>(qdim));
    RequireOk(CausalAttentionDecodeSplit(dq.data() + b * qdim, kptr[ub], vptr[ub], 1, pos[ub] + 1, H, Hkv, D,
                                         single.data(), scratch.data(), Stream()));
    CHECK(Download(single) == alone);
  }
  // Two rows at the end of one cache (query t at position S - 2 + t), split: the reference's.
  const auto longest = static_cast<std::size_t>(std::max_element(pos.begin(), pos.end()) - pos.begin());
  const std::vector<float> q2(q.begin(), q.begin() + 2 * qdim);
  auto two = Poisoned<float>(q2.size());
  RequireOk(CausalAttentionDecodeSplit(dq.data(), kptr[longest], vptr[longest], 2, pos[longest] + 1, H, Hkv, D,
                                       two.data(), scratch.data(), Stream()));
  CHECK(RelErr(Download(two), lm2::testing::CausalAttentionReference(q2, k_host[longest], v_host[longest], 2,
                                                                     pos[longest] + 1, H, Hkv, D)) < kTolReduce);
  const auto after = Download(scratch);
  CHECK(std::all_of(after.begin(), after.begin() + counters, [](float c) { return c == 0.0f; }));
  CHECK(CausalAttentionDecodeSplit(dq.data(), kptr[0], vptr[0], kGemvMaxRows + 1, 100, H, Hkv, D, two.data(),
                                   scratch.data(), Stream())
            .IsInvalidArgument());
  CHECK(CausalAttentionDecodeSplit(dq.data(), kptr[0], vptr[0], 1, 1, H, Hkv, D, two.data(), nullptr, Stream())
            .IsInvalidArgument());
}

TEST_CASE("Batched memory decode ops equal the one-session ops per session", "[cuda][ops]") {
  // The one-pass read (dh = 32), the general one (dh = 24), and the paper's head shape at
  // N = 2000 (a ragged last chunk) for 8 sessions, whose streamed read takes runs of several
  // chunks a block (about one wave of blocks: 2 or more chunks each on any GPU of fewer than
  // 333 multiprocessors, three 64 KiB blocks an SM) and must give the one-pass read's bits,
  // which the one-session calls below use; and for 12 sessions, whose streamed blocks merge
  // their runs' chunks (kMergeRunMinSessions: another summation order, fp32 rounding apart).
  const auto [N, d, Hm, B] =
      GENERATE(std::make_tuple(int64_t{300}, int64_t{128}, int64_t{4}, int64_t{3}),
               std::make_tuple(int64_t{37}, int64_t{96}, int64_t{4}, int64_t{3}),
               std::make_tuple(int64_t{2000}, int64_t{2048}, int64_t{32}, int64_t{8}),
               std::make_tuple(int64_t{2000}, int64_t{2048}, int64_t{32}, int64_t{12}));
  const bool same_bits = B <= kGemvMaxRows;
  const int64_t ld = d + 40;  // q and offer rows ld apart
  INFO("N=" << N << " d=" << d << " heads=" << Hm << " B=" << B);
  std::vector<DeviceBuffer<__nv_bfloat16>> mk, mv;
  std::vector<DeviceBuffer<float>> mass, acc;
  std::vector<const __nv_bfloat16*> kp, vp;
  std::vector<float*> mp, ap;
  std::vector<std::vector<float>> mass0, acc0;
  for (int64_t b = 0; b < B; ++b) {
    for (auto* m : {&mk, &mv}) {
      auto f = Upload(Random(static_cast<std::size_t>(N * d)));
      m->push_back(Poisoned<__nv_bfloat16>(static_cast<std::size_t>(N * d)));
      RequireOk(ConvertF32ToBf16(f.data(), N * d, m->back().data(), Stream()));
      RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "convert"));  // f is freed next
    }
    mass0.push_back(Random(static_cast<std::size_t>(Hm * N)));
    acc0.push_back(Random(static_cast<std::size_t>(N * d)));
    mass.push_back(Upload(mass0.back()));
    acc.push_back(Upload(acc0.back()));
    kp.push_back(mk.back().data());
    vp.push_back(mv.back().data());
    mp.push_back(mass.back().data());
    ap.push_back(acc.back().data());
  }
  auto dkp = Upload(kp), dvp = Upload(vp);
  auto dmp = Upload(mp), dap = Upload(ap);
  const auto rows = Random(static_cast<std::size_t>(B * ld));  // q rows; reused as the write offers
  auto drows = Upload(rows);
  auto attn = Poisoned<float>(static_cast<std::size_t>(B * Hm * N)), e = Poisoned<float>(static_cast<std::size_t>(B * d));
  auto scratch = Poisoned<float>(static_cast<std::size_t>(MemoryReadDecodeScratch(B, N, d, Hm)));
  RequireOk(MemoryReadBatch(drows.data(), ld, dkp.data(), dvp.data(), B, N, d, Hm, attn.data(), e.data(),
                            scratch.data(), nullptr, Stream()));
  // Stage each session's write terms in slot b of 3 (zeroed) slots, then flush all 3 slots:
  // the sums must equal the immediate one-token update (TF32 GEMM vs fp32).
  const int64_t kSlots = 3;
  std::vector<DeviceBuffer<float>> pend_a, pend_o;
  std::vector<float*> pap, pop;
  for (int64_t b = 0; b < B; ++b) {
    pend_a.push_back(Upload(std::vector<float>(static_cast<std::size_t>(kSlots * Hm * N), 0.0f)));
    pend_o.push_back(Upload(std::vector<float>(static_cast<std::size_t>(kSlots * d), 0.0f)));
    pap.push_back(pend_a.back().data());
    pop.push_back(pend_o.back().data());
  }
  auto dpap = Upload(pap), dpop = Upload(pop);
  std::vector<int64_t> slots(static_cast<std::size_t>(B));
  for (int64_t b = 0; b < B; ++b) slots[static_cast<std::size_t>(b)] = b % kSlots;
  auto dslots = Upload(slots);
  RequireOk(StageWriteBatch(attn.data(), drows.data(), ld, B, N, d, Hm, dslots.data(), dpap.data(), dpop.data(),
                            dmp.data(), Stream()));
  // The read with the staging fused in leaves the same staged terms, masses and outputs.
  {
    std::vector<DeviceBuffer<float>> fa, fo, fm;
    std::vector<float*> fap, fop, fmp;
    for (int64_t b = 0; b < B; ++b) {
      fa.push_back(Upload(std::vector<float>(static_cast<std::size_t>(kSlots * Hm * N), 0.0f)));
      fo.push_back(Upload(std::vector<float>(static_cast<std::size_t>(kSlots * d), 0.0f)));
      fm.push_back(Upload(mass0[static_cast<std::size_t>(b)]));
      fap.push_back(fa.back().data());
      fop.push_back(fo.back().data());
      fmp.push_back(fm.back().data());
    }
    auto dfap = Upload(fap), dfop = Upload(fop), dfmp = Upload(fmp);
    const MemoryStage stage{.offer = drows.data(), .offer_ld = ld, .slots = dslots.data(),
                            .pending_attn = dfap.data(), .pending_offer = dfop.data(), .mass = dfmp.data()};
    auto attn2 = Poisoned<float>(static_cast<std::size_t>(B * Hm * N)), e2 = Poisoned<float>(static_cast<std::size_t>(B * d));
    RequireOk(MemoryReadBatch(drows.data(), ld, dkp.data(), dvp.data(), B, N, d, Hm, attn2.data(), e2.data(),
                              scratch.data(), &stage, Stream()));
    CHECK(Download(e2) == Download(e));
    for (int64_t b = 0; b < B; ++b) {
      const auto ub = static_cast<std::size_t>(b);
      CHECK(Download(fa[ub]) == Download(pend_a[ub]));
      CHECK(Download(fo[ub]) == Download(pend_o[ub]));
      CHECK(Download(fm[ub]) == Download(mass[ub]));
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    RequireOk(FlushStagedWrites(Cublas(), pap[static_cast<std::size_t>(b)], pop[static_cast<std::size_t>(b)], kSlots,
                                N, d, Hm, ap[static_cast<std::size_t>(b)], Stream()));
  }
  const auto got_attn = Download(attn), got_e = Download(e);
  for (int64_t b = 0; b < B; ++b) {
    INFO("session " << b);
    const auto ub = static_cast<std::size_t>(b);
    auto a1 = Poisoned<float>(static_cast<std::size_t>(Hm * N)), e1 = Poisoned<float>(static_cast<std::size_t>(d));
    RequireOk(MemoryReadOneToken(drows.data() + b * ld, ld, kp[ub], vp[ub], N, d, Hm, a1.data(), e1.data(),
                                 scratch.data(), Stream()));
    const auto want_attn = Download(a1), want_e = Download(e1);
    if (same_bits) {
      CHECK(std::equal(want_attn.begin(), want_attn.end(), got_attn.begin() + b * Hm * N));
      CHECK(std::equal(want_e.begin(), want_e.end(), got_e.begin() + b * d));
    } else {
      const std::vector<float> attn_b(got_attn.begin() + b * Hm * N, got_attn.begin() + (b + 1) * Hm * N);
      const std::vector<float> e_b(got_e.begin() + b * d, got_e.begin() + (b + 1) * d);
      CHECK(RelErr(attn_b, std::vector<double>(want_attn.begin(), want_attn.end())) < kTolReduce);
      CHECK(RelErr(e_b, std::vector<double>(want_e.begin(), want_e.end())) < kTolReduce);
    }
    auto m1 = Upload(mass0[ub]), c1 = Upload(acc0[ub]);
    RequireOk(AccumulateWriteOneToken(a1.data(), drows.data() + b * ld, N, d, Hm, m1.data(), c1.data(), Stream()));
    if (same_bits) {
      CHECK(Download(m1) == Download(mass[ub]));
    } else {
      const auto one = Download(m1);
      CHECK(RelErr(Download(mass[ub]), std::vector<double>(one.begin(), one.end())) < kTolReduce);
    }
    std::vector<double> want_acc;
    for (float v : Download(c1)) want_acc.push_back(v);
    CHECK(RelErr(Download(acc[ub]), want_acc) < kTolTf32);
  }
}

TEST_CASE("Decode steps staging their queries: the flushed write sums are the read's, a flush empties its slots",
          "[cuda][ops]") {
  // MemoryStage::staged: each step's read leaves its tokens' bf16 q, offer and softmax shift in
  // a staging slot; FlushStagedTokens adds their write terms with the tiled write kernel. Head
  // widths 32 and 16 (mma.sync write kernel) and the paper's 64 at N = 2000, 8 and 12
  // sessions (streamed read, merging its runs at 12; the wgmma write kernel on compute
  // capability 9.0). Seven steps into 5
  // slots: 5 flushed, then 2, so a slot left over from the first flush would add its token
  // twice. The reference: the read's probabilities from the fp32 query (the contract's A)
  // and the bf16 memory K, the unrounded offers.
  const auto [N, d, Hm, B] = GENERATE(std::make_tuple(int64_t{300}, int64_t{128}, int64_t{4}, int64_t{3}),
                                      std::make_tuple(int64_t{100}, int64_t{64}, int64_t{4}, int64_t{2}),
                                      std::make_tuple(int64_t{2000}, int64_t{2048}, int64_t{32}, int64_t{8}),
                                      std::make_tuple(int64_t{2000}, int64_t{2048}, int64_t{32}, int64_t{12}));
  INFO("N=" << N << " d=" << d << " heads=" << Hm << " B=" << B);
  REQUIRE(DecodeStagesTokens(d, Hm));
  const int64_t dh = d / Hm, ld = d + 40, kCapacity = 5, kSteps = 7;
  std::vector<DeviceBuffer<__nv_bfloat16>> mk, mv;
  std::vector<DeviceBuffer<float>> mass, acc;
  // Every session's slots in one buffer, emptied by one call (as a state's memory layers').
  const int64_t per_session = StagedTokensFloats(kCapacity, d, Hm);
  auto staged = Poisoned<float>(static_cast<std::size_t>(B * per_session));
  RequireOk(ClearStagedTokens(staged.data(), B, kCapacity, d, Hm, Stream()));
  std::vector<std::vector<float>> mk_host, mass0, acc0;
  std::vector<const __nv_bfloat16*> kp, vp;
  std::vector<float*> sp;
  for (int64_t b = 0; b < B; ++b) {
    for (auto* m : {&mk, &mv}) {
      auto f = Random(static_cast<std::size_t>(N * d));
      auto df = Upload(f);
      m->push_back(Poisoned<__nv_bfloat16>(f.size()));
      RequireOk(ConvertF32ToBf16(df.data(), N * d, m->back().data(), Stream()));
      RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "convert"));  // df is freed next
      if (m == &mk) {
        for (float& v : f) v = RoundBf16(v);
        mk_host.push_back(std::move(f));
      }
    }
    mass0.push_back(Random(static_cast<std::size_t>(Hm * N)));
    for (float& v : mass0.back()) v = std::abs(v);
    acc0.push_back(Random(static_cast<std::size_t>(N * d)));
    mass.push_back(Upload(mass0.back()));
    acc.push_back(Upload(acc0.back()));
    kp.push_back(mk.back().data());
    vp.push_back(mv.back().data());
    sp.push_back(staged.data() + b * per_session);
  }
  auto dkp = Upload(kp), dvp = Upload(vp);
  auto dsp = Upload(sp);
  std::vector<std::vector<double>> want_mass, want_acc;
  for (int64_t b = 0; b < B; ++b) {
    want_mass.emplace_back(mass0[static_cast<std::size_t>(b)].begin(), mass0[static_cast<std::size_t>(b)].end());
    want_acc.emplace_back(acc0[static_cast<std::size_t>(b)].begin(), acc0[static_cast<std::size_t>(b)].end());
  }
  auto scratch = Poisoned<float>(static_cast<std::size_t>(MemoryReadDecodeScratch(B, N, d, Hm)));
  std::vector<double> p(static_cast<std::size_t>(N));
  int64_t pending = 0;
  const auto flush = [&] {
    for (int64_t b = 0; b < B; ++b) {
      const auto ub = static_cast<std::size_t>(b);
      RequireOk(FlushStagedTokens(kp[ub], sp[ub], pending, kCapacity, N, d, Hm, mass[ub].data(), acc[ub].data(),
                                  Stream()));
    }
    pending = 0;
  };
  for (int64_t step = 0; step < kSteps; ++step) {
    INFO("step " << step);
    const auto q = Random(static_cast<std::size_t>(B * ld)), offer = Random(static_cast<std::size_t>(B * ld));
    auto dq = Upload(q), doffer = Upload(offer);
    auto dslots = Upload(std::vector<int64_t>(static_cast<std::size_t>(B), pending));
    // The read's output is the unstaged read's, bit for bit.
    auto attn = Poisoned<float>(static_cast<std::size_t>(B * Hm * N)), e = Poisoned<float>(static_cast<std::size_t>(B * d));
    RequireOk(MemoryReadBatch(dq.data(), ld, dkp.data(), dvp.data(), B, N, d, Hm, attn.data(), e.data(),
                              scratch.data(), nullptr, Stream()));
    const auto want_e = Download(e);
    const MemoryStage stage{.offer = doffer.data(), .offer_ld = ld, .slots = dslots.data(), .staged = dsp.data(),
                            .capacity = kCapacity};
    auto e2 = Poisoned<float>(static_cast<std::size_t>(B * d));
    RequireOk(MemoryReadBatch(dq.data(), ld, dkp.data(), dvp.data(), B, N, d, Hm, nullptr, e2.data(), scratch.data(),
                              &stage, Stream()));
    CHECK(Download(e2) == want_e);
    for (int64_t b = 0; b < B; ++b) {
      const auto ub = static_cast<std::size_t>(b);
      for (int64_t j = 0; j < Hm; ++j) {
        for (int64_t n = 0; n < N; ++n) {
          double dot = 0;
          for (int64_t c = 0; c < dh; ++c) {
            dot += static_cast<double>(q[static_cast<std::size_t>(b * ld + j * dh + c)]) *
                   mk_host[ub][static_cast<std::size_t>(n * d + j * dh + c)];
          }
          p[static_cast<std::size_t>(n)] = dot / std::sqrt(static_cast<double>(dh));
        }
        SoftmaxRows(p, 1, static_cast<std::size_t>(N));
        for (int64_t n = 0; n < N; ++n) {
          const double pn = p[static_cast<std::size_t>(n)];
          want_mass[ub][static_cast<std::size_t>(j * N + n)] += pn;
          for (int64_t c = 0; c < dh; ++c) {
            want_acc[ub][static_cast<std::size_t>(n * d + j * dh + c)] +=
                pn * offer[static_cast<std::size_t>(b * ld + j * dh + c)];
          }
        }
      }
    }
    if (++pending == kCapacity) flush();
  }
  flush();  // the last 2
  // What the sums gained (the starting values would hide an error in them): the products'
  // operands are bf16 (probabilities and offers: 2^-9 each), and the probabilities come from
  // the bf16 query (as a prefill chunk's) against the fp32 query's softmax shift: the masses
  // are off by 1.0-1.3e-3 (H200) where a prefill chunk's, which take their shifts from the
  // bf16 query too, are off by < 1e-4 against that query.
  for (int64_t b = 0; b < B; ++b) {
    INFO("session " << b);
    const auto ub = static_cast<std::size_t>(b);
    CHECK(GainError(Download(mass[ub]), mass0[ub], want_mass[ub]) < kTolBf16Operands);
    CHECK(GainError(Download(acc[ub]), acc0[ub], want_acc[ub]) < kTolBf16Operands);
  }
  // Refusals: more tokens than slots, a head width the write kernels do not take, staging
  // where the one-pass read does not run (width 24), no staging buffers.
  CHECK(FlushStagedTokens(kp[0], sp[0], kCapacity + 1, kCapacity, N, d, Hm, mass[0].data(), acc[0].data(), Stream())
            .IsInvalidArgument());
  CHECK(FlushStagedTokens(kp[0], sp[0], 1, kCapacity, N, 264, 2, mass[0].data(), acc[0].data(), Stream())
            .IsInvalidArgument());
  CHECK(FlushStagedTokens(nullptr, nullptr, 0, kCapacity, N, d, Hm, nullptr, nullptr, Stream()).ok());
  CHECK(!DecodeStagesTokens(96, 4));
  auto dslots = Upload(std::vector<int64_t>(static_cast<std::size_t>(B), 0));
  auto rows = Upload(Random(static_cast<std::size_t>(B * ld)));
  auto e = Poisoned<float>(static_cast<std::size_t>(B * d));
  MemoryStage none{.offer = rows.data(), .offer_ld = ld, .slots = dslots.data(), .staged = dsp.data(), .capacity = 0};
  CHECK(MemoryReadBatch(rows.data(), ld, dkp.data(), dvp.data(), B, N, d, Hm, nullptr, e.data(), scratch.data(), &none,
                        Stream())
            .IsInvalidArgument());
}

TEST_CASE("Launchers refuse bad shapes and null pointers; empty work is a no-op", "[cuda][ops]") {
  auto buf = DeviceBuffer<float>::Allocate(64);
  RequireOk(buf.status());
  float* p = buf->data();
  CHECK(CausalAttention(p, p, p, 1, 4, 6, 4, 8, p, Stream()).IsInvalidArgument());  // 4 does not divide 6
  CHECK(CausalAttention(p, p, p, 5, 4, 4, 4, 8, p, Stream()).IsInvalidArgument());  // T > S
  CHECK(CausalAttentionDecode(p, p, p, 1, 1, 1, 1, 264, p, Stream()).IsInvalidArgument());  // head_dim > 256
  CHECK(CausalAttention(p, nullptr, p, 1, 4, 4, 4, 8, p, Stream()).IsInvalidArgument());
  CHECK(Rope(p, 1, 1, 7, nullptr, 10000.0, Stream()).IsInvalidArgument());  // odd head_dim
  auto bbuf = DeviceBuffer<__nv_bfloat16>::Allocate(64);
  RequireOk(bbuf.status());
  __nv_bfloat16* pb = bbuf->data();
  CHECK(CausalAttentionTiled(p, pb, pb, 1, 1, 1, 1, 136, p, Stream()).IsInvalidArgument());  // head_dim > 128
  CHECK(CausalAttentionTiled(p, pb, pb, 5, 4, 4, 4, 8, p, Stream()).IsInvalidArgument());    // T > S
  CHECK(MemoryRead(Cublas(), p, 10, pb, pb, 1, 4, 10, 4, p, p, pb, Stream()).IsInvalidArgument());  // 4 does not divide 10
  CHECK(MemoryReadWrite(p, 10, p, 10, pb, pb, 1, 4, 10, 4, p, true, p, p, p, Stream()).IsInvalidArgument());
  CHECK(MemoryReadWrite(p, 264, p, 264, pb, pb, 1, 4, 264, 2, p, true, p, p, p, Stream())
            .IsInvalidArgument());  // dh 132
  CHECK(MemoryReadWrite(p, 7, p, 8, pb, pb, 1, 4, 8, 2, p, true, p, p, p, Stream())
            .IsInvalidArgument());  // q_ld < d
  CHECK(MemoryReadWrite(p, 8, nullptr, 8, pb, pb, 1, 4, 8, 2, p, true, p, p, p, Stream()).IsInvalidArgument());
  CHECK(WriteUpdate(p, p, 4, 8, 2, p, nullptr, Stream()).IsInvalidArgument());  // no bf16 u
  CHECK(WriteUpdate(p, p, 4, 8, 2, p, pb, Stream()).ok());
  CHECK(GatedMemoryUpdate(p, p, nullptr, p, p, 4, 8, p, Stream()).IsInvalidArgument());  // no input-gate bias
  CHECK(GatedMemoryUpdate(p, p, p, p, p, 4, 0, p, Stream()).IsInvalidArgument());        // width 0
  CHECK(RmsNorm(p, p, 1, 0, 1e-5f, p, Stream()).IsInvalidArgument());
  CHECK(Linear(Cublas(), nullptr, 1, 0, nullptr, 4, p, false, Stream()).IsInvalidArgument());
  CHECK(SwiGlu(p, p, -1, p, Stream()).IsInvalidArgument());
  CHECK(GatedResidual(p, nullptr, p, p, 1, 4, p, Stream()).IsInvalidArgument());
  CHECK(GatedResidual(p, p, p, p, 1, 0, p, Stream()).IsInvalidArgument());  // no width
  // Zero-sized work launches nothing and needs no pointers.
  CHECK(CausalAttention(nullptr, nullptr, nullptr, 0, 0, 4, 2, 8, nullptr, Stream()).ok());
  CHECK(MemoryRead(nullptr, nullptr, 8, nullptr, nullptr, 0, 4, 8, 2, nullptr, nullptr, nullptr, Stream()).ok());
  CHECK(MemoryReadWrite(nullptr, 8, nullptr, 8, nullptr, nullptr, 0, 4, 8, 2, nullptr, true, nullptr, nullptr, nullptr,
                        Stream())
            .ok());
  CHECK(Linear(Cublas(), nullptr, 0, 8, nullptr, 4, nullptr, false, Stream()).ok());
  CHECK(AddInPlace(nullptr, nullptr, 0, Stream()).ok());
  RequireOk(CudaStatus(cudaStreamSynchronize(Stream()), "stream"));
}
