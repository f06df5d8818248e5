// Session basics: opening/resuming, a chat turn and its commit, inspection.
#include <algorithm>
#include <chrono>
#include <span>
#include <utility>

#include "engine_core.h"
#include "lineage.h"
#include "lm2/runtime/generate.h"
#include "lm2/runtime/sampler.h"
#include "lm2/session.h"
#include "memory_ops.h"

namespace lm2 {
namespace {
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

namespace internal {

Status SessionCore::CheckUsable() const {
  if (erased) return Status::NotFound("session '" + id.session + "' was erased");
  return Status::Ok();
}

SessionCore::~SessionCore() { engine->residency->Remove(*this); }

namespace {

// A new state holding `bank`; on failure none (a half-built state is no use to a retry, and
// its memory may be what a retry needs).
Result<std::unique_ptr<runtime::SequenceState>> StateHolding(const runtime::Model& m, const MemoryState& bank) {
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<runtime::SequenceState> s, m.NewState());
  LM2_RETURN_IF_ERROR(m.ImportMemory(*s, bank));
  return s;
}

}  // namespace

Result<Residency::Pin> SessionCore::UseState() {
  Residency::Pin pin = engine->residency->Enter(*this);
  if (state != nullptr) return pin;
  LM2_RETURN_IF_ERROR(engine->residency->Reclaiming([&]() -> Status {
    LM2_ASSIGN_OR_RETURN(state, StateHolding(model(), memory));
    if (!prefill_on_build) return Status::Ok();
    Status s = PrefillOnResume(*this);
    if (!s.ok()) state.reset();  // as StateHolding's
    return s;
  }));
  return pin;
}

Result<std::unique_ptr<runtime::SequenceState>> SessionCore::TemporaryState(const MemoryState& bank) const {
  std::unique_ptr<runtime::SequenceState> out;
  LM2_RETURN_IF_ERROR(engine->residency->Reclaiming([&]() -> Status {
    LM2_ASSIGN_OR_RETURN(out, StateHolding(model(), bank));
    return Status::Ok();
  }));
  return out;
}

void SessionCore::DropState(bool prefill) { engine->residency->Drop(*this, prefill); }

Status SessionCore::LoadHead(bool prefill) {
  LM2_RETURN_IF_ERROR(CheckUsable());
  persistence::LoadOptions lo;
  lo.expected_fingerprint = engine->info.fingerprint;
  lo.with_transcript = false;
  // NotFound from LoadHead means no such session, or one with nothing committed yet. A
  // writer (this or another process) may commit the first version between LoadHead and
  // Head; then the head is no longer 0 and loading again finds it.
  for (int attempt = 0;; ++attempt) {
    auto snap = store().LoadHead(id, lo);
    if (snap.ok()) {
      Adopt(snap->info.version, std::move(snap->state), snap->info.turn_count, prefill);
      return Status::Ok();
    }
    if (!snap.status().IsNotFound()) return snap.status().WithContext("session '" + id.session + "'");
    LM2_ASSIGN_OR_RETURN(persistence::HeadInfo h, store().Head(id));
    if (h.head_version == 0) {
      Adopt(0, engine->initial_memory.Clone(), 0, prefill);
      return Status::Ok();
    }
    if (attempt >= 3) return snap.status();
  }
}

void SessionCore::Adopt(uint64_t version, MemoryState bank, uint64_t turns, bool prefill) {
  memory = std::move(bank);
  head = version;
  turn_count = turns;
  DropState(prefill);
}

Status PrefillOnResume(SessionCore& c) {
  if (c.options.context != ContextPolicy::kKeepContext || c.options.resume_prefill_turns <= 0 || c.head == 0) {
    return Status::Ok();
  }
  LM2_ASSIGN_OR_RETURN(Lineage lineage, LoadLineage(c.store(), c.id, c.head));
  std::vector<int32_t> tokens;
  int32_t taken = 0;
  for (auto it = lineage.versions.rbegin(); it != lineage.versions.rend() && taken < c.options.resume_prefill_turns; ++it) {
    if (KindOf(*it) != "turn") continue;
    persistence::LoadOptions lo;
    LM2_ASSIGN_OR_RETURN(persistence::Snapshot snap, c.store().LoadVersion(c.id, it->version, lo));
    std::vector<int32_t> turn = snap.transcript.prompt_tokens;
    turn.insert(turn.end(), snap.transcript.reply_tokens.begin(), snap.transcript.reply_tokens.end());
    tokens.insert(tokens.begin(), turn.begin(), turn.end());
    ++taken;
  }
  // Keep room for the next turn: at most half the context, the most recent tokens.
  const auto budget = static_cast<std::size_t>(c.engine->info.max_context / 2);
  if (tokens.size() > budget) tokens.erase(tokens.begin(), tokens.end() - static_cast<std::ptrdiff_t>(budget));
  if (tokens.empty()) return Status::Ok();
  const runtime::Model& m = c.model();
  LM2_RETURN_IF_ERROR(m.Forward(*c.state, tokens, runtime::LogitsMode::kNone, nullptr));
  // The transcript is in memory already: close the segment and put the committed bank
  // back, keeping only the context (KV cache).
  LM2_RETURN_IF_ERROR(m.EndSegment(*c.state));
  return m.ImportMemory(*c.state, c.memory);
}

Result<std::unique_ptr<SessionCore>> OpenSessionCore(std::shared_ptr<const EngineCore> engine,
                                                     persistence::SessionId id, const SessionOptions& options) {
  auto core = std::make_unique<SessionCore>();
  core->engine = std::move(engine);
  core->id = std::move(id);
  core->options = options;
  auto head = core->store().Head(core->id);
  if (!head.ok()) {
    if (!head.status().IsNotFound()) return head.status();
    if (!options.create_if_missing) {
      return Status::NotFound("no session '" + core->id.session + "' for tenant '" + core->id.tenant + "'");
    }
    Status created = core->store().CreateSession(core->id);
    if (!created.ok() && created.code() != StatusCode::kAlreadyExists) return created;  // a racing creator is fine
  }
  // A resume: the first call's state gets the last turns' context back (PrefillOnResume).
  LM2_RETURN_IF_ERROR(core->LoadHead(/*prefill=*/true));
  return core;
}

}  // namespace internal

using internal::SessionCore;

Session::Session(std::unique_ptr<SessionCore> core) : core_(std::move(core)) {}
Session::~Session() = default;

const std::string& Session::tenant() const { return core_->id.tenant; }
const std::string& Session::id() const { return core_->id.session; }
uint64_t Session::head_version() const { return core_->head; }
uint64_t Session::turn_count() const { return core_->turn_count; }

Status Session::Reload() { return core_->LoadHead(/*prefill=*/false); }

namespace {

// Checks the message and options and renders the prompt; OutOfRange when it cannot fit
// the context with a reply token.
Result<std::vector<int32_t>> RenderPrompt(const SessionCore& c, std::string_view message, const ChatOptions& options) {
  const internal::EngineCore& e = *c.engine;
  if (message.empty()) return Status::InvalidArgument("empty message");
  if (message.size() > e.options.max_message_bytes) {
    return Status::InvalidArgument("message of " + std::to_string(message.size()) + " bytes is over the limit of " +
                                   std::to_string(e.options.max_message_bytes) + " (EngineOptions.max_message_bytes)");
  }
  if (options.max_tokens < 1 || options.max_tokens > e.options.max_reply_tokens) {
    return Status::InvalidArgument("max_tokens must be in [1, " + std::to_string(e.options.max_reply_tokens) + "]");
  }
  LM2_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, e.tokenizer->RenderUserTurn(message, c.turn_count == 0));
  if (static_cast<int64_t>(prompt.size()) + 1 > e.info.max_context) {
    return Status::OutOfRange("message is " + std::to_string(prompt.size()) + " tokens; a turn must fit the model's " +
                              std::to_string(e.info.max_context) + "-token context with room for the reply");
  }
  return prompt;
}

// Empties c.state's context where the policy says so or the prompt and one reply token
// would not fit after it.
void MakeRoom(SessionCore& c, const std::vector<int32_t>& prompt) {
  if (c.options.context == ContextPolicy::kResetEachTurn) c.model().ResetContext(*c.state);
  const auto need = static_cast<int64_t>(prompt.size()) + 1;
  if (c.state->context_length() + need > c.engine->info.max_context) c.model().ResetContext(*c.state);
}

runtime::SamplingOptions Sampling(const ChatOptions& o) {
  runtime::SamplingOptions s;
  s.temperature = o.temperature;
  s.top_k = o.top_k;
  s.top_p = o.top_p;
  s.repetition_penalty = o.repetition_penalty;
  s.seed = o.seed;
  return s;
}

std::vector<LayerSlots> MassDiff(const internal::EngineCore& e, const std::vector<std::vector<float>>& before,
                                 const std::vector<std::vector<float>>& after) {
  std::vector<LayerSlots> out;
  for (std::size_t i = 0; i < after.size() && i < e.info.memory_layers.size(); ++i) {
    LayerSlots ls{e.info.memory_layers[i], after[i]};
    if (i < before.size()) {
      for (std::size_t n = 0; n < ls.values.size() && n < before[i].size(); ++n) ls.values[n] -= before[i][n];
    }
    out.push_back(std::move(ls));
  }
  return out;
}

// Runs the turn in c.state (segment left closed, memory written). The prompt's last token
// runs inside Generate so the read mass before it separates the prompt's reads from the
// reply's.
Result<ChatResult> RunTurn(SessionCore& c, const std::vector<int32_t>& prompt, const ChatOptions& options,
                           const TokenCallback& on_token, persistence::TurnTranscript* transcript) {
  const runtime::Model& m = c.model();
  const internal::EngineCore& e = *c.engine;
  ChatResult r;
  const auto t0 = Clock::now();
  const std::span<const int32_t> all(prompt);
  if (prompt.size() > 1) {
    // The turn's first call grows the state's buffers (KV cache, scratch); a backend out of
    // memory refuses it with the state unchanged, so idle sessions' states can make room.
    LM2_RETURN_IF_ERROR(e.residency->Reclaiming(
        [&] { return m.Forward(*c.state, all.first(prompt.size() - 1), runtime::LogitsMode::kNone, nullptr); }));
  }
  auto reads_before = m.SegmentReadMass(*c.state);
  r.prefill_seconds = Since(t0);

  runtime::GenerateOptions go;
  go.max_tokens = options.max_tokens;
  go.stop_strings = options.stop_strings;
  go.cancel = options.cancel;
  go.batcher = e.batcher.get();
  // The reply's own forwards refused for memory (its prompt's last token, steps without the
  // batcher, the last token): an idle session's state makes room (inside this call, this
  // session's is never one).
  go.on_out_of_memory = [&e] { return e.residency->ReleaseIdle(); };
  runtime::Sampler sampler(Sampling(options));
  runtime::TextCallback cb;
  if (on_token) cb = [&](std::string_view t) { on_token(t); };
  LM2_ASSIGN_OR_RETURN(runtime::GenerateResult g,
                       runtime::Generate(m, *c.state, *e.tokenizer, sampler, all.last(1), go, cb));
  auto reads_after = m.SegmentReadMass(*c.state);
  if (reads_after.ok()) {
    r.slot_reads = MassDiff(e, reads_before.ok() ? *reads_before : std::vector<std::vector<float>>{}, *reads_after);
  }
  // The segment's end may need memory too (its write's buffers; a session's first end also
  // its own memory K/V); refused, it changes nothing, so idle sessions' states can make room.
  LM2_RETURN_IF_ERROR(e.residency->Reclaiming([&] { return m.EndSegment(*c.state); }));
  r.text = std::move(g.text);
  r.stop_reason = std::string(runtime::StopReasonName(g.stop));
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  r.reply_tokens = static_cast<int64_t>(g.tokens.size());
  r.prefill_seconds += g.prefill_seconds;
  r.decode_seconds = g.decode_seconds;
  transcript->prompt_tokens = prompt;
  transcript->reply_tokens = std::move(g.tokens);
  return r;
}

}  // namespace

Result<ChatResult> Session::Chat(std::string_view message, const ChatOptions& options, const TokenCallback& on_token) {
  SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  LM2_RETURN_IF_ERROR(runtime::ValidateSamplingOptions(Sampling(options)));
  LM2_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, RenderPrompt(c, message, options));
  // Pinned: no other session's call takes c.state until this one returns.
  LM2_ASSIGN_OR_RETURN(internal::Residency::Pin pin, c.UseState());
  MakeRoom(c, prompt);

  // From here on, any failure discards the in-memory state and returns to the head (the
  // next call rebuilds the state from it).
  const auto discard = [&](const Status& why) -> Status {
    c.DropState(/*prefill=*/false);
    return why;
  };
  persistence::TurnTranscript transcript;
  auto turn = RunTurn(c, prompt, options, on_token, &transcript);
  if (!turn.ok()) return discard(turn.status());
  ChatResult r = std::move(turn).value();
  // A cancel that arrives after the last token but before the commit still cancels: the
  // caller asked before anything was committed.
  if (options.cancel != nullptr && options.cancel->load()) return discard(Status::Cancelled("turn cancelled"));
  // Into a kept bank where the engine has one (BankPool: no fresh host memory to touch).
  internal::BankPool& spares = *c.engine->spare_banks;
  MemoryState bank = spares.Take();
  // The export's page-locked staging may not fit either: an idle session's state holds some.
  if (Status exported = c.engine->residency->Reclaiming([&] { return c.model().ExportMemoryInto(*c.state, bank); });
      !exported.ok()) {
    return discard(exported);
  }

  persistence::CommitOptions co;
  co.metadata[internal::kMetaKind] = "turn";
  co.metadata[internal::kMetaPreview] = internal::Preview(message);
  co.metadata[internal::kMetaPromptTokens] = std::to_string(transcript.prompt_tokens.size());
  co.metadata[internal::kMetaReplyTokens] = std::to_string(transcript.reply_tokens.size());
  co.turns = 1;
  const auto t0 = Clock::now();
  auto version = c.store().Commit(c.id, c.head, bank, transcript, co);
  r.commit_seconds = Since(t0);
  if (!version.ok()) {
    Status s = version.status();
    if (s.IsConflict()) {
      s = Status::Conflict(std::string(s.message()) + " (another handle committed to session '" + c.id.session +
                           "' first: call Reload() and send the message again)");
    }
    spares.Give(std::move(bank));
    return discard(s);
  }
  auto writes = internal::SlotDiff(c.memory, bank);
  if (writes.ok()) r.slot_writes = std::move(writes).value();
  spares.Give(std::exchange(c.memory, std::move(bank)));
  c.head = *version;
  c.turn_count += 1;
  r.version = *version;
  return r;
}

Result<std::vector<float>> Session::NextTokenLogits(std::string_view message) const {
  SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  const runtime::Model& m = c.model();
  if (message.empty()) return Status::InvalidArgument("empty message");
  LM2_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, c.engine->tokenizer->RenderUserTurn(message, c.turn_count == 0));
  if (static_cast<int64_t>(prompt.size()) >= c.engine->info.max_context) {
    return Status::OutOfRange("message does not fit the context");
  }
  // A state of its own (the session's may hold context, and a segment run in it could not
  // be undone), counted as the session's while it lives.
  internal::Residency::Pin pin = c.engine->residency->Enter(c);
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<runtime::SequenceState> s, c.TemporaryState(c.memory));
  const std::span<const int32_t> all(prompt);
  std::vector<float> logits;
  // Each forward refused for memory leaves the state as it was: idle sessions make room.
  internal::Residency& residency = *c.engine->residency;
  if (prompt.size() > 1) {
    LM2_RETURN_IF_ERROR(residency.Reclaiming(
        [&] { return m.Forward(*s, all.first(prompt.size() - 1), runtime::LogitsMode::kNone, nullptr); }));
  }
  LM2_RETURN_IF_ERROR(residency.Reclaiming([&] { return m.Forward(*s, all.last(1), runtime::LogitsMode::kLast, &logits); }));
  return logits;
}

Result<MemoryState> Session::Memory() const {
  LM2_RETURN_IF_ERROR(core_->CheckUsable());
  return core_->memory.Clone();
}

Result<std::vector<LayerSlots>> Session::SlotNorms() const {
  LM2_RETURN_IF_ERROR(core_->CheckUsable());
  return internal::SlotNorms(core_->memory);
}

Status Session::Erase() {
  SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  LM2_RETURN_IF_ERROR(c.store().EraseSession(c.id));
  c.erased = true;
  c.DropState(/*prefill=*/false);
  c.memory = MemoryState();
  c.head = 0;
  c.turn_count = 0;
  return Status::Ok();
}

}  // namespace lm2
