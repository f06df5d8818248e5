// Envelope encryption (OpenSSL EVP, AES-256-GCM): per-session data keys (DEKs) wrapped by
// per-tenant KEKs, and records sealed under a DEK with associated data that binds them to
// their tenant, session, version and kind.
//
// Record layout:       "LM2E" | format u8 (1) | kind u8 | nonce[12] | ciphertext | tag[16]
// Wrapped DEK layout:  "LM2K" | format u8 (1) | id_len u16 LE | key_id | nonce[12] | wrapped DEK[32] | tag[16]
// Associated data: a domain string, the header bytes, and length-prefixed tenant, session
// (and for records the version as u64 LE; for DEKs the key id).
//
// Nonces are 96 random bits from RAND_bytes per record; with a fresh DEK per session the
// 2^32-records-per-key bound of random GCM nonces is far away (one record per commit).
//
// Large records can be sealed and opened in place (SealRecordInPlace / OpenRecordInPlace):
// the header and tag live apart from the body, which is encrypted inside the buffer it
// was encoded into, so no second bank-sized buffer is touched.
//
// Thread-safety: free functions without shared state. Cost: one AES-GCM pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "lm2/core/status.h"
#include "lm2/persistence/key_provider.h"
#include "lm2/persistence/secret.h"

namespace lm2::persistence {

inline constexpr std::size_t kDekBytes = 32;
inline constexpr std::size_t kNonceBytes = 12;
inline constexpr std::size_t kTagBytes = 16;
inline constexpr std::size_t kRecordHeaderBytes = 6 + kNonceBytes;
inline constexpr std::size_t kRecordOverheadBytes = kRecordHeaderBytes + kTagBytes;

// Appended only; values are persisted.
enum class RecordKind : uint8_t {
  kSnapshot = 1,
  kTranscript = 2,
  kVersionInfo = 3,
  kHead = 4,
  kSnapshotFile = 5,  // a reference to a snapshot record stored in its own file
};

struct RecordBinding {
  std::string_view tenant;
  std::string_view session;
  uint64_t version = 0;
  RecordKind kind = RecordKind::kSnapshot;
};

// A sealed record: ciphertext is not secret, so it is not wiped.
struct SealedRecord {
  std::unique_ptr<uint8_t[]> data;
  std::size_t size = 0;
};

// A fresh random key (RAND_bytes). Internal when the CSPRNG fails.
Result<SecretBytes> RandomKey(std::size_t bytes = kDekBytes);

Result<SealedRecord> SealRecord(const SecretBytes& dek, const RecordBinding& binding,
                                const uint8_t* plaintext, std::size_t size);

// The parts of a record sealed in place: the record is header | body | tag.
struct RecordFrame {
  uint8_t header[kRecordHeaderBytes] = {};
  uint8_t tag[kTagBytes] = {};
};

// Encrypts data[0, size) in place and fills `frame`. On failure the buffer may hold a mix
// of plaintext and ciphertext: the caller wipes it.
Status SealRecordInPlace(const SecretBytes& dek, const RecordBinding& binding, uint8_t* data,
                         std::size_t size, RecordFrame* frame);

// Authenticates and decrypts the body data[0, size) in place. Same statuses as OpenRecord;
// on failure the buffer holds unauthenticated bytes: the caller wipes or drops it.
Status OpenRecordInPlace(const SecretBytes& dek, const RecordBinding& binding,
                         const uint8_t* header, uint8_t* data, std::size_t size,
                         const uint8_t* tag);

// Corruption when the record is malformed, truncated, altered, bound to something else,
// or sealed under another key (GCM cannot tell these apart, and says nothing more).
Result<SecretBytes> OpenRecord(const SecretBytes& dek, const RecordBinding& binding,
                               const uint8_t* record, std::size_t size);

// Wraps `dek` for (tenant, session) under `kek`.
Result<std::string> WrapDek(const Kek& kek, std::string_view tenant, std::string_view session,
                            const SecretBytes& dek);

// The key id a wrapped DEK names. Corruption when malformed.
Result<std::string> WrappedKeyId(std::string_view wrapped);

// Unwraps with the KEK the wrapped key names, fetched from `keys`. PermissionDenied when
// the KEK is unavailable or does not authenticate the wrapped key (wrong KEK, or a key
// moved to another tenant/session); Corruption when malformed.
Result<SecretBytes> UnwrapDek(KeyProvider& keys, std::string_view tenant, std::string_view session,
                              std::string_view wrapped);

}  // namespace lm2::persistence
