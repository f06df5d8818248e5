// Crash consistency: a child process commits in a loop and is SIGKILLed at random
// moments; after each kill the store reopens with a complete, decryptable head that is
// at least the last acknowledged commit, and every listed version decrypts. Banks are
// stored inline and in bank files in alternate rounds.
#include <catch2/catch.hpp>

#include <chrono>
#include <random>
#include <thread>

#include "child_util.h"

using namespace lm2;
using namespace lm2::persistence;
using namespace lm2::persistence::test;

TEST_CASE("persistence crash: SIGKILL during commits never loses or tears a version", "[persistence]") {
  TempDir dir;
  const std::string db = dir.sub("db");
  const SessionId id{"tenant-crash", "s1"};
  const int rounds = 24;
  std::mt19937 rng(12345);
  uint64_t total_acked = 0, kills_before_first_ack = 0;
  uint64_t durable = 0;  // highest version known committed before this round
  for (int round = 0; round < rounds; ++round) {
    // Odd rounds store every bank in its own file, even rounds inline in RocksDB: the
    // history mixes both, and both must survive the kills.
    Child c = SpawnChild({"commit-loop", db, round % 2 == 1 ? "0" : "1048576"});
    std::string buf;
    std::string first;
    // Half the rounds kill right after the first ack, the rest after a random delay, and
    // every fourth round kills while the child may still be opening the database.
    if (round % 4 != 3) first = ReadLine(c.out, &buf);
    if (round % 4 == 3) ++kills_before_first_ack;
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 60000));
    ::kill(c.pid, SIGKILL);
    const int status = WaitChild(c.pid);
    REQUIRE(WIFSIGNALED(status));
    std::vector<std::string> lines = ReadAllLines(c.out, buf);
    ::close(c.out);
    if (!first.empty()) lines.insert(lines.begin(), first);
    uint64_t last_acked = 0;
    for (const auto& l : lines) {
      REQUIRE(l.rfind("acked ", 0) == 0);
      last_acked = std::stoull(l.substr(6));
      ++total_acked;
    }
    auto st = OpenStore(db, MakeKeys());
    auto head = st->Head(id);
    if (!head.ok()) {  // killed before the session was created
      REQUIRE(head.status().IsNotFound());
      REQUIRE(last_acked == 0);
      REQUIRE(durable == 0);
      continue;
    }
    INFO("round " << round << " head " << head->head_version << " last acked " << last_acked
                  << " durable before " << durable);
    const uint64_t floor = std::max(durable, last_acked);
    REQUIRE(head->head_version >= floor);      // nothing acknowledged is lost
    REQUIRE(head->head_version <= floor + 1);  // at most the commit in flight landed
    durable = head->head_version;
    REQUIRE(head->head_version == head->last_version);
    if (head->head_version == 0) continue;
    auto snap = st->LoadHead(id);
    REQUIRE(snap.ok());
    REQUIRE(SameBank(snap->state, MakeBank({0, 3}, 64, 160, static_cast<uint32_t>(head->head_version))));
    auto versions = st->ListVersions(id);
    REQUIRE(versions.ok());
    REQUIRE(!versions->empty());
    REQUIRE(versions->back().version == head->head_version);
    for (std::size_t i = 0; i < versions->size(); ++i) {
      const uint64_t v = (*versions)[i].version;
      if (i > 0) REQUIRE(v == (*versions)[i - 1].version + 1);  // contiguous history
      REQUIRE((*versions)[i].parent_version == v - 1);           // linear: no fork
      auto s = st->LoadVersion(id, v);
      REQUIRE(s.ok());
      REQUIRE(SameBank(s->state, MakeBank({0, 3}, 64, 160, static_cast<uint32_t>(v))));
    }
    // Keep the next round's checks bounded.
    RetentionPolicy keep;
    keep.keep_last = 4;
    REQUIRE(st->ApplyRetention(id, keep).ok());
    CHECK(BankFilesIn(db).size() <= 4);  // removed versions' files and orphans are swept
  }
  CHECK(total_acked > static_cast<uint64_t>(rounds));  // the kills hit a busy committer
  CHECK(kills_before_first_ack > 0);
}
