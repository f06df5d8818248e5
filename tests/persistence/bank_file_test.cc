// Bank files: snapshots stored in their own files (RocksDbStoreOptions::bank_file_min_bytes)
// with a sealed reference in RocksDB. Round trips, tampering with the file and with its
// reference, moved files, retention and erasure of the files, a history mixing inline and
// file snapshots, and concurrent commits to several sessions sharing the encode buffers.
#include <catch2/catch.hpp>

#include <set>
#include <thread>

#include "lm2/persistence/envelope.h"
#include "store_keys.h"
#include "test_util.h"

using namespace lm2;
using namespace lm2::persistence;
using namespace lm2::persistence::test;

namespace {
const SessionId kA{"tenant-a", "s1"};

Result<uint64_t> CommitBank(SessionStore& st, const SessionId& id, uint64_t expected, uint32_t seed) {
  return st.Commit(id, expected, MakeBank({0, 2}, 8, 16, seed), TurnTranscript{{static_cast<int32_t>(seed)}, {1}});
}

void ExpectRefused(SessionStore& st, const SessionId& id, uint64_t version, const std::string& what) {
  auto r = st.LoadVersion(id, version);
  INFO(what);
  REQUIRE_FALSE(r.ok());
  REQUIRE((r.status().IsCorruption() || r.status().IsPermissionDenied()));
}
}  // namespace

TEST_CASE("persistence bank files: round trip, tampering, moved files, retention, erase", "[persistence]") {
  TempDir dir;
  auto ring = MakeKeys();
  auto st = OpenStore(dir.path(), ring, ProcessSharing::kPerOperation, nullptr, /*bank_file_min_bytes=*/0);
  REQUIRE(st->CreateSession(kA).ok());
  REQUIRE(*CommitBank(*st, kA, 0, 1) == 1);
  REQUIRE(*CommitBank(*st, kA, 1, 2) == 2);
  REQUIRE(BankFilesIn(dir.path()).size() == 2);
  {  // RocksDB holds only small sealed references of kind kSnapshotFile.
    st.reset();
    RawDb raw(dir.path());
    for (auto& [k, v] : raw.All("snapshots")) {
      CHECK(v.size() < 128);
      CHECK(static_cast<uint8_t>(v[5]) == static_cast<uint8_t>(RecordKind::kSnapshotFile));
    }
  }
  st = OpenStore(dir.path(), ring, ProcessSharing::kPerOperation, nullptr, 0);
  CHECK(SameBank(st->LoadVersion(kA, 1)->state, MakeBank({0, 2}, 8, 16, 1)));
  CHECK(SameBank(st->LoadHead(kA)->state, MakeBank({0, 2}, 8, 16, 2)));
  const auto files = BankFilesIn(dir.path());
  const std::filesystem::path f1 = files[0], f2 = files[1];  // names sort by version
  const std::string orig1 = ReadFileBytes(f1), orig2 = ReadFileBytes(f2);

  SECTION("every flipped byte region and every truncation of the file is refused") {
    std::vector<std::size_t> positions;
    for (std::size_t p = 0; p < 40; ++p) positions.push_back(p);
    for (std::size_t p = 40; p < orig2.size(); p += orig2.size() / 16) positions.push_back(p);
    for (std::size_t p = orig2.size() - 20; p < orig2.size(); ++p) positions.push_back(p);
    for (std::size_t p : positions) {
      std::string v = orig2;
      v[p] = static_cast<char>(v[p] ^ 0x10);
      WriteFileBytes(f2, v);
      ExpectRefused(*st, kA, 2, "flipped byte " + std::to_string(p));
    }
    for (std::size_t n : {std::size_t{0}, std::size_t{5}, orig2.size() / 2, orig2.size() - 1}) {
      WriteFileBytes(f2, orig2.substr(0, n));
      ExpectRefused(*st, kA, 2, "truncated to " + std::to_string(n));
    }
    WriteFileBytes(f2, orig2 + "x");
    ExpectRefused(*st, kA, 2, "one byte appended");
    std::filesystem::remove(f2);
    ExpectRefused(*st, kA, 2, "file missing");
    WriteFileBytes(f2, orig1);  // an authentic file of another version
    ExpectRefused(*st, kA, 2, "version 1's file as version 2's");
    WriteFileBytes(f2, orig2);
    CHECK(st->LoadHead(kA).ok());
  }

  SECTION("the reference record is authenticated like every record") {
    const std::string key = keys::RecordKey(kA.tenant, kA.session, 2);
    std::string ref;
    st.reset();
    {
      RawDb raw(dir.path());
      for (auto& [k, v] : raw.All("snapshots")) if (k == key) ref = v;
    }
    REQUIRE(!ref.empty());
    std::vector<std::string> variants;
    for (std::size_t p = 0; p < ref.size(); ++p) {
      std::string v = ref;
      v[p] = static_cast<char>(v[p] ^ 0x04);
      variants.push_back(v);
    }
    variants.push_back(ref.substr(0, ref.size() - 1));
    variants.push_back("");
    std::string ref1;
    {
      RawDb raw(dir.path());
      for (auto& [k, v] : raw.All("snapshots")) if (k == keys::RecordKey(kA.tenant, kA.session, 1)) ref1 = v;
    }
    variants.push_back(ref1);  // version 1's reference under version 2's key
    for (const std::string& v : variants) {
      { RawDb raw(dir.path()); raw.Put("snapshots", key, v); }
      st = OpenStore(dir.path(), ring, ProcessSharing::kPerOperation, nullptr, 0);
      ExpectRefused(*st, kA, 2, "reference variant of size " + std::to_string(v.size()));
      st.reset();
    }
    { RawDb raw(dir.path()); raw.Put("snapshots", key, ref); }
    st = OpenStore(dir.path(), ring, ProcessSharing::kPerOperation, nullptr, 0);
    CHECK(st->LoadHead(kA).ok());
  }

  SECTION("a file copied to another session or tenant is refused") {
    const SessionId b{"tenant-a", "s2"}, c{"tenant-c", "s1"};
    for (const SessionId& id : {b, c}) {
      REQUIRE(st->CreateSession(id).ok());
      REQUIRE(CommitBank(*st, id, 0, 7).ok());
    }
    for (const auto& p : BankFilesIn(dir.path())) {
      if (p == f1 || p == f2) continue;
      const std::string saved = ReadFileBytes(p);
      WriteFileBytes(p, orig1);
      std::size_t refused = 0;
      for (const SessionId& id : {b, c}) {
        auto r = st->LoadVersion(id, 1);
        if (!r.ok()) {
          CHECK(r.status().IsCorruption());
          ++refused;
        }
      }
      CHECK(refused == 1);  // the session whose file it is
      WriteFileBytes(p, saved);
    }
    CHECK(st->LoadHead(b).ok());
    CHECK(st->LoadHead(c).ok());
  }

  SECTION("fork, retention and erase keep exactly the files of kept versions") {
    const SessionId other{"tenant-b", "forked"};
    REQUIRE(st->Fork(kA, 1, other).ok());
    CHECK(SameBank(st->LoadHead(other)->state, MakeBank({0, 2}, 8, 16, 1)));
    REQUIRE(BankFilesIn(dir.path()).size() == 3);
    REQUIRE(*CommitBank(*st, kA, 2, 3) == 3);
    // An orphan, as a commit that crashed before its WriteBatch leaves behind.
    std::filesystem::copy_file(f2, f2.parent_path() / "0000000000000063.bank");
    RetentionPolicy keep1;
    keep1.keep_last = 1;
    CHECK(*st->ApplyRetention(kA, keep1) == std::vector<uint64_t>{1, 2});
    std::set<std::string> names;
    for (const auto& p : BankFilesIn(dir.path())) names.insert(p.filename().string());
    CHECK(names == std::set<std::string>{"0000000000000001.bank", "0000000000000003.bank"});  // other@1, kA@3
    CHECK(st->LoadHead(kA).ok());
    REQUIRE(st->EraseSession(kA).ok());
    CHECK(BankFilesIn(dir.path()).size() == 1);
    REQUIRE(st->CreateSession(kA).ok());
    REQUIRE(*CommitBank(*st, kA, 0, 4) == 1);
    REQUIRE(st->EraseTenant("tenant-b").ok());
    REQUIRE(BankFilesIn(dir.path()).size() == 1);  // kA@1 only
    CHECK(SameBank(st->LoadHead(kA)->state, MakeBank({0, 2}, 8, 16, 4)));
    REQUIRE(st->EraseTenant("tenant-a").ok());
    CHECK(BankFilesIn(dir.path()).empty());
    CHECK(std::filesystem::is_empty(std::filesystem::path(dir.path()) / "banks"));
  }

  SECTION("a history mixing inline and file snapshots reads back whatever the option") {
    st = OpenStore(dir.path(), ring);  // default: these small banks go inline
    REQUIRE(*CommitBank(*st, kA, 2, 3) == 3);
    CHECK(BankFilesIn(dir.path()).size() == 2);
    for (uint32_t v = 1; v <= 3; ++v) CHECK(SameBank(st->LoadVersion(kA, v)->state, MakeBank({0, 2}, 8, 16, v)));
    REQUIRE(st->Rollback(kA, 3, 2).ok());
    CHECK(SameBank(st->LoadHead(kA)->state, MakeBank({0, 2}, 8, 16, 2)));
  }
}

TEST_CASE("persistence bank files: concurrent commits to several sessions share the encode buffers",
          "[persistence]") {
  TempDir dir;
  RocksDbStoreOptions o;
  o.path = dir.path();
  o.keys = MakeKeys();
  o.bank_file_min_bytes = 0;
  o.cached_encode_buffers = 2;  // fewer than the threads: buffers are taken, returned, freed
  auto opened = OpenRocksDbSessionStore(o);
  REQUIRE(opened.ok());
  SessionStore& st = **opened;
  constexpr int kThreads = 4, kRounds = 6;
  std::vector<int> errors(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::string name = std::to_string(t);
      name.insert(0, 1, 's');  // (not "s" + ...: GCC 12 warns falsely about that, -Wrestrict)
      const SessionId id{"tenant-p", name};
      if (!st.CreateSession(id).ok()) { ++errors[static_cast<std::size_t>(t)]; return; }
      for (int r = 0; r < kRounds; ++r) {
        // Sizes differ per thread and round, so buffers of several sizes circulate.
        const int64_t slots = 16 + 8 * t + r;
        const uint32_t seed = static_cast<uint32_t>(t * 100 + r);
        auto v = st.Commit(id, static_cast<uint64_t>(r), MakeBank({0, 1}, slots, 64, seed), TurnTranscript{});
        if (!v.ok() || *v != static_cast<uint64_t>(r + 1)) ++errors[static_cast<std::size_t>(t)];
        auto back = st.LoadHead(id);
        if (!back.ok() || !SameBank(back->state, MakeBank({0, 1}, slots, 64, seed))) {
          ++errors[static_cast<std::size_t>(t)];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int e : errors) CHECK(e == 0);
  CHECK(BankFilesIn(dir.path()).size() == kThreads * kRounds);
}
