// SessionStore: versioned, encrypted memory-bank snapshots of chat sessions.
//
// Each session (tenant, session id) has a head pointer and versions 1, 2, ... (numbers
// are never reused). A version holds the memory bank, its description (VersionInfo) and
// the transcript of the turn that produced it. Every record is AES-256-GCM sealed under
// the session's data key, which is stored only wrapped by the tenant's KEK
// (docs/persistence.md).
//
// Implementations: RocksDB (OpenRocksDbSessionStore, below). A shared store for many
// hosts would implement the same interface and pass the same tests.
//
// Thread-safety: all methods may be called concurrently from many threads. Commits to
// one session are serialised and compare-and-set on the head: exactly one of several
// writers that saw the same head wins, the others get Conflict.
// Errors: NotFound (no such session/version), Conflict (head moved), Corruption
// (tampered or truncated data), PermissionDenied (missing or wrong key),
// FailedPrecondition (bank of another model), Unavailable (store busy in another
// process), IOError. Nothing throws.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/memory_state.h"
#include "lm2/core/status.h"
#include "lm2/persistence/key_provider.h"
#include "lm2/persistence/types.h"

namespace rocksdb {
class Env;
}

namespace lm2::persistence {

// Where the time of a commit went (filled when CommitOptions::timings is set).
struct CommitTimings {
  double encode_s = 0;   // FlatBuffers encoding (and bf16/int8 conversion)
  double encrypt_s = 0;  // DEK unwrap + AES-256-GCM of all records
  double store_s = 0;    // RocksDB: head read and CAS check, synced WriteBatch
  double file_s = 0;     // writing and syncing the bank's own file (0 when stored inline)
  uint64_t record_bytes = 0;  // bytes written (all sealed records of the commit)
};

struct LoadTimings {
  double read_s = 0;     // RocksDB reads
  double decrypt_s = 0;  // DEK unwrap + AES-256-GCM
  double decode_s = 0;   // verification and conversion to fp32
};

struct CommitOptions {
  DType dtype = DType::kF32;                   // storage precision of the bank. Default: fp32
  std::map<std::string, std::string> metadata; // stored in VersionInfo. Default: none
  uint64_t turns = 1;                          // turns this commit adds to turn_count. Default: 1
  CommitTimings* timings = nullptr;            // out: where the time went. Default: not measured
};

struct LoadOptions {
  // Refuse a bank of another model (FailedPrecondition) when non-empty. Default: "" (no check).
  std::string expected_fingerprint;
  bool with_transcript = true;       // also load the version's transcript. Default: true
  LoadTimings* timings = nullptr;    // out: where the time went. Default: not measured
};

// Retention: which versions survive ApplyRetention. A version is kept when it is the
// head, or among the `keep_last` highest version numbers, or created at or after
// now - max_age_ms. A rule set to 0 is off; with both off nothing is removed.
struct RetentionPolicy {
  uint64_t keep_last = 0;   // keep the K newest versions. Default: 0 (rule off)
  int64_t max_age_ms = 0;   // keep versions younger than this. Default: 0 (rule off)
  int64_t now_unix_ms = 0;  // the clock for max_age_ms. Default: 0 (system clock)
};

struct HeadInfo {
  uint64_t head_version = 0;  // 0: no version committed yet
  uint64_t last_version = 0;  // highest version number allocated
  int64_t created_unix_ms = 0;
};

class SessionStore {
 public:
  virtual ~SessionStore() = default;

  // Creates an empty session (head 0) with a fresh data key. AlreadyExists if present.
  virtual Status CreateSession(const SessionId& id) = 0;

  // Commits a new version on top of `expected_head` (0 for the first) and moves the head
  // to it, atomically and durably. Conflict when the head is not `expected_head`.
  // Returns the new version number.
  virtual Result<uint64_t> Commit(const SessionId& id, uint64_t expected_head,
                                  const MemoryState& state, const TurnTranscript& transcript,
                                  const CommitOptions& options = {}) = 0;

  virtual Result<HeadInfo> Head(const SessionId& id) = 0;
  // NotFound when the session has no committed version.
  virtual Result<Snapshot> LoadHead(const SessionId& id, const LoadOptions& options = {}) = 0;
  virtual Result<Snapshot> LoadVersion(const SessionId& id, uint64_t version,
                                       const LoadOptions& options = {}) = 0;
  // All kept versions, oldest first, without their banks.
  virtual Result<std::vector<VersionInfo>> ListVersions(const SessionId& id) = 0;

  // Moves the head to kept version `to_version` (compare-and-set on `expected_head`).
  // Later versions stay listable until retention removes them; the next commit's parent
  // is `to_version`.
  virtual Status Rollback(const SessionId& id, uint64_t expected_head, uint64_t to_version) = 0;

  // Creates session `to` (same or other tenant) whose version 1 is a copy of `from`'s
  // `version`, re-encrypted under `to`'s own data key. AlreadyExists if `to` exists.
  virtual Status Fork(const SessionId& from, uint64_t version, const SessionId& to) = 0;

  // Removes the versions the policy does not keep. Returns the removed version numbers.
  virtual Result<std::vector<uint64_t>> ApplyRetention(const SessionId& id,
                                                       const RetentionPolicy& policy) = 0;

  // Destroys the session's wrapped data key (durably), then its data. Idempotent.
  virtual Status EraseSession(const SessionId& id) = 0;
  // Destroys all wrapped data keys of the tenant (durably) first, then all its data, and
  // compacts so the deleted bytes leave the store's files (crypto-shredding).
  virtual Status EraseTenant(std::string_view tenant) = 0;

  virtual Result<std::vector<std::string>> ListSessions(std::string_view tenant) = 0;

  // Re-wraps every data key of the tenant with its current KEK (after a rotation).
  // Returns how many keys were rewrapped.
  virtual Result<uint64_t> RewrapTenantKeys(std::string_view tenant) = 0;
};

// How several processes share one RocksDB store. RocksDB lets one process at a time
// open a database read-write (a LOCK file); the modes choose how to live with that.
enum class ProcessSharing {
  // The store opens the database once and holds it: other processes' Open returns
  // Unavailable after `open_timeout_ms`. Fastest; the default.
  kExclusive,
  // The store opens the database for each operation and closes it after, so processes
  // take turns through RocksDB's LOCK (waiting up to `open_timeout_ms` each time). The
  // read-check-write of a commit happens inside one turn, so compare-and-set holds
  // across processes. Costs a database open per operation (milliseconds).
  kPerOperation,
};

struct RocksDbStoreOptions {
  std::string path;                        // database directory. Required
  std::shared_ptr<KeyProvider> keys;       // KEKs. Required
  bool create_if_missing = true;           // create the database. Default: true
  bool sync = true;                        // fsync the WAL on every commit. Default: true
  ProcessSharing sharing = ProcessSharing::kExclusive;  // Default: kExclusive
  int64_t open_timeout_ms = 10000;         // wait for another process's lock. Default: 10 s
  // Values at least this large go to blob files (snapshots). Default: 64 KiB.
  uint64_t min_blob_size = 64 * 1024;
  // Write buffer of the snapshots column family. Default: 64 MiB.
  uint64_t snapshot_write_buffer_bytes = 64ull << 20;
  // A snapshot whose encoded size is at least this is written once to its own synced
  // file under <path>/banks, and the commit's WriteBatch holds a sealed reference to it;
  // smaller ones are RocksDB values (WAL, memtable, blob file). 0: every snapshot gets a
  // file. Default: 1 MiB. Either kind is read back whatever this is set to.
  uint64_t bank_file_min_bytes = 1ull << 20;
  // Encode buffers kept between commits for reuse (each as large as the largest bank
  // committed), so large commits do not fault in fresh memory each time. 0: none kept.
  // Default: 2.
  std::size_t cached_encode_buffers = 2;
  // All file I/O goes through this Env (tests inject faults). Default: nullptr
  // (rocksdb::Env::Default()). Not owned; must outlive the store.
  rocksdb::Env* env = nullptr;
};

// Opens (or creates) a RocksDB-backed store. Unavailable when another process holds
// the database (kExclusive) past the timeout; IOError/Corruption from RocksDB otherwise.
Result<std::unique_ptr<SessionStore>> OpenRocksDbSessionStore(const RocksDbStoreOptions& options);

}  // namespace lm2::persistence
