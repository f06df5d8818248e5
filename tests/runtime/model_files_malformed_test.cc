// Malformed model directories: each gives a clear Status, never a crash. Fixtures are
// written into temporary directories from the committed tiny-vanilla model. These run
// under ASan/UBSan in CI (build type Asan).
#include <cstring>
#include <random>

#include <catch2/catch.hpp>

#include "lm2/runtime/model_files.h"
#include "loader_test_util.h"

using namespace lm2::runtime;
using namespace lm2::testing;
using lm2::StatusCode;

namespace {

// A copy of tiny-vanilla whose model.safetensors the test rewrites.
struct Fixture {
  TempDir dir;
  StFile st;
  Fixture() {
    CopyModel("tiny-vanilla", dir.str());
    st = ReadSt(dir / "model.safetensors");
  }
  std::string weights() const { return dir / "model.safetensors"; }
  void Write() const { WriteSt(weights(), st); }
  void WriteRaw(const std::string& bytes) const { WriteFile(weights(), bytes); }
};

// Opens `dir`, expecting failure with `code` and a message containing each needle.
void ExpectError(const std::string& dir, StatusCode code, std::initializer_list<std::string> needles) {
  auto files = ModelFiles::Open(dir);
  REQUIRE_FALSE(files.ok());
  const std::string msg(files.status().message());
  INFO(files.status().ToString());
  CHECK(files.status().code() == code);
  for (const std::string& n : needles) CHECK(msg.find(n) != std::string::npos);
}

const char* const kEmbed = "model.embed_tokens.weight";

}  // namespace

TEST_CASE("malformed: the unmodified fixture loads", "[loader][malformed]") {
  Fixture f;
  f.Write();  // re-serialised by the test's own writer
  auto files = ModelFiles::Open(f.dir.str());
  INFO(files.status().ToString());
  CHECK(files.ok());
}

TEST_CASE("malformed: missing config.json or weights, or no directory", "[loader][malformed]") {
  {
    Fixture f;
    std::filesystem::remove(f.dir / "config.json");
    ExpectError(f.dir.str(), StatusCode::kNotFound, {"config.json"});
  }
  {
    Fixture f;
    std::filesystem::remove(f.weights());
    ExpectError(f.dir.str(), StatusCode::kNotFound, {"model.safetensors", "no weights"});
  }
  ExpectError("/nonexistent/lm2-model", StatusCode::kNotFound, {"config.json"});
  {
    Fixture f;
    WriteFile(f.dir / "config.json", "{\"vocab_size\": ");
    ExpectError(f.dir.str(), StatusCode::kInvalidArgument, {"config.json", "not valid JSON"});
  }
  {
    Fixture f;
    std::filesystem::remove(f.weights());
    std::filesystem::create_directory(f.weights());
    ExpectError(f.dir.str(), StatusCode::kIOError, {"model.safetensors"});
  }
}

TEST_CASE("malformed: truncated files", "[loader][malformed]") {
  Fixture f;
  const std::string bytes = StBytes(f.st);
  for (std::size_t len : {std::size_t{0}, std::size_t{4}, std::size_t{7}}) {
    f.WriteRaw(bytes.substr(0, len));
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"model.safetensors", "shorter than the 8-byte"});
  }
  f.WriteRaw(bytes.substr(0, bytes.size() / 2));  // cut inside the data
  ExpectError(f.dir.str(), StatusCode::kCorruption, {"runs past the end of the file"});
  f.WriteRaw(bytes.substr(0, bytes.size() - 1));  // one byte short: the last tensor
  ExpectError(f.dir.str(), StatusCode::kCorruption, {"runs past the end of the file"});
  f.WriteRaw(bytes.substr(0, 8 + 10));  // cut inside the header
  ExpectError(f.dir.str(), StatusCode::kCorruption, {"header length", "runs past the end"});
}

TEST_CASE("malformed: header length beyond the file and huge declared headers", "[loader][malformed]") {
  Fixture f;
  const std::string bytes = StBytes(f.st);
  const std::string rest = bytes.substr(8);
  f.WriteRaw(U64(bytes.size()) + rest);
  ExpectError(f.dir.str(), StatusCode::kCorruption, {"header length", "runs past the end of the file"});
  for (uint64_t n : {uint64_t{100} * 1024 * 1024 + 1, uint64_t{1} << 40, UINT64_MAX, uint64_t{1} << 63}) {
    f.WriteRaw(U64(n) + rest);
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"header length", "exceeds"});
  }
}

TEST_CASE("malformed: invalid JSON headers", "[loader][malformed]") {
  Fixture f;
  for (const std::string& header :
       {std::string("{\"a\": "), std::string("not json at all"), std::string("{\"x\":1,}"), std::string(8, '\0'),
        std::string("{\"\xff\xfe\": 1}"), std::string(1000, '[')}) {
    f.WriteRaw(U64(header.size()) + header + f.st.data);
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"model.safetensors", "not valid JSON"});
  }
  for (const std::string& header : {std::string("[1, 2]"), std::string("42"), std::string("\"s\"")}) {
    f.WriteRaw(U64(header.size()) + header + f.st.data);
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"not a JSON object"});
  }
}

TEST_CASE("malformed: wrong or unknown dtype", "[loader][malformed]") {
  {
    Fixture f;
    f.st.header[kEmbed]["dtype"] = "Q4_K";
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "unknown dtype", "Q4_K"});
  }
  {
    Fixture f;  // a valid safetensors dtype of the right size, but not a weight dtype
    f.st.header[kEmbed]["dtype"] = "I32";
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kUnimplemented, {kEmbed, "I32", "F32, F16 or BF16"});
  }
  {
    Fixture f;  // right dtype family, wrong size: F16 tag over F32 bytes
    f.st.header[kEmbed]["dtype"] = "F16";
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "needs", "bytes"});
  }
  {
    Fixture f;
    f.st.header[kEmbed]["dtype"] = 32;
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "dtype"});
  }
}

TEST_CASE("malformed: wrong shapes", "[loader][malformed]") {
  {
    Fixture f;  // self-consistent in the file, but not what the config says
    f.st.header[kEmbed]["shape"] = {64, 512};
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "shape [64, 512], expected [512, 64]"});
  }
  {
    Fixture f;  // shape x dtype != byte range
    f.st.header[kEmbed]["shape"] = {512, 63};
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "needs", "its range holds"});
  }
  {
    Fixture f;  // dims whose product overflows 64 bits
    f.st.header[kEmbed]["shape"] = {uint64_t{1} << 40, uint64_t{1} << 40};
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "overflows"});
  }
  for (const json& bad : {json{-1, 64}, json{1.5, 64}, json("512x64"), json{"512", 64}}) {
    Fixture f;
    f.st.header[kEmbed]["shape"] = bad;
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "shape must be"});
  }
}

TEST_CASE("malformed: missing and unexpected tensors", "[loader][malformed]") {
  {
    Fixture f;
    f.st.header.erase("model.layers.1.mlp.down_proj.weight");
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"missing tensors", "model.layers.1.mlp.down_proj.weight [64, 128]"});
  }
  {
    Fixture f;
    f.st.header["lm_head.weight"] = f.st.header[kEmbed];  // tied model: no lm_head expected...
    f.st.header["lm_head.weight"]["data_offsets"] = {f.st.data.size(), f.st.data.size() + 512 * 64 * 4};
    f.st.data += std::string(512 * 64 * 4, '\0');
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"unexpected tensors", "lm_head.weight"});
  }
  {
    Fixture f;  // a memory tensor in a vanilla model
    f.st.header["model.layers.0.memory.read_q.weight"] = {
        {"dtype", "F32"}, {"shape", {64, 64}}, {"data_offsets", {f.st.data.size(), f.st.data.size() + 64 * 64 * 4}}};
    f.st.data += std::string(64 * 64 * 4, '\0');
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"unexpected tensors", "memory.read_q"});
  }
}

TEST_CASE("malformed: bad data_offsets and overlapping ranges", "[loader][malformed]") {
  {
    Fixture f;  // two tensors share bytes
    const json a = f.st.header["model.layers.0.input_layernorm.weight"]["data_offsets"];
    f.st.header["model.layers.1.input_layernorm.weight"]["data_offsets"] = a;
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"overlaps", "input_layernorm.weight"});
  }
  {
    Fixture f;  // partial overlap: shift one range back by 4 bytes
    json& offs = f.st.header["model.norm.weight"]["data_offsets"];
    const uint64_t b = offs[0].get<uint64_t>(), e = offs[1].get<uint64_t>();
    REQUIRE(b >= 4);
    offs = {b - 4, e - 4};
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"overlaps"});
  }
  for (const json& bad : {json{8, 4}, json{-4, 4}, json{0}, json{0, 1, 2}, json("0-4"), json{0.0, 256.0}}) {
    Fixture f;
    f.st.header["model.norm.weight"]["data_offsets"] = bad;
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"model.norm.weight", "data_offsets"});
  }
  {
    Fixture f;
    f.st.header["model.norm.weight"]["data_offsets"] = {UINT64_MAX - 255, UINT64_MAX};
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"model.norm.weight", "runs past the end"});
  }
}

TEST_CASE("malformed: bad entries and metadata", "[loader][malformed]") {
  {
    Fixture f;
    f.st.header["model.norm.weight"]["extra"] = 1;
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"model.norm.weight", "exactly dtype, shape, data_offsets"});
  }
  {
    Fixture f;
    f.st.header["model.norm.weight"] = json::array();
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"model.norm.weight", "exactly"});
  }
  {
    Fixture f;
    f.st.header["__metadata__"] = {{"format", 1}};
    f.Write();
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"__metadata__"});
  }
}

TEST_CASE("malformed: broken sharded directories", "[loader][malformed]") {
  auto make = [](Fixture& f, const json& weight_map) {
    std::filesystem::rename(f.weights(), f.dir / "model-00001-of-00001.safetensors");
    WriteFile(f.dir / "model.safetensors.index.json", json{{"weight_map", weight_map}}.dump());
  };
  auto full_map = [](const Fixture& f) {
    json m = json::object();
    for (const auto& [name, _] : f.st.header.items()) {
      if (name != "__metadata__") m[name] = "model-00001-of-00001.safetensors";
    }
    return m;
  };
  {
    Fixture f;
    make(f, full_map(f));
    CHECK(ModelFiles::Open(f.dir.str()).ok());
  }
  {
    Fixture f;  // the index names a shard that is not there
    json m = full_map(f);
    m[kEmbed] = "model-00002-of-00002.safetensors";
    make(f, m);
    ExpectError(f.dir.str(), StatusCode::kNotFound, {"model-00002-of-00002.safetensors"});
  }
  {
    Fixture f;  // a shard holds a tensor the index does not map to it
    json m = full_map(f);
    m.erase(kEmbed);
    make(f, m);
    ExpectError(f.dir.str(), StatusCode::kCorruption, {kEmbed, "not mapped to this shard"});
  }
  {
    Fixture f;  // the index names a tensor no shard holds
    json m = full_map(f);
    m["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00001.safetensors";
    make(f, m);
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"no shard holds", "model.layers.7.mlp.up_proj.weight"});
  }
  {
    Fixture f;  // path traversal in a shard name
    json m = full_map(f);
    m[kEmbed] = "../model.safetensors";
    make(f, m);
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"plain file name"});
  }
  {
    Fixture f;
    make(f, json::object());
    WriteFile(f.dir / "model.safetensors.index.json", "{\"weight_map\": ");
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"index.json", "not valid JSON"});
    WriteFile(f.dir / "model.safetensors.index.json", "{\"metadata\": {}}");
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"weight_map"});
  }
  {
    Fixture f;  // the same tensor in two shards
    make(f, full_map(f));
    std::filesystem::copy_file(f.dir / "model-00001-of-00001.safetensors", f.dir / "model-00002-of-00002.safetensors");
    json m = full_map(f);
    WriteFile(f.dir / "model.safetensors.index.json", json{{"weight_map", m}}.dump());
    // model-00002 is not named by the index, so it is not read: still fine.
    CHECK(ModelFiles::Open(f.dir.str()).ok());
    m[kEmbed] = "model-00002-of-00002.safetensors";
    WriteFile(f.dir / "model.safetensors.index.json", json{{"weight_map", m}}.dump());
    ExpectError(f.dir.str(), StatusCode::kCorruption, {"not mapped to this shard"});
  }
}

TEST_CASE("malformed: random header corruption never crashes", "[loader][malformed]") {
  Fixture f;
  const std::string good = StBytes(f.st);
  uint64_t header_len = 0;
  std::memcpy(&header_len, good.data(), 8);
  std::mt19937_64 rng(12345);
  int failures = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string bytes = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const std::size_t pos = rng() % (8 + header_len);
      bytes[pos] = static_cast<char>(rng() & 0xFF);
    }
    f.WriteRaw(bytes);
    auto files = ModelFiles::Open(f.dir.str());
    if (!files.ok()) {
      ++failures;
      CHECK_FALSE(files.status().message().empty());
    } else {
      for (const TensorSpec& spec : files.value()->specs()) {  // every view lies inside the file
        auto v = files.value()->Tensor(spec.name);
        REQUIRE(v.ok());
        std::vector<float> out(static_cast<std::size_t>(NumElements(v->shape)));
        ConvertToF32(v->dtype, v->data, out.data(), out.size());
      }
    }
  }
  CHECK(failures > 200);  // nearly every corruption of the header is caught
}
