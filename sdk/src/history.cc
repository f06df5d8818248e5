// Session history and control: versions, transcripts, rollback, fork, clear, forget.
#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "engine_core.h"
#include "ids.h"
#include "lineage.h"
#include "lm2/session.h"
#include "memory_ops.h"

namespace lm2 {

using internal::SessionCore;

namespace {

int64_t MetaInt(const std::map<std::string, std::string>& m, const char* key) {
  auto it = m.find(key);
  if (it == m.end()) return 0;
  return std::strtoll(it->second.c_str(), nullptr, 10);
}

persistence::LoadOptions Checked(const SessionCore& c, bool with_transcript) {
  persistence::LoadOptions lo;
  lo.expected_fingerprint = c.engine->info.fingerprint;
  lo.with_transcript = with_transcript;
  return lo;
}

// Commits `bank` as a non-turn version (clear / forget) and makes it this handle's head.
Status CommitOp(SessionCore& c, MemoryState bank, std::map<std::string, std::string> meta) {
  persistence::CommitOptions co;
  co.metadata = std::move(meta);
  co.turns = 0;
  LM2_ASSIGN_OR_RETURN(uint64_t v, c.store().Commit(c.id, c.head, bank, persistence::TurnTranscript{}, co));
  c.Adopt(v, std::move(bank), c.turn_count, /*prefill=*/false);
  return Status::Ok();
}

std::string Describe(const ClearSpec& spec) {
  std::vector<int64_t> layers(spec.layers.begin(), spec.layers.end());
  return "clear layers=" + (layers.empty() ? std::string("all") : internal::JoinInts(layers)) +
         " slots=" + (spec.slots.empty() ? std::string("all") : internal::JoinInts(spec.slots));
}

}  // namespace

Result<std::vector<VersionEntry>> Session::History() const {
  const SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  LM2_ASSIGN_OR_RETURN(std::vector<persistence::VersionInfo> all, c.store().ListVersions(c.id));
  std::vector<VersionEntry> out;
  for (auto& v : all) {
    VersionEntry e;
    e.version = v.version;
    e.parent_version = v.parent_version;
    e.created_unix_ms = v.created_unix_ms;
    e.kind = internal::KindOf(v);
    auto p = v.metadata.find(internal::kMetaPreview);
    e.preview = p == v.metadata.end() ? std::string() : p->second;
    e.turn_count = v.turn_count;
    e.token_count = v.token_count;
    e.prompt_tokens = MetaInt(v.metadata, internal::kMetaPromptTokens);
    e.reply_tokens = MetaInt(v.metadata, internal::kMetaReplyTokens);
    e.is_head = v.version == c.head;
    e.metadata = std::move(v.metadata);
    out.push_back(std::move(e));
  }
  return out;
}

Result<TurnRecord> Session::Turn(uint64_t version) const {
  const SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  LM2_ASSIGN_OR_RETURN(persistence::Snapshot snap, c.store().LoadVersion(c.id, version, Checked(c, true)));
  if (internal::KindOf(snap.info) != "turn" && internal::KindOf(snap.info) != "base") {
    return Status::NotFound("version " + std::to_string(version) + " is a " + internal::KindOf(snap.info) + ", not a turn");
  }
  const runtime::Tokenizer& tok = *c.engine->tokenizer;
  const auto text_of = [&](const std::vector<int32_t>& ids) -> Result<std::string> {
    std::vector<int32_t> keep;
    for (int32_t id : ids) {
      if (id == tok.user_id() || id == tok.assistant_id() || id == tok.end_id() || tok.IsControl(id)) continue;
      keep.push_back(id);
    }
    LM2_ASSIGN_OR_RETURN(std::string s, tok.Decode(keep));
    const auto b = s.find_first_not_of(' ');
    const auto e = s.find_last_not_of(' ');
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  };
  TurnRecord r;
  r.version = version;
  r.prompt_ids = std::move(snap.transcript.prompt_tokens);
  r.reply_ids = std::move(snap.transcript.reply_tokens);
  LM2_ASSIGN_OR_RETURN(r.user_text, text_of(r.prompt_ids));
  LM2_ASSIGN_OR_RETURN(r.reply_text, text_of(r.reply_ids));
  return r;
}

Status Session::Rollback(uint64_t version) {
  SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  if (version == 0) return Status::InvalidArgument("rollback: version 0 has no memory; use ClearMemory() for a blank bank");
  // Load first: a missing, tampered or other-model version fails before the head moves.
  LM2_ASSIGN_OR_RETURN(persistence::Snapshot snap, c.store().LoadVersion(c.id, version, Checked(c, false)));
  LM2_RETURN_IF_ERROR(c.store().Rollback(c.id, c.head, version));
  c.Adopt(version, std::move(snap.state), snap.info.turn_count, /*prefill=*/false);
  return Status::Ok();
}

Result<std::unique_ptr<Session>> Session::Fork(uint64_t version, std::string_view new_session_id,
                                               std::string_view new_tenant) const {
  const SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  const std::string tenant = new_tenant.empty() ? c.id.tenant : std::string(new_tenant);
  LM2_RETURN_IF_ERROR(internal::ValidateId("tenant", tenant));
  LM2_RETURN_IF_ERROR(internal::ValidateId("session id", new_session_id));
  persistence::SessionId to{tenant, std::string(new_session_id)};
  // Verify the version belongs to this model before copying it.
  LM2_ASSIGN_OR_RETURN(persistence::Snapshot snap, c.store().LoadVersion(c.id, version, Checked(c, false)));
  LM2_RETURN_IF_ERROR(c.store().Fork(c.id, version, to));
  SessionOptions so = c.options;
  so.create_if_missing = false;
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<SessionCore> core, internal::OpenSessionCore(c.engine, to, so));
  return std::unique_ptr<Session>(new Session(std::move(core)));
}

Status Session::ClearMemory(const ClearSpec& spec) {
  SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  MemoryState bank = c.memory.Clone();
  LM2_RETURN_IF_ERROR(internal::ApplyClear(bank, c.engine->initial_memory, spec));
  std::vector<int64_t> layers(spec.layers.begin(), spec.layers.end());
  return CommitOp(c, std::move(bank),
                  {{internal::kMetaKind, "clear"},
                   {internal::kMetaPreview, Describe(spec)},
                   {internal::kMetaClearLayers, internal::JoinInts(layers)},
                   {internal::kMetaClearSlots, internal::JoinInts(spec.slots)}});
}

Status Session::ForgetTurn(uint64_t version) {
  SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  LM2_ASSIGN_OR_RETURN(internal::Lineage lineage, internal::LoadLineage(c.store(), c.id, c.head));
  const auto& L = lineage.versions;
  std::map<uint64_t, std::size_t> index;  // version -> position in L
  for (std::size_t i = 0; i < L.size(); ++i) index[L[i].version] = i;
  auto found = index.find(version);
  if (found == index.end()) {
    return Status::NotFound("version " + std::to_string(version) + " is not in the history of the head (" +
                            std::to_string(c.head) + ")");
  }
  const std::size_t target = found->second;
  const std::string kind = internal::KindOf(L[target]);
  if (target == 0 && lineage.root_is_base) {
    return Status::FailedPrecondition("version " + std::to_string(version) +
                                      " is the base of this history (a fork's copy or the oldest kept version): "
                                      "its turns cannot be separated from it; use ClearMemory or Rollback");
  }
  if (kind != "turn") return Status::InvalidArgument("version " + std::to_string(version) + " is a " + kind + ", not a turn");

  // Which versions later forgets removed, and where each forget sits.
  std::set<uint64_t> forgotten;
  bool shortcut_ok = target > 0;  // start from the stored bank of the version before the target
  for (std::size_t i = 0; i < L.size(); ++i) {
    if (internal::KindOf(L[i]) != "forget") continue;
    const int64_t v = MetaInt(L[i].metadata, internal::kMetaForgot);
    forgotten.insert(static_cast<uint64_t>(v));
    auto at = index.find(static_cast<uint64_t>(v));
    // A forget after the start point that removed something at or before it: the start
    // point's stored bank still holds that turn, so replay from the root instead.
    if (at != index.end() && target > 0 && i > target - 1 && at->second <= target - 1) shortcut_ok = false;
  }
  if (forgotten.count(version) != 0) {
    return Status::FailedPrecondition("turn " + std::to_string(version) + " is already forgotten");
  }

  const runtime::Model& m = c.model();
  MemoryState bank;
  std::size_t first;  // first position of L to replay
  if (shortcut_ok) {
    LM2_ASSIGN_OR_RETURN(persistence::Snapshot s, c.store().LoadVersion(c.id, L[target - 1].version, Checked(c, false)));
    bank = std::move(s.state);
    first = target;
  } else if (lineage.root_is_base) {
    LM2_ASSIGN_OR_RETURN(persistence::Snapshot s, c.store().LoadVersion(c.id, L[0].version, Checked(c, false)));
    bank = std::move(s.state);
    first = 1;
  } else {
    bank = c.engine->initial_memory.Clone();
    first = 0;
  }
  // The replay runs in a state of its own, counted as the session's while it lives.
  internal::Residency& residency = *c.engine->residency;
  internal::Residency::Pin pin = residency.Enter(c);
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<runtime::SequenceState> state, c.TemporaryState(bank));
  for (std::size_t i = first; i < L.size(); ++i) {
    const persistence::VersionInfo& v = L[i];
    const std::string k = internal::KindOf(v);
    if (i == target || forgotten.count(v.version) != 0 || k == "forget") continue;
    if (k == "turn") {
      LM2_ASSIGN_OR_RETURN(persistence::Snapshot s, c.store().LoadVersion(c.id, v.version, Checked(c, true)));
      LM2_RETURN_IF_ERROR(internal::ReplayTurn(m, *state, s.transcript, residency));
    } else if (k == "clear") {
      LM2_ASSIGN_OR_RETURN(ClearSpec spec, internal::ClearSpecFromMetadata(v.metadata));
      MemoryState now;
      LM2_RETURN_IF_ERROR(residency.Reclaiming([&] { return m.ExportMemoryInto(*state, now); }));
      LM2_RETURN_IF_ERROR(internal::ApplyClear(now, c.engine->initial_memory, spec));
      LM2_RETURN_IF_ERROR(residency.Reclaiming([&] { return m.ImportMemory(*state, now); }));
    } else {
      return Status::FailedPrecondition("version " + std::to_string(v.version) + " of kind " + k + " cannot be replayed");
    }
  }
  MemoryState result;
  LM2_RETURN_IF_ERROR(residency.Reclaiming([&] { return m.ExportMemoryInto(*state, result); }));
  return CommitOp(c, std::move(result),
                  {{internal::kMetaKind, "forget"},
                   {internal::kMetaPreview, "forget turn " + std::to_string(version)},
                   {internal::kMetaForgot, std::to_string(version)}});
}

Result<std::vector<LayerSlots>> Session::SlotWrites(uint64_t version) const {
  const SessionCore& c = *core_;
  LM2_RETURN_IF_ERROR(c.CheckUsable());
  LM2_ASSIGN_OR_RETURN(persistence::Snapshot after, c.store().LoadVersion(c.id, version, Checked(c, false)));
  if (after.info.parent_version == 0) return internal::SlotDiff(c.engine->initial_memory, after.state);
  auto before = c.store().LoadVersion(c.id, after.info.parent_version, Checked(c, false));
  if (!before.ok()) {
    return before.status().WithContext("the version before " + std::to_string(version) + " (" +
                                       std::to_string(after.info.parent_version) + ")");
  }
  return internal::SlotDiff(before->state, after.state);
}

}  // namespace lm2
