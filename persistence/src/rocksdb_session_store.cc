// RocksDbSessionStore: open, create, commit, load, list, rollback. Administrative
// operations (fork, retention, erase, rewrap) are in store_admin.cc.
#include "rocksdb_session_store.h"

#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include "store_keys.h"

namespace lm2::persistence {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

rocksdb::Slice AsSlice(const SealedRecord& r) {
  return {reinterpret_cast<const char*>(r.data.get()), r.size};
}

const uint8_t* Bytes(const rocksdb::PinnableSlice& s) {
  return reinterpret_cast<const uint8_t*>(s.data());
}

bool IsLockBusy(const rocksdb::Status& s) {
  if (!s.IsIOError() && !s.IsBusy()) return false;
  const std::string m = s.ToString();
  return m.find("lock file") != std::string::npos || m.find("lock hold") != std::string::npos ||
         s.IsBusy();
}

}  // namespace

DbHandle::~DbHandle() {
  if (db == nullptr) return;
  for (auto* c : cfs) {
    if (c != nullptr) db->DestroyColumnFamilyHandle(c).PermitUncheckedError();
  }
  db->Close().PermitUncheckedError();
  delete db;
}

Status FromRocks(const rocksdb::Status& s, std::string_view what) {
  if (s.ok()) return Status::Ok();
  const std::string msg = std::string(what) + ": " + s.ToString();
  if (s.IsNotFound()) return Status::NotFound(msg);
  if (s.IsCorruption()) return Status::Corruption(msg);
  if (s.IsBusy() || s.IsTimedOut() || s.IsTryAgain()) return Status::Unavailable(msg);
  if (s.IsInvalidArgument()) return Status::InvalidArgument(msg);
  if (s.IsNoSpace() || s.IsMemoryLimit()) return Status::ResourceExhausted(msg);
  if (s.IsIOError()) return Status::IOError(msg);
  return Status::Internal(msg);
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Result<std::unique_ptr<SessionStore>> OpenRocksDbSessionStore(const RocksDbStoreOptions& options) {
  return RocksDbSessionStore::Open(options);
}

Result<std::unique_ptr<SessionStore>> RocksDbSessionStore::Open(const RocksDbStoreOptions& options) {
  if (options.path.empty()) return Status::InvalidArgument("RocksDbStoreOptions::path is empty");
  if (!options.keys) return Status::InvalidArgument("RocksDbStoreOptions::keys is null");
  std::unique_ptr<RocksDbSessionStore> store(new RocksDbSessionStore(options));
  try {
    LM2_ASSIGN_OR_RETURN(auto h, store->OpenDb());
    // kPerOperation: the first open creates the database and is closed at once.
    if (options.sharing == ProcessSharing::kExclusive) store->held_ = std::move(h);
  } catch (const std::exception& e) {
    return Status::Internal(std::string("opening the session store: ") + e.what());
  }
  return std::unique_ptr<SessionStore>(std::move(store));
}

Result<std::unique_ptr<DbHandle>> RocksDbSessionStore::OpenDb() const {
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = options_.create_if_missing;
  dbo.create_missing_column_families = true;
  if (options_.env != nullptr) dbo.env = options_.env;
  dbo.max_background_jobs = 2;
  dbo.keep_log_file_num = 2;
  dbo.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  dbo.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;

  rocksdb::ColumnFamilyOptions small;
  small.compression = rocksdb::kNoCompression;  // sealed records do not compress
  rocksdb::ColumnFamilyOptions snaps = small;
  snaps.enable_blob_files = true;
  snaps.min_blob_size = options_.min_blob_size;
  snaps.blob_file_size = 256ull << 20;
  snaps.enable_blob_garbage_collection = true;
  snaps.write_buffer_size = static_cast<std::size_t>(options_.snapshot_write_buffer_bytes);
  std::vector<rocksdb::ColumnFamilyDescriptor> cfds = {
      {rocksdb::kDefaultColumnFamilyName, small},
      {"sessions", small},
      {"snapshots", snaps},
      {"transcripts", small},
      {"keys", small},
  };

  const auto deadline = Clock::now() + std::chrono::milliseconds(options_.open_timeout_ms);
  std::minstd_rand rng(static_cast<unsigned>(std::hash<std::thread::id>()(std::this_thread::get_id())) ^
                       static_cast<unsigned>(Clock::now().time_since_epoch().count()));
  for (;;) {
    auto h = std::make_unique<DbHandle>();
    rocksdb::Status s = rocksdb::DB::Open(dbo, options_.path, cfds, &h->cfs, &h->db);
    if (s.ok()) return h;
    h->db = nullptr;
    if (!IsLockBusy(s)) return FromRocks(s, "opening session store " + options_.path);
    if (Clock::now() >= deadline) {
      return Status::Unavailable("session store " + options_.path +
                                 " is held by another process or store object (" + s.ToString() + ")");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500 + rng() % 4000));
  }
}

std::mutex& RocksDbSessionStore::SessionMutex(const SessionId& id) {
  const std::size_t h = std::hash<std::string>()(keys::SessionPrefix(id.tenant, id.session));
  return stripes_[h % stripes_.size()];
}

// ---- Helpers ------------------------------------------------------------------------------
Result<SecretBytes> RocksDbSessionStore::LoadDek(DbHandle& h, const SessionId& id) {
  rocksdb::PinnableSlice wrapped;
  rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kKeys),
                                keys::SessionPrefix(id.tenant, id.session), &wrapped);
  if (s.IsNotFound()) return Status::NotFound("no session " + id.session + " for this tenant");
  LM2_RETURN_IF_ERROR(FromRocks(s, "reading the session key"));
  return UnwrapDek(*options_.keys, id.tenant, id.session, wrapped.ToStringView());
}

Result<HeadRecord> RocksDbSessionStore::ReadHead(DbHandle& h, const SessionId& id, const SecretBytes& dek) {
  rocksdb::PinnableSlice v;
  rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kSessions),
                                keys::HeadKey(id.tenant, id.session), &v);
  if (s.IsNotFound()) return Status::Corruption("session has a key but no head record");
  LM2_RETURN_IF_ERROR(FromRocks(s, "reading the session head"));
  LM2_ASSIGN_OR_RETURN(SecretBytes plain,
                       OpenRecord(dek, {id.tenant, id.session, 0, RecordKind::kHead}, Bytes(v), v.size()));
  HeadRecord head;
  LM2_RETURN_IF_ERROR(DecodeHead(plain.data(), plain.size(), &head));
  return head;
}

Result<SealedRecord> RocksDbSessionStore::SealHead(const SessionId& id, const SecretBytes& dek,
                                                   const HeadRecord& head) {
  EncodedBuffer enc = EncodeHead(head);
  return SealRecord(dek, {id.tenant, id.session, 0, RecordKind::kHead}, enc.data(), enc.size());
}

// ---- Create / commit ---------------------------------------------------------------------
Status RocksDbSessionStore::CreateSession(const SessionId& id) {
  if (id.tenant.empty() || id.session.empty()) return Status::InvalidArgument("empty tenant or session id");
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Status {
    const std::string prefix = keys::SessionPrefix(id.tenant, id.session);
    rocksdb::PinnableSlice existing;
    rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kKeys), prefix, &existing);
    if (s.ok()) return Status::AlreadyExists("session " + id.session + " already exists");
    if (!s.IsNotFound()) return FromRocks(s, "reading the session key");
    LM2_ASSIGN_OR_RETURN(Kek kek, options_.keys->CurrentKek(id.tenant));
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, RandomKey());
    LM2_ASSIGN_OR_RETURN(std::string wrapped, WrapDek(kek, id.tenant, id.session, dek));
    LM2_ASSIGN_OR_RETURN(SealedRecord head, SealHead(id, dek, {0, 0, NowUnixMs()}));
    LM2_RETURN_IF_ERROR(files_.RemoveSession(id.tenant, id.session));
    rocksdb::WriteBatch b;
    // Leftovers of an erase interrupted by a crash are dropped with the new session.
    const std::string end = keys::PrefixSuccessor(prefix);
    for (auto c : {DbHandle::kSessions, DbHandle::kSnapshots, DbHandle::kTranscripts}) {
      LM2_RETURN_IF_ERROR(FromRocks(b.DeleteRange(h.cf(c), prefix, end), "batch"));
    }
    LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kKeys), prefix, wrapped), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kSessions), keys::HeadKey(id.tenant, id.session),
                                        AsSlice(head)), "batch"));
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    return FromRocks(h.db->Write(wo, &b), "creating the session");
  });
}

Result<uint64_t> RocksDbSessionStore::Commit(const SessionId& id, uint64_t expected_head,
                                             const MemoryState& state, const TurnTranscript& transcript,
                                             const CommitOptions& options) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Result<uint64_t> {
    CommitTimings t;
    auto t0 = Clock::now();
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    LM2_ASSIGN_OR_RETURN(HeadRecord head, ReadHead(h, id, dek));
    auto t1 = Clock::now();
    t.store_s += Seconds(t0, t1);  // (includes one small unwrap; negligible)
    if (head.head_version != expected_head) {
      return Status::Conflict("head of session " + id.session + " is version " +
                              std::to_string(head.head_version) + ", not the expected " +
                              std::to_string(expected_head));
    }
    VersionInfo info;
    info.version = head.last_version + 1;
    info.parent_version = head.head_version;
    info.created_unix_ms = NowUnixMs();
    info.model_fingerprint = state.model_fingerprint;
    info.metadata = options.metadata;
    const uint64_t turn_tokens = transcript.prompt_tokens.size() + transcript.reply_tokens.size();
    if (head.head_version > 0) {
      rocksdb::PinnableSlice pv;
      rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kSessions),
                                    keys::VersionInfoKey(id.tenant, id.session, head.head_version), &pv);
      LM2_RETURN_IF_ERROR(FromRocks(s, "reading the head version's info"));
      LM2_ASSIGN_OR_RETURN(SecretBytes plain,
                           OpenRecord(dek, {id.tenant, id.session, head.head_version, RecordKind::kVersionInfo},
                                      Bytes(pv), pv.size()));
      VersionInfo parent;
      LM2_RETURN_IF_ERROR(DecodeVersionInfo(plain.data(), plain.size(), &parent));
      info.turn_count = parent.turn_count;
      info.token_count = parent.token_count;
    }
    info.turn_count += options.turns;
    info.token_count += turn_tokens;
    auto t2 = Clock::now();
    t.store_s += Seconds(t1, t2);
    const uint64_t v = info.version;
    rocksdb::WriteBatch b;
    LM2_ASSIGN_OR_RETURN(const uint64_t snap_bytes, StageSnapshot(h, &b, id, dek, info, state, options.dtype, &t));
    auto t3 = Clock::now();
    const SnapshotIds ids{id.tenant, id.session};
    info.bank_values = state.TotalValues();
    info.dtype = options.dtype;
    LM2_ASSIGN_OR_RETURN(EncodedBuffer vinfo, EncodeVersionInfo(ids, info));
    LM2_ASSIGN_OR_RETURN(EncodedBuffer tr, EncodeTranscript(v, transcript));
    LM2_ASSIGN_OR_RETURN(SealedRecord info_rec,
                         SealRecord(dek, {id.tenant, id.session, v, RecordKind::kVersionInfo}, vinfo.data(), vinfo.size()));
    LM2_ASSIGN_OR_RETURN(SealedRecord tr_rec,
                         SealRecord(dek, {id.tenant, id.session, v, RecordKind::kTranscript}, tr.data(), tr.size()));
    LM2_ASSIGN_OR_RETURN(SealedRecord head_rec, SealHead(id, dek, {v, v, head.created_unix_ms}));
    dek.Reset();
    auto t4 = Clock::now();
    t.encrypt_s += Seconds(t3, t4);  // the small records: encoding and sealing together
    LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kTranscripts), keys::RecordKey(id.tenant, id.session, v),
                                        AsSlice(tr_rec)), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kSessions), keys::VersionInfoKey(id.tenant, id.session, v),
                                        AsSlice(info_rec)), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kSessions), keys::HeadKey(id.tenant, id.session),
                                        AsSlice(head_rec)), "batch"));
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    LM2_RETURN_IF_ERROR(FromRocks(h.db->Write(wo, &b), "committing version " + std::to_string(v)));
    auto t5 = Clock::now();
    t.store_s += Seconds(t4, t5);
    t.record_bytes = snap_bytes + tr_rec.size + info_rec.size + head_rec.size;
    if (options.timings != nullptr) *options.timings = t;
    return v;
  });
}

Result<uint64_t> RocksDbSessionStore::StageSnapshot(DbHandle& h, rocksdb::WriteBatch* batch, const SessionId& id,
                                                    const SecretBytes& dek, const VersionInfo& info,
                                                    const MemoryState& state, DType dtype, CommitTimings* t) {
  auto t0 = Clock::now();
  PooledAllocator alloc(&pool_);  // declared first: outlives `enc`, which hands its buffer back
  LM2_ASSIGN_OR_RETURN(EncodedBuffer enc, EncodeSnapshot({id.tenant, id.session}, info, state, dtype, &alloc));
  auto t1 = Clock::now();
  const uint64_t v = info.version;
  RecordFrame frame;
  LM2_RETURN_IF_ERROR(SealRecordInPlace(dek, {id.tenant, id.session, v, RecordKind::kSnapshot}, enc.mutable_data(),
                                        enc.size(), &frame));
  auto t2 = Clock::now();
  t->encode_s += Seconds(t0, t1);
  t->encrypt_s += Seconds(t1, t2);
  const std::string key = keys::RecordKey(id.tenant, id.session, v);
  const uint64_t record_bytes = kRecordOverheadBytes + enc.size();
  if (enc.size() < options_.bank_file_min_bytes) {
    // Inline: an empty batch is reserved up front (grown by doubling, a large value would
    // be copied about twice over) and takes header, body and tag as parts of one value.
    if (batch->Count() == 0) *batch = rocksdb::WriteBatch(record_bytes + 4096);
    const rocksdb::Slice key_part(key);
    const rocksdb::Slice parts[] = {
        {reinterpret_cast<const char*>(frame.header), kRecordHeaderBytes},
        {reinterpret_cast<const char*>(enc.data()), enc.size()},
        {reinterpret_cast<const char*>(frame.tag), kTagBytes},
    };
    LM2_RETURN_IF_ERROR(FromRocks(batch->Put(h.cf(DbHandle::kSnapshots), rocksdb::SliceParts(&key_part, 1),
                                             rocksdb::SliceParts(parts, 3)), "batch"));
    return record_bytes;
  }
  LM2_RETURN_IF_ERROR(files_.Write(id.tenant, id.session, v, frame, enc.data(), enc.size()));
  t->file_s += Seconds(t2, Clock::now());
  const std::string ref = EncodeBankRef(record_bytes, frame);
  LM2_ASSIGN_OR_RETURN(SealedRecord ref_rec, SealRecord(dek, {id.tenant, id.session, v, RecordKind::kSnapshotFile},
                                                        reinterpret_cast<const uint8_t*>(ref.data()), ref.size()));
  LM2_RETURN_IF_ERROR(FromRocks(batch->Put(h.cf(DbHandle::kSnapshots), key, AsSlice(ref_rec)), "batch"));
  return record_bytes + ref_rec.size;
}

// ---- Reads ---------------------------------------------------------------------------------
Result<HeadInfo> RocksDbSessionStore::Head(const SessionId& id) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Result<HeadInfo> {
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    LM2_ASSIGN_OR_RETURN(HeadRecord head, ReadHead(h, id, dek));
    return HeadInfo{head.head_version, head.last_version, head.created_unix_ms};
  });
}

Result<Snapshot> RocksDbSessionStore::LoadVersionLocked(DbHandle& h, const SessionId& id, const SecretBytes& dek,
                                                        uint64_t version, const LoadOptions& options) {
  LoadTimings t;
  auto t0 = Clock::now();
  const std::string key = keys::RecordKey(id.tenant, id.session, version);
  rocksdb::PinnableSlice v;
  rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kSnapshots), key, &v);
  if (s.IsNotFound()) return Status::NotFound("session " + id.session + " has no version " + std::to_string(version));
  LM2_RETURN_IF_ERROR(FromRocks(s, "reading version " + std::to_string(version)));
  SecretBytes plain;  // the decrypted snapshot is plain[body, body + body_size)
  std::size_t body = 0, body_size = 0;
  auto t1 = Clock::now();
  if (v.size() > 5 && static_cast<uint8_t>(v.data()[5]) == static_cast<uint8_t>(RecordKind::kSnapshotFile)) {
    // A reference to the version's bank file: it pins the file's size, header and tag.
    LM2_ASSIGN_OR_RETURN(SecretBytes ref, OpenRecord(dek, {id.tenant, id.session, version, RecordKind::kSnapshotFile},
                                                     Bytes(v), v.size()));
    v.Reset();
    uint64_t file_size = 0;
    RecordFrame frame;
    LM2_RETURN_IF_ERROR(DecodeBankRef(ref.data(), ref.size(), &file_size, &frame));
    LM2_ASSIGN_OR_RETURN(plain, files_.Read(id.tenant, id.session, version, file_size));
    t1 = Clock::now();
    const uint8_t* rec = plain.data() + kBankFileLead;
    body = kBankFileLead + kRecordHeaderBytes;
    body_size = static_cast<std::size_t>(file_size) - kRecordOverheadBytes;
    if (std::memcmp(rec, frame.header, kRecordHeaderBytes) != 0 ||
        std::memcmp(rec + kRecordHeaderBytes + body_size, frame.tag, kTagBytes) != 0) {
      return Status::Corruption("the bank file of version " + std::to_string(version) +
                                " is not the one its reference names");
    }
    LM2_RETURN_IF_ERROR(OpenRecordInPlace(dek, {id.tenant, id.session, version, RecordKind::kSnapshot}, rec,
                                          plain.data() + body, body_size, rec + kRecordHeaderBytes + body_size));
  } else {
    LM2_ASSIGN_OR_RETURN(plain, OpenRecord(dek, {id.tenant, id.session, version, RecordKind::kSnapshot}, Bytes(v),
                                           v.size()));
    v.Reset();
    body_size = plain.size();
  }
  auto t2 = Clock::now();
  Snapshot out;
  LM2_RETURN_IF_ERROR(DecodeSnapshot(plain.data() + body, body_size, {id.tenant, id.session},
                                     options.expected_fingerprint, &out.info, &out.state));
  plain.Reset();
  if (out.info.version != version) return Status::Corruption("snapshot holds another version");
  auto t3 = Clock::now();
  t.read_s = Seconds(t0, t1);
  t.decrypt_s = Seconds(t1, t2);
  t.decode_s = Seconds(t2, t3);
  if (options.with_transcript) {
    rocksdb::PinnableSlice tv;
    s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kTranscripts), key, &tv);
    if (s.IsNotFound()) return Status::Corruption("version " + std::to_string(version) + " has no transcript");
    LM2_RETURN_IF_ERROR(FromRocks(s, "reading a transcript"));
    LM2_ASSIGN_OR_RETURN(SecretBytes tp, OpenRecord(dek, {id.tenant, id.session, version, RecordKind::kTranscript},
                                                    Bytes(tv), tv.size()));
    LM2_RETURN_IF_ERROR(DecodeTranscript(tp.data(), tp.size(), version, &out.transcript));
  }
  if (options.timings != nullptr) *options.timings = t;
  return out;
}

Result<Snapshot> RocksDbSessionStore::LoadHead(const SessionId& id, const LoadOptions& options) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Result<Snapshot> {
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    LM2_ASSIGN_OR_RETURN(HeadRecord head, ReadHead(h, id, dek));
    if (head.head_version == 0) return Status::NotFound("session " + id.session + " has no committed version");
    return LoadVersionLocked(h, id, dek, head.head_version, options);
  });
}

Result<Snapshot> RocksDbSessionStore::LoadVersion(const SessionId& id, uint64_t version, const LoadOptions& options) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Result<Snapshot> {
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    return LoadVersionLocked(h, id, dek, version, options);
  });
}

PrefixIterator::PrefixIterator(const DbHandle& h, DbHandle::Cf cf, std::string prefix)
    : end_(keys::PrefixSuccessor(prefix)), upper_(end_) {
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper_;
  it_.reset(h.db->NewIterator(ro, h.cf(cf)));
  it_->Seek(prefix);
}

Result<std::vector<VersionInfo>> RocksDbSessionStore::ListVersionsLocked(DbHandle& h, const SessionId& id,
                                                                         const SecretBytes& dek) {
  PrefixIterator it(h, DbHandle::kSessions, keys::VersionInfoPrefix(id.tenant, id.session));
  std::vector<VersionInfo> out;
  for (; it->Valid(); it->Next()) {
    const uint64_t v = keys::TrailingVersion(it->key().ToStringView());
    LM2_ASSIGN_OR_RETURN(SecretBytes plain,
                         OpenRecord(dek, {id.tenant, id.session, v, RecordKind::kVersionInfo},
                                    reinterpret_cast<const uint8_t*>(it->value().data()), it->value().size()));
    VersionInfo info;
    LM2_RETURN_IF_ERROR(DecodeVersionInfo(plain.data(), plain.size(), &info));
    if (info.version != v) return Status::Corruption("version info holds another version");
    out.push_back(std::move(info));
  }
  LM2_RETURN_IF_ERROR(FromRocks(it->status(), "listing versions"));
  return out;
}

Result<std::vector<VersionInfo>> RocksDbSessionStore::ListVersions(const SessionId& id) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Result<std::vector<VersionInfo>> {
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    return ListVersionsLocked(h, id, dek);
  });
}

Status RocksDbSessionStore::Rollback(const SessionId& id, uint64_t expected_head, uint64_t to_version) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Status {
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    LM2_ASSIGN_OR_RETURN(HeadRecord head, ReadHead(h, id, dek));
    if (head.head_version != expected_head) {
      return Status::Conflict("head is version " + std::to_string(head.head_version) + ", not the expected " +
                              std::to_string(expected_head));
    }
    rocksdb::PinnableSlice pv;
    rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kSessions),
                                  keys::VersionInfoKey(id.tenant, id.session, to_version), &pv);
    if (s.IsNotFound()) return Status::NotFound("no kept version " + std::to_string(to_version));
    LM2_RETURN_IF_ERROR(FromRocks(s, "reading version info"));
    // Authenticate the target before pointing the head at it.
    LM2_ASSIGN_OR_RETURN(SecretBytes plain, OpenRecord(dek, {id.tenant, id.session, to_version, RecordKind::kVersionInfo},
                                                       Bytes(pv), pv.size()));
    LM2_ASSIGN_OR_RETURN(SealedRecord rec, SealHead(id, dek, {to_version, head.last_version, head.created_unix_ms}));
    rocksdb::WriteBatch b;
    LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kSessions), keys::HeadKey(id.tenant, id.session), AsSlice(rec)), "batch"));
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    return FromRocks(h.db->Write(wo, &b), "moving the head");
  });
}

}  // namespace lm2::persistence
