// Envelope encryption: tampering, truncation, moved records, KEK handling.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "lm2/persistence/envelope.h"
#include "test_util.h"

using namespace lm2;
using namespace lm2::persistence;
using lm2::persistence::test::KeyOf;
using lm2::persistence::test::TempDir;

namespace {
std::vector<uint8_t> Plain(std::size_t n) {
  std::vector<uint8_t> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(i * 31 + 7);
  return p;
}
const RecordBinding kBind{"tenant-a", "session-1", 3, RecordKind::kSnapshot};
}  // namespace

TEST_CASE("persistence crypto: seal/open round trip, fresh nonce per record", "[persistence]") {
  auto dek = RandomKey();
  REQUIRE(dek.ok());
  auto p = Plain(1000);
  auto a = SealRecord(*dek, kBind, p.data(), p.size());
  auto b = SealRecord(*dek, kBind, p.data(), p.size());
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(a->size == p.size() + kRecordOverheadBytes);
  CHECK(std::memcmp(a->data.get() + 6, b->data.get() + 6, kNonceBytes) != 0);
  CHECK(std::memcmp(a->data.get(), b->data.get(), a->size) != 0);
  // The plaintext does not appear in the record.
  CHECK(std::search(a->data.get(), a->data.get() + a->size, p.begin(), p.begin() + 32) == a->data.get() + a->size);
  auto o = OpenRecord(*dek, kBind, a->data.get(), a->size);
  REQUIRE(o.ok());
  REQUIRE(o->size() == p.size());
  CHECK(std::memcmp(o->data(), p.data(), p.size()) == 0);
}

TEST_CASE("persistence crypto: every flipped byte and every truncation is Corruption", "[persistence]") {
  auto dek = RandomKey();
  REQUIRE(dek.ok());
  auto p = Plain(300);
  auto rec = SealRecord(*dek, kBind, p.data(), p.size());
  REQUIRE(rec.ok());
  std::vector<uint8_t> bytes(rec->data.get(), rec->data.get() + rec->size);
  for (std::size_t pos = 0; pos < bytes.size(); ++pos) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}}) {
      auto t = bytes;
      t[pos] ^= mask;
      auto o = OpenRecord(*dek, kBind, t.data(), t.size());
      INFO("byte " << pos);
      REQUIRE_FALSE(o.ok());
      REQUIRE(o.status().IsCorruption());
    }
  }
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    REQUIRE(OpenRecord(*dek, kBind, bytes.data(), n).status().IsCorruption());
  }
  auto longer = bytes;
  longer.push_back(0);
  CHECK(OpenRecord(*dek, kBind, longer.data(), longer.size()).status().IsCorruption());
}

TEST_CASE("persistence crypto: a record bound elsewhere or under another key fails", "[persistence]") {
  auto dek = RandomKey();
  auto other = RandomKey();
  REQUIRE(dek.ok());
  REQUIRE(other.ok());
  auto p = Plain(64);
  auto rec = SealRecord(*dek, kBind, p.data(), p.size());
  REQUIRE(rec.ok());
  const uint8_t* r = rec->data.get();
  CHECK(OpenRecord(*dek, {"tenant-b", "session-1", 3, RecordKind::kSnapshot}, r, rec->size).status().IsCorruption());
  CHECK(OpenRecord(*dek, {"tenant-a", "session-2", 3, RecordKind::kSnapshot}, r, rec->size).status().IsCorruption());
  CHECK(OpenRecord(*dek, {"tenant-a", "session-1", 4, RecordKind::kSnapshot}, r, rec->size).status().IsCorruption());
  CHECK(OpenRecord(*dek, {"tenant-a", "session-1", 3, RecordKind::kTranscript}, r, rec->size).status().IsCorruption());
  // Length-prefixing: moving bytes between tenant and session ids changes the binding.
  CHECK(OpenRecord(*dek, {"tenant-", "asession-1", 3, RecordKind::kSnapshot}, r, rec->size).status().IsCorruption());
  CHECK(OpenRecord(*other, kBind, r, rec->size).status().IsCorruption());
}

TEST_CASE("persistence crypto: DEK wrap with wrong, missing and rotated KEKs", "[persistence]") {
  KeyringKeyProvider ring;
  REQUIRE(ring.Add("*", 1, KeyOf(1)).ok());
  auto dek = RandomKey();
  REQUIRE(dek.ok());
  auto kek1 = ring.CurrentKek("alice");
  REQUIRE(kek1.ok());
  CHECK(kek1->key_id == "*/1");
  auto w1 = WrapDek(*kek1, "alice", "s1", *dek);
  REQUIRE(w1.ok());
  // Per-tenant KEKs are derived: bob's differs from alice's.
  auto bob = ring.CurrentKek("bob");
  REQUIRE(bob.ok());
  CHECK(std::memcmp(bob->key.data(), kek1->key.data(), kKekBytes) != 0);

  auto u = UnwrapDek(ring, "alice", "s1", *w1);
  REQUIRE(u.ok());
  CHECK(std::memcmp(u->data(), dek->data(), kDekBytes) == 0);
  // Moved to another tenant or session: refused.
  CHECK(UnwrapDek(ring, "bob", "s1", *w1).status().IsPermissionDenied());
  CHECK(UnwrapDek(ring, "alice", "s2", *w1).status().IsPermissionDenied());
  // Rotation: new wraps use version 2, old ones still unwrap.
  REQUIRE(ring.Add("*", 2, KeyOf(2)).ok());
  auto kek2 = ring.CurrentKek("alice");
  REQUIRE(kek2.ok());
  CHECK(kek2->key_id == "*/2");
  CHECK(UnwrapDek(ring, "alice", "s1", *w1).ok());
  auto w2 = WrapDek(*kek2, "alice", "s1", *dek);
  REQUIRE(w2.ok());
  // An own entry for a tenant takes precedence over the master.
  REQUIRE(ring.Add("alice", 1, KeyOf(9)).ok());
  CHECK(ring.CurrentKek("alice")->key_id == "alice/1");
  // Wrong KEK under the same id: refused.
  KeyringKeyProvider wrong;
  REQUIRE(wrong.Add("*", 1, KeyOf(3)).ok());
  CHECK(UnwrapDek(wrong, "alice", "s1", *w1).status().IsPermissionDenied());
  // Missing KEK.
  ring.Remove("*", 1);
  CHECK(UnwrapDek(ring, "alice", "s1", *w1).status().IsPermissionDenied());
  CHECK(UnwrapDek(ring, "alice", "s1", *w2).ok());
  // Tampered wrapped key.
  for (std::size_t pos = 0; pos < w2->size(); ++pos) {
    std::string t = *w2;
    t[pos] = static_cast<char>(t[pos] ^ 0x10);
    auto r = UnwrapDek(ring, "alice", "s1", t);
    REQUIRE_FALSE(r.ok());
    REQUIRE((r.status().IsPermissionDenied() || r.status().IsCorruption()));
  }
}

TEST_CASE("persistence crypto: file and environment key providers", "[persistence]") {
  TempDir dir;
  const std::string path = dir.sub("keyring");
  const std::string hex1(64, 'a'), hex2 = std::string(62, '0') + "01";
  {
    std::ofstream f(path);
    f << "# tenant version key\n* 1 " << hex1 << "\nalice 3 " << hex2 << "  # alice's own\n";
  }
  ::chmod(path.c_str(), 0644);
  CHECK(OpenFileKeyProvider(path).status().IsPermissionDenied());
  ::chmod(path.c_str(), 0600);
  auto p = OpenFileKeyProvider(path);
  REQUIRE(p.ok());
  auto a = (*p)->CurrentKek("alice");
  REQUIRE(a.ok());
  CHECK(a->key_id == "alice/3");
  CHECK(a->key.data()[31] == 1);
  CHECK((*p)->CurrentKek("bob")->key_id == "*/1");
  CHECK((*p)->GetKek("bob", "alice/3").status().IsPermissionDenied());
  {
    std::ofstream f(path);
    f << "* 1 " << std::string(63, 'a') << "\n";
  }
  auto bad = OpenFileKeyProvider(path);
  CHECK(bad.status().IsInvalidArgument());
  CHECK(bad.status().message().find("aaaa") == std::string_view::npos);  // no key bytes in messages

  ::setenv("LM2_TEST_KEK", hex1.c_str(), 1);
  auto e = OpenEnvKeyProvider("LM2_TEST_KEK");
  REQUIRE(e.ok());
  CHECK((*e)->CurrentKek("x")->key_id == "*/1");
  ::setenv("LM2_TEST_KEK", ("* 1 " + hex1 + "; * 2 " + hex2).c_str(), 1);
  auto e2 = OpenEnvKeyProvider("LM2_TEST_KEK");
  REQUIRE(e2.ok());
  CHECK((*e2)->CurrentKek("x")->key_id == "*/2");
  ::unsetenv("LM2_TEST_KEK");
  CHECK(OpenEnvKeyProvider("LM2_TEST_KEK").status().IsNotFound());
}
