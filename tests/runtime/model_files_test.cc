// ModelFiles on well-formed directories: the committed test models, F16/BF16 weights,
// sharded directories, and the fingerprint.
#include "lm2/runtime/model_files.h"

#include <cmath>
#include <cstring>
#include <set>
#include <thread>

#include <catch2/catch.hpp>

#include "loader_test_util.h"

using namespace lm2::runtime;
using namespace lm2::testing;

namespace {

const char* const kModels[] = {"tiny-lm2", "tiny-partial", "tiny-vanilla"};

std::unique_ptr<ModelFiles> OpenOk(const std::string& dir) {
  auto files = ModelFiles::Open(dir);
  INFO(files.status().ToString());
  REQUIRE(files.ok());
  return std::move(files).value();
}

std::vector<float> ToF32(const TensorView& v) {
  std::vector<float> out(static_cast<std::size_t>(NumElements(v.shape)));
  ConvertToF32(v.dtype, v.data, out.data(), out.size());
  return out;
}

// f32 -> binary16 bits, round to nearest even (finite, normal-range inputs only).
uint16_t F32ToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const float a = std::fabs(f);
  if (a < std::ldexp(1.0f, -14)) {  // subnormal range: quantise to multiples of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(std::ldexp(a, 24))));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  uint32_t mant = static_cast<uint32_t>(std::nearbyint(std::ldexp(m, 11)));  // 11 bits incl. the leading one
  if (mant == 2048) {
    mant = 1024;
    ++e;
  }
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(e + 14) << 10) | (mant & 0x3FFu));
}

}  // namespace

TEST_CASE("loader: ExpectedTensors equals the committed models' tensors", "[loader]") {
  const std::map<std::string, std::size_t> counts = {{"tiny-lm2", 60}, {"tiny-partial", 41}, {"tiny-vanilla", 20}};
  for (const char* name : kModels) {
    INFO(name);
    auto config = ModelConfig::Load(TestModel(name));
    REQUIRE(config.ok());
    const std::vector<TensorSpec> specs = ExpectedTensors(*config);
    const StFile st = ReadSt(TestModel(name) + "/model.safetensors");
    std::map<std::string, Shape> in_file;
    for (const auto& [key, info] : st.header.items()) {
      if (key != "__metadata__") in_file[key] = info.at("shape").get<Shape>();
    }
    std::map<std::string, Shape> expected;
    for (const TensorSpec& s : specs) expected[s.name] = s.shape;
    CHECK(expected == in_file);
    CHECK(specs.size() == counts.at(name));
    for (std::size_t i = 1; i < specs.size(); ++i) CHECK(specs[i - 1].name < specs[i].name);
  }
  auto partial = ModelConfig::Load(TestModel("tiny-partial"));
  REQUIRE(partial.ok());
  bool has_init = false;
  for (const TensorSpec& s : ExpectedTensors(*partial)) {
    if (s.name == "model.layers.1.memory.init") has_init = s.shape == Shape{12, 48};
    CHECK(s.name.find("layers.0.memory") == std::string::npos);
  }
  CHECK(has_init);
}

TEST_CASE("loader: opens every test model; views are the file's bytes", "[loader]") {
  for (const char* name : kModels) {
    INFO(name);
    auto files = OpenOk(TestModel(name));
    const StFile st = ReadSt(TestModel(name) + "/model.safetensors");
    CHECK(files->config().CanonicalJson() == ModelConfig::Load(TestModel(name))->CanonicalJson());
    CHECK(files->weight_files() == std::vector<std::string>{"model.safetensors"});
    CHECK(files->weight_bytes() == st.data.size());
    REQUIRE(files->specs().size() == ExpectedTensors(files->config()).size());
    for (const TensorSpec& spec : files->specs()) {
      auto view = files->Tensor(spec.name);
      REQUIRE(view.ok());
      CHECK(view->dtype == DType::kF32);
      CHECK(view->shape == spec.shape);
      const std::string bytes = TensorBytes(st, spec.name);
      REQUIRE(view->nbytes == bytes.size());
      CHECK(std::memcmp(view->data, bytes.data(), bytes.size()) == 0);
      const std::vector<float> f = ToF32(*view);
      for (std::size_t i : {std::size_t{0}, f.size() / 2, f.size() - 1}) {
        float want;
        std::memcpy(&want, bytes.data() + 4 * i, 4);
        CHECK(f[i] == want);
      }
    }
    CHECK(files->Tensor("model.layers.99.mlp.up_proj.weight").status().IsNotFound());
  }
}

TEST_CASE("loader: embedding values are plausible and norms sit near one", "[loader]") {
  auto files = OpenOk(TestModel("tiny-lm2"));
  auto norm = files->Tensor("model.norm.weight");
  REQUIRE(norm.ok());
  for (float g : ToF32(*norm)) CHECK(std::fabs(g - 1.0f) < 0.6f);  // 1 + N(0, 0.1^2)
  auto emb = files->Tensor("model.embed_tokens.weight");
  REQUIRE(emb.ok());
  double sq = 0;
  const auto e = ToF32(*emb);
  for (float x : e) sq += static_cast<double>(x) * static_cast<double>(x);
  CHECK(std::sqrt(sq / static_cast<double>(e.size())) == Approx(1.0).epsilon(0.1));  // N(0, 1)
}

TEST_CASE("loader: fingerprint is stable, thread-safe and covers config and every byte", "[loader]") {
  std::set<std::string> prints;
  for (const char* name : kModels) {
    const std::string fp = OpenOk(TestModel(name))->Fingerprint();
    CHECK(fp.size() == 64);
    CHECK(fp.find_first_not_of("0123456789abcdef") == std::string::npos);
    prints.insert(fp);
  }
  CHECK(prints.size() == 3);

  auto a = OpenOk(TestModel("tiny-lm2"));
  auto b = OpenOk(TestModel("tiny-lm2"));
  std::vector<std::string> seen(8);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < seen.size(); ++i) threads.emplace_back([&, i] { seen[i] = a->Fingerprint(); });
  for (auto& t : threads) t.join();
  for (const auto& s : seen) CHECK(s == b->Fingerprint());
  CHECK(&a->Fingerprint() == &a->Fingerprint());  // cached

  // One flipped bit in the last tensor's last byte changes it.
  TempDir dir;
  CopyModel("tiny-lm2", dir.str());
  std::string bytes = ReadFile(dir / "model.safetensors");
  bytes.back() = static_cast<char>(bytes.back() ^ 1);
  WriteFile(dir / "model.safetensors", bytes);
  CHECK(OpenOk(dir.str())->Fingerprint() != b->Fingerprint());

  // So does a config change that leaves the tensors' shapes alone.
  TempDir dir2;
  CopyModel("tiny-lm2", dir2.str());
  json cfg = json::parse(ReadFile(dir2 / "config.json"));
  cfg["rope_theta"] = 500000.0;
  WriteFile(dir2 / "config.json", cfg.dump());
  CHECK(OpenOk(dir2.str())->Fingerprint() != b->Fingerprint());

  // Keys outside the canonical config (e.g. torch_dtype) do not.
  TempDir dir3;
  CopyModel("tiny-lm2", dir3.str());
  cfg = json::parse(ReadFile(dir3 / "config.json"));
  cfg["torch_dtype"] = "bfloat16";
  cfg["transformers_version"] = "4.44.0";
  WriteFile(dir3 / "config.json", cfg.dump(4));
  CHECK(OpenOk(dir3.str())->Fingerprint() == b->Fingerprint());
}

TEST_CASE("loader: F16 and BF16 weights load and widen exactly", "[loader]") {
  // tiny-vanilla with every tensor re-stored: alternately F16, BF16 and F32.
  TempDir dir;
  CopyModel("tiny-vanilla", dir.str());
  const StFile src = ReadSt(TestModel("tiny-vanilla") + "/model.safetensors");
  std::vector<std::pair<std::string, StTensor>> tensors;
  std::map<std::string, std::vector<float>> want;
  int k = 0;
  for (const auto& [name, info] : src.header.items()) {
    if (name == "__metadata__") continue;
    const std::string bytes = TensorBytes(src, name);
    std::vector<float> f(bytes.size() / 4);
    std::memcpy(f.data(), bytes.data(), bytes.size());
    StTensor t{"F32", info.at("shape").get<Shape>(), bytes};
    if (k % 3 != 2) {
      std::string out(f.size() * 2, '\0');
      for (std::size_t i = 0; i < f.size(); ++i) {
        uint16_t h;
        if (k % 3 == 0) {
          h = F32ToHalf(f[i]);
          f[i] = HalfToFloat(h);
        } else {  // bf16 by truncation: the widened value is the f32 with its low half cleared
          uint32_t bits;
          std::memcpy(&bits, &f[i], 4);
          h = static_cast<uint16_t>(bits >> 16);
          bits &= 0xFFFF0000u;
          std::memcpy(&f[i], &bits, 4);
        }
        std::memcpy(&out[2 * i], &h, 2);
      }
      t.dtype = k % 3 == 0 ? "F16" : "BF16";
      t.bytes = out;
    }
    want[name] = f;
    tensors.emplace_back(name, t);
    ++k;
  }
  WriteSt(dir / "model.safetensors", BuildSt(tensors));
  auto files = OpenOk(dir.str());
  std::set<DType> dtypes;
  for (const auto& [name, values] : want) {
    auto view = files->Tensor(name);
    REQUIRE(view.ok());
    dtypes.insert(view->dtype);
    CHECK(view->nbytes == values.size() * DTypeSize(view->dtype));
    const std::vector<float> got = ToF32(*view);
    REQUIRE(got.size() == values.size());
    CHECK(std::memcmp(got.data(), values.data(), got.size() * 4) == 0);
    // The f16 values are close to the originals (a sanity check of the fixture itself).
    const std::string orig = TensorBytes(src, name);
    float first;
    std::memcpy(&first, orig.data(), 4);
    CHECK(got[0] == Approx(first).epsilon(1e-2).margin(1e-3));
  }
  CHECK(dtypes == std::set<DType>{DType::kF32, DType::kF16, DType::kBF16});
  CHECK(files->Fingerprint() != OpenOk(TestModel("tiny-vanilla"))->Fingerprint());
}

TEST_CASE("loader: sharded directory with an index loads like the single file", "[loader]") {
  TempDir dir;
  for (const char* f : {"config.json", "tokenizer.model"}) {
    std::filesystem::copy_file(TestModel("tiny-lm2") + "/" + f, dir / f);
  }
  const StFile src = ReadSt(TestModel("tiny-lm2") + "/model.safetensors");
  std::vector<std::vector<std::pair<std::string, StTensor>>> shards(3);
  json weight_map = json::object();
  std::size_t i = 0;
  for (const auto& [name, info] : src.header.items()) {
    if (name == "__metadata__") continue;
    const std::size_t s = (i++ * 3) / 60;  // 60 tensors, 20 per shard, in name order
    shards[s].emplace_back(name, StTensor{"F32", info.at("shape").get<Shape>(), TensorBytes(src, name)});
    weight_map[name] = "model-0000" + std::to_string(s + 1) + "-of-00003.safetensors";
  }
  for (std::size_t s = 0; s < 3; ++s) {
    WriteSt(dir / ("model-0000" + std::to_string(s + 1) + "-of-00003.safetensors"), BuildSt(shards[s]));
  }
  const json index = {{"metadata", {{"total_size", src.data.size()}}}, {"weight_map", weight_map}};
  WriteFile(dir / "model.safetensors.index.json", index.dump(2));

  auto sharded = OpenOk(dir.str());
  auto single = OpenOk(TestModel("tiny-lm2"));
  CHECK(sharded->weight_files().size() == 3);
  CHECK(sharded->weight_bytes() == single->weight_bytes());
  for (const TensorSpec& spec : single->specs()) {
    auto a = sharded->Tensor(spec.name);
    auto b = single->Tensor(spec.name);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(a->nbytes == b->nbytes);
    CHECK(std::memcmp(a->data, b->data, a->nbytes) == 0);
  }
  // The fingerprint is over content, not file layout.
  CHECK(sharded->Fingerprint() == single->Fingerprint());

  // A stale single file beside the index is ignored: the index wins.
  WriteFile(dir / "model.safetensors", "garbage");
  CHECK(OpenOk(dir.str())->Fingerprint() == single->Fingerprint());
}
