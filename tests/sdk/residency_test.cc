// Resident sessions: states built when a call needs them, at most
// EngineOptions::max_resident_sessions held at once, the least recently used idle session's
// given up (Residency), and an evicted session coming back as a resumed one.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <span>
#include <thread>

#include "../../sdk/src/engine_core.h"
#include "../../sdk/src/residency.h"
#include "lm2/runtime/forwarding_model.h"
#include "sdk_test_util.h"
#if defined(LM2_WITH_CUDA)
#include "support/device_memory_hog.h"
#endif

using namespace lm2;
using namespace lm2::sdk_test;

namespace {

const std::vector<std::string> kMsgs = {"Mary went to the kitchen.", "John picked up the apple.",
                                        "Where is Mary?", "The cat sleeps."};

std::vector<float> MustLogits(const Session& s, const std::string& msg) {
  auto l = s.NextTokenLogits(msg);
  if (!l.ok()) throw std::runtime_error("NextTokenLogits: " + l.status().ToString());
  return std::move(l).value();
}

bool SameLogits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A state with nothing in it: the registry only moves states around and destroys them.
struct FakeState : runtime::SequenceState {
  int64_t context_length() const override { return 0; }
  bool segment_open() const override { return false; }
  int64_t segment_tokens() const override { return 0; }
};

// Session cores on an engine core that has nothing but its registry.
struct Registry {
  std::shared_ptr<internal::EngineCore> engine = std::make_shared<internal::EngineCore>();
  std::vector<std::unique_ptr<internal::SessionCore>> cores;

  Registry(std::size_t cap, int sessions) {
    engine->residency = std::make_unique<internal::Residency>(cap);
    for (int i = 0; i < sessions; ++i) {
      cores.push_back(std::make_unique<internal::SessionCore>());
      cores.back()->engine = engine;
    }
  }
  internal::Residency& residency() { return *engine->residency; }
  internal::SessionCore& core(int i) { return *cores[static_cast<std::size_t>(i)]; }
  bool holds(int i) { return core(i).state != nullptr; }
  // A call of session i that needs its state: built when it has none.
  internal::Residency::Pin Enter(int i) {
    internal::Residency::Pin pin = residency().Enter(core(i));
    if (core(i).state == nullptr) core(i).state = std::make_unique<FakeState>();
    return pin;
  }
  void Call(int i) { internal::Residency::Pin pin = Enter(i); }
};

}  // namespace

TEST_CASE("registry: the least recently used idle session gives its state up, never one inside a call") {
  Registry r(/*cap=*/2, /*sessions=*/3);
  r.Call(0);
  r.Call(1);
  r.Call(0);  // 1 is now the least recently used
  r.Call(2);
  CHECK(r.holds(0));
  CHECK_FALSE(r.holds(1));
  CHECK(r.holds(2));
  CHECK(r.core(1).prefill_on_build);  // it comes back as a resumed session
  CHECK(r.residency().stats().resident_sessions == 2);
  CHECK(r.residency().stats().evictions == 1);
  {
    // 0 and 2 inside calls: 1 goes over the cap instead of waiting, and gives its state up
    // when its call ends (the only idle holder then).
    internal::Residency::Pin p0 = r.Enter(0);
    internal::Residency::Pin p2 = r.Enter(2);
    {
      internal::Residency::Pin p1 = r.Enter(1);
      CHECK(r.residency().stats().resident_sessions == 3);
      CHECK(r.residency().stats().evictions == 1);
      CHECK(r.holds(0));
      CHECK(r.holds(2));
    }
    CHECK_FALSE(r.holds(1));
    CHECK(r.residency().stats().resident_sessions == 2);
    CHECK(r.residency().stats().evictions == 2);
  }
  CHECK(r.holds(0));
  CHECK(r.holds(2));
  r.cores.pop_back();  // a closed session leaves the count
  CHECK(r.residency().stats().resident_sessions == 1);
}

TEST_CASE("registry: out of memory, idle states go least recently used first until the attempt succeeds") {
  Registry r(/*cap=*/0, /*sessions=*/4);
  r.Call(0);
  r.Call(1);
  r.Call(2);
  internal::Residency::Pin pin = r.Enter(3);
  int attempts = 0;
  Status s = r.residency().Reclaiming([&] {
    return ++attempts <= 2 ? Status::ResourceExhausted("device full") : Status::Ok();
  });
  CHECK(s.ok());
  CHECK(attempts == 3);
  CHECK_FALSE(r.holds(0));
  CHECK_FALSE(r.holds(1));
  CHECK(r.holds(2));
  CHECK(r.holds(3));  // inside the call: never a victim
  CHECK(r.residency().stats().evictions == 2);

  attempts = 0;
  s = r.residency().Reclaiming([&] {
    ++attempts;
    return Status::ResourceExhausted("device full");
  });
  CHECK(s.code() == StatusCode::kResourceExhausted);
  CHECK(s.message().find("device full") != std::string_view::npos);
  CHECK(s.message().find("no idle session's state could be released") != std::string_view::npos);
  CHECK(attempts == 2);  // once more after 2 gave its state up
  CHECK_FALSE(r.holds(2));
  CHECK(r.holds(3));

  r.Call(0);
  attempts = 0;
  s = r.residency().Reclaiming([&] {
    ++attempts;
    return Status::Internal("not a memory error");
  });
  CHECK(s.code() == StatusCode::kInternal);
  CHECK(attempts == 1);
  CHECK(r.holds(0));  // other errors evict nothing
  CHECK(r.residency().stats().evictions == 3);
}

TEST_CASE("a cap of 2: five sessions taking turns reply, remember and score as without a cap") {
  TempDir capped_dir, free_dir;
  EngineOptions o = TinyOptions(capped_dir);
  o.max_resident_sessions = 2;
  auto capped = OpenEngine(o);
  auto uncapped = OpenEngine(TinyOptions(free_dir));
  constexpr int kSessions = 5;
  std::vector<std::unique_ptr<Session>> a, b;
  for (int i = 0; i < kSessions; ++i) {
    a.push_back(OpenSession(*capped, "t", "s" + std::to_string(i)));
    b.push_back(OpenSession(*uncapped, "t", "s" + std::to_string(i)));
  }
  std::size_t peak = 0;  // sessions holding a state while a reply streams
  const TokenCallback watch = [&](std::string_view) { peak = std::max(peak, capped->ResidentSessions()); };
  for (std::size_t turn = 0; turn < 3; ++turn) {
    for (std::size_t i = 0; i < kSessions; ++i) {
      const std::string msg = kMsgs[(turn + i) % kMsgs.size()];
      auto r = a[i]->Chat(msg, Short(), watch);
      REQUIRE(r.ok());
      CHECK(r->text == MustChat(*b[i], msg).text);
      CHECK(capped->ResidentSessions() <= 2);
    }
  }
  CHECK(peak == 2);  // the LRU session gave its state up before this one built its own
  // Each chat after the first two found both states held by idle sessions.
  CHECK(capped->Stats().evictions == 3 * kSessions - 2);
  for (std::size_t i = 0; i < kSessions; ++i) {
    CHECK(SameBits(MustMemory(*a[i]), MustMemory(*b[i])));
    CHECK(SameLogits(MustLogits(*a[i], kMsgs[3]), MustLogits(*b[i], kMsgs[3])));
    CHECK(capped->ResidentSessions() <= 2);
  }
  // The next turn after all that is still the uncapped one's.
  CHECK(MustChat(*a[0], kMsgs[2]).text == MustChat(*b[0], kMsgs[2]).text);
  CHECK(SameBits(MustMemory(*a[0]), MustMemory(*b[0])));
  CHECK(capped->Stats().resident_sessions == 2);
  CHECK(uncapped->Stats().resident_sessions == kSessions);
  CHECK(uncapped->Stats().evictions == 0);
}

TEST_CASE("opening sessions builds no state; a call builds one; moving the head or closing drops it") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));  // no cap
  std::vector<std::unique_ptr<Session>> many;
  for (int i = 0; i < 50; ++i) many.push_back(OpenSession(*engine, "t", "s" + std::to_string(i)));
  CHECK(engine->ResidentSessions() == 0);
  // What reads the committed bank or the store needs no state.
  CHECK(many[0]->SlotNorms().ok());
  CHECK(many[0]->History().ok());
  MustMemory(*many[0]);
  CHECK(engine->ResidentSessions() == 0);

  MustChat(*many[0], kMsgs[0]);
  MustChat(*many[1], kMsgs[0]);
  MustChat(*many[1], kMsgs[1]);
  CHECK(engine->ResidentSessions() == 2);
  MustLogits(*many[2], kMsgs[1]);  // a temporary state, gone with the call
  CHECK(engine->ResidentSessions() == 2);

  REQUIRE(many[0]->ClearMemory().ok());
  CHECK(engine->ResidentSessions() == 1);
  REQUIRE(many[1]->Rollback(1).ok());
  CHECK(engine->ResidentSessions() == 0);
  MustChat(*many[1], kMsgs[2]);
  REQUIRE(many[1]->Reload().ok());
  CHECK(engine->ResidentSessions() == 0);
  MustChat(*many[1], kMsgs[3]);
  CHECK(engine->ResidentSessions() == 1);
  many.clear();
  CHECK(engine->ResidentSessions() == 0);
  CHECK(engine->Stats().evictions == 0);
}

TEST_CASE("kKeepContext: an evicted session's next turn is that of the same session reopened") {
  TempDir dir, free_dir;
  EngineOptions o = TinyOptions(dir);
  o.max_resident_sessions = 1;
  auto engine = OpenEngine(o);
  SessionOptions keep;
  keep.context = ContextPolicy::kKeepContext;
  keep.resume_prefill_turns = 2;
  // Two sessions with the same two turns, each run without an eviction in between.
  auto evicted = OpenSession(*engine, "t", "evicted", keep);
  MustChat(*evicted, kMsgs[0]);
  MustChat(*evicted, kMsgs[1]);
  auto reopened = OpenSession(*engine, "t", "reopened", keep);
  MustChat(*reopened, kMsgs[0]);  // takes the one state from `evicted`
  MustChat(*reopened, kMsgs[1]);
  CHECK(engine->Stats().evictions == 1);
  REQUIRE(SameBits(MustMemory(*evicted), MustMemory(*reopened)));
  reopened.reset();  // as after a process restart
  reopened = OpenSession(*engine, "t", "reopened", keep);

  const std::string reply = MustChat(*evicted, kMsgs[2]).text;
  CHECK(reply == MustChat(*reopened, kMsgs[2]).text);
  CHECK(SameBits(MustMemory(*evicted), MustMemory(*reopened)));

  // Never evicted, the session keeps the context its turns left, which the prefill (against
  // the memory after them) does not reproduce bit for bit: the eviction really was a resume.
  auto uncapped = OpenEngine(TinyOptions(free_dir));
  auto kept = OpenSession(*uncapped, "t", "kept", keep);
  for (std::size_t i = 0; i < 3; ++i) MustChat(*kept, kMsgs[i]);
  CHECK_FALSE(SameBits(MustMemory(*kept), MustMemory(*evicted)));
}

TEST_CASE("threads: eight sessions on four threads under a cap of 2 commit every turn, as run one by one") {
  TempDir dir, seq_dir;
  EngineOptions o = TinyOptions(dir);
  o.max_resident_sessions = 2;
  auto engine = OpenEngine(o);
  constexpr int kThreads = 4, kPerThread = 2, kTurns = 3, kSessions = kThreads * kPerThread;
  const auto message = [](int session, int turn) {
    return kMsgs[static_cast<std::size_t>(session + turn) % kMsgs.size()] + " " + std::to_string(session);
  };
  const auto name = [](int session) { return "s" + std::to_string(session); };
  std::vector<std::unique_ptr<Session>> sessions;
  for (int id = 0; id < kSessions; ++id) sessions.push_back(OpenSession(*engine, "t", name(id)));
  CHECK(engine->ResidentSessions() == 0);
  std::vector<std::vector<std::string>> replies(kSessions);
  std::vector<Status> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int turn = 0; turn < kTurns; ++turn) {
        for (int id = t * kPerThread; id < (t + 1) * kPerThread; ++id) {
          const auto i = static_cast<std::size_t>(id);
          auto r = sessions[i]->Chat(message(id, turn), Short());
          if (!r.ok()) {
            errors[static_cast<std::size_t>(t)] = r.status();
            return;
          }
          replies[i].push_back(r->text);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& s : errors) CHECK(s.ok());
  CHECK(engine->ResidentSessions() <= 2);
  CHECK(engine->Stats().evictions >= kSessions - 2);  // every session built a state; at most 2 are left

  auto sequential = OpenEngine(TinyOptions(seq_dir));
  for (int id = 0; id < kSessions; ++id) {
    const auto i = static_cast<std::size_t>(id);
    CHECK(sessions[i]->head_version() == kTurns);
    auto s = OpenSession(*sequential, "t", name(id));
    std::vector<std::string> expected;
    for (int turn = 0; turn < kTurns; ++turn) expected.push_back(MustChat(*s, message(id, turn)).text);
    CHECK(replies[i] == expected);
    CHECK(SameBits(MustMemory(*sessions[i]), MustMemory(*s)));
  }
}

TEST_CASE("threads: chats, scores, rollbacks, clears and reopened handles under a cap of 1 all succeed") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  o.max_resident_sessions = 1;
  auto engine = OpenEngine(o);
  constexpr int kThreads = 4, kRounds = 4;
  std::vector<Status> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Status& error = errors[static_cast<std::size_t>(t)];
      const std::string id = "s" + std::to_string(t);
      for (int round = 0; round < kRounds && error.ok(); ++round) {
        // A new handle each round: the old one's state (if an eviction left it one) goes
        // with it while other threads evict.
        auto s = engine->OpenSession("t", id);
        if (!s.ok()) {
          error = s.status();
          break;
        }
        Session& session = **s;
        auto r = session.Chat(kMsgs[static_cast<std::size_t>(round) % kMsgs.size()], Short());
        if (!r.ok()) error = r.status();
        if (error.ok()) error = session.NextTokenLogits(kMsgs[3]).status();
        if (error.ok() && round == 1) error = session.Rollback(1);
        if (error.ok() && round == 2) error = session.ClearMemory();
        if (error.ok() && round == 3) error = session.ForgetTurn(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& s : errors) CHECK(s.ok());
  CHECK(engine->ResidentSessions() == 0);  // every handle closed
}

#if defined(LM2_WITH_CUDA)
namespace {

// What the full-device cases start from: a GPU engine (none where there is no GPU: `why`
// says so), the turn of kMsgs[0] with memory to spare in a session closed since, and two
// idle sessions a and b holding states.
struct IdleSessions {
  std::unique_ptr<Engine> engine;
  ChatResult want;
  MemoryState want_memory;
  std::unique_ptr<Session> a, b;
};

IdleSessions OpenWithIdleSessions(const EngineOptions& o, std::string* why) {
  IdleSessions w;
  w.engine = OpenGpuEngine(o, why);
  if (w.engine == nullptr) return w;
  {
    auto reference = OpenSession(*w.engine, "t", "reference");
    w.want = MustChat(*reference, kMsgs[0]);
    w.want_memory = MustMemory(*reference);
  }
  w.a = OpenSession(*w.engine, "t", "a");
  w.b = OpenSession(*w.engine, "t", "b");
  MustChat(*w.a, kMsgs[1]);
  MustChat(*w.b, kMsgs[3]);
  return w;
}

}  // namespace

// A loaded model whose next `refuse` forwards answer ResourceExhausted and change nothing,
// as the CUDA backend refuses a call it has no memory for: the out-of-memory path of the
// calls the SDK retries, on any backend.
struct OwnedModel {
  std::unique_ptr<runtime::Model> model;
};
class RefusingForwards : private OwnedModel, public runtime::ForwardingModel {
 public:
  explicit RefusingForwards(std::unique_ptr<runtime::Model> m)
      : OwnedModel{std::move(m)}, runtime::ForwardingModel(*OwnedModel::model) {}
  Status Forward(runtime::SequenceState& state, std::span<const int32_t> tokens, runtime::LogitsMode mode,
                 std::vector<float>* logits) const override {
    if (refuse > 0) {
      --refuse;
      ++refused;
      return Status::ResourceExhausted("device full (test)");
    }
    return ForwardingModel::Forward(state, tokens, mode, logits);
  }
  // Decode steps (a batcher's batched calls, or a reply's steps without one).
  Status ForwardBatchSample(std::span<runtime::SequenceState* const> states, std::span<const int32_t> tokens,
                            std::span<const runtime::TokenRule> rules, std::vector<int32_t>* next) const override {
    if (refuse_steps > 0) {
      --refuse_steps;
      ++refused;
      return Status::ResourceExhausted("device full (test)");
    }
    return ForwardingModel::ForwardBatchSample(states, tokens, rules, next);
  }
  mutable std::atomic<int> refuse{0}, refuse_steps{0}, refuse_exports{0}, refused{0};

 protected:
  // Bank exports (their page-locked staging, on the GPU).
  Status ExportBanks(const runtime::SequenceState& state, MemoryState& out) const override {
    if (refuse_exports > 0) {
      --refuse_exports;
      ++refused;
      return Status::ResourceExhausted("host memory full (test)");
    }
    return ForwardingModel::ExportBanks(state, out);
  }
};

// Engines opened while it lives load their model wrapped in RefusingForwards (`model` is the
// last one).
struct RefusingEngines {
  RefusingForwards* model = nullptr;
  RefusingEngines() {
    internal::SetModelWrapperForTesting([this](std::unique_ptr<runtime::Model> m) -> std::unique_ptr<runtime::Model> {
      auto wrapped = std::make_unique<RefusingForwards>(std::move(m));
      model = wrapped.get();
      return wrapped;
    });
  }
  ~RefusingEngines() { internal::SetModelWrapperForTesting({}); }
  RefusingEngines(const RefusingEngines&) = delete;
  RefusingEngines& operator=(const RefusingEngines&) = delete;
};

TEST_CASE("out of memory in NextTokenLogits, ForgetTurn and a turn's steps: idle sessions' states make room") {
  // A call refused for memory leaves its state as it was, so these calls retry it once an
  // idle session's state is destroyed (Residency::Reclaiming, GenerateOptions::
  // on_out_of_memory, the batcher's hook), and give what they give with memory to spare.
  // Without the retry each call answered ResourceExhausted.
  TempDir dir;
  RefusingEngines refusing;
  auto engine = OpenEngine(TinyOptions(dir));
  RefusingForwards& model = *refusing.model;
  auto a = OpenSession(*engine, "t", "a");
  auto b = OpenSession(*engine, "t", "b");
  auto c = OpenSession(*engine, "t", "c");
  auto twin = OpenSession(*engine, "t", "c-twin");
  const ChatResult first = MustChat(*c, kMsgs[0]);
  MustChat(*c, kMsgs[1]);
  const ChatResult twin_first = MustChat(*twin, kMsgs[0]);
  MustChat(*twin, kMsgs[1]);
  const auto idle_again = [&] {  // a and b hold states, least recently used first
    MustChat(*a, kMsgs[2]);
    MustChat(*b, kMsgs[3]);
  };
  idle_again();
  const std::vector<float> want = MustLogits(*c, kMsgs[2]);

  // NextTokenLogits: its prompt's forward refused twice; a's and b's states go.
  auto evictions = engine->Stats().evictions;
  model.refuse = 2;
  auto got = c->NextTokenLogits(kMsgs[2]);
  INFO(got.status().ToString());
  REQUIRE(got.ok());
  CHECK(SameLogits(*got, want));
  CHECK(model.refused == 2);
  CHECK(engine->Stats().evictions == evictions + 2);

  // More refusals than idle holders: ResourceExhausted, saying so; the session goes on.
  idle_again();
  model.refuse = 100;
  auto none = c->NextTokenLogits(kMsgs[2]);
  CHECK(none.status().code() == StatusCode::kResourceExhausted);
  CHECK(none.status().message().find("no idle session's state could be released") != std::string_view::npos);
  model.refuse = 0;
  CHECK(SameLogits(MustLogits(*c, kMsgs[2]), want));

  // ForgetTurn: the replay of the turn it keeps refused once, the export of its result once;
  // the memory is the twin's after the same ForgetTurn with memory to spare.
  REQUIRE(twin->ForgetTurn(twin_first.version).ok());
  idle_again();
  evictions = engine->Stats().evictions;
  model.refused = 0;
  model.refuse = 1;
  model.refuse_exports = 1;
  const Status forgot = c->ForgetTurn(first.version);
  INFO(forgot.ToString());
  REQUIRE(forgot.ok());
  CHECK(model.refused == 2);
  CHECK(engine->Stats().evictions == evictions + 2);
  CHECK(SameBits(MustMemory(*c), MustMemory(*twin)));

  // A turn's decode steps refused twice (through the engine's batcher on a GPU, by the
  // reply's own retry without one, as on the CPU) and its bank's export once: the twin's
  // reply and memory, three idle states destroyed (a's, b's and the twin's).
  const ChatResult twin_turn = MustChat(*twin, kMsgs[3]);
  idle_again();
  evictions = engine->Stats().evictions;
  model.refused = 0;
  model.refuse_steps = 2;
  model.refuse_exports = 1;
  auto turn = c->Chat(kMsgs[3], Short());
  INFO(turn.status().ToString());
  REQUIRE(turn.ok());
  CHECK(turn->text == twin_turn.text);
  CHECK(model.refused == 3);
  CHECK(engine->Stats().evictions == evictions + 3);
  CHECK(SameBits(MustMemory(*c), MustMemory(*twin)));
}

// The out-of-memory path the CPU backend never takes: on a GPU with every byte that
// allocations can get taken, a new session's state and its turn get their memory from idle
// sessions' states (Residency::Reclaiming), and the turn replies and remembers as it does
// with memory to spare. Without the reclaiming, the state's creation answers
// ResourceExhausted (the CUDA model test's [oom] case).
TEST_CASE("on a full GPU, idle sessions' states make room for another session's turn", "[gpu]") {
  TempDir dir;
  std::string why;
  IdleSessions w = OpenWithIdleSessions(TinyOptions(dir), &why);
  if (w.engine == nullptr) {
    WARN("SKIPPED: GPU test: " << why);
    return;
  }
  Engine* engine = w.engine.get();
  const ChatResult& want = w.want;
  const MemoryState& want_memory = w.want_memory;
  Session* a = w.a.get();
  REQUIRE(engine->Stats().resident_sessions == 2);
  REQUIRE(engine->Stats().evictions == 0);
  auto c = OpenSession(*engine, "t", "c");
  {
    lm2::testing::DeviceMemoryHog hog;
    auto got = c->Chat(kMsgs[0], Short());
    INFO(got.status().ToString());
    REQUIRE(got.ok());
    CHECK(got->text == want.text);
    CHECK(engine->Stats().evictions >= 1);
    CHECK(engine->Stats().resident_sessions <= 2);
  }
  CHECK(SameBits(MustMemory(*c), want_memory));
  // An evicted session comes back once memory is back, as a twin that was never evicted.
  auto twin = OpenSession(*engine, "t", "a-twin");
  MustChat(*twin, kMsgs[1]);
  CHECK(MustChat(*a, kMsgs[2]).text == MustChat(*twin, kMsgs[2]).text);
  CHECK(SameBits(MustMemory(*a), MustMemory(*twin)));
}

// The same for the turn's segment end: a new session's first end needs memory its prompt
// and decode steps did not (its write's buffers and its own memory K/V). The device fills
// while the reply decodes (from the reply's third piece on, the steps' buffers and graph
// made); the end then gets its memory from an idle session's state. Without the reclaiming
// around EndSegment the turn fails with ResourceExhausted.
TEST_CASE("on a full GPU, a turn's segment end gets its memory from idle sessions' states", "[gpu]") {
  TempDir dir;
  std::string why;
  IdleSessions w = OpenWithIdleSessions(TinyOptions(dir), &why);
  if (w.engine == nullptr) {
    WARN("SKIPPED: GPU test: " << why);
    return;
  }
  Engine* engine = w.engine.get();
  REQUIRE(w.want.reply_tokens >= 4);  // pieces enough for the device to fill mid-reply
  REQUIRE(engine->Stats().evictions == 0);
  auto c = OpenSession(*engine, "t", "c");
  std::unique_ptr<lm2::testing::DeviceMemoryHog> hog;
  int pieces = 0;
  auto got = c->Chat(kMsgs[0], Short(), [&](std::string_view) {
    if (++pieces == 3) hog = std::make_unique<lm2::testing::DeviceMemoryHog>();
  });
  const bool filled = hog != nullptr;
  const auto evictions = engine->Stats().evictions;
  hog.reset();
  REQUIRE(filled);
  INFO(got.status().ToString());
  REQUIRE(got.ok());
  CHECK(got->text == w.want.text);
  CHECK(evictions >= 1);
  CHECK(SameBits(MustMemory(*c), w.want_memory));
}

// Sessions chatting at once on a full device: their batched decode steps need what no
// step alone did (the batch's logits and pointer table for more rows), and the engine's
// DecodeBatcher gets it from idle sessions' states (DecodeBatcherOptions::
// on_out_of_memory); every reply is that of a twin session with memory to spare. Each
// session's second turn repeats its first message, so that its prompt (shorter by the
// first turn's BOS) and its segment end need nothing the first turn did not make: the
// batched steps are what meets the full device first.
TEST_CASE("on a full GPU, sessions chatting at once get their batched steps' memory from idle sessions", "[gpu]") {
  TempDir dir;
  EngineOptions o = TinyOptions(dir);
  std::string why;
  auto engine = OpenGpuEngine(o, &why);
  if (engine == nullptr) {
    WARN("SKIPPED: GPU test: " << why);
    return;
  }
  constexpr int kChats = 4;
  const ChatOptions longer = Short(24);  // steps enough for the threads' replies to overlap
  std::vector<std::unique_ptr<Session>> chats, twins;
  std::vector<std::string> want(kChats);
  const auto message = [](int i) { return kMsgs[static_cast<std::size_t>(i) % kMsgs.size()]; };
  for (int i = 0; i < kChats; ++i) {
    chats.push_back(OpenSession(*engine, "t", "chat" + std::to_string(i)));
    twins.push_back(OpenSession(*engine, "t", "twin" + std::to_string(i)));
    MustChat(*chats.back(), message(i), longer);  // alone: each step a batch of one
    MustChat(*twins.back(), message(i), longer);
    want[static_cast<std::size_t>(i)] = MustChat(*twins.back(), message(i), longer).text;
  }
  twins.clear();  // their states' memory goes back to the pool, for the hog
  auto a = OpenSession(*engine, "t", "a");
  auto b = OpenSession(*engine, "t", "b");
  MustChat(*a, kMsgs[1]);
  MustChat(*b, kMsgs[3]);
  const auto evictions_before = engine->Stats().evictions;
  std::vector<Result<ChatResult>> got(kChats, Status::Internal("not run"));
  {
    lm2::testing::DeviceMemoryHog hog;
    std::vector<std::thread> threads;
    for (int i = 0; i < kChats; ++i) {
      threads.emplace_back([&, i] { got[static_cast<std::size_t>(i)] = chats[static_cast<std::size_t>(i)]->Chat(message(i), longer); });
    }
    for (auto& t : threads) t.join();
  }
  for (int i = 0; i < kChats; ++i) {
    INFO("chat " << i << ": " << got[static_cast<std::size_t>(i)].status().ToString());
    REQUIRE(got[static_cast<std::size_t>(i)].ok());
    CHECK(got[static_cast<std::size_t>(i)]->text == want[static_cast<std::size_t>(i)]);
  }
  CHECK(engine->Stats().evictions > evictions_before);
}
#endif
