// Shared helpers for the persistence tests: temporary directories, banks, keys, and raw
// access to the RocksDB files behind a store (to tamper with and inspect them).
#pragma once

#include "support/temp_dir.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lm2/core/memory_state.h"
#include "lm2/persistence/key_provider.h"
#include "lm2/persistence/session_store.h"

namespace lm2::persistence::test {

// A fresh temporary directory (tests/support/temp_dir.h).
using ::lm2::testing::TempDir;

inline MemoryState MakeBank(std::vector<int32_t> layers, int64_t slots, int64_t dim, uint32_t seed,
                            const std::string& fingerprint = "fp-test-model") {
  MemoryState s;
  s.model_fingerprint = fingerprint;
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int32_t l : layers) {
    MemoryLayer m;
    m.layer = l;
    m.slots = slots;
    m.dim = dim;
    m.data.resize(static_cast<std::size_t>(slots * dim));
    for (auto& x : m.data) x = dist(rng);
    s.layers.push_back(std::move(m));
  }
  return s;
}

inline bool SameBank(const MemoryState& a, const MemoryState& b) {
  if (a.model_fingerprint != b.model_fingerprint || a.layers.size() != b.layers.size()) return false;
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    const auto &x = a.layers[i], &y = b.layers[i];
    if (x.layer != y.layer || x.slots != y.slots || x.dim != y.dim || x.data != y.data) return false;
  }
  return true;
}

inline SecretBytes KeyOf(uint8_t fill) {
  SecretBytes k(kKekBytes);
  for (std::size_t i = 0; i < kKekBytes; ++i) k.data()[i] = static_cast<uint8_t>(fill + i);
  return k;
}

// A keyring with KEK version 1 for the master entry ("*").
inline std::shared_ptr<KeyringKeyProvider> MakeKeys(uint8_t fill = 7) {
  auto k = std::make_shared<KeyringKeyProvider>();
  if (!k->Add("*", 1, KeyOf(fill)).ok()) throw std::runtime_error("keyring");
  return k;
}

// bank_file_min_bytes 0: every snapshot in its own bank file (the test banks are small).
inline std::unique_ptr<SessionStore> OpenStore(const std::string& path, std::shared_ptr<KeyProvider> keys,
                                               ProcessSharing sharing = ProcessSharing::kExclusive,
                                               rocksdb::Env* env = nullptr,
                                               uint64_t bank_file_min_bytes = RocksDbStoreOptions{}.bank_file_min_bytes) {
  RocksDbStoreOptions o;
  o.path = path;
  o.keys = std::move(keys);
  o.sharing = sharing;
  o.env = env;
  o.bank_file_min_bytes = bank_file_min_bytes;
  auto s = OpenRocksDbSessionStore(o);
  if (!s.ok()) throw std::runtime_error("open store: " + s.status().ToString());
  return std::move(s).value();
}

// The bank files under a store's directory (<db>/banks/...), sorted.
inline std::vector<std::filesystem::path> BankFilesIn(const std::string& db) {
  std::vector<std::filesystem::path> out;
  const std::filesystem::path root = std::filesystem::path(db) / "banks";
  if (!std::filesystem::exists(root)) return out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(root)) {
    if (e.is_regular_file()) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

inline std::string ReadFileBytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline void WriteFileBytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("writing " + p.string());
}

// Raw RocksDB access to a store's database (the store must be closed).
class RawDb {
 public:
  static constexpr const char* kCfs[] = {"default", "sessions", "snapshots", "transcripts", "keys"};
  explicit RawDb(const std::string& path) {
    rocksdb::ColumnFamilyOptions cfo;
    std::vector<rocksdb::ColumnFamilyDescriptor> d;
    for (const char* n : kCfs) {
      rocksdb::ColumnFamilyOptions o = cfo;
      if (std::string(n) == "snapshots") {
        o.enable_blob_files = true;
        o.min_blob_size = 64 * 1024;
      }
      d.emplace_back(n, o);
    }
    rocksdb::DBOptions dbo;
    auto s = rocksdb::DB::Open(dbo, path, d, &cfs_, &db_);
    if (!s.ok()) throw std::runtime_error("raw open: " + s.ToString());
  }
  ~RawDb() {
    for (auto* c : cfs_) db_->DestroyColumnFamilyHandle(c).PermitUncheckedError();
    db_->Close().PermitUncheckedError();
    delete db_;
  }
  rocksdb::ColumnFamilyHandle* cf(const std::string& name) {
    for (std::size_t i = 0; i < cfs_.size(); ++i) if (name == kCfs[i]) return cfs_[i];
    throw std::runtime_error("no column family " + name);
  }
  // All (key, value) pairs of a column family.
  std::vector<std::pair<std::string, std::string>> All(const std::string& cf_name) {
    std::vector<std::pair<std::string, std::string>> out;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf(cf_name)));
    for (it->SeekToFirst(); it->Valid(); it->Next()) out.emplace_back(it->key().ToString(), it->value().ToString());
    return out;
  }
  void Put(const std::string& cf_name, const std::string& k, const std::string& v) {
    auto s = db_->Put(rocksdb::WriteOptions(), cf(cf_name), k, v);
    if (!s.ok()) throw std::runtime_error("raw put: " + s.ToString());
  }
  void Delete(const std::string& cf_name, const std::string& k) {
    auto s = db_->Delete(rocksdb::WriteOptions(), cf(cf_name), k);
    if (!s.ok()) throw std::runtime_error("raw delete: " + s.ToString());
  }

 private:
  rocksdb::DB* db_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> cfs_;
};

}  // namespace lm2::persistence::test
