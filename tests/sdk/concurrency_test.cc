// Concurrency: two handles (threads, processes) on one session never lose or fork a turn;
// many sessions on one engine at once compute what they compute alone (their turns export
// into banks the engine keeps, BankPool, which passes between them).
#include <catch2/catch.hpp>

#include <barrier>
#include <set>
#include <thread>

#include "../../sdk/src/bank_pool.h"
#include "sdk_test_util.h"

using namespace lm2;
using namespace lm2::sdk_test;

namespace {

// The user messages along the head's lineage (root first).
std::vector<std::string> LineageMessages(const Session& s) {
  auto h = s.History();
  REQUIRE(h.ok());
  std::map<uint64_t, const VersionEntry*> by;
  for (const auto& e : *h) by[e.version] = &e;
  std::vector<std::string> out;
  for (uint64_t v = s.head_version(); v != 0; v = by.at(v)->parent_version) {
    auto t = s.Turn(v);
    REQUIRE(t.ok());
    out.insert(out.begin(), t->user_text);
  }
  return out;
}

}  // namespace

TEST_CASE("the second of two handles that saw the same head gets Conflict, reload and retry works") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto a = OpenSession(*engine, "t", "s");
  auto b = OpenSession(*engine, "t", "s");
  MustChat(*a, "first from a");
  const MemoryState b_before = MustMemory(*b);
  auto r = b->Chat("first from b", Short());
  CHECK(r.status().code() == StatusCode::kConflict);
  CHECK(b->head_version() == 0);
  CHECK(SameBits(MustMemory(*b), b_before));
  REQUIRE(b->Reload().ok());
  CHECK(b->head_version() == 1);
  CHECK(SameBits(MustMemory(*b), MustMemory(*a)));
  auto r2 = b->Chat("first from b", Short());
  REQUIRE(r2.ok());
  CHECK(r2->version == 2);
  // Same for the history operations: a stale handle cannot clear, roll back or forget.
  CHECK(a->ClearMemory().code() == StatusCode::kConflict);
  CHECK(a->Rollback(1).code() == StatusCode::kConflict);
  CHECK(a->ForgetTurn(1).code() == StatusCode::kConflict);
  CHECK(LineageMessages(*b) == std::vector<std::string>{"first from a", "first from b"});
}

TEST_CASE("threads: two handles on one session, every turn lands exactly once") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  constexpr int kTurns = 4;
  std::atomic<int> conflicts{0};
  auto worker = [&](const std::string& tag) {
    auto s = OpenSession(*engine, "t", "shared");
    for (int i = 0; i < kTurns; ++i) {
      const std::string msg = tag + " " + std::to_string(i);
      while (true) {
        auto r = s->Chat(msg, Short(4));
        if (r.ok()) break;
        REQUIRE(r.status().IsConflict());
        ++conflicts;
        REQUIRE(s->Reload().ok());
      }
    }
  };
  std::thread t1(worker, "alpha"), t2(worker, "beta");
  t1.join();
  t2.join();
  auto s = OpenSession(*engine, "t", "shared");
  CHECK(s->turn_count() == 2 * kTurns);
  const auto msgs = LineageMessages(*s);
  REQUIRE(msgs.size() == 2 * kTurns);
  std::set<std::string> unique(msgs.begin(), msgs.end());
  CHECK(unique.size() == 2 * kTurns);
  for (int i = 0; i < kTurns; ++i) {
    CHECK(unique.count("alpha " + std::to_string(i)) == 1);
    CHECK(unique.count("beta " + std::to_string(i)) == 1);
  }
  // No fork in the history: every version is on the head's line or a lost CAS never
  // became a version at all.
  auto h = s->History();
  REQUIRE(h.ok());
  CHECK(h->size() == 2 * kTurns);
  INFO("conflicts seen: " << conflicts.load());
}

TEST_CASE("processes: two processes on one session, every turn lands exactly once") {
  TempDir dir;
  const EngineOptions o = TinyOptions(dir, /*shared=*/true);
  std::string out1, out2;
  int rc1 = -1, rc2 = -1;
  std::thread p1([&] { rc1 = RunChild({"race", o.model_dir, o.store_path, o.key_file, "t", "s", "3", "one"}, &out1); });
  std::thread p2([&] { rc2 = RunChild({"race", o.model_dir, o.store_path, o.key_file, "t", "s", "3", "two"}, &out2); });
  p1.join();
  p2.join();
  INFO(out1 << out2);
  REQUIRE(rc1 == 0);
  REQUIRE(rc2 == 0);
  auto engine = OpenEngine(o);
  auto s = OpenSession(*engine, "t", "s");
  const auto msgs = LineageMessages(*s);
  std::set<std::string> unique(msgs.begin(), msgs.end());
  CHECK(msgs.size() == 6);
  CHECK(unique == std::set<std::string>{"one 0", "one 1", "one 2", "two 0", "two 1", "two 2"});
  auto h = s->History();
  REQUIRE(h.ok());
  CHECK(h->size() == 6);
}

TEST_CASE("on a GPU, sessions chatting at once share decode steps and reply as alone", "[gpu]") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  // On the GPU (OpenGpuEngine), batch_decode on by default.
  // With a cap of 2 the sessions' states are destroyed and rebuilt between their turns
  // while other sessions' decode steps run.
  o.max_resident_sessions = GENERATE(std::size_t{0}, std::size_t{2});
  INFO("max_resident_sessions " << o.max_resident_sessions);
  std::string why;
  auto engine = OpenGpuEngine(o, &why);
  if (engine == nullptr) {
    WARN("SKIPPED: GPU test: " << why);
    return;
  }
  const std::vector<std::string> msgs = {"Mary went to the kitchen.", "Where is Mary?"};
  // Greedy replies, then sampled ones (picked on the device, seeded per session).
  ChatOptions chat = Short();
  if (GENERATE(false, true)) {
    chat.temperature = 0.9f;
    chat.top_p = 0.95f;
    chat.repetition_penalty = 1.1f;
    chat.seed = 42;
  }
  INFO("temperature " << chat.temperature);
  constexpr int kSessions = 5;
  std::vector<MemoryState> alone, together(kSessions);
  std::vector<std::string> alone_text, together_text(kSessions);
  for (int i = 0; i < kSessions; ++i) {
    auto s = OpenSession(*engine, "t", "alone" + std::to_string(i));
    MustChat(*s, msgs[0] + " " + std::to_string(i), chat);
    alone_text.push_back(MustChat(*s, msgs[1], chat).text);
    alone.push_back(MustMemory(*s));
  }
  const EngineStats before = engine->Stats();
  CHECK(before.decode_batches == before.decode_steps);  // alone: every step a batch of one
  CHECK(before.largest_decode_batch == 1);
  const uint64_t evictions_before = before.evictions;
  std::barrier between_turns(kSessions);  // every session holds a state after its first turn
  std::vector<std::thread> threads;
  for (int i = 0; i < kSessions; ++i) {
    threads.emplace_back([&, i] {
      auto s = OpenSession(*engine, "t", "together" + std::to_string(i));
      MustChat(*s, msgs[0] + " " + std::to_string(i), chat);
      between_turns.arrive_and_wait();
      together_text[static_cast<std::size_t>(i)] = MustChat(*s, msgs[1], chat).text;
      together[static_cast<std::size_t>(i)] = MustMemory(*s);
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < kSessions; ++i) {
    CHECK(together_text[i] == alone_text[i]);
    CHECK(SameBits(together[i], alone[i]));
  }
  // The engine's statistics saw the steps shared: fewer calls than steps, some of several.
  const EngineStats after = engine->Stats();
  CHECK(after.decode_steps - before.decode_steps > after.decode_batches - before.decode_batches);
  CHECK(after.largest_decode_batch > 1);
  // Under the cap, at most 2 of the 5 kept their states between the turns.
  if (o.max_resident_sessions != 0) CHECK(after.evictions - evictions_before >= kSessions - 2);
}

TEST_CASE("many sessions on one engine at once give what each gives alone") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  const std::vector<std::string> msgs = {"Mary went to the kitchen.", "Where is Mary?"};
  std::vector<MemoryState> alone;
  for (int i = 0; i < 4; ++i) {
    auto s = OpenSession(*engine, "t", "alone" + std::to_string(i));
    MustChat(*s, msgs[0] + " " + std::to_string(i));
    MustChat(*s, msgs[1]);
    alone.push_back(MustMemory(*s));
  }
  std::vector<MemoryState> together(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      auto s = OpenSession(*engine, "t", "together" + std::to_string(i));
      MustChat(*s, msgs[0] + " " + std::to_string(i));
      MustChat(*s, msgs[1]);
      together[static_cast<std::size_t>(i)] = MustMemory(*s);
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < 4; ++i) CHECK(SameBits(together[i], alone[i]));
}

TEST_CASE("the engine's bank pool keeps at most its capacity and hands the kept memory back") {
  internal::BankPool pool(2);
  CHECK(pool.Take().layers.empty());  // none kept: an empty bank
  auto bank = [](float v) {
    MemoryState m;
    m.layers.push_back(MemoryLayer{0, 2, 2, std::vector<float>(4, v)});
    return m;
  };
  pool.Give(MemoryState());  // nothing to keep
  CHECK(pool.kept() == 0);
  MemoryState a = bank(1.0f);
  const float* a_data = a.layers[0].data.data();
  pool.Give(std::move(a));
  pool.Give(bank(2.0f));
  pool.Give(bank(3.0f));  // over the capacity: freed
  CHECK(pool.kept() == 2);
  std::set<const float*> taken;
  for (int i = 0; i < 2; ++i) taken.insert(pool.Take().layers.at(0).data.data());
  CHECK(taken.count(a_data) == 1);  // the same memory comes back
  CHECK(pool.kept() == 0);
}
