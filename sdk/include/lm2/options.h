// Options of the session SDK: per engine (EngineOptions), per session (SessionOptions) and
// per turn (ChatOptions). Plain values; every field's default is in its comment.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lm2::persistence {
class KeyProvider;  // lm2/persistence/key_provider.h: implement it to plug in a KMS
}

namespace lm2 {

enum class Backend {
  kAuto,  // the first CUDA GPU when this build has the CUDA backend and one is present, else the CPU
  kCpu,   // fp32 reference backend (OpenBLAS)
  kCuda,  // the CUDA backend on GPU 0 (bf16 weights); Engine::Open fails with Unavailable without one
};

// How much of an earlier conversation the self-attention context holds.
enum class ContextPolicy {
  // Every turn starts with an empty context: earlier turns reach the model through the
  // memory bank only. The memory is then a deterministic function of the turns'
  // transcripts, so a resumed session is bit-identical to one that never stopped and
  // ForgetTurn is exact. The default.
  kResetEachTurn,
  // The context is kept across turns (emptied only when the next turn would not fit).
  // Replies also see earlier turns verbatim, but the memory then depends on what the
  // context held, which a resumed process does not have: a resume is not bit-identical
  // (see SessionOptions::resume_prefill_turns) and ForgetTurn's replay is approximate.
  kKeepContext,
};

// Stage names passed to EngineOptions::on_progress, in order.
//   "model files" (validated, mapped), "fingerprint" (hash over the weights),
//   "weights" (backend load), "tokenizer", "store" (RocksDB opened), "ready".
using ProgressCallback = std::function<void(std::string_view stage, double fraction)>;

struct EngineOptions {
  std::string model_dir;    // model directory (config.json, *.safetensors, tokenizer.model). Required
  std::string store_path;   // RocksDB directory of the sessions' memory. Required
  Backend backend = Backend::kAuto;  // Default: kAuto (GPU if present, else CPU); ModelInfo::backend says which
  // Sessions chatting at the same time on different threads share batched decode steps
  // (one forward for all of them, each with its own context and memory) where the backend
  // gains from it: the GPU. Bit-identical to decoding alone within the GPU's GEMV row
  // limit, else equal to fp32 rounding (docs/sdk.md). Default: true
  bool batch_decode = true;

  // Keys (tenant KEKs) that encrypt the store, first match wins:
  //   key_provider if set; else the keyring file key_file if non-empty (must be mode 0600;
  //   CreateKeyFile() makes one); else the environment variable key_env.
  // No key at all is PermissionDenied at Open.
  std::shared_ptr<persistence::KeyProvider> key_provider;  // Default: none
  std::string key_file;                                    // Default: "" (not used)
  std::string key_env = "LM2_KEK";                         // Default: "LM2_KEK"

  // Other processes may use the same store at the same time (each operation opens the
  // database and closes it: milliseconds per operation). Default: false (this process
  // holds the store; another process's Engine::Open fails with Unavailable).
  bool share_store_between_processes = false;
  bool sync_commits = true;  // fsync every commit. Default: true

  // Limits. A message longer than max_message_bytes is InvalidArgument; a turn whose
  // prompt does not fit the model's context is OutOfRange.
  std::size_t max_message_bytes = 64 * 1024;  // Default: 64 KiB
  int32_t max_reply_tokens = 1024;            // cap on ChatOptions::max_tokens. Default: 1024

  // Most sessions holding a backend state at once: KV cache, memory bank, memory K/V and
  // scratch, 0.5-1 GB each on the GPU for the paper's model (docs/cuda.md). A session builds its state when
  // a call first needs one (Chat; NextTokenLogits and ForgetTurn build a temporary one), not
  // at open. When that many other sessions hold one, the least recently used session not
  // inside a call gives its state up (it is destroyed; the session keeps its committed bank
  // on the host and in the store). When every holder is inside a call, the session goes over
  // the cap rather than wait or fail, and the cap is restored as calls end. An evicted
  // session comes back as a resumed one in a new process would, paying one NewState +
  // ImportMemory of its bank: with kResetEachTurn bit-identical to never having been
  // evicted; with kKeepContext its context is lost (the last resume_prefill_turns turns
  // are run into the new one, as on open).
  // Independent of the cap, a state's creation, a turn's forwards, steps, segment end or
  // export, or a call of NextTokenLogits or of ForgetTurn's replay that finds the backend out
  // of memory (ResourceExhausted) evicts the least recently used idle session's state and
  // tries again (docs/sdk.md). Default: 0 (no cap)
  std::size_t max_resident_sessions = 0;

  ProgressCallback on_progress;  // loading progress. Default: none
};

struct SessionOptions {
  bool create_if_missing = true;  // false: an unknown session is NotFound. Default: true
  ContextPolicy context = ContextPolicy::kResetEachTurn;  // Default: kResetEachTurn
  // On resume with kKeepContext: run the last K turns' stored transcripts into the
  // context, without writing them to memory again, so the next reply sees them verbatim
  // as in the process that wrote them. A resume is the first call after open, and the
  // first after an eviction (EngineOptions::max_resident_sessions); it costs a prefill of
  // those tokens then. The KV entries are computed against the current memory (not the
  // memory each turn saw), so the result is close to, not bit-identical with, a session
  // that never stopped. Ignored with kResetEachTurn. Default: 0 (memory only).
  int32_t resume_prefill_turns = 0;
};

// Text of the reply as it becomes final (never half a character or part of a stop string).
using TokenCallback = std::function<void(std::string_view text)>;

struct ChatOptions {
  int32_t max_tokens = 256;                // reply length limit (>= 1). Default: 256
  float temperature = 0.0f;                // 0 = greedy. Default: 0
  int32_t top_k = 0;                       // 0 = off. Default: 0
  float top_p = 1.0f;                      // 1 = off. Default: 1
  float repetition_penalty = 1.0f;         // 1 = off. Default: 1
  uint64_t seed = 0;                       // sampling seed. Default: 0
  std::vector<std::string> stop_strings;   // extra stop strings. Default: none
  // Set to true from any thread to stop the turn: if it is set before the turn commits
  // (also after the reply's last token), Chat returns Cancelled and the session stays at
  // its last committed version. Default: nullptr (not cancellable).
  const std::atomic<bool>* cancel = nullptr;
};

// Which memory to reset to its initial value.
struct ClearSpec {
  std::vector<int32_t> layers;  // decoder layer indices (memory layers). Default: empty = all
  std::vector<int64_t> slots;   // slot indices in each chosen layer. Default: empty = all
};

}  // namespace lm2
