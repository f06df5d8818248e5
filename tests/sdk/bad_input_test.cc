// Bad input: each gets its own clear status, and nothing committed is lost.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <fstream>

#include "lm2/runtime/cuda_devices.h"
#include "persistence/test_util.h"  // RawDb: raw access to the store's RocksDB files
#include "sdk_test_util.h"

using namespace lm2;
using namespace lm2::sdk_test;

TEST_CASE("engine options: missing model, CUDA backend on this machine, vanilla model") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  EngineOptions missing = o;
  missing.model_dir = dir.sub("nope");
  CHECK(Engine::Open(missing).status().code() == StatusCode::kNotFound);
  {  // (closed at the block's end: an open engine holds the store, which `progress` opens below)
    EngineOptions cuda = o;
    cuda.backend = Backend::kCuda;
    auto gpus = lm2::runtime::ListCudaDevices();
    REQUIRE(gpus.ok());
    auto on_cuda = Engine::Open(cuda);
    if (gpus->empty() || !gpus->front().supported) {
      CHECK(on_cuda.status().code() == StatusCode::kUnavailable);  // no silent fallback to the CPU
    } else {
      REQUIRE(on_cuda.ok());
      CHECK((*on_cuda)->model_info().backend == "cuda:0");
    }
  }
  EngineOptions vanilla = o;
  vanilla.model_dir = SourceDir() + "/tests/data/models/tiny-vanilla";
  CHECK(Engine::Open(vanilla).status().code() == StatusCode::kInvalidArgument);
  EngineOptions none = o;
  none.model_dir = "";
  CHECK(Engine::Open(none).status().code() == StatusCode::kInvalidArgument);
  std::vector<std::string> stages;
  EngineOptions progress = o;
  progress.on_progress = [&](std::string_view stage, double) { stages.emplace_back(stage); };
  REQUIRE(Engine::Open(progress).ok());
  CHECK(stages == std::vector<std::string>{"model files", "fingerprint", "weights", "tokenizer", "store", "ready"});
}

TEST_CASE("key file: CreateKeyFile makes a 0600 file once, no key or a missing key file is PermissionDenied") {
  TempDir dir;
  const std::string path = dir.sub("k");
  REQUIRE(CreateKeyFile(path).ok());
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  const auto read = [](const std::string& p) {
    std::ifstream in(p);
    std::string line, all;
    while (std::getline(in, line)) all += line + "\n";
    return all;
  };
  const std::string first = read(path);
  CHECK(first.find("* 1 ") != std::string::npos);
  REQUIRE(CreateKeyFile(path).ok());  // exists: untouched
  CHECK(read(path) == first);

  EngineOptions o = TinyOptions(dir);
  o.key_file = dir.sub("missing-key");
  CHECK(Engine::Open(o).status().code() == StatusCode::kPermissionDenied);
  o.key_file = "";
  o.key_env = "LM2_SDK_TEST_UNSET_VARIABLE";
  CHECK(Engine::Open(o).status().code() == StatusCode::kPermissionDenied);
}

TEST_CASE("unknown session, bad ids, empty, oversized and too-long messages") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  o.max_message_bytes = 2000;
  auto engine = OpenEngine(o);
  SessionOptions no_create;
  no_create.create_if_missing = false;
  CHECK(engine->OpenSession("t", "unknown", no_create).status().code() == StatusCode::kNotFound);
  CHECK(engine->OpenSession("t", "", {}).status().code() == StatusCode::kInvalidArgument);
  CHECK(engine->OpenSession("t/..", "x", {}).status().code() == StatusCode::kInvalidArgument);
  CHECK(engine->OpenSession("t", std::string(200, 'a'), {}).status().code() == StatusCode::kInvalidArgument);

  auto s = OpenSession(*engine, "t", "s");
  MustChat(*s, "Mary went to the kitchen.");
  const MemoryState before = MustMemory(*s);
  CHECK(s->Chat("", Short()).status().code() == StatusCode::kInvalidArgument);
  CHECK(s->Chat(std::string(2001, 'a'), Short()).status().code() == StatusCode::kInvalidArgument);
  std::string long_msg;
  for (int i = 0; i < 150; ++i) long_msg += "kitchen ";  // under the byte limit, over 256 tokens
  CHECK(s->Chat(long_msg, Short()).status().code() == StatusCode::kOutOfRange);
  ChatOptions zero = Short();
  zero.max_tokens = 0;
  CHECK(s->Chat("hi", zero).status().code() == StatusCode::kInvalidArgument);
  ChatOptions neg = Short();
  neg.temperature = -1.0f;
  CHECK(s->Chat("hi", neg).status().code() == StatusCode::kInvalidArgument);
  CHECK(s->head_version() == 1);
  CHECK(SameBits(MustMemory(*s), before));
  auto h = s->History();
  REQUIRE(h.ok());
  CHECK(h->size() == 1);
  // The session still works.
  CHECK(MustChat(*s, "Where is Mary?").version == 2);
}

TEST_CASE("wrong model for the stored memory is FailedPrecondition, the data stays") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  MemoryState kept;
  {
    auto engine = OpenEngine(o);
    auto s = OpenSession(*engine, "t", "s");
    MustChat(*s, "Mary went to the kitchen.");
    kept = MustMemory(*s);
  }
  {
    EngineOptions other = o;
    other.model_dir = SourceDir() + "/tests/data/models/tiny-partial";
    auto engine = OpenEngine(other);
    auto s = engine->OpenSession("t", "s");
    CHECK(s.status().code() == StatusCode::kFailedPrecondition);
    CHECK(s.status().message().find("model") != std::string_view::npos);
  }
  auto engine = OpenEngine(o);
  auto s = OpenSession(*engine, "t", "s");
  CHECK(SameBits(MustMemory(*s), kept));
}

TEST_CASE("a tampered record is Corruption, a wrong key is PermissionDenied, the rest is intact") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  MemoryState m2;
  {
    auto engine = OpenEngine(o);
    auto s = OpenSession(*engine, "t", "s");
    MustChat(*s, "Mary went to the kitchen.");
    MustChat(*s, "John picked up the apple.");
    m2 = MustMemory(*s);
  }
  std::string key, original;
  {
    persistence::test::RawDb raw(o.store_path);
    auto all = raw.All("snapshots");
    REQUIRE(all.size() == 2);
    key = all.back().first;  // version 2: the head
    original = all.back().second;
    std::string bad = original;
    bad[bad.size() / 2] = static_cast<char>(bad[bad.size() / 2] ^ 0x40);
    raw.Put("snapshots", key, bad);
  }
  {
    auto engine = OpenEngine(o);
    auto s = engine->OpenSession("t", "s");
    CHECK(s.status().code() == StatusCode::kCorruption);
  }
  {
    persistence::test::RawDb raw(o.store_path);
    raw.Put("snapshots", key, original);
  }
  {
    EngineOptions wrong = o;
    wrong.key_file = dir.sub("other-keys");
    REQUIRE(CreateKeyFile(wrong.key_file).ok());
    auto engine = OpenEngine(wrong);
    auto s = engine->OpenSession("t", "s");
    CHECK(s.status().code() == StatusCode::kPermissionDenied);
  }
  auto engine = OpenEngine(o);
  auto s = OpenSession(*engine, "t", "s");
  CHECK(s->head_version() == 2);
  CHECK(SameBits(MustMemory(*s), m2));
}

TEST_CASE("erase a session and a tenant") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto a = OpenSession(*engine, "t", "a");
  auto b = OpenSession(*engine, "t", "b");
  auto c = OpenSession(*engine, "u", "c");
  MustChat(*a, "one");
  MustChat(*b, "two");
  MustChat(*c, "three");
  REQUIRE(a->Erase().ok());
  CHECK(a->Chat("again", Short()).status().code() == StatusCode::kNotFound);
  CHECK(a->History().status().code() == StatusCode::kNotFound);
  SessionOptions no_create;
  no_create.create_if_missing = false;
  CHECK(engine->OpenSession("t", "a", no_create).status().code() == StatusCode::kNotFound);
  CHECK(*engine->ListSessions("t") == std::vector<std::string>{"b"});
  REQUIRE(engine->EraseTenant("t").ok());
  CHECK(engine->ListSessions("t")->empty());
  CHECK(engine->OpenSession("t", "b", no_create).status().code() == StatusCode::kNotFound);
  auto still = engine->OpenSession("u", "c", no_create);
  REQUIRE(still.ok());
  CHECK((*still)->head_version() == 1);
}
