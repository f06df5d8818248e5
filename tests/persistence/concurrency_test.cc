// Concurrency: N threads and 2 processes commit to one session with compare-and-set.
// Exactly one writer wins each version; history stays linear; nothing is lost.
#include <catch2/catch.hpp>

#include <barrier>
#include <chrono>
#include <map>
#include <set>
#include <thread>

#include "child_util.h"

using namespace lm2;
using namespace lm2::persistence;
using namespace lm2::persistence::test;

TEST_CASE("persistence concurrency: N threads, one winner per version", "[persistence]") {
  TempDir dir;
  auto st = OpenStore(dir.path(), MakeKeys());
  const SessionId id{"tenant-a", "hot"};
  REQUIRE(st->CreateSession(id).ok());
  constexpr int kThreads = 8, kRounds = 12;
  std::barrier sync(kThreads);
  std::vector<std::vector<uint64_t>> won(kThreads);
  std::vector<int> errors(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        sync.arrive_and_wait();  // nobody commits between here and the next barrier
        auto h = st->Head(id);
        if (!h.ok()) { ++errors[static_cast<std::size_t>(t)]; }
        sync.arrive_and_wait();
        if (!h.ok()) continue;
        MemoryState bank = MakeBank({0}, 4, 8, static_cast<uint32_t>(t * 1000 + r));
        CommitOptions o;
        o.metadata["writer"] = std::to_string(t);
        auto v = st->Commit(id, h->head_version, bank, TurnTranscript{}, o);
        if (v.ok()) {
          won[static_cast<std::size_t>(t)].push_back(*v);
        } else if (!v.status().IsConflict()) {
          ++errors[static_cast<std::size_t>(t)];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int e : errors) REQUIRE(e == 0);
  std::map<uint64_t, int> winner;
  for (int t = 0; t < kThreads; ++t) {
    for (uint64_t v : won[static_cast<std::size_t>(t)]) REQUIRE(winner.emplace(v, t).second);  // one winner
  }
  REQUIRE(winner.size() == kRounds);  // exactly one per round: all saw the same head
  auto head = st->Head(id);
  REQUIRE(head.ok());
  CHECK(head->head_version == kRounds);
  auto versions = st->ListVersions(id);
  REQUIRE(versions.ok());
  REQUIRE(versions->size() == kRounds);
  for (const auto& info : *versions) {
    CHECK(info.parent_version == info.version - 1);
    CHECK(info.metadata.at("writer") == std::to_string(winner.at(info.version)));
    CHECK(info.turn_count == info.version);  // no lost update: every turn counted once
  }
}

TEST_CASE("persistence concurrency: 2 processes, one winner per version", "[persistence]") {
  TempDir dir;
  const std::string db = dir.sub("db");
  const int rounds = 25;
  // Create the store first, then start both writers' rounds together, 1 s from now.
  { auto st = OpenStore(db, MakeKeys()); }
  const auto start = std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::system_clock::now().time_since_epoch()).count() + 1000;
  Child a = SpawnChild({"cas", db, "A", std::to_string(rounds), std::to_string(start)});
  Child b = SpawnChild({"cas", db, "B", std::to_string(rounds), std::to_string(start)});
  std::vector<std::string> la = ReadAllLines(a.out), lb = ReadAllLines(b.out);
  ::close(a.out);
  ::close(b.out);
  const int sa = WaitChild(a.pid), sb = WaitChild(b.pid);
  REQUIRE(WIFEXITED(sa));
  REQUIRE(WEXITSTATUS(sa) == 0);
  REQUIRE(WIFEXITED(sb));
  REQUIRE(WEXITSTATUS(sb) == 0);
  REQUIRE(la.size() == rounds);
  REQUIRE(lb.size() == rounds);
  std::map<uint64_t, std::string> winner;
  int lost = 0;
  for (auto* lines : {&la, &lb}) {
    const std::string who = lines == &la ? "A" : "B";
    for (const auto& l : *lines) {
      if (l.rfind("won ", 0) == 0) {
        REQUIRE(winner.emplace(std::stoull(l.substr(4)), who).second);
      } else {
        REQUIRE(l.rfind("lost ", 0) == 0);
        ++lost;
      }
    }
  }
  INFO("wins " << winner.size() << ", conflicts " << lost);
  CHECK(lost > 0);  // the processes really raced
  auto st = OpenStore(db, MakeKeys());
  const SessionId id{"tenant-crash", "s1"};
  auto head = st->Head(id);
  REQUIRE(head.ok());
  CHECK(head->head_version == winner.size());
  auto versions = st->ListVersions(id);
  REQUIRE(versions.ok());
  REQUIRE(versions->size() == winner.size());
  for (const auto& info : *versions) {
    REQUIRE(winner.count(info.version) == 1);
    CHECK(info.metadata.at("writer") == winner.at(info.version));
    CHECK(info.parent_version == info.version - 1);
    CHECK(st->LoadVersion(id, info.version).ok());
  }
}
