// Session: turns, commits, resume (same and new process), history, rollback, fork, clear,
// forget-turn (against the CPU runtime driven directly), inspection, cancellation.
#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <fstream>

#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/model_files.h"
#include "sdk_test_util.h"

using namespace lm2;
using namespace lm2::sdk_test;

namespace {

const std::vector<std::string> kMsgs = {"Mary went to the kitchen.", "John picked up the apple.",
                                        "Where is Mary?", "The cat sleeps."};

struct Runtime {
  std::unique_ptr<runtime::Model> model;
  Runtime() {
    auto files = runtime::ModelFiles::Open(TinyModel());
    REQUIRE(files.ok());
    auto m = runtime::LoadCpuModel(std::shared_ptr<const runtime::ModelFiles>(std::move(files).value()));
    REQUIRE(m.ok());
    model = std::move(m).value();
  }
  // `start`, then each transcript as one segment in an empty context: what the SDK's
  // replay must produce.
  MemoryState Fold(const MemoryState& start, const std::vector<TurnRecord>& turns) const {
    auto st = model->NewState();
    REQUIRE(st.ok());
    REQUIRE(model->ImportMemory(**st, start).ok());
    for (const auto& t : turns) {
      std::vector<int32_t> ids = t.prompt_ids;
      ids.insert(ids.end(), t.reply_ids.begin(), t.reply_ids.end());
      model->ResetContext(**st);
      REQUIRE(model->Forward(**st, ids, runtime::LogitsMode::kNone, nullptr).ok());
      REQUIRE(model->EndSegment(**st).ok());
    }
    auto out = model->ExportMemory(**st);
    REQUIRE(out.ok());
    return std::move(out).value();
  }
};

TurnRecord MustTurn(const Session& s, uint64_t v) {
  auto t = s.Turn(v);
  REQUIRE(t.ok());
  return std::move(t).value();
}

}  // namespace

TEST_CASE("a turn commits one version holding the memory and the transcript") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "alice", "main");
  CHECK(s->head_version() == 0);
  const MemoryState initial = MustMemory(*s);
  std::string streamed;
  auto r = s->Chat(kMsgs[0], Short(), [&](std::string_view t) { streamed += t; });
  REQUIRE(r.ok());
  CHECK(r->version == 1);
  CHECK(streamed == r->text);
  CHECK(r->reply_tokens >= 1);
  CHECK(s->head_version() == 1);
  CHECK(s->turn_count() == 1);
  CHECK_FALSE(SameBits(initial, MustMemory(*s)));  // the turn wrote memory
  MustChat(*s, kMsgs[1]);
  auto h = s->History();
  REQUIRE(h.ok());
  REQUIRE(h->size() == 2);
  CHECK((*h)[0].kind == "turn");
  CHECK((*h)[0].preview == kMsgs[0]);
  CHECK((*h)[1].parent_version == 1);
  CHECK((*h)[1].is_head);
  CHECK((*h)[0].prompt_tokens == r->prompt_tokens);
  const TurnRecord t1 = MustTurn(*s, 1);
  CHECK(t1.user_text == kMsgs[0]);
  CHECK(t1.reply_ids.size() == static_cast<std::size_t>(r->reply_tokens));
  CHECK(t1.prompt_ids.front() == 1);  // BOS on the first turn only
  CHECK(MustTurn(*s, 2).prompt_ids.front() != 1);
  auto listed = engine->ListSessions("alice");
  REQUIRE(listed.ok());
  CHECK(*listed == std::vector<std::string>{"main"});
}

TEST_CASE("resume after the engine is closed is bit-identical to a session that never stopped") {
  TempDir dir;
  const EngineOptions o = TinyOptions(dir);
  MemoryState never, resumed;
  std::vector<float> logits_never, logits_resumed;
  std::string reply_never, reply_resumed;
  {
    auto engine = OpenEngine(o);
    auto a = OpenSession(*engine, "t", "never");
    auto b = OpenSession(*engine, "t", "resumed");
    for (int i = 0; i < 2; ++i) {
      MustChat(*a, kMsgs[static_cast<std::size_t>(i)]);
      MustChat(*b, kMsgs[static_cast<std::size_t>(i)]);
    }
    reply_never = MustChat(*a, kMsgs[2]).text;
    never = MustMemory(*a);
    logits_never = *a->NextTokenLogits(kMsgs[3]);
  }
  {
    auto engine = OpenEngine(o);
    auto b = OpenSession(*engine, "t", "resumed");
    CHECK(b->head_version() == 2);
    reply_resumed = MustChat(*b, kMsgs[2]).text;
    resumed = MustMemory(*b);
    logits_resumed = *b->NextTokenLogits(kMsgs[3]);
  }
  CHECK(reply_resumed == reply_never);
  CHECK(SameBits(resumed, never));
  REQUIRE(logits_resumed.size() == logits_never.size());
  CHECK(std::memcmp(logits_resumed.data(), logits_never.data(), logits_never.size() * sizeof(float)) == 0);
}

TEST_CASE("resume in a new process gives bit-identical memory and next-token logits") {
  TempDir dir;
  const EngineOptions o = TinyOptions(dir, /*shared=*/true);
  std::string out;
  REQUIRE(RunChild({"chat", o.model_dir, o.store_path, o.key_file, "t", "proc", kMsgs[0], kMsgs[1]}, &out) == 0);
  const std::string dump = dir.sub("dump.bin");
  REQUIRE(RunChild({"dump", o.model_dir, o.store_path, o.key_file, "t", "proc", dump, kMsgs[2]}, &out) == 0);
  auto engine = OpenEngine(o);
  auto local = OpenSession(*engine, "t", "local");  // never stopped: both turns in this process
  MustChat(*local, kMsgs[0]);
  MustChat(*local, kMsgs[1]);
  const MemoryState mem = MustMemory(*local);
  const std::vector<float> logits = *local->NextTokenLogits(kMsgs[2]);
  std::vector<float> expected;
  for (const auto& l : mem.layers) expected.insert(expected.end(), l.data.begin(), l.data.end());
  expected.insert(expected.end(), logits.begin(), logits.end());
  std::ifstream f(dump, std::ios::binary);
  std::vector<float> got(expected.size() + 1);
  f.read(reinterpret_cast<char*>(got.data()), static_cast<std::streamsize>(got.size() * sizeof(float)));
  REQUIRE(static_cast<std::size_t>(f.gcount()) == expected.size() * sizeof(float));  // nothing more, nothing less
  got.pop_back();
  CHECK(std::memcmp(got.data(), expected.data(), expected.size() * sizeof(float)) == 0);
  // The store's copy, opened here, is the child's bank too.
  auto other = OpenSession(*engine, "t", "proc");
  CHECK(SameBits(MustMemory(*other), mem));
}

TEST_CASE("rollback restores a version's memory exactly and continues from it") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  std::vector<MemoryState> mem;
  for (int i = 0; i < 3; ++i) {
    MustChat(*s, kMsgs[static_cast<std::size_t>(i)]);
    mem.push_back(MustMemory(*s));
  }
  REQUIRE(s->Rollback(1).ok());
  CHECK(s->head_version() == 1);
  CHECK(s->turn_count() == 1);
  CHECK(SameBits(MustMemory(*s), mem[0]));
  // The same turn from the same memory gives the same memory as before.
  auto r = MustChat(*s, kMsgs[1]);
  CHECK(r.version == 4);
  CHECK(SameBits(MustMemory(*s), mem[1]));
  auto h = s->History();
  REQUIRE(h.ok());
  REQUIRE(h->size() == 4);
  CHECK(h->back().parent_version == 1);
  CHECK(s->Rollback(99).code() == StatusCode::kNotFound);
  CHECK(s->head_version() == 4);
  CHECK(s->Rollback(0).code() == StatusCode::kInvalidArgument);
  // A new handle resumes at the rolled-back-and-continued head.
  auto again = OpenSession(*engine, "t", "s");
  CHECK(again->head_version() == 4);
  CHECK(SameBits(MustMemory(*again), mem[1]));
}

TEST_CASE("fork copies a version into a new session that evolves on its own") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  MustChat(*s, kMsgs[0]);
  const MemoryState m1 = MustMemory(*s);
  MustChat(*s, kMsgs[1]);
  const MemoryState m2 = MustMemory(*s);
  auto f = s->Fork(1, "branch");
  REQUIRE(f.ok());
  CHECK((*f)->head_version() == 1);
  CHECK(SameBits(MustMemory(**f), m1));
  MustChat(**f, kMsgs[2]);
  CHECK(SameBits(MustMemory(*s), m2));  // the original is untouched
  auto h = (*f)->History();
  REQUIRE(h.ok());
  CHECK((*h)[0].kind == "base");
  CHECK(s->Fork(1, "branch").status().code() == StatusCode::kAlreadyExists);
  auto other_tenant = s->Fork(2, "copy", "bob");
  REQUIRE(other_tenant.ok());
  CHECK((*other_tenant)->tenant() == "bob");
  CHECK(SameBits(MustMemory(**other_tenant), m2));
  // The fork's base cannot be forgotten turn by turn.
  CHECK((*f)->ForgetTurn(1).code() == StatusCode::kFailedPrecondition);
}

TEST_CASE("clearing slots or layers resets exactly those rows to the initial memory") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  const MemoryState initial = MustMemory(*s);
  MustChat(*s, kMsgs[0]);
  MustChat(*s, kMsgs[1]);
  const MemoryState before = MustMemory(*s);
  ClearSpec spec;
  spec.layers = {1};
  spec.slots = {2, 5};
  REQUIRE(s->ClearMemory(spec).ok());
  CHECK(s->head_version() == 3);
  CHECK(s->turn_count() == 2);
  MemoryState expected = before.Clone();
  const int64_t d = expected.layers[1].dim;
  for (int64_t slot : {2, 5}) {
    for (int64_t k = 0; k < d; ++k) {
      expected.layers[1].data[static_cast<std::size_t>(slot * d + k)] = (k == slot % d) ? 1.0f : 0.0f;  // e_{n mod d}
    }
  }
  CHECK(SameBits(MustMemory(*s), expected));
  ClearSpec layer0;
  layer0.layers = {0};
  REQUIRE(s->ClearMemory(layer0).ok());
  auto m = MustMemory(*s);
  CHECK(m.layers[0].data == initial.layers[0].data);
  CHECK(m.layers[2].data == before.layers[2].data);
  REQUIRE(s->ClearMemory().ok());
  CHECK(SameBits(MustMemory(*s), initial));
  const uint64_t head = s->head_version();
  ClearSpec bad;
  bad.layers = {7};
  CHECK(s->ClearMemory(bad).code() == StatusCode::kInvalidArgument);
  bad.layers = {};
  bad.slots = {16};
  CHECK(s->ClearMemory(bad).code() == StatusCode::kInvalidArgument);
  CHECK(s->head_version() == head);
  auto h = s->History();
  REQUIRE(h.ok());
  CHECK(h->back().kind == "clear");
}

TEST_CASE("forget-turn equals the runtime replaying the other turns' transcripts") {
  TempDir dir;
  Runtime rt;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  const MemoryState initial = MustMemory(*s);
  MustChat(*s, kMsgs[0]);
  const MemoryState m1 = MustMemory(*s);
  MustChat(*s, kMsgs[1]);
  MustChat(*s, kMsgs[2]);
  const TurnRecord t1 = MustTurn(*s, 1), t2 = MustTurn(*s, 2), t3 = MustTurn(*s, 3);

  REQUIRE(s->ForgetTurn(2).ok());  // from version 1's stored bank, replay turn 3
  CHECK(s->head_version() == 4);
  CHECK(SameBits(MustMemory(*s), rt.Fold(m1, {t3})));
  CHECK(s->ForgetTurn(2).code() == StatusCode::kFailedPrecondition);  // already forgotten

  REQUIRE(s->ForgetTurn(1).ok());  // from the initial memory, replay turn 3 only
  CHECK(SameBits(MustMemory(*s), rt.Fold(initial, {t3})));

  // A later turn and a clear in the history: both replayed, the clear re-applied.
  MustChat(*s, kMsgs[3]);  // version 6
  const TurnRecord t6 = MustTurn(*s, 6);
  ClearSpec spec;
  spec.slots = {0, 3};
  REQUIRE(s->ClearMemory(spec).ok());  // version 7
  MustChat(*s, kMsgs[0]);              // version 8
  const TurnRecord t8 = MustTurn(*s, 8);
  REQUIRE(s->ForgetTurn(6).ok());
  MemoryState cleared = rt.Fold(initial, {t3});
  for (auto& l : cleared.layers) {
    for (int64_t slot : {0, 3}) {
      for (int64_t k = 0; k < l.dim; ++k) l.data[static_cast<std::size_t>(slot * l.dim + k)] = (k == slot) ? 1.0f : 0.0f;
    }
  }
  CHECK(SameBits(MustMemory(*s), rt.Fold(cleared, {t8})));
  CHECK(s->ForgetTurn(7).code() == StatusCode::kInvalidArgument);  // a clear, not a turn
  CHECK(s->ForgetTurn(42).code() == StatusCode::kNotFound);
  (void)t1;
  (void)t2;
}

TEST_CASE("inspection: slot norms, per-turn writes and the reply's reads") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  const ModelInfo& info = engine->model_info();
  auto norms0 = s->SlotNorms();
  REQUIRE(norms0.ok());
  REQUIRE(norms0->size() == info.memory_layers.size());
  for (const auto& l : *norms0) {
    for (float v : l.values) CHECK(v == Approx(1.0f));  // identity rows
  }
  const ChatResult r = MustChat(*s, kMsgs[0], Short(12));
  auto writes = s->SlotWrites(1);
  REQUIRE(writes.ok());
  REQUIRE(writes->size() == r.slot_writes.size());
  for (std::size_t i = 0; i < writes->size(); ++i) CHECK((*writes)[i].values == r.slot_writes[i].values);
  const MemoryState m = MustMemory(*s);
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    const auto& L = m.layers[i];
    double total = 0.0;
    for (int64_t n = 0; n < L.slots; ++n) {
      double w = 0.0, nn = 0.0;
      for (int64_t k = 0; k < L.dim; ++k) {
        const double v = L.data[static_cast<std::size_t>(n * L.dim + k)];
        const double e = (k == n % L.dim) ? 1.0 : 0.0;
        w += (v - e) * (v - e);
        nn += v * v;
      }
      CHECK(r.slot_writes[i].values[static_cast<std::size_t>(n)] == Approx(std::sqrt(w)).epsilon(1e-5));
      CHECK((*s->SlotNorms())[i].values[static_cast<std::size_t>(n)] == Approx(std::sqrt(nn)).epsilon(1e-5));
      total += w;
    }
    CHECK(total > 0.0);
  }
  // Reads: per layer the reply's positions (assistant prefix + every reply token, each a
  // softmax over slots per memory head) sum to (1 + reply tokens) x memory heads.
  REQUIRE(r.slot_reads.size() == info.memory_layers.size());
  const double heads = 4.0;  // tiny-lm2 memory_heads
  for (const auto& l : r.slot_reads) {
    double sum = 0.0;
    for (float v : l.values) {
      CHECK(v >= 0.0f);
      sum += static_cast<double>(v);
    }
    CHECK(sum == Approx((1.0 + static_cast<double>(r.reply_tokens)) * heads).epsilon(1e-4));
  }
}

TEST_CASE("runtime SegmentReadMass: per layer the segment's tokens x memory heads, needs an open segment") {
  Runtime rt;
  auto st = rt.model->NewState();
  REQUIRE(st.ok());
  CHECK(rt.model->SegmentReadMass(**st).status().code() == StatusCode::kFailedPrecondition);
  std::vector<int32_t> ids = {1, 4, 20, 30, 40, 6, 5};
  REQUIRE(rt.model->Forward(**st, ids, runtime::LogitsMode::kNone, nullptr).ok());
  auto mass = rt.model->SegmentReadMass(**st);
  REQUIRE(mass.ok());
  REQUIRE(mass->size() == 3);
  for (const auto& layer : *mass) {
    REQUIRE(layer.size() == 16);
    double sum = 0.0;
    for (float v : layer) sum += static_cast<double>(v);
    CHECK(sum == Approx(7.0 * 4.0).epsilon(1e-5));
  }
  REQUIRE(rt.model->EndSegment(**st).ok());
  CHECK(rt.model->SegmentReadMass(**st).status().code() == StatusCode::kFailedPrecondition);
}

TEST_CASE("a cancel set after the reply's last token, before the commit, still cancels") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  MustChat(*s, kMsgs[0]);
  const MemoryState before = MustMemory(*s);
  std::atomic<bool> cancel{false};
  ChatOptions o = Short(1);  // one token: its text streams only after generation has ended
  o.cancel = &cancel;
  int pieces = 0;
  auto r = s->Chat(kMsgs[1], o, [&](std::string_view) {
    ++pieces;
    cancel = true;
  });
  REQUIRE(pieces == 1);  // the tiny model's first reply token to kMsgs[1] is text
  CHECK(r.status().code() == StatusCode::kCancelled);
  CHECK(s->head_version() == 1);
  CHECK(SameBits(MustMemory(*s), before));
}

TEST_CASE("a cancelled turn commits nothing and leaves the session as it was") {
  TempDir dir;
  auto engine = OpenEngine(TinyOptions(dir));
  auto s = OpenSession(*engine, "t", "s");
  auto ref = OpenSession(*engine, "t", "ref");
  MustChat(*s, kMsgs[0]);
  MustChat(*ref, kMsgs[0]);
  const MemoryState before = MustMemory(*s);
  std::atomic<bool> cancel{false};
  ChatOptions o = Short(32);
  o.cancel = &cancel;
  int pieces = 0;
  auto r = s->Chat(kMsgs[1], o, [&](std::string_view) {
    if (++pieces == 1) cancel = true;
  });
  if (pieces == 0) {
    WARN("the reply ended before any text was streamed; cancellation not exercised by the callback");
    cancel = true;
    r = s->Chat(kMsgs[1], o);
  }
  CHECK(r.status().code() == StatusCode::kCancelled);
  CHECK(s->head_version() == 1);
  CHECK(SameBits(MustMemory(*s), before));
  auto h = s->History();
  REQUIRE(h.ok());
  CHECK(h->size() == 1);
  // The next turn is exactly what it would have been without the cancelled one.
  CHECK(MustChat(*s, kMsgs[1]).text == MustChat(*ref, kMsgs[1]).text);
  CHECK(SameBits(MustMemory(*s), MustMemory(*ref)));
}
