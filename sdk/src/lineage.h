// Private: the chain of versions that leads to a head, and replaying it.
//
// A head's memory is a fold over its lineage (root first): a turn runs its transcript as
// one segment in an empty context, a clear resets slots, a forget removes an earlier
// turn from the fold. The root is either the session's first version (replayable from the
// initial memory) or a base whose stored bank is the starting point: a fork's copied
// version, or the oldest version retention kept.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine_core.h"
#include "lm2/persistence/session_store.h"

namespace lm2::internal {

struct Lineage {
  std::vector<persistence::VersionInfo> versions;  // root first, the head last
  bool root_is_base = false;  // the root's bank is a starting point, not a replayable step
};

// "turn", "clear", "forget" or "base" (a fork's copy). Versions without SDK metadata count
// as turns.
std::string KindOf(const persistence::VersionInfo& info);

Result<Lineage> LoadLineage(persistence::SessionStore& store, const persistence::SessionId& id, uint64_t head);

// Runs one stored turn as a segment in an empty context (the memory write applied). Each
// call that a backend out of memory refuses with the state unchanged (the forward, the
// segment's end) runs through residency.Reclaiming: idle sessions' states make room.
Status ReplayTurn(const runtime::Model& model, runtime::SequenceState& state,
                  const persistence::TurnTranscript& transcript, Residency& residency);

}  // namespace lm2::internal
