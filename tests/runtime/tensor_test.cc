// DType helpers and exact fp16 / bf16 widening.
#include "lm2/runtime/tensor.h"

#include <cmath>
#include <cstring>
#include <vector>

#include <catch2/catch.hpp>

using namespace lm2::runtime;

namespace {

// IEEE binary16 by its definition, independent of the implementation under test.
double HalfByDefinition(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  if (exp == 31) return mant ? std::nan("") : sign * HUGE_VAL;
  return sign * std::ldexp(1024 + mant, exp - 25);
}

}  // namespace

TEST_CASE("tensor: dtype names, sizes and shapes", "[tensor][loader]") {
  CHECK(DTypeSize(DType::kF32) == 4);
  CHECK(DTypeSize(DType::kF16) == 2);
  CHECK(DTypeSize(DType::kBF16) == 2);
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) CHECK(DTypeFromName(DTypeName(d)) == d);
  CHECK_FALSE(DTypeFromName("F64").has_value());
  CHECK_FALSE(DTypeFromName("f32").has_value());
  CHECK(NumElements({}) == 1);
  CHECK(NumElements({3, 0, 2}) == 0);
  CHECK(NumElements({64, 128}) == 8192);
  CHECK(ShapeString({64, 128}) == "[64, 128]");
  CHECK(ShapeString({}) == "[]");
}

TEST_CASE("tensor: every f16 value widens exactly", "[tensor][loader]") {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> out(all.size());
  ConvertToF32(DType::kF16, all.data(), out.data(), all.size());
  for (uint32_t i = 0; i < 65536; ++i) {
    const double want = HalfByDefinition(static_cast<uint16_t>(i));
    INFO("f16 bits " << i);
    if (std::isnan(want)) {
      REQUIRE(std::isnan(out[i]));
    } else {
      REQUIRE(static_cast<double>(out[i]) == want);
      REQUIRE(std::signbit(out[i]) == ((i >> 15) != 0));
    }
  }
  CHECK(HalfToFloat(0x3C00) == 1.0f);
  CHECK(HalfToFloat(0xC000) == -2.0f);
  CHECK(HalfToFloat(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(HalfToFloat(0x7BFF) == 65504.0f);               // largest finite
}

TEST_CASE("tensor: bf16 widens exactly and unaligned sources work", "[tensor][loader]") {
  CHECK(BF16ToFloat(0x3F80) == 1.0f);
  CHECK(BF16ToFloat(0xC000) == -2.0f);
  CHECK(BF16ToFloat(0x3FC0) == 1.5f);
  CHECK(std::isinf(BF16ToFloat(0x7F80)));
  CHECK(std::isnan(BF16ToFloat(0x7FC0)));
  // Any f32 whose low 16 bits are zero is a bf16 value: it must come back bit-identical.
  std::vector<uint16_t> bf;
  std::vector<float> want;
  for (uint32_t hi = 0; hi < 65536; hi += 7) {
    if (((hi >> 7) & 0xFF) == 0xFF) continue;  // skip inf/nan
    bf.push_back(static_cast<uint16_t>(hi));
    const uint32_t bits = hi << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    want.push_back(f);
  }
  std::vector<unsigned char> unaligned(bf.size() * 2 + 1);
  std::memcpy(unaligned.data() + 1, bf.data(), bf.size() * 2);
  std::vector<float> got(bf.size());
  ConvertToF32(DType::kBF16, unaligned.data() + 1, got.data(), got.size());
  CHECK(std::memcmp(got.data(), want.data(), got.size() * 4) == 0);

  std::vector<unsigned char> f32(want.size() * 4 + 3);
  std::memcpy(f32.data() + 3, want.data(), want.size() * 4);
  std::vector<float> got32(want.size());
  ConvertToF32(DType::kF32, f32.data() + 3, got32.data(), got32.size());
  CHECK(std::memcmp(got32.data(), want.data(), want.size() * 4) == 0);
}
