// Key-encryption keys (KEKs): the root of the envelope scheme (docs/persistence.md).
//
// A KeyProvider hands out per-tenant 256-bit KEKs, each with a key id. New data keys are
// wrapped with the tenant's current (newest) KEK; older KEKs stay available by id so old
// records keep working until RewrapTenantKeys() moves them. A KMS plugs in by
// implementing the two methods (and keeping the KEK inside the KMS is a later step).
//
// Thread-safety: implementations must be safe to call from many threads at once.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include "lm2/core/status.h"
#include "lm2/persistence/secret.h"

namespace lm2::persistence {

inline constexpr std::size_t kKekBytes = 32;

struct Kek {
  std::string key_id;  // stored next to each wrapped key; not secret
  SecretBytes key;     // kKekBytes bytes
};

class KeyProvider {
 public:
  virtual ~KeyProvider() = default;
  // The KEK to wrap new data keys of `tenant` with. NotFound when the tenant has none.
  virtual Result<Kek> CurrentKek(std::string_view tenant) = 0;
  // The KEK `key_id` of `tenant`, to unwrap. PermissionDenied when unknown or not the
  // tenant's (a key id of another tenant is refused).
  virtual Result<Kek> GetKek(std::string_view tenant, std::string_view key_id) = 0;
};

// In-memory keyring: the implementation behind the file and environment providers, and
// the one tests use. Entries are (tenant, version, key); tenant "*" is a master entry
// from which the KEK of any tenant without its own entry is derived with
// HKDF-SHA256(master, salt "lm2-kek-v1", info tenant). Key ids: "<tenant>/<version>" for
// own entries, "*/<version>" for derived ones. The highest version is current.
// Cost: lookups are map finds plus, for derived keys, one HKDF.
class KeyringKeyProvider : public KeyProvider {
 public:
  KeyringKeyProvider() = default;

  // Parses "tenant version hexkey" entries separated by newlines or ';' ('#' starts a
  // comment). A bare 64-hex-digit string means "* 1 <hex>". InvalidArgument on errors
  // (the message never contains key bytes).
  static Result<std::unique_ptr<KeyringKeyProvider>> Parse(std::string_view text);

  // Adds or replaces a KEK (a rotation adds a higher version).
  Status Add(std::string_view tenant, uint32_t version, SecretBytes key);
  // Forgets a KEK (tests use it for the "missing KEK" case).
  void Remove(std::string_view tenant, uint32_t version);

  Result<Kek> CurrentKek(std::string_view tenant) override;
  Result<Kek> GetKek(std::string_view tenant, std::string_view key_id) override;

 private:
  Result<Kek> Derive(std::string_view tenant, uint32_t version, const SecretBytes& master);

  std::mutex mu_;
  std::map<std::pair<std::string, uint32_t>, SecretBytes> keys_;  // guarded by mu_
};

struct FileKeyProviderOptions {
  // Refuse a keyring file that group or others can read or write. Default: true.
  bool require_private_file = true;
};

// Reads a keyring file (format: KeyringKeyProvider::Parse) once, at Open. Rotation: add
// a line with a higher version and open a new provider.
Result<std::unique_ptr<KeyProvider>> OpenFileKeyProvider(const std::string& path,
                                                         const FileKeyProviderOptions& options = {});

// Reads the keyring from an environment variable (default LM2_KEK) once, at Open.
// NotFound when the variable is unset.
Result<std::unique_ptr<KeyProvider>> OpenEnvKeyProvider(const std::string& variable = "LM2_KEK");

}  // namespace lm2::persistence
