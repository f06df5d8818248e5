// persistence_test_child: a helper process for the crash and multi-process tests.
//
//   persistence_test_child commit-loop <db> [<bank_file_min_bytes>]
//                                                    commit forever (until SIGKILL); prints
//                                                    "acked <v>" after each durable commit
//   persistence_test_child cas <db> <writer> <n> [<start unix ms>]
//                                                    n rounds of Head -> Commit(head) on a
//                                                    store opened per operation; prints
//                                                    "won <v>" or "lost <v>" per round
// Keys come from LM2_KEK (the environment key provider). Bank of version v: seed v.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>

#include "test_util.h"

using namespace lm2;
using namespace lm2::persistence;

namespace {
void Say(const std::string& line) {
  const std::string s = line + "\n";
  if (::write(1, s.data(), s.size()) != static_cast<ssize_t>(s.size())) std::_Exit(3);
}
int Fail(const Status& s) {
  std::fprintf(stderr, "child: %s\n", s.ToString().c_str());
  return 2;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 64;
  const std::string mode = argv[1];
  auto keys = OpenEnvKeyProvider("LM2_KEK");
  if (!keys.ok()) return Fail(keys.status());
  RocksDbStoreOptions o;
  o.path = argv[2];
  o.keys = std::shared_ptr<KeyProvider>(std::move(keys).value());
  o.open_timeout_ms = 30000;
  const SessionId id{"tenant-crash", "s1"};
  if (mode == "commit-loop") {
    if (argc > 3) o.bank_file_min_bytes = std::stoull(argv[3]);
    auto st = OpenRocksDbSessionStore(o);
    if (!st.ok()) return Fail(st.status());
    Status c = (*st)->CreateSession(id);
    if (!c.ok() && c.code() != StatusCode::kAlreadyExists) return Fail(c);
    for (;;) {
      auto h = (*st)->Head(id);
      if (!h.ok()) return Fail(h.status());
      const uint64_t next = h->last_version + 1;
      MemoryState bank = test::MakeBank({0, 3}, 64, 160, static_cast<uint32_t>(next));
      auto v = (*st)->Commit(id, h->head_version, bank, TurnTranscript{{static_cast<int32_t>(next)}, {}});
      if (!v.ok()) return Fail(v.status());
      Say("acked " + std::to_string(*v));
    }
  }
  if (mode == "cas" && (argc == 5 || argc == 6)) {
    o.sharing = ProcessSharing::kPerOperation;
    const std::string writer = argv[3];
    const int rounds = std::stoi(argv[4]);
    auto st = OpenRocksDbSessionStore(o);
    if (!st.ok()) return Fail(st.status());
    Status c = (*st)->CreateSession(id);
    if (!c.ok() && c.code() != StatusCode::kAlreadyExists) return Fail(c);
    // Both writers start their rounds at the same wall-clock moment (argv[5], unix ms), so
    // they race even when one process took longer to start.
    if (argc > 5) {
      std::this_thread::sleep_until(std::chrono::system_clock::time_point(std::chrono::milliseconds(std::stoll(argv[5]))));
    }
    std::mt19937 rng(static_cast<uint32_t>(::getpid()));
    for (int i = 0; i < rounds; ++i) {
      auto h = (*st)->Head(id);
      if (!h.ok()) return Fail(h.status());
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
      MemoryState bank = test::MakeBank({0}, 4, 8, static_cast<uint32_t>(h->last_version + 1));
      CommitOptions co;
      co.metadata["writer"] = writer;
      auto v = (*st)->Commit(id, h->head_version, bank, TurnTranscript{}, co);
      if (v.ok()) {
        Say("won " + std::to_string(*v));
      } else if (v.status().IsConflict()) {
        Say("lost " + std::to_string(h->head_version));
      } else {
        return Fail(v.status());
      }
    }
    return 0;
  }
  return 64;
}
