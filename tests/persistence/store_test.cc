// RocksDB session store: operations, CAS, retention, tampering and moved records at the
// storage level, KEK rotation, and fault injection through the Env.
#include <catch2/catch.hpp>

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

#include <atomic>
#include <fstream>
#include <sstream>
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

Result<uint64_t> CommitBank(SessionStore& st, const SessionId& id, uint64_t expected, uint32_t seed,
                            CommitOptions o = {}) {
  MemoryState bank = MakeBank({0, 2}, 8, 16, seed);
  return st.Commit(id, expected, bank, TurnTranscript{{static_cast<int32_t>(seed)}, {1, 2}}, o);
}
}  // namespace

TEST_CASE("persistence store: create, commit with CAS, load, list", "[persistence]") {
  TempDir dir;
  auto st = OpenStore(dir.path(), MakeKeys());
  REQUIRE(st->CreateSession(kA).ok());
  CHECK(st->CreateSession(kA).code() == StatusCode::kAlreadyExists);
  CHECK(st->LoadHead(kA).status().IsNotFound());
  CHECK(st->Head({"tenant-a", "nope"}).status().IsNotFound());
  CommitOptions o;
  o.metadata = {{"k", "v"}};
  auto v1 = CommitBank(*st, kA, 0, 1, o);
  REQUIRE(v1.ok());
  CHECK(*v1 == 1);
  CHECK(CommitBank(*st, kA, 0, 2).status().IsConflict());  // stale writer: nothing written
  auto v2 = CommitBank(*st, kA, 1, 2);
  REQUIRE(v2.ok());
  CHECK(*v2 == 2);
  auto head = st->LoadHead(kA);
  REQUIRE(head.ok());
  CHECK(head->info.version == 2);
  CHECK(head->info.parent_version == 1);
  CHECK(head->info.turn_count == 2);
  CHECK(head->info.token_count == 6);
  CHECK(SameBank(head->state, MakeBank({0, 2}, 8, 16, 2)));
  CHECK(head->transcript == TurnTranscript{{2}, {1, 2}});
  auto one = st->LoadVersion(kA, 1);
  REQUIRE(one.ok());
  CHECK(SameBank(one->state, MakeBank({0, 2}, 8, 16, 1)));
  CHECK(one->info.metadata.at("k") == "v");
  CHECK(st->LoadVersion(kA, 3).status().IsNotFound());
  LoadOptions other_model;
  other_model.expected_fingerprint = "fp-other";
  CHECK(st->LoadHead(kA, other_model).status().code() == StatusCode::kFailedPrecondition);
  auto list = st->ListVersions(kA);
  REQUIRE(list.ok());
  REQUIRE(list->size() == 2);
  CHECK((*list)[0].version == 1);
  CHECK((*list)[1].parent_version == 1);
  REQUIRE(st->CreateSession({"tenant-a", "s2"}).ok());
  REQUIRE(st->CreateSession({"tenant-ab", "s3"}).ok());
  auto sessions = st->ListSessions("tenant-a");
  REQUIRE(sessions.ok());
  CHECK(*sessions == std::vector<std::string>{"s1", "s2"});
  // Reopen: everything is still there.
  st.reset();
  st = OpenStore(dir.path(), MakeKeys());
  CHECK(st->Head(kA)->head_version == 2);
  // A second store object on the same database is refused (RocksDB's LOCK).
  RocksDbStoreOptions o2;
  o2.path = dir.path();
  o2.keys = MakeKeys();
  o2.open_timeout_ms = 50;
  CHECK(OpenRocksDbSessionStore(o2).status().code() == StatusCode::kUnavailable);
}

TEST_CASE("persistence store: rollback moves the head back, fork copies a version", "[persistence]") {
  TempDir dir;
  auto st = OpenStore(dir.path(), MakeKeys());
  REQUIRE(st->CreateSession(kA).ok());
  for (uint64_t v = 0; v < 4; ++v) REQUIRE(CommitBank(*st, kA, v, static_cast<uint32_t>(v + 1)).ok());
  CHECK(st->Rollback(kA, 3, 2).IsConflict());
  CHECK(st->Rollback(kA, 4, 9).IsNotFound());
  REQUIRE(st->Rollback(kA, 4, 2).ok());
  CHECK(SameBank(st->LoadHead(kA)->state, MakeBank({0, 2}, 8, 16, 2)));
  auto v5 = CommitBank(*st, kA, 2, 50);
  REQUIRE(v5.ok());
  CHECK(*v5 == 5);  // numbers are never reused
  CHECK(st->LoadHead(kA)->info.parent_version == 2);
  CHECK(st->LoadHead(kA)->info.turn_count == 3);  // the rolled-back turns do not count
  CHECK(st->ListVersions(kA)->size() == 5);

  const SessionId forked{"tenant-a", "s1-fork"}, other_tenant{"tenant-b", "copy"};
  REQUIRE(st->Fork(kA, 3, forked).ok());
  CHECK(st->Fork(kA, 3, forked).code() == StatusCode::kAlreadyExists);
  CHECK(st->Fork(kA, 77, {"tenant-a", "x"}).IsNotFound());
  auto f = st->LoadHead(forked);
  REQUIRE(f.ok());
  CHECK(f->info.version == 1);
  CHECK(f->info.metadata.at("lm2.fork_of") == "s1@3");
  CHECK(SameBank(f->state, MakeBank({0, 2}, 8, 16, 3)));
  CHECK(f->transcript == TurnTranscript{{3}, {1, 2}});
  REQUIRE(CommitBank(*st, forked, 1, 60).ok());
  CHECK(st->Head(kA)->head_version == 5);  // the original is untouched
  REQUIRE(st->Fork(kA, 1, other_tenant).ok());
  CHECK(SameBank(st->LoadHead(other_tenant)->state, MakeBank({0, 2}, 8, 16, 1)));
}

TEST_CASE("persistence store: retention keeps exactly what the policy says", "[persistence]") {
  TempDir dir;
  auto st = OpenStore(dir.path(), MakeKeys());
  REQUIRE(st->CreateSession(kA).ok());
  for (uint64_t v = 0; v < 10; ++v) {
    REQUIRE(CommitBank(*st, kA, v, static_cast<uint32_t>(v)).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
  }
  auto versions = [&] {
    std::set<uint64_t> s;
    auto list = st->ListVersions(kA);
    REQUIRE(list.ok());
    for (const auto& i : *list) s.insert(i.version);
    return s;
  };
  CHECK(st->ApplyRetention(kA, {})->empty());  // no rule: nothing removed
  RetentionPolicy last8;
  last8.keep_last = 8;
  CHECK(*st->ApplyRetention(kA, last8) == std::vector<uint64_t>{1, 2});
  CHECK(versions() == std::set<uint64_t>{3, 4, 5, 6, 7, 8, 9, 10});
  // Age: keep versions created at or after version 6's time (plus the K newest: none).
  auto infos = *st->ListVersions(kA);
  RetentionPolicy age;
  age.max_age_ms = 1000;
  age.now_unix_ms = infos[3].created_unix_ms + 1000;  // infos[3] is version 6
  std::set<uint64_t> expect;
  for (const auto& i : infos) if (i.created_unix_ms >= infos[3].created_unix_ms) expect.insert(i.version);
  REQUIRE(st->ApplyRetention(kA, age).ok());
  CHECK(versions() == expect);
  CHECK(expect.count(5) == 0);
  // Union of the rules, and the head is always kept even when old.
  REQUIRE(st->Rollback(kA, 10, 6).ok());
  RetentionPolicy both;
  both.keep_last = 2;
  both.max_age_ms = 1;
  both.now_unix_ms = infos.back().created_unix_ms + 1000000;  // everything is old
  auto removed = st->ApplyRetention(kA, both);
  REQUIRE(removed.ok());
  CHECK(versions() == std::set<uint64_t>{6, 9, 10});
  CHECK(st->LoadVersion(kA, 7).status().IsNotFound());
  CHECK(st->LoadHead(kA)->info.version == 6);
  // Retention of removed versions leaves no transcript or snapshot records behind.
  st.reset();
  RawDb raw(dir.path());
  CHECK(raw.All("snapshots").size() == 3);
  CHECK(raw.All("transcripts").size() == 3);
}

TEST_CASE("persistence store: tampered or truncated stored records are refused", "[persistence]") {
  TempDir dir;
  auto st = OpenStore(dir.path(), MakeKeys(), ProcessSharing::kPerOperation);
  REQUIRE(st->CreateSession(kA).ok());
  REQUIRE(CommitBank(*st, kA, 0, 1).ok());
  REQUIRE(CommitBank(*st, kA, 1, 2).ok());
  struct Target {
    const char* cf;
    std::string key;
  };
  const std::vector<Target> targets = {
      {"snapshots", keys::RecordKey(kA.tenant, kA.session, 2)},
      {"transcripts", keys::RecordKey(kA.tenant, kA.session, 2)},
      {"sessions", keys::HeadKey(kA.tenant, kA.session)},
      {"keys", keys::SessionPrefix(kA.tenant, kA.session)},
  };
  int tried = 0;
  for (const Target& t : targets) {
    std::string orig;
    {
      RawDb raw(dir.path());
      for (auto& [k, v] : raw.All(t.cf)) if (k == t.key) orig = v;
    }
    REQUIRE(!orig.empty());
    std::vector<std::size_t> positions;
    for (std::size_t p = 0; p < std::min<std::size_t>(orig.size(), 24); ++p) positions.push_back(p);
    for (std::size_t p = 24; p < orig.size(); p += std::max<std::size_t>(1, orig.size() / 12)) positions.push_back(p);
    positions.push_back(orig.size() - 1);
    std::vector<std::string> variants;
    for (std::size_t p : positions) {
      std::string v = orig;
      v[p] = static_cast<char>(v[p] ^ 0x04);
      variants.push_back(v);
    }
    for (std::size_t n : {std::size_t{0}, std::size_t{5}, orig.size() / 2, orig.size() - 1}) variants.push_back(orig.substr(0, n));
    for (const std::string& v : variants) {
      { RawDb raw(dir.path()); raw.Put(t.cf, t.key, v); }
      auto r = st->LoadHead(kA);
      INFO(t.cf << " variant size " << v.size());
      REQUIRE_FALSE(r.ok());
      REQUIRE((r.status().IsCorruption() || r.status().IsPermissionDenied()));
      ++tried;
    }
    { RawDb raw(dir.path()); raw.Put(t.cf, t.key, orig); }
    REQUIRE(st->LoadHead(kA).ok());
  }
  CHECK(tried > 100);
}

TEST_CASE("persistence store: a record copied to another tenant, session or version fails", "[persistence]") {
  TempDir dir;
  auto keys_ring = MakeKeys();
  auto st = OpenStore(dir.path(), keys_ring, ProcessSharing::kPerOperation);
  const SessionId b{"tenant-a", "s2"}, c{"tenant-c", "s1"};
  for (const SessionId& id : {kA, b, c}) {
    REQUIRE(st->CreateSession(id).ok());
    REQUIRE(CommitBank(*st, id, 0, 1).ok());
    REQUIRE(CommitBank(*st, id, 1, 2).ok());
  }
  std::string rec_a_v1;
  {
    RawDb raw(dir.path());
    for (auto& [k, v] : raw.All("snapshots")) if (k == keys::RecordKey(kA.tenant, kA.session, 1)) rec_a_v1 = v;
  }
  REQUIRE(!rec_a_v1.empty());
  struct Dest {
    SessionId id;
    uint64_t version;
  };
  for (const Dest& d : {Dest{kA, 2}, Dest{b, 1}, Dest{c, 1}}) {
    std::string saved;
    const std::string key = keys::RecordKey(d.id.tenant, d.id.session, d.version);
    {
      RawDb raw(dir.path());
      for (auto& [k, v] : raw.All("snapshots")) if (k == key) saved = v;
      raw.Put("snapshots", key, rec_a_v1);
    }
    auto r = st->LoadVersion(d.id, d.version);
    INFO(d.id.tenant << "/" << d.id.session << "@" << d.version);
    CHECK(r.status().IsCorruption());
    { RawDb raw(dir.path()); raw.Put("snapshots", key, saved); }
    CHECK(st->LoadVersion(d.id, d.version).ok());
  }
  // A wrapped key copied to another session does not unwrap.
  {
    RawDb raw(dir.path());
    std::string wa;
    for (auto& [k, v] : raw.All("keys")) if (k == keys::SessionPrefix(kA.tenant, kA.session)) wa = v;
    raw.Put("keys", keys::SessionPrefix(b.tenant, b.session), wa);
  }
  CHECK(st->LoadHead(b).status().IsPermissionDenied());
}

TEST_CASE("persistence store: wrong, missing, rotated KEK and rewrap", "[persistence]") {
  TempDir dir;
  auto ring = MakeKeys(1);
  {
    auto st = OpenStore(dir.path(), ring);
    REQUIRE(st->CreateSession(kA).ok());
    REQUIRE(CommitBank(*st, kA, 0, 1).ok());
  }
  {
    auto st = OpenStore(dir.path(), MakeKeys(2));  // wrong KEK, same id "*/1"
    CHECK(st->LoadHead(kA).status().IsPermissionDenied());
    CHECK(CommitBank(*st, kA, 1, 2).status().IsPermissionDenied());
  }
  {
    auto st = OpenStore(dir.path(), std::make_shared<KeyringKeyProvider>());  // no KEK
    CHECK(st->LoadHead(kA).status().IsPermissionDenied());
    CHECK(st->CreateSession({"tenant-a", "new"}).IsNotFound());
  }
  auto st = OpenStore(dir.path(), ring);
  REQUIRE(ring->Add("*", 2, KeyOf(2)).ok());  // rotation
  const SessionId fresh{"tenant-a", "s-new"};
  REQUIRE(st->CreateSession(fresh).ok());
  REQUIRE(CommitBank(*st, fresh, 0, 5).ok());
  CHECK(st->LoadHead(kA).ok());  // old key still unwraps
  auto rewrapped = st->RewrapTenantKeys("tenant-a");
  REQUIRE(rewrapped.ok());
  CHECK(*rewrapped == 1);  // only kA was on */1
  CHECK(*st->RewrapTenantKeys("tenant-a") == 0);
  ring->Remove("*", 1);  // the old KEK is retired
  CHECK(SameBank(st->LoadHead(kA)->state, MakeBank({0, 2}, 8, 16, 1)));
  CHECK(st->LoadHead(fresh).ok());
  st.reset();
  RawDb raw(dir.path());
  for (auto& [k, v] : raw.All("keys")) CHECK(*WrappedKeyId(v) == "*/2");
}

TEST_CASE("persistence store: erase session and erase tenant (crypto-shredding)", "[persistence]") {
  TempDir dir;
  auto ring = MakeKeys();
  const SessionId b{"tenant-a", "s2"}, keep{"tenant-b", "s1"};
  {
    auto st = OpenStore(dir.path(), ring);
    for (const SessionId& id : {kA, b, keep}) {
      REQUIRE(st->CreateSession(id).ok());
      REQUIRE(CommitBank(*st, id, 0, 1).ok());
      REQUIRE(CommitBank(*st, id, 1, 2).ok());
    }
    REQUIRE(st->EraseSession(b).ok());
    CHECK(st->LoadHead(b).status().IsNotFound());
    CHECK(*st->ListSessions("tenant-a") == std::vector<std::string>{"s1"});
    REQUIRE(st->EraseSession(b).ok());  // idempotent
  }
  // What an attacker copied before the erase: the raw sealed snapshot and wrapped key.
  std::string raw_snapshot, raw_wrapped;
  {
    RawDb raw(dir.path());
    for (auto& [k, v] : raw.All("snapshots")) if (k == keys::RecordKey(kA.tenant, kA.session, 2)) raw_snapshot = v;
    for (auto& [k, v] : raw.All("keys")) if (k == keys::SessionPrefix(kA.tenant, kA.session)) raw_wrapped = v;
  }
  REQUIRE(!raw_snapshot.empty());
  REQUIRE(!raw_wrapped.empty());
  {  // Sanity: before the erase, the copied bytes do decrypt with what the store holds.
    auto dek = UnwrapDek(*ring, kA.tenant, kA.session, raw_wrapped);
    REQUIRE(dek.ok());
    CHECK(OpenRecord(*dek, {kA.tenant, kA.session, 2, RecordKind::kSnapshot},
                     reinterpret_cast<const uint8_t*>(raw_snapshot.data()), raw_snapshot.size()).ok());
  }
  {
    auto st = OpenStore(dir.path(), ring);
    REQUIRE(st->EraseTenant("tenant-a").ok());
    CHECK(st->ListSessions("tenant-a")->empty());
    CHECK(st->LoadHead(kA).status().IsNotFound());
    CHECK(st->LoadHead(keep).ok());  // other tenants untouched
  }
  { auto st = OpenStore(dir.path(), ring); }  // reopen: obsolete files are purged
  // 1. Nothing the store holds (any value of any column family, tried as a wrapped key
  //    of the erased session, even with the tenant's KEK still available) opens the record.
  {
    RawDb raw(dir.path());
    for (const char* cf : RawDb::kCfs) {
      for (auto& [k, v] : raw.All(cf)) {
        auto dek = UnwrapDek(*ring, kA.tenant, kA.session, v);
        CHECK_FALSE(dek.ok());
        CHECK(k.find(keys::TenantPrefix("tenant-a")) != 0);
      }
    }
  }
  // 2. No file of the database still contains the wrapped key bytes.
  const std::string needle = raw_wrapped.substr(raw_wrapped.size() - 48);  // nonce + wrapped DEK + tag
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir.path())) {
    if (!e.is_regular_file()) continue;
    std::ifstream f(e.path(), std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    const std::string content = ss.str();
    INFO(e.path().string());
    CHECK(content.find(needle) == std::string::npos);
  }
}

namespace {
// A FileSystem that fails every write and sync (WAL, bank files) while `fail` is set.
class FailingFs : public rocksdb::FileSystemWrapper {
 public:
  explicit FailingFs(std::shared_ptr<rocksdb::FileSystem> t) : FileSystemWrapper(std::move(t)) {}
  const char* Name() const override { return "FailingFs"; }
  std::atomic<bool> fail{false};
  std::atomic<int> failures{0};

  class File : public rocksdb::FSWritableFileWrapper {
   public:
    File(std::unique_ptr<rocksdb::FSWritableFile> f, FailingFs* fs)
        : FSWritableFileWrapper(f.get()), owned_(std::move(f)), fs_(fs) {}
    rocksdb::IOStatus Append(const rocksdb::Slice& d, const rocksdb::IOOptions& o, rocksdb::IODebugContext* g) override {
      if (fs_->fail) { ++fs_->failures; return rocksdb::IOStatus::IOError("injected write fault"); }
      return FSWritableFileWrapper::Append(d, o, g);
    }
    rocksdb::IOStatus Append(const rocksdb::Slice& d, const rocksdb::IOOptions& o,
                             const rocksdb::DataVerificationInfo& v, rocksdb::IODebugContext* g) override {
      if (fs_->fail) { ++fs_->failures; return rocksdb::IOStatus::IOError("injected write fault"); }
      return FSWritableFileWrapper::Append(d, o, v, g);
    }
    rocksdb::IOStatus Sync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* g) override {
      if (fs_->fail) { ++fs_->failures; return rocksdb::IOStatus::IOError("injected sync fault"); }
      return FSWritableFileWrapper::Sync(o, g);
    }
    rocksdb::IOStatus Fsync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* g) override {
      if (fs_->fail) { ++fs_->failures; return rocksdb::IOStatus::IOError("injected sync fault"); }
      return FSWritableFileWrapper::Fsync(o, g);
    }

   private:
    std::unique_ptr<rocksdb::FSWritableFile> owned_;
    FailingFs* fs_;
  };

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r, rocksdb::IODebugContext* g) override {
    std::unique_ptr<rocksdb::FSWritableFile> inner;
    auto s = FileSystemWrapper::NewWritableFile(f, o, &inner, g);
    if (s.ok()) *r = std::make_unique<File>(std::move(inner), this);
    return s;
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r, rocksdb::IODebugContext* g) override {
    std::unique_ptr<rocksdb::FSWritableFile> inner;
    auto s = FileSystemWrapper::ReopenWritableFile(f, o, &inner, g);
    if (s.ok()) *r = std::make_unique<File>(std::move(inner), this);
    return s;
  }
};
}  // namespace

TEST_CASE("persistence store: injected write faults fail the commit and lose nothing", "[persistence]") {
  const uint64_t bank_file_min = GENERATE(uint64_t{0}, RocksDbStoreOptions{}.bank_file_min_bytes);
  INFO("bank_file_min_bytes " << bank_file_min);
  TempDir dir;
  auto fs = std::make_shared<FailingFs>(rocksdb::FileSystem::Default());
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(fs);
  auto ring = MakeKeys();
  {
    auto st = OpenStore(dir.path(), ring, ProcessSharing::kExclusive, env.get(), bank_file_min);
    REQUIRE(st->CreateSession(kA).ok());
    REQUIRE(CommitBank(*st, kA, 0, 1).ok());
    REQUIRE(CommitBank(*st, kA, 1, 2).ok());
    fs->fail = true;
    auto r = CommitBank(*st, kA, 2, 3);
    CHECK_FALSE(r.ok());
    CHECK(r.status().code() == StatusCode::kIOError);
    CHECK(fs->failures > 0);
    fs->fail = false;
  }
  auto st = OpenStore(dir.path(), ring);
  auto head = st->LoadHead(kA);
  REQUIRE(head.ok());
  CHECK(head->info.version == 2);
  CHECK(SameBank(head->state, MakeBank({0, 2}, 8, 16, 2)));
  auto v3 = CommitBank(*st, kA, 2, 3);
  REQUIRE(v3.ok());
  CHECK(*v3 == 3);
}
