// persistence_bench: what a commit and a restore of a memory bank cost, and where the
// time goes (encode / encrypt / bank file / RocksDB), next to the two floors measured on
// the same machine in the same run: AES-256-GCM over the same bytes and a synced
// sequential write of the same bytes (write + fdatasync).
//
// AES-GCM is measured twice, with the store's own code: `aes-warm` encrypts in place in a
// buffer that is already mapped (SealRecordInPlace; what the commit does since it reuses
// its encode buffers: the fair physical reference), `aes-fresh` encrypts into a freshly
// allocated buffer (SealRecord; it pays the first-touch page faults of that buffer, which
// on some VMs cost more than the encryption). `ratio` = commit / (aes-warm + syncwr), the
// target's ratio; `ratio-fresh` = commit / (aes-fresh + syncwr), the reference used before.
// `first` is the first commit of each size: the store's encode buffer is new then.
//
//   persistence_bench [--dir DIR] [--min-kib N] [--max-mib N] [--reps R]
// Sizes: 256 KiB, 1, 4, 16, 64, 128, 256 MiB (within the bounds).
//
// Restores read warm (page cache / memtable): this measures the CPU path, not a cold disk.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "lm2/persistence/envelope.h"
#include "lm2/persistence/key_provider.h"
#include "lm2/persistence/session_store.h"

using namespace lm2;
using namespace lm2::persistence;

namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

MemoryState MakeBank(std::size_t bytes, uint32_t seed) {
  constexpr int64_t kDim = 1024;
  const std::size_t values = bytes / 4;
  const std::size_t layers = std::max<std::size_t>(1, bytes / (16u << 20));
  MemoryState s;
  s.model_fingerprint = "bench-model";
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (std::size_t l = 0; l < layers; ++l) {
    MemoryLayer m;
    m.layer = static_cast<int32_t>(l);
    m.dim = kDim;
    m.slots = static_cast<int64_t>(values / layers) / kDim;
    m.data.resize(static_cast<std::size_t>(m.slots * m.dim));
    for (auto& x : m.data) x = dist(rng);
    s.layers.push_back(std::move(m));
  }
  return s;
}

// A new file, write() then fdatasync(): the floor for making `n` bytes durable. The file
// is kept until the caller deletes it after all repetitions of a size: on a filesystem
// mounted with `discard` (ext4 here), deleting a large file makes the next journal
// commit, i.e. the next fsync of whoever comes next, pay for discarding its blocks.
double SyncedWrite(const std::string& path, const uint8_t* data, std::size_t n) {
  auto t = Clock::now();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) { std::perror("open"); std::exit(1); }
  for (std::size_t off = 0; off < n;) {
    const ssize_t w = ::write(fd, data + off, n - off);
    if (w <= 0) { std::perror("write"); std::exit(1); }
    off += static_cast<std::size_t>(w);
  }
  if (::fdatasync(fd) != 0) { std::perror("fdatasync"); std::exit(1); }
  ::close(fd);
  return Since(t);
}

void Check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  std::size_t max_mib = 256, min_kib = 256;
  int reps = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dir" && i + 1 < argc) dir = argv[++i];
    else if (a == "--max-mib" && i + 1 < argc) max_mib = std::stoul(argv[++i]);
    else if (a == "--min-kib" && i + 1 < argc) min_kib = std::stoul(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::stoi(argv[++i]));
    else { std::fprintf(stderr, "usage: %s [--dir DIR] [--min-kib N] [--max-mib N] [--reps R]\n", argv[0]); return 2; }
  }
  const bool own_dir = dir.empty();
  if (own_dir) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "lm2-persist-bench-XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) return 1;
    dir = tmpl;
  }
  auto ring = std::make_shared<KeyringKeyProvider>();
  auto kek = RandomKey(kKekBytes);
  Check(kek.status(), "key");
  Check(ring->Add("*", 1, std::move(kek).value()), "keyring");
  RocksDbStoreOptions o;
  o.path = dir + "/db";
  o.keys = ring;
  auto store = OpenRocksDbSessionStore(o);
  Check(store.status(), "open");
  SessionStore& st = **store;
  const SessionId id{"bench", "s"};
  Check(st.CreateSession(id), "create");
  auto dek = RandomKey();
  Check(dek.status(), "dek");

  std::printf("persistence_bench: dir %s, median of %d reps, times in ms, throughput in MiB/s\n", dir.c_str(), reps);
  std::printf("%9s | %8s %8s %7s %7s %7s %7s %6s | %8s %7s %7s %7s %6s | %8s %9s %8s | %6s %11s\n", "bank",
              "commit", "first", "encode", "encrypt", "file", "rocksdb", "MiB/s", "restore", "read", "decrypt",
              "decode", "MiB/s", "aes-warm", "aes-fresh", "syncwr", "ratio", "ratio-fresh");
  uint64_t head = 0;
  for (std::size_t kib = 256; kib <= max_mib * 1024; kib = kib >= 64 * 1024 ? kib * 2 : kib * 4) {
    if (kib < min_kib) continue;
    const std::size_t sz = kib * 1024;
    MemoryState bank = MakeBank(sz, static_cast<uint32_t>(kib));
    const double mib = static_cast<double>(bank.TotalValues() * 4) / (1 << 20);
    std::vector<double> commit, enc, crypt, file, rdb, restore, rd, dec, dcd, aes_warm, aes_fresh, wr;
    for (int r = 0; r < reps; ++r) {
      CommitTimings ct;
      CommitOptions co;
      co.timings = &ct;
      auto t = Clock::now();
      auto v = st.Commit(id, head, bank, TurnTranscript{{1, 2, 3}, {4, 5}}, co);
      commit.push_back(Since(t));
      Check(v.status(), "commit");
      head = *v;
      enc.push_back(ct.encode_s);
      crypt.push_back(ct.encrypt_s);
      file.push_back(ct.file_s);
      rdb.push_back(ct.store_s);

      LoadTimings lt;
      LoadOptions lo;
      lo.timings = &lt;
      lo.expected_fingerprint = "bench-model";
      t = Clock::now();
      auto snap = st.LoadHead(id, lo);
      restore.push_back(Since(t));
      Check(snap.status(), "restore");
      if (snap->state.TotalValues() != bank.TotalValues() || snap->state.layers[0].data != bank.layers[0].data) {
        std::fprintf(stderr, "restore returned a different bank\n");
        return 1;
      }
      rd.push_back(lt.read_s);
      dec.push_back(lt.decrypt_s);
      dcd.push_back(lt.decode_s);

      // Floors over the same number of bytes the commit wrote.
      std::vector<uint8_t> plain(ct.record_bytes);
      std::memcpy(plain.data(), bank.layers[0].data.data(), std::min(plain.size(), bank.layers[0].data.size() * 4));
      const RecordBinding binding{"bench", "s", 1, RecordKind::kSnapshot};
      t = Clock::now();
      auto sealed = SealRecord(*dek, binding, plain.data(), plain.size());  // into a fresh buffer
      aes_fresh.push_back(Since(t));
      Check(sealed.status(), "seal");
      RecordFrame frame;
      t = Clock::now();
      Check(SealRecordInPlace(*dek, binding, plain.data(), plain.size(), &frame), "seal in place");  // warm
      aes_warm.push_back(Since(t));
      wr.push_back(SyncedWrite(dir + "/seqwrite" + std::to_string(r), sealed->data.get(), sealed->size));
    }
    for (int r = 0; r < reps; ++r) ::unlink((dir + "/seqwrite" + std::to_string(r)).c_str());
    RetentionPolicy keep;
    keep.keep_last = 1;
    Check(st.ApplyRetention(id, keep).status(), "retention");
    const double c = Median(commit), rs = Median(restore);
    const double floor = Median(aes_warm) + Median(wr), floor_fresh = Median(aes_fresh) + Median(wr);
    char label[32];
    if (kib < 1024) std::snprintf(label, sizeof label, "%zu KiB", kib);
    else std::snprintf(label, sizeof label, "%zu MiB", kib / 1024);
    std::printf("%9s | %8.2f %8.2f %7.2f %7.2f %7.2f %7.2f %6.0f | %8.2f %7.2f %7.2f %7.2f %6.0f | %8.2f %9.2f %8.2f | %6.2f %11.2f\n",
                label, c * 1e3, commit[0] * 1e3, Median(enc) * 1e3, Median(crypt) * 1e3, Median(file) * 1e3,
                Median(rdb) * 1e3, mib / c, rs * 1e3, Median(rd) * 1e3, Median(dec) * 1e3, Median(dcd) * 1e3,
                mib / rs, Median(aes_warm) * 1e3, Median(aes_fresh) * 1e3, Median(wr) * 1e3, c / floor,
                c / floor_fresh);
    std::fflush(stdout);
  }
  std::printf("ratio = commit / (aes-warm + syncwr), the target's (< 2 for 128 MiB); "
              "ratio-fresh = commit / (aes-fresh + syncwr)\n");
  store->reset();
  if (own_dir) std::filesystem::remove_all(dir);
  return 0;
}
