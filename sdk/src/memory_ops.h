// Private: per-slot statistics of memory banks and clearing of slots/layers.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/memory_state.h"
#include "lm2/core/status.h"
#include "lm2/options.h"
#include "lm2/types.h"

namespace lm2::internal {

// Per layer, ‖M[slot]‖₂.
std::vector<LayerSlots> SlotNorms(const MemoryState& m);
// Per layer, ‖after[slot] − before[slot]‖₂. InvalidArgument if the shapes differ.
Result<std::vector<LayerSlots>> SlotDiff(const MemoryState& before, const MemoryState& after);
// Sets the chosen rows of `m` to those of `initial`. InvalidArgument for a layer without
// memory or a slot out of range (m unchanged then).
Status ApplyClear(MemoryState& m, const MemoryState& initial, const ClearSpec& spec);

// "1,5,9" <-> {1,5,9}.
std::string JoinInts(const std::vector<int64_t>& v);
Result<std::vector<int64_t>> ParseInts(const std::string& s);
// ClearSpec <-> version metadata (kMetaClearLayers / kMetaClearSlots).
Result<ClearSpec> ClearSpecFromMetadata(const std::map<std::string, std::string>& meta);

// The first `max_bytes` bytes of `text` or fewer, cut at a UTF-8 character boundary,
// newlines turned into spaces, "..." appended when cut.
std::string Preview(std::string_view text, std::size_t max_bytes = 60);

}  // namespace lm2::internal
