// Engine: a loaded model plus the encrypted session store, shared by every session.
//
//   lm2::EngineOptions opt;
//   opt.model_dir = "models/lm2-demo";  opt.store_path = "lm2-data";  opt.key_file = "lm2.key";
//   auto engine = lm2::Engine::Open(opt);           // loads the weights once
//   auto session = (*engine)->OpenSession("alice", "main");
//   auto reply = (*session)->Chat("My cat is called Tom.");
//
// Ownership: the Engine owns the weights, tokenizer and store; Sessions it opens keep it
// alive (they share ownership), so it may be released before them. Thread-safety: every
// method may be called from many threads at once; each Session is used by one thread at a
// time. Cost: Open maps the weights, hashes them (fingerprint) and opens the store; the
// rest is per call.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/options.h"
#include "lm2/session.h"
#include "lm2/status.h"
#include "lm2/types.h"

namespace lm2 {

namespace internal {
struct EngineCore;
}

class Engine {
 public:
  // Errors: InvalidArgument (options), NotFound/Corruption (model files), Unimplemented
  // (backend kCuda in this build), PermissionDenied (no key), Unavailable (the store is
  // held by another process and sharing is off), IOError.
  static Result<std::unique_ptr<Engine>> Open(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Opens session (tenant, session_id): resumed from its head version, or created when
  // new (NotFound instead when options.create_if_missing is false). Ids: 1..128 bytes of
  // [A-Za-z0-9._@-] (they are stored in plaintext: use opaque ids).
  Result<std::unique_ptr<Session>> OpenSession(std::string_view tenant, std::string_view session_id,
                                               const SessionOptions& options = {}) const;
  // Sessions of a tenant, sorted.
  Result<std::vector<std::string>> ListSessions(std::string_view tenant) const;
  // Erases a session (its data key first, then its data). Idempotent.
  Status EraseSession(std::string_view tenant, std::string_view session_id) const;
  // Erases every session of a tenant (crypto-shredding: keys first, then data, compacted).
  Status EraseTenant(std::string_view tenant) const;

  const ModelInfo& model_info() const;

  // Sessions holding a backend state now (EngineOptions::max_resident_sessions): each one
  // whose state a call built and that has not lost it since (to an eviction, a Rollback,
  // Reload, ClearMemory, ForgetTurn, a failed turn or closing), and each inside a call that
  // is building one (NextTokenLogits and ForgetTurn build a temporary one).
  std::size_t ResidentSessions() const;
  // ResidentSessions() and the evictions so far, read at one moment.
  EngineStats Stats() const;

 private:
  explicit Engine(std::shared_ptr<internal::EngineCore> core);
  std::shared_ptr<internal::EngineCore> core_;
};

// Writes a new keyring file at `path` holding one random 256-bit master key (from which
// every tenant's key is derived), mode 0600, unless the file exists (then OK, untouched).
// For samples and single-machine apps; production keys come from a KMS (key_provider).
Status CreateKeyFile(const std::string& path);

}  // namespace lm2
