// Value types the session SDK returns: a turn's result, history entries, memory reports.
// Plain values, cheap to copy except where a comment says otherwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lm2 {

// Per memory layer, one number per slot (a norm, a write size, a read mass).
struct LayerSlots {
  int32_t layer = 0;          // decoder layer index
  std::vector<float> values;  // [memory_slots]
};

struct ChatResult {
  std::string text;                 // the reply, without the stop token or stop string
  std::string stop_reason;          // "stop_token", "stop_string", "max_tokens", "context_full"
  uint64_t version = 0;             // the version this turn committed
  int64_t prompt_tokens = 0;        // tokens of the rendered user turn
  int64_t reply_tokens = 0;         // generated tokens (a final stop token included)
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
  double commit_seconds = 0.0;      // encode + encrypt + synced write
  // Per slot, ‖M'[slot] − M[slot]‖₂: how much this turn wrote to each slot.
  std::vector<LayerSlots> slot_writes;
  // Per slot, the read attention mass of the positions that produced the reply (the
  // assistant-prefix token and every reply token but the last): which slots it read.
  std::vector<LayerSlots> slot_reads;
};

// One version of a session (a turn, a clear or a forget), without its memory bank.
struct VersionEntry {
  uint64_t version = 0;
  uint64_t parent_version = 0;   // the head it was committed on (0: the first)
  int64_t created_unix_ms = 0;
  std::string kind;              // "turn", "clear", "forget", or "base" (a fork's copy)
  std::string preview;           // turn: the start of the user's message; else a description
  uint64_t turn_count = 0;       // turns committed up to here (clears and forgets add none)
  uint64_t token_count = 0;      // tokens committed up to here
  int64_t prompt_tokens = 0;     // this turn's (0 for other kinds)
  int64_t reply_tokens = 0;
  bool is_head = false;
  std::map<std::string, std::string> metadata;  // everything stored with the version
};

// A turn's stored transcript, as text and ids.
struct TurnRecord {
  uint64_t version = 0;
  std::string user_text;         // the user's message as the model saw it (decoded)
  std::string reply_text;
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> reply_ids;
};

// An engine's sessions' backend states (Engine::Stats).
struct EngineStats {
  // Sessions holding a state (KV cache, memory bank, scratch) now, those building one
  // inside a call included.
  std::size_t resident_sessions = 0;
  // States taken back from idle sessions so far: to stay within
  // EngineOptions::max_resident_sessions, or to make room when the backend ran out of memory.
  uint64_t evictions = 0;
  // Decode steps of concurrent chats run as one batched call (EngineOptions::batch_decode
  // on a backend that batches, the GPU; zero otherwise): the calls, the steps they ran
  // (steps / calls: how many chats a call served on average) and the most steps in one.
  uint64_t decode_batches = 0;
  uint64_t decode_steps = 0;
  uint64_t largest_decode_batch = 0;
};

struct ModelInfo {
  std::string model_dir;
  std::string fingerprint;        // SHA-256 hex of config + weights
  std::string backend;            // "cpu"
  int32_t num_layers = 0;
  std::vector<int32_t> memory_layers;
  int64_t memory_slots = 0;       // N
  int64_t hidden_size = 0;        // d
  int64_t max_context = 0;        // max_position_embeddings
};

}  // namespace lm2
