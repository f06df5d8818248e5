#include "bank_files.h"

#include <openssl/evp.h>

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

#include "store_keys.h"

namespace lm2::persistence {
namespace {

constexpr std::string_view kSuffix = ".bank";

std::string HashHex(const std::string& bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr) != 1 || len < 16) {
    // SHA-256 does not fail on valid input; fall back to a deterministic, collision-free
    // (if long) name rather than none.
    std::string hex;
    char b[3];
    for (char c : bytes) {
      std::snprintf(b, sizeof b, "%02x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      hex += b;
    }
    return hex;
  }
  std::string hex;
  char b[3];
  for (unsigned int i = 0; i < 16; ++i) {
    std::snprintf(b, sizeof b, "%02x", md[i]);
    hex += b;
  }
  return hex;
}

std::string VersionName(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return std::string(b) + std::string(kSuffix);
}

// The version a file name encodes; false for a name that is not a version file.
bool ParseVersionName(std::string_view name, uint64_t* v) {
  if (name.size() != 16 + kSuffix.size() || name.substr(16) != kSuffix) return false;
  uint64_t x = 0;
  for (char c : name.substr(0, 16)) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return false;
    x = (x << 4) | static_cast<uint64_t>(d);
  }
  *v = x;
  return true;
}

Status Io(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  return Status::IOError(what + ": " + s.ToString());
}

}  // namespace

BankFiles::BankFiles(rocksdb::Env* env, std::string db_path)
    : env_(env), root_(db_path + "/banks"), db_path_(std::move(db_path)) {}

std::string BankFiles::TenantDir(std::string_view tenant) const {
  return root_ + "/" + HashHex(keys::TenantPrefix(tenant));
}

std::string BankFiles::SessionDir(std::string_view tenant, std::string_view session) const {
  return TenantDir(tenant) + "/" + HashHex(keys::SessionPrefix(tenant, session));
}

std::string BankFiles::FilePath(std::string_view tenant, std::string_view session, uint64_t version) const {
  return SessionDir(tenant, session) + "/" + VersionName(version);
}

Status BankFiles::SyncDir(const std::string& dir) {
  std::unique_ptr<rocksdb::Directory> d;
  LM2_RETURN_IF_ERROR(Io(env_->NewDirectory(dir, &d), "opening directory " + dir));
  return Io(d->Fsync(), "syncing directory " + dir);
}

Status BankFiles::Write(std::string_view tenant, std::string_view session, uint64_t version,
                        const RecordFrame& frame, const uint8_t* body, std::size_t size) {
  const std::string tdir = TenantDir(tenant);
  const std::string sdir = SessionDir(tenant, session);
  rocksdb::Status exists = env_->FileExists(sdir);
  if (exists.IsNotFound()) {
    for (const std::string* d : std::initializer_list<const std::string*>{&root_, &tdir, &sdir}) {
      LM2_RETURN_IF_ERROR(Io(env_->CreateDirIfMissing(*d), "creating directory " + *d));
    }
    for (const std::string* d : std::initializer_list<const std::string*>{&db_path_, &root_, &tdir}) {
      LM2_RETURN_IF_ERROR(SyncDir(*d));
    }
  } else {
    LM2_RETURN_IF_ERROR(Io(exists, "checking directory " + sdir));
  }
  const std::string path = sdir + "/" + VersionName(version);
  std::unique_ptr<rocksdb::WritableFile> f;
  LM2_RETURN_IF_ERROR(Io(env_->NewWritableFile(path, &f, rocksdb::EnvOptions()), "creating " + path));
  const rocksdb::Slice parts[] = {
      {reinterpret_cast<const char*>(frame.header), kRecordHeaderBytes},
      {reinterpret_cast<const char*>(body), size},
      {reinterpret_cast<const char*>(frame.tag), kTagBytes},
  };
  for (const rocksdb::Slice& p : parts) LM2_RETURN_IF_ERROR(Io(f->Append(p), "writing " + path));
  LM2_RETURN_IF_ERROR(Io(f->Sync(), "syncing " + path));
  LM2_RETURN_IF_ERROR(Io(f->Close(), "closing " + path));
  return SyncDir(sdir);
}

Result<SecretBytes> BankFiles::Read(std::string_view tenant, std::string_view session, uint64_t version,
                                    uint64_t expected_size) {
  const std::string path = FilePath(tenant, session, version);
  uint64_t size = 0;
  rocksdb::Status s = env_->GetFileSize(path, &size);
  if (s.IsNotFound() || (s.IsIOError() && !env_->FileExists(path).ok())) {
    return Status::Corruption("the bank file of version " + std::to_string(version) + " is missing");
  }
  LM2_RETURN_IF_ERROR(Io(s, "reading the size of " + path));
  if (size != expected_size) {
    return Status::Corruption("the bank file of version " + std::to_string(version) + " has the wrong size");
  }
  std::unique_ptr<rocksdb::RandomAccessFile> f;
  LM2_RETURN_IF_ERROR(Io(env_->NewRandomAccessFile(path, &f, rocksdb::EnvOptions()), "opening " + path));
  const std::size_t n = static_cast<std::size_t>(size);
  SecretBytes buf(kBankFileLead + n);
  char* dst = reinterpret_cast<char*>(buf.data() + kBankFileLead);
  rocksdb::Slice got;
  LM2_RETURN_IF_ERROR(Io(f->Read(0, n, &got, dst), "reading " + path));
  if (got.size() != n) {
    return Status::Corruption("the bank file of version " + std::to_string(version) + " is truncated");
  }
  if (got.data() != dst) std::memmove(dst, got.data(), n);
  return buf;
}

std::string EncodeBankRef(uint64_t file_size, const RecordFrame& frame) {
  std::string out(1, static_cast<char>(kBankRefFormat));
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((file_size >> (8 * i)) & 0xff));
  out.append(reinterpret_cast<const char*>(frame.header), kRecordHeaderBytes);
  out.append(reinterpret_cast<const char*>(frame.tag), kTagBytes);
  return out;
}

Status DecodeBankRef(const uint8_t* data, std::size_t size, uint64_t* file_size, RecordFrame* frame) {
  if (size != kBankRefBytes || data[0] != kBankRefFormat) return Status::Corruption("malformed bank file reference");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(data[1 + i]) << (8 * i);
  if (n < kRecordOverheadBytes) return Status::Corruption("bank file reference with an impossible size");
  *file_size = n;
  std::memcpy(frame->header, data + 9, kRecordHeaderBytes);
  std::memcpy(frame->tag, data + 9 + kRecordHeaderBytes, kTagBytes);
  return Status::Ok();
}

Status BankFiles::Sweep(std::string_view tenant, std::string_view session, const std::set<uint64_t>& keep) {
  const std::string sdir = SessionDir(tenant, session);
  std::vector<std::string> names;
  rocksdb::Status s = env_->GetChildren(sdir, &names);
  if (s.IsNotFound() || !env_->FileExists(sdir).ok()) return Status::Ok();
  LM2_RETURN_IF_ERROR(Io(s, "listing " + sdir));
  for (const std::string& n : names) {
    if (n == "." || n == "..") continue;
    uint64_t v = 0;
    if (ParseVersionName(n, &v) && keep.count(v) != 0) continue;
    LM2_RETURN_IF_ERROR(Io(env_->DeleteFile(sdir + "/" + n), "deleting " + sdir + "/" + n));
  }
  return Status::Ok();
}

// Deletes `dir` with its files and, `depth` levels down, its subdirectories.
Status BankFiles::RemoveDir(const std::string& dir, int depth) {
  if (!env_->FileExists(dir).ok()) return Status::Ok();
  std::vector<std::string> names;
  LM2_RETURN_IF_ERROR(Io(env_->GetChildren(dir, &names), "listing " + dir));
  for (const std::string& n : names) {
    if (n == "." || n == "..") continue;
    const std::string p = dir + "/" + n;
    bool is_dir = false;
    LM2_RETURN_IF_ERROR(Io(env_->IsDirectory(p, &is_dir), "inspecting " + p));
    if (is_dir && depth > 0) {
      LM2_RETURN_IF_ERROR(RemoveDir(p, depth - 1));
    } else {
      LM2_RETURN_IF_ERROR(Io(env_->DeleteFile(p), "deleting " + p));
    }
  }
  LM2_RETURN_IF_ERROR(Io(env_->DeleteDir(dir), "deleting " + dir));
  return SyncDir(dir.substr(0, dir.rfind('/')));
}

Status BankFiles::RemoveSession(std::string_view tenant, std::string_view session) {
  return RemoveDir(SessionDir(tenant, session), 0);
}

Status BankFiles::RemoveTenant(std::string_view tenant) { return RemoveDir(TenantDir(tenant), 1); }

}  // namespace lm2::persistence
