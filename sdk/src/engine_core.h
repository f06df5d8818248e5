// Private: what an Engine shares with its Sessions, and a Session's own state.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "bank_pool.h"
#include "lm2/core/memory_state.h"
#include "lm2/options.h"
#include "lm2/persistence/session_store.h"
#include "lm2/runtime/decode_batcher.h"
#include "lm2/runtime/model.h"
#include "lm2/runtime/tokenizer.h"
#include "lm2/types.h"
#include "residency.h"

namespace lm2::internal {

// Tests only: wraps the model of every engine opened while it is set (fault injection, e.g.
// a backend that runs out of memory where the CPU never does). Empty: the model as loaded.
// Set it before opening engines and clear it after; not for concurrent use.
using ModelWrapper = std::function<std::unique_ptr<runtime::Model>(std::unique_ptr<runtime::Model>)>;
void SetModelWrapperForTesting(ModelWrapper wrap);

// Read-only after Engine::Open (the store is internally thread-safe).
struct EngineCore {
  EngineOptions options;
  ModelInfo info;
  std::unique_ptr<runtime::Model> model;
  std::unique_ptr<runtime::Tokenizer> tokenizer;
  std::unique_ptr<persistence::SessionStore> store;
  MemoryState initial_memory;  // the bank of a fresh state (identity rows or learned init)
  // Joins concurrent sessions' decode steps (EngineOptions::batch_decode on a backend that
  // batches, else null). Internally synchronised.
  std::unique_ptr<runtime::DecodeBatcher> batcher;
  // Host banks kept for the sessions' exports after each turn (at most kKeptBanks).
  // Internally synchronised.
  std::unique_ptr<BankPool> spare_banks;
  // Which sessions hold a backend state, and evicting idle ones' (EngineOptions::
  // max_resident_sessions, or a backend out of memory). Internally synchronised.
  std::unique_ptr<Residency> residency;
};

// Banks an engine keeps for reuse (BankPool): two turns committing at once export without
// fresh host memory.
inline constexpr std::size_t kKeptBanks = 2;

// Metadata keys stored with every version the SDK commits.
inline constexpr const char* kMetaKind = "lm2.kind";          // turn | clear | forget
inline constexpr const char* kMetaPreview = "lm2.preview";    // start of the message / description
inline constexpr const char* kMetaClearLayers = "lm2.clear.layers";  // "0,2" or "" (all)
inline constexpr const char* kMetaClearSlots = "lm2.clear.slots";    // "3,7" or "" (all)
inline constexpr const char* kMetaForgot = "lm2.forgot";      // version number forgotten
inline constexpr const char* kMetaPromptTokens = "lm2.prompt_tokens";
inline constexpr const char* kMetaReplyTokens = "lm2.reply_tokens";

struct SessionCore {
  SessionCore() = default;
  SessionCore(const SessionCore&) = delete;
  SessionCore& operator=(const SessionCore&) = delete;
  ~SessionCore();  // leaves the engine's Residency

  std::shared_ptr<const EngineCore> engine;
  persistence::SessionId id;
  SessionOptions options;
  // Built when a call needs it (UseState), dropped when the head moves (Adopt) or a turn
  // fails, taken by an eviction between calls (Residency). Touched only by this session's
  // thread inside a pinned call, or under the Residency's mutex. No segment open between
  // calls.
  std::unique_ptr<runtime::SequenceState> state;
  // The next build runs PrefillOnResume: the session was just opened, or an eviction took
  // its state. Written under the Residency's mutex.
  bool prefill_on_build = false;
  MemoryState memory;       // the head's bank (what `state` holds between calls)
  uint64_t head = 0;        // the version this handle is at
  uint64_t turn_count = 0;  // turns up to the head
  bool erased = false;

  const runtime::Model& model() const { return *engine->model; }
  persistence::SessionStore& store() const { return *engine->store; }

  // Pins this session for a call (Residency::Enter) and builds its state if it has none:
  // NewState + ImportMemory of `memory`, then PrefillOnResume when prefill_on_build. A
  // backend out of memory evicts idle sessions' states and tries again (Residency::Reclaiming).
  Result<Residency::Pin> UseState();
  // A state of its own holding `bank` (empty context) for a pinned call that must not touch
  // `state` (NextTokenLogits, ForgetTurn's replay); built as UseState builds.
  Result<std::unique_ptr<runtime::SequenceState>> TemporaryState(const MemoryState& bank) const;
  // Destroys the state; the next call rebuilds it from `memory` (with PrefillOnResume when
  // `prefill`).
  void DropState(bool prefill);
  // Reads the head from the store into memory/head/turn_count and drops the state
  // (`prefill`: as DropState's).
  Status LoadHead(bool prefill);
  // Makes `version` (already committed) the head of this handle, holding `bank`, and drops
  // the state (`prefill`: as DropState's; false: the next call starts from an empty context).
  void Adopt(uint64_t version, MemoryState bank, uint64_t turns, bool prefill);
  Status CheckUsable() const;
};

}  // namespace lm2::internal

namespace lm2::internal {
// With ContextPolicy::kKeepContext and resume_prefill_turns > 0: runs the last turns'
// transcripts into the fresh context of `core.state`, leaving the memory as committed.
Status PrefillOnResume(SessionCore& core);
// Opens (creating when allowed) a session and loads its head; builds no state.
Result<std::unique_ptr<SessionCore>> OpenSessionCore(std::shared_ptr<const EngineCore> engine,
                                                     persistence::SessionId id, const SessionOptions& options);
}  // namespace lm2::internal
