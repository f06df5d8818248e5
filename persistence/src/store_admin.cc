// RocksDbSessionStore: fork, retention, erasure (crypto-shredding), listing, rewrap.
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <set>

#include "rocksdb_session_store.h"
#include "store_keys.h"

namespace lm2::persistence {
namespace {

rocksdb::Slice AsSlice(const SealedRecord& r) {
  return {reinterpret_cast<const char*>(r.data.get()), r.size};
}

}  // namespace

Status RocksDbSessionStore::Fork(const SessionId& from, uint64_t version, const SessionId& to) {
  if (to.tenant.empty() || to.session.empty()) return Status::InvalidArgument("empty tenant or session id");
  if (from == to) return Status::InvalidArgument("cannot fork a session into itself");
  std::mutex& a = SessionMutex(from);
  std::mutex& b = SessionMutex(to);
  std::unique_lock<std::mutex> la(a, std::defer_lock), lb(b, std::defer_lock);
  if (&a == &b) {
    la.lock();
  } else {
    std::lock(la, lb);
  }
  return WithDb([&](DbHandle& h) -> Status {
    const std::string to_prefix = keys::SessionPrefix(to.tenant, to.session);
    rocksdb::PinnableSlice existing;
    rocksdb::Status s = h.db->Get(rocksdb::ReadOptions(), h.cf(DbHandle::kKeys), to_prefix, &existing);
    if (s.ok()) return Status::AlreadyExists("session " + to.session + " already exists");
    if (!s.IsNotFound()) return FromRocks(s, "reading the session key");

    LM2_ASSIGN_OR_RETURN(SecretBytes from_dek, LoadDek(h, from));
    LoadOptions lo;
    LM2_ASSIGN_OR_RETURN(Snapshot snap, LoadVersionLocked(h, from, from_dek, version, lo));
    from_dek.Reset();

    LM2_ASSIGN_OR_RETURN(Kek kek, options_.keys->CurrentKek(to.tenant));
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, RandomKey());
    LM2_ASSIGN_OR_RETURN(std::string wrapped, WrapDek(kek, to.tenant, to.session, dek));
    VersionInfo info = snap.info;
    info.version = 1;
    info.parent_version = 0;
    info.created_unix_ms = NowUnixMs();
    info.metadata["lm2.fork_of"] = from.session + "@" + std::to_string(version);
    const SnapshotIds ids{to.tenant, to.session};
    LM2_RETURN_IF_ERROR(files_.RemoveSession(to.tenant, to.session));  // leftovers of an interrupted erase
    rocksdb::WriteBatch wb;
    const std::string end = keys::PrefixSuccessor(to_prefix);
    for (auto c : {DbHandle::kSessions, DbHandle::kSnapshots, DbHandle::kTranscripts}) {
      LM2_RETURN_IF_ERROR(FromRocks(wb.DeleteRange(h.cf(c), to_prefix, end), "batch"));
    }
    CommitTimings unused;
    LM2_RETURN_IF_ERROR(StageSnapshot(h, &wb, to, dek, info, snap.state, snap.info.dtype, &unused).status());
    LM2_ASSIGN_OR_RETURN(EncodedBuffer vinfo, EncodeVersionInfo(ids, info));
    LM2_ASSIGN_OR_RETURN(EncodedBuffer tr, EncodeTranscript(1, snap.transcript));
    LM2_ASSIGN_OR_RETURN(SealedRecord info_rec, SealRecord(dek, {to.tenant, to.session, 1, RecordKind::kVersionInfo},
                                                           vinfo.data(), vinfo.size()));
    LM2_ASSIGN_OR_RETURN(SealedRecord tr_rec, SealRecord(dek, {to.tenant, to.session, 1, RecordKind::kTranscript},
                                                         tr.data(), tr.size()));
    LM2_ASSIGN_OR_RETURN(SealedRecord head_rec, SealHead(to, dek, {1, 1, NowUnixMs()}));
    const std::string rk = keys::RecordKey(to.tenant, to.session, 1);
    LM2_RETURN_IF_ERROR(FromRocks(wb.Put(h.cf(DbHandle::kKeys), to_prefix, wrapped), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(wb.Put(h.cf(DbHandle::kTranscripts), rk, AsSlice(tr_rec)), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(wb.Put(h.cf(DbHandle::kSessions), keys::VersionInfoKey(to.tenant, to.session, 1),
                                         AsSlice(info_rec)), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(wb.Put(h.cf(DbHandle::kSessions), keys::HeadKey(to.tenant, to.session),
                                         AsSlice(head_rec)), "batch"));
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    return FromRocks(h.db->Write(wo, &wb), "forking the session");
  });
}

Result<std::vector<uint64_t>> RocksDbSessionStore::ApplyRetention(const SessionId& id, const RetentionPolicy& policy) {
  if (policy.max_age_ms < 0) return Status::InvalidArgument("max_age_ms must not be negative");
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Result<std::vector<uint64_t>> {
    LM2_ASSIGN_OR_RETURN(SecretBytes dek, LoadDek(h, id));
    LM2_ASSIGN_OR_RETURN(HeadRecord head, ReadHead(h, id, dek));
    LM2_ASSIGN_OR_RETURN(std::vector<VersionInfo> versions, ListVersionsLocked(h, id, dek));
    std::vector<uint64_t> removed;
    if (policy.keep_last == 0 && policy.max_age_ms == 0) return removed;
    const int64_t now = policy.now_unix_ms != 0 ? policy.now_unix_ms : NowUnixMs();
    const std::size_t n = versions.size();  // oldest first
    rocksdb::WriteBatch b;
    for (std::size_t i = 0; i < n; ++i) {
      const VersionInfo& v = versions[i];
      const bool is_head = v.version == head.head_version;
      const bool recent_k = policy.keep_last > 0 && n - i <= policy.keep_last;
      const bool young = policy.max_age_ms > 0 && v.created_unix_ms >= now - policy.max_age_ms;
      if (is_head || recent_k || young) continue;
      removed.push_back(v.version);
      const std::string rk = keys::RecordKey(id.tenant, id.session, v.version);
      LM2_RETURN_IF_ERROR(FromRocks(b.Delete(h.cf(DbHandle::kSnapshots), rk), "batch"));
      LM2_RETURN_IF_ERROR(FromRocks(b.Delete(h.cf(DbHandle::kTranscripts), rk), "batch"));
      LM2_RETURN_IF_ERROR(FromRocks(
          b.Delete(h.cf(DbHandle::kSessions), keys::VersionInfoKey(id.tenant, id.session, v.version)), "batch"));
    }
    if (!removed.empty()) {
      rocksdb::WriteOptions wo;
      wo.sync = options_.sync;
      LM2_RETURN_IF_ERROR(FromRocks(h.db->Write(wo, &b), "applying retention"));
    }
    // Then the bank files of every version not kept: the removed ones, and any left by a
    // commit or a retention that crashed before it finished.
    std::set<uint64_t> keep;
    for (const VersionInfo& v : versions) keep.insert(v.version);
    for (uint64_t r : removed) keep.erase(r);
    LM2_RETURN_IF_ERROR(files_.Sweep(id.tenant, id.session, keep));
    return removed;
  });
}

Status RocksDbSessionStore::EraseRanges(DbHandle& h, std::string_view prefix, bool compact) {
  const std::string begin(prefix);
  const std::string end = keys::PrefixSuccessor(prefix);
  rocksdb::WriteOptions wo;
  wo.sync = true;  // erasure is always durable
  // 1. Wrapped data keys first: once this write is durable the data is unreadable.
  {
    rocksdb::WriteBatch b;
    LM2_RETURN_IF_ERROR(FromRocks(b.DeleteRange(h.cf(DbHandle::kKeys), begin, end), "batch"));
    LM2_RETURN_IF_ERROR(FromRocks(h.db->Write(wo, &b), "destroying wrapped keys"));
  }
  // 2. Then the data.
  {
    rocksdb::WriteBatch b;
    for (auto c : {DbHandle::kSessions, DbHandle::kSnapshots, DbHandle::kTranscripts}) {
      LM2_RETURN_IF_ERROR(FromRocks(b.DeleteRange(h.cf(c), begin, end), "batch"));
    }
    LM2_RETURN_IF_ERROR(FromRocks(h.db->Write(wo, &b), "deleting session data"));
  }
  if (!compact) return Status::Ok();
  // 3. Push the deletions through the files: flush every column family (so the WAL that
  //    held the wrapped keys becomes obsolete and is deleted), then rewrite the SST files
  //    of the range down to the bottom level so no live file holds the old bytes.
  std::vector<rocksdb::ColumnFamilyHandle*> cfs(h.cfs.begin(), h.cfs.end());
  LM2_RETURN_IF_ERROR(FromRocks(h.db->Flush(rocksdb::FlushOptions(), cfs), "flushing after erase"));
  rocksdb::CompactRangeOptions co;
  co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  const rocksdb::Slice b(begin), e(end);
  for (auto c : {DbHandle::kKeys, DbHandle::kSessions, DbHandle::kTranscripts, DbHandle::kSnapshots}) {
    LM2_RETURN_IF_ERROR(FromRocks(h.db->CompactRange(co, h.cf(c), &b, &e), "compacting after erase"));
  }
  return Status::Ok();
}

Status RocksDbSessionStore::EraseSession(const SessionId& id) {
  std::lock_guard<std::mutex> lock(SessionMutex(id));
  return WithDb([&](DbHandle& h) -> Status {
    LM2_RETURN_IF_ERROR(EraseRanges(h, keys::SessionPrefix(id.tenant, id.session), /*compact=*/true));
    return files_.RemoveSession(id.tenant, id.session);
  });
}

Status RocksDbSessionStore::EraseTenant(std::string_view tenant) {
  if (tenant.empty()) return Status::InvalidArgument("empty tenant");
  // Every session of the tenant may be in the middle of a commit: take all stripes.
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(stripes_.size());
  for (auto& m : stripes_) locks.emplace_back(m);
  return WithDb([&](DbHandle& h) -> Status {
    LM2_RETURN_IF_ERROR(EraseRanges(h, keys::TenantPrefix(tenant), /*compact=*/true));
    return files_.RemoveTenant(tenant);
  });
}

Result<std::vector<std::string>> RocksDbSessionStore::ListSessions(std::string_view tenant) {
  return WithDb([&](DbHandle& h) -> Result<std::vector<std::string>> {
    PrefixIterator it(h, DbHandle::kKeys, keys::TenantPrefix(tenant));
    std::vector<std::string> out;
    for (; it->Valid(); it->Next()) {
      auto s = keys::SessionOfKey(tenant, it->key().ToStringView());
      if (!s) return Status::Corruption("malformed key in the keys column family");
      out.push_back(std::move(*s));
    }
    LM2_RETURN_IF_ERROR(FromRocks(it->status(), "listing sessions"));
    return out;
  });
}

Result<uint64_t> RocksDbSessionStore::RewrapTenantKeys(std::string_view tenant) {
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(stripes_.size());
  for (auto& m : stripes_) locks.emplace_back(m);
  return WithDb([&](DbHandle& h) -> Result<uint64_t> {
    LM2_ASSIGN_OR_RETURN(Kek current, options_.keys->CurrentKek(tenant));
    PrefixIterator it(h, DbHandle::kKeys, keys::TenantPrefix(tenant));
    rocksdb::WriteBatch b;
    uint64_t n = 0;
    for (; it->Valid(); it->Next()) {
      auto session = keys::SessionOfKey(tenant, it->key().ToStringView());
      if (!session) return Status::Corruption("malformed key in the keys column family");
      const std::string_view wrapped = it->value().ToStringView();
      LM2_ASSIGN_OR_RETURN(std::string key_id, WrappedKeyId(wrapped));
      if (key_id == current.key_id) continue;
      LM2_ASSIGN_OR_RETURN(SecretBytes dek, UnwrapDek(*options_.keys, tenant, *session, wrapped));
      LM2_ASSIGN_OR_RETURN(std::string rewrapped, WrapDek(current, tenant, *session, dek));
      LM2_RETURN_IF_ERROR(FromRocks(b.Put(h.cf(DbHandle::kKeys), it->key(), rewrapped), "batch"));
      ++n;
    }
    LM2_RETURN_IF_ERROR(FromRocks(it->status(), "listing keys"));
    if (n == 0) return n;
    rocksdb::WriteOptions wo;
    wo.sync = true;
    LM2_RETURN_IF_ERROR(FromRocks(h.db->Write(wo, &b), "rewrapping keys"));
    return n;
  });
}

}  // namespace lm2::persistence
