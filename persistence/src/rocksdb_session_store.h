// RocksDbSessionStore: the RocksDB implementation of SessionStore (private header).
//
// Ownership: owns the database handle (kExclusive) or opens one per operation
// (kPerOperation); shares the KeyProvider. Thread-safety: per-session mutex stripes
// serialise each session's read-check-write; RocksDB handles the rest. Cost: a commit
// is one encode pass into a reused buffer, one AES-GCM pass in place, and one synced
// WriteBatch; a large bank (bank_file_min_bytes) is written once to its own synced file
// instead of through the WAL, the memtable and a blob file. Up to cached_encode_buffers
// bank-sized buffers stay allocated between commits.
#pragma once

#include <rocksdb/db.h>

#include <array>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bank_files.h"
#include "buffer_pool.h"
#include "lm2/persistence/codec.h"
#include "lm2/persistence/envelope.h"
#include "lm2/persistence/session_store.h"

namespace lm2::persistence {

// One open database and its column families; closes on destruction.
struct DbHandle {
  enum Cf { kDefault = 0, kSessions, kSnapshots, kTranscripts, kKeys, kCount };
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> cfs;
  rocksdb::ColumnFamilyHandle* cf(Cf c) const { return cfs[static_cast<std::size_t>(c)]; }
  ~DbHandle();
};

// The keys of one column family that start with `prefix`, the iterator positioned at the
// first of them. Owns the upper bound the RocksDB iterator reads, so the two live and die
// together; not copyable or movable for the same reason. Check status() after the loop.
class PrefixIterator {
 public:
  PrefixIterator(const DbHandle& h, DbHandle::Cf cf, std::string prefix);
  PrefixIterator(const PrefixIterator&) = delete;
  PrefixIterator& operator=(const PrefixIterator&) = delete;
  rocksdb::Iterator* operator->() const { return it_.get(); }

 private:
  std::string end_;       // the first key past the prefix
  rocksdb::Slice upper_;  // points into end_
  std::unique_ptr<rocksdb::Iterator> it_;
};

// Maps a RocksDB status to an lm2 Status.
Status FromRocks(const rocksdb::Status& s, std::string_view what);
int64_t NowUnixMs();

class RocksDbSessionStore final : public SessionStore {
 public:
  static Result<std::unique_ptr<SessionStore>> Open(const RocksDbStoreOptions& options);
  ~RocksDbSessionStore() override = default;

  Status CreateSession(const SessionId& id) override;
  Result<uint64_t> Commit(const SessionId& id, uint64_t expected_head, const MemoryState& state,
                          const TurnTranscript& transcript, const CommitOptions& options) override;
  Result<HeadInfo> Head(const SessionId& id) override;
  Result<Snapshot> LoadHead(const SessionId& id, const LoadOptions& options) override;
  Result<Snapshot> LoadVersion(const SessionId& id, uint64_t version, const LoadOptions& options) override;
  Result<std::vector<VersionInfo>> ListVersions(const SessionId& id) override;
  Status Rollback(const SessionId& id, uint64_t expected_head, uint64_t to_version) override;
  Status Fork(const SessionId& from, uint64_t version, const SessionId& to) override;
  Result<std::vector<uint64_t>> ApplyRetention(const SessionId& id, const RetentionPolicy& policy) override;
  Status EraseSession(const SessionId& id) override;
  Status EraseTenant(std::string_view tenant) override;
  Result<std::vector<std::string>> ListSessions(std::string_view tenant) override;
  Result<uint64_t> RewrapTenantKeys(std::string_view tenant) override;

 private:
  explicit RocksDbSessionStore(RocksDbStoreOptions options)
      : options_(std::move(options)),
        files_(options_.env != nullptr ? options_.env : rocksdb::Env::Default(), options_.path),
        pool_(options_.cached_encode_buffers) {}

  Result<std::unique_ptr<DbHandle>> OpenDb() const;
  // Runs f(DbHandle&) with an open database: the held one, or (kPerOperation) one
  // opened for this call. Converts exceptions into statuses.
  template <typename F>
  auto WithDb(F&& f) -> decltype(f(std::declval<DbHandle&>()));

  std::mutex& SessionMutex(const SessionId& id);

  // Helpers; all take an open handle and assume the session's mutex is held.
  Result<SecretBytes> LoadDek(DbHandle& h, const SessionId& id);
  Result<HeadRecord> ReadHead(DbHandle& h, const SessionId& id, const SecretBytes& dek);
  Result<SealedRecord> SealHead(const SessionId& id, const SecretBytes& dek, const HeadRecord& head);
  Result<Snapshot> LoadVersionLocked(DbHandle& h, const SessionId& id, const SecretBytes& dek,
                                     uint64_t version, const LoadOptions& options);
  Result<std::vector<VersionInfo>> ListVersionsLocked(DbHandle& h, const SessionId& id,
                                                      const SecretBytes& dek);
  Status EraseRanges(DbHandle& h, std::string_view prefix, bool compact);
  // Encodes the snapshot of version `info.version` into a pooled buffer, seals it in place
  // and adds it to `batch` (reserved for it when empty): inline, or written to its bank
  // file with a reference record.
  // Fills t's encode_s, encrypt_s, file_s; returns the bytes written.
  Result<uint64_t> StageSnapshot(DbHandle& h, rocksdb::WriteBatch* batch, const SessionId& id,
                                 const SecretBytes& dek, const VersionInfo& info, const MemoryState& state,
                                 DType dtype, CommitTimings* t);

  RocksDbStoreOptions options_;
  BankFiles files_;
  BufferPool pool_;
  std::unique_ptr<DbHandle> held_;  // kExclusive: the open database
  std::mutex per_op_mu_;            // kPerOperation: one open handle per process at a time
  std::array<std::mutex, 64> stripes_;
};

template <typename F>
auto RocksDbSessionStore::WithDb(F&& f) -> decltype(f(std::declval<DbHandle&>())) {
  try {
    if (held_) return f(*held_);
    std::lock_guard<std::mutex> lock(per_op_mu_);
    auto h = OpenDb();
    if (!h.ok()) return h.status();
    return f(**h);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory in the session store");
  } catch (const std::exception& e) {
    return Status::Internal(std::string("unexpected exception in the session store: ") + e.what());
  } catch (...) {
    return Status::Internal("unexpected exception in the session store");
  }
}

}  // namespace lm2::persistence
