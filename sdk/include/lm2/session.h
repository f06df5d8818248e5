// Session: one conversation (tenant, session id) whose memory bank persists, encrypted
// and versioned, across turns, processes and machines.
//
// A turn is the user's message plus the model's reply: one memory segment. When the reply
// ends, the memory write is applied and a new version (memory + the turn's token ids) is
// committed with compare-and-set on the head this handle last saw. If another handle
// (thread or process) committed first, Chat returns Conflict and commits nothing: call
// Reload() and send the message again. A failed or cancelled turn leaves the session at
// its last committed version (the in-memory state is dropped; the next call rebuilds it
// from that version).
//
// Ownership: a Session owns its sequence state (KV cache, memory bank), built when a call
// first needs it and given up while the session is idle when the engine's cap on resident
// sessions needs room (EngineOptions::max_resident_sessions); it keeps its committed bank
// on the host and keeps its Engine alive. Thread-safety: not thread-safe; use one Session
// from one thread at a time (many Sessions, on one Engine, may run on many threads at
// once; ChatOptions::cancel may be set from any thread). Costs: Chat = prefill + decode +
// one synced commit of the bank, plus NewState + ImportMemory of the bank when the session
// has no state (its first call, and its first after an eviction, a failed turn or a call
// that moved its head); Rollback/Reload = one decrypt of a bank; ForgetTurn replays the
// later turns.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/memory_state.h"
#include "lm2/options.h"
#include "lm2/status.h"
#include "lm2/types.h"

namespace lm2 {

namespace internal {
struct EngineCore;
struct SessionCore;
}  // namespace internal

class Session {
 public:
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const std::string& tenant() const;
  const std::string& id() const;
  // The version this handle is at (0: nothing committed yet).
  uint64_t head_version() const;
  // Turns committed up to the head.
  uint64_t turn_count() const;

  // Runs one turn and commits it. Errors: InvalidArgument (empty message, message over
  // EngineOptions::max_message_bytes, bad options), OutOfRange (the prompt does not fit
  // the context), Cancelled, Conflict (another handle committed first: Reload and retry),
  // and store errors. On any error nothing is committed and the session is unchanged.
  Result<ChatResult> Chat(std::string_view message, const ChatOptions& options = {},
                          const TokenCallback& on_token = {});

  // Logits [vocab] the model gives for the first reply token if `message` were sent now;
  // changes nothing. For tests and scoring.
  Result<std::vector<float>> NextTokenLogits(std::string_view message) const;

  // Re-reads the head from the store (after a Conflict, or to see another handle's turns).
  Status Reload();

  // Versions, oldest first (with kind, preview and token counts).
  Result<std::vector<VersionEntry>> History() const;
  // The stored transcript of turn `version` (NotFound for other kinds).
  Result<TurnRecord> Turn(uint64_t version) const;
  // Moves the head to kept version `version` (later versions stay listed until retention
  // removes them); the next turn continues from there. Conflict if the head moved.
  Status Rollback(uint64_t version);
  // New session (tenant, new_session_id) whose first version is a copy of `version` of
  // this one (re-encrypted under the new session's own key). tenant "" = this tenant.
  // AlreadyExists when that session exists.
  Result<std::unique_ptr<Session>> Fork(uint64_t version, std::string_view new_session_id,
                                        std::string_view new_tenant = {}) const;
  // Resets the chosen slots/layers to their initial values and commits that as a version.
  Status ClearMemory(const ClearSpec& spec = {});
  // Forgets turn `version` exactly: restores the memory before it and replays the later
  // turns' stored transcripts (and clears) without it; commits the result as a version.
  // FailedPrecondition if the history it needs was removed or predates a fork.
  Status ForgetTurn(uint64_t version);
  // Erases this session from the store (key first, then data). The handle is then
  // unusable (every call returns NotFound).
  Status Erase();

  // Per memory layer, ‖M[slot]‖₂ of the head memory.
  Result<std::vector<LayerSlots>> SlotNorms() const;
  // Per memory layer, ‖M_v[slot] − M_parent[slot]‖₂: how much version `version` changed
  // each slot (for the first version, against the initial memory).
  Result<std::vector<LayerSlots>> SlotWrites(uint64_t version) const;
  // A copy of the head memory bank (hundreds of MiB for large models).
  Result<MemoryState> Memory() const;

 private:
  friend class Engine;
  explicit Session(std::unique_ptr<internal::SessionCore> core);
  std::unique_ptr<internal::SessionCore> core_;
};

}  // namespace lm2
