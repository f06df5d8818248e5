// BankFiles: the snapshot records of large banks, each in its own file inside the
// database directory, written once and synced before the commit's WriteBatch refers to
// them (a RocksDB value would be written to the WAL, copied into the memtable and written
// again to a blob file at flush).
//
//   <db>/banks/<H(lp(tenant))>/<H(lp(tenant) lp(session))>/<version, 16 hex>.bank
//
// H = the first 128 bits of SHA-256, in hex (ids are arbitrary bytes and may be long; they
// are RocksDB keys already, so the hash hides nothing new). A file holds one sealed
// snapshot record, "LM2E" fmt kind nonce ciphertext tag, exactly as it would be stored
// inline. Paths follow from (tenant, session, version) alone, so erase and retention find
// the files without reading any record, and a file left by a commit that crashed before
// its WriteBatch is replaced by the next commit of that version number.
//
// All I/O goes through the store's rocksdb::Env. Thread-safety: stateless apart from the
// Env; callers serialise work on one session (the store's per-session mutex).
#pragma once

#include <rocksdb/env.h>

#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "lm2/core/status.h"
#include "lm2/persistence/envelope.h"
#include "lm2/persistence/secret.h"

namespace lm2::persistence {

// The reference record that stands for a bank file in the snapshots column family
// (sealed as RecordKind::kSnapshotFile under the session's DEK, bound like every record):
//   format u8 (1) | file size u64 LE | the file's record header[18] | its GCM tag[16]
// The header (with its nonce) and tag pin the exact file written by that commit.
inline constexpr uint8_t kBankRefFormat = 1;
inline constexpr std::size_t kBankRefBytes = 1 + 8 + kRecordHeaderBytes + kTagBytes;
std::string EncodeBankRef(uint64_t file_size, const RecordFrame& frame);
Status DecodeBankRef(const uint8_t* data, std::size_t size, uint64_t* file_size, RecordFrame* frame);

// Read() puts the file this many bytes into its buffer, so that the record's body (after
// its 18-byte header) starts 32 bytes in: aligned for the FlatBuffers reader.
inline constexpr std::size_t kBankFileLead = 14;

class BankFiles {
 public:
  BankFiles(rocksdb::Env* env, std::string db_path);

  std::string TenantDir(std::string_view tenant) const;
  std::string SessionDir(std::string_view tenant, std::string_view session) const;
  std::string FilePath(std::string_view tenant, std::string_view session, uint64_t version) const;

  // Writes frame.header | body | frame.tag as the version's file (replacing any file of
  // that name), fdatasyncs it and syncs its directory (creating and syncing the
  // directories on the first file of a session). IOError on failure.
  Status Write(std::string_view tenant, std::string_view session, uint64_t version,
               const RecordFrame& frame, const uint8_t* body, std::size_t size);

  // The whole file of `version` at offset kBankFileLead of the result, which is
  // kBankFileLead + `expected_size` bytes long. Corruption
  // when it is missing or has another size; IOError when it cannot be read.
  Result<SecretBytes> Read(std::string_view tenant, std::string_view session, uint64_t version,
                           uint64_t expected_size);

  // Deletes every file of the session whose version is not in `keep`.
  Status Sweep(std::string_view tenant, std::string_view session, const std::set<uint64_t>& keep);
  // Deletes the session's (or the tenant's) files and directories. Idempotent.
  Status RemoveSession(std::string_view tenant, std::string_view session);
  Status RemoveTenant(std::string_view tenant);

 private:
  Status SyncDir(const std::string& dir);
  Status RemoveDir(const std::string& dir, int depth);

  rocksdb::Env* env_;
  std::string root_;  // <db>/banks
  std::string db_path_;
};

}  // namespace lm2::persistence
