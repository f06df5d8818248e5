// Plain value types shared by the persistence codec and the session stores.
//
// Thread-safety: values. A Snapshot owns its memory bank (possibly hundreds of MiB):
// it is move-only, like MemoryState.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lm2/core/memory_state.h"

namespace lm2::persistence {

// Identity of a session: the tenant (unit of keys and erasure) and the session id.
// Both are stored in plaintext in RocksDB keys: use opaque ids, not names or emails.
struct SessionId {
  std::string tenant;
  std::string session;
  bool operator==(const SessionId&) const = default;
};

// How the tensors of a bank are stored. The bank in memory is always fp32.
enum class DType : uint8_t {
  kF32 = 0,   // exact
  kBF16 = 1,  // round-to-nearest-even; |x - x'| <= |x| * 2^-8 for finite x
  kI8 = 2,    // per-row scale = max|row| / 127; |x - x'| <= max|row| / 254
};

// The token ids of the turn that produced a version (the caller's message and the reply).
struct TurnTranscript {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> reply_tokens;
  bool operator==(const TurnTranscript&) const = default;
};

// Everything about a version except its bank: cheap to list.
struct VersionInfo {
  uint64_t version = 0;          // 1, 2, ...; never reused within a session
  uint64_t parent_version = 0;   // the head this version was committed on (0: none)
  int64_t created_unix_ms = 0;   // wall clock at commit
  uint64_t turn_count = 0;       // turns in the session up to and including this version
  uint64_t token_count = 0;      // tokens in the session up to and including this version
  std::string model_fingerprint;
  std::map<std::string, std::string> metadata;  // caller's key/value pairs
  uint64_t bank_values = 0;      // total values across layers
  DType dtype = DType::kF32;     // storage precision of the bank
};

// A decoded version: its description, its memory bank and its turn's transcript.
struct Snapshot {
  VersionInfo info;
  MemoryState state;
  TurnTranscript transcript;
};

}  // namespace lm2::persistence
