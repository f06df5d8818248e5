// Snapshot codec: round trips for every dtype within stated bounds; malformed input refused.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>

#include "lm2/persistence/codec.h"
#include "test_util.h"

using namespace lm2;
using namespace lm2::persistence;
using lm2::persistence::test::MakeBank;
using lm2::persistence::test::SameBank;

namespace {
const SnapshotIds kIds{"tenant-a", "session-1"};

VersionInfo Info() {
  VersionInfo i;
  i.version = 7;
  i.parent_version = 6;
  i.created_unix_ms = 1700000000123;
  i.turn_count = 7;
  i.token_count = 913;
  i.model_fingerprint = "fp-test-model";
  i.metadata = {{"title", "trip planning"}, {"lang", "en"}};
  return i;
}

MemoryState RoundTrip(const MemoryState& in, DType dt, VersionInfo* info_out = nullptr) {
  auto enc = EncodeSnapshot(kIds, Info(), in, dt);
  REQUIRE(enc.ok());
  VersionInfo info;
  MemoryState out;
  Status s = DecodeSnapshot(enc->data(), enc->size(), kIds, "fp-test-model", &info, &out);
  REQUIRE(s.ok());
  if (info_out) *info_out = info;
  return out;
}
}  // namespace

TEST_CASE("persistence codec: fp32 round trip is exact and keeps all header fields", "[persistence]") {
  MemoryState bank = MakeBank({1, 3, 8}, 16, 24, 1);
  bank.layers[0].data[5] = std::numeric_limits<float>::denorm_min();
  bank.layers[1].data[0] = -0.0f;
  VersionInfo info;
  MemoryState out = RoundTrip(bank, DType::kF32, &info);
  CHECK(SameBank(bank, out));
  CHECK(std::signbit(out.layers[1].data[0]));
  CHECK(info.version == 7);
  CHECK(info.parent_version == 6);
  CHECK(info.created_unix_ms == 1700000000123);
  CHECK(info.turn_count == 7);
  CHECK(info.token_count == 913);
  CHECK(info.metadata == Info().metadata);
  CHECK(info.bank_values == 3u * 16 * 24);
  CHECK(info.dtype == DType::kF32);
}

TEST_CASE("persistence codec: bf16 round trip within |x| * 2^-8", "[persistence]") {
  MemoryState bank = MakeBank({0, 2}, 32, 64, 2);
  bank.layers[0].data[0] = 1e30f;
  bank.layers[0].data[1] = -3.0e-20f;
  MemoryState out = RoundTrip(bank, DType::kBF16);
  double worst = 0;
  for (std::size_t l = 0; l < bank.layers.size(); ++l) {
    for (std::size_t i = 0; i < bank.layers[l].data.size(); ++i) {
      const float x = bank.layers[l].data[i], y = out.layers[l].data[i];
      REQUIRE(std::fabs(x - y) <= std::fabs(x) * 0x1p-8f);
      if (x != 0) worst = std::max(worst, static_cast<double>(std::fabs(x - y) / std::fabs(x)));
    }
  }
  CHECK(worst > 0);  // it is lossy: the bound is tested, not vacuous
  CHECK(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::infinity()))));
  CHECK(Bf16ToFloat(FloatToBf16(1.0f + 0x1p-8f)) == 1.0f);  // tie rounds to even
}

TEST_CASE("persistence codec: int8 round trip within max|row| / 254 per row", "[persistence]") {
  MemoryState bank = MakeBank({4}, 50, 33, 3);
  std::fill(bank.layers[0].data.begin() + 33, bank.layers[0].data.begin() + 66, 0.0f);  // an all-zero row
  for (int c = 0; c < 33; ++c) bank.layers[0].data[static_cast<std::size_t>(2 * 33 + c)] *= 1000.0f;  // a large row
  MemoryState out = RoundTrip(bank, DType::kI8);
  const std::size_t cols = 33;
  for (std::size_t r = 0; r < 50; ++r) {
    float maxabs = 0;
    for (std::size_t c = 0; c < cols; ++c) maxabs = std::max(maxabs, std::fabs(bank.layers[0].data[r * cols + c]));
    const float bound = maxabs / 254.0f * (1.0f + 1e-5f) + 1e-30f;
    for (std::size_t c = 0; c < cols; ++c) {
      REQUIRE(std::fabs(bank.layers[0].data[r * cols + c] - out.layers[0].data[r * cols + c]) <= bound);
    }
  }
  CHECK(out.layers[0].data[40] == 0.0f);
  MemoryState bad = MakeBank({0}, 2, 2, 4);
  bad.layers[0].data[1] = std::numeric_limits<float>::infinity();
  CHECK(EncodeSnapshot(kIds, Info(), bad, DType::kI8).status().IsInvalidArgument());
}

TEST_CASE("persistence codec: snapshot of another model is FailedPrecondition", "[persistence]") {
  MemoryState bank = MakeBank({0}, 4, 4, 5);
  auto enc = EncodeSnapshot(kIds, Info(), bank, DType::kF32);
  REQUIRE(enc.ok());
  VersionInfo info;
  MemoryState out;
  Status s = DecodeSnapshot(enc->data(), enc->size(), kIds, "fp-other-model", &info, &out);
  CHECK(s.code() == StatusCode::kFailedPrecondition);
  CHECK(DecodeSnapshot(enc->data(), enc->size(), kIds, "", &info, &out).ok());  // no check asked
  CHECK(DecodeSnapshot(enc->data(), enc->size(), {"tenant-b", "session-1"}, "", &info, &out).IsCorruption());
}

TEST_CASE("persistence codec: shape errors on encode, verifier and size checks on decode", "[persistence]") {
  MemoryState bank = MakeBank({0, 1}, 8, 8, 6);
  bank.layers[1].data.pop_back();
  CHECK(EncodeSnapshot(kIds, Info(), bank, DType::kF32).status().IsInvalidArgument());
  MemoryState unordered = MakeBank({2, 1}, 2, 2, 6);
  CHECK(EncodeSnapshot(kIds, Info(), unordered, DType::kF32).status().IsInvalidArgument());

  MemoryState good = MakeBank({0, 1}, 8, 8, 6);
  auto enc = EncodeSnapshot(kIds, Info(), good, DType::kBF16);
  REQUIRE(enc.ok());
  std::vector<uint8_t> bytes(enc->data(), enc->data() + enc->size());
  VersionInfo info;
  MemoryState out;
  // Every truncation is refused.
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    INFO("truncated to " << n);
    REQUIRE(DecodeSnapshot(bytes.data(), n, kIds, "", &info, &out).IsCorruption());
  }
  // Flipping bytes: the codec alone (no MAC) must never crash, and whatever it accepts
  // must be shape-consistent. Header bytes (offsets) must be refused.
  int refused = 0;
  for (std::size_t pos = 0; pos < bytes.size(); ++pos) {
    std::vector<uint8_t> t = bytes;
    t[pos] ^= 0x5a;
    Status s = DecodeSnapshot(t.data(), t.size(), kIds, "", &info, &out);
    if (!s.ok()) {
      // A flipped format version reads as "newer than this build": Unimplemented.
      CHECK((s.IsCorruption() || s.code() == StatusCode::kUnimplemented));
      ++refused;
    } else {
      for (const auto& l : out.layers) REQUIRE(l.data.size() == static_cast<std::size_t>(l.slots * l.dim));
    }
  }
  CHECK(refused > 0);
  std::vector<uint8_t> garbage(200, 0xab);
  CHECK(DecodeSnapshot(garbage.data(), garbage.size(), kIds, "", &info, &out).IsCorruption());
}

TEST_CASE("persistence codec: transcript and version info round trip", "[persistence]") {
  TurnTranscript t{{1, 2, 3}, {4, 5}};
  auto enc = EncodeTranscript(9, t);
  REQUIRE(enc.ok());
  TurnTranscript out;
  REQUIRE(DecodeTranscript(enc->data(), enc->size(), 9, &out).ok());
  CHECK(out == t);
  CHECK(DecodeTranscript(enc->data(), enc->size(), 8, &out).IsCorruption());
  auto vi = EncodeVersionInfo(kIds, Info());
  REQUIRE(vi.ok());
  VersionInfo info;
  REQUIRE(DecodeVersionInfo(vi->data(), vi->size(), &info).ok());
  CHECK(info.metadata == Info().metadata);
  CHECK(info.token_count == 913);
}
