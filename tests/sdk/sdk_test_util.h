// Helpers for the SDK tests: temporary directories, an engine on the tiny test model, bank
// comparison, and running sdk_test_child (the second process of the resume and
// concurrency tests).
#pragma once

#include "support/paths.h"
#include "support/temp_dir.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lm2/engine.h"

namespace lm2::sdk_test {

using ::lm2::testing::SourceDir;
inline std::string TinyModel() { return ::lm2::testing::TestModel("tiny-lm2"); }

// A fresh temporary directory (tests/support/temp_dir.h).
using ::lm2::testing::TempDir;

// Options for an engine on tiny-lm2 with a key file and a store in `dir`.
inline EngineOptions TinyOptions(const TempDir& dir, bool shared = false) {
  EngineOptions o;
  o.model_dir = TinyModel();
  o.store_path = dir.sub("store");
  o.key_file = dir.sub("keys");
  o.key_env = "";
  o.share_store_between_processes = shared;
  o.sync_commits = false;  // tests: durability is the persistence suite's subject
  o.backend = Backend::kCpu;  // the suites compare with the fp32/float64 references at 1e-4
  if (!CreateKeyFile(o.key_file).ok()) throw std::runtime_error("CreateKeyFile failed");
  return o;
}

inline std::unique_ptr<Engine> OpenEngine(const EngineOptions& o) {
  auto e = Engine::Open(o);
  if (!e.ok()) throw std::runtime_error("Engine::Open: " + e.status().ToString());
  return std::move(e).value();
}

// An engine on the GPU (o.backend set to kCuda), or null with *why set when this build or
// machine has none (the caller says SKIPPED); any other failure throws.
inline std::unique_ptr<Engine> OpenGpuEngine(EngineOptions o, std::string* why) {
  o.backend = Backend::kCuda;
  auto e = Engine::Open(o);
  if (e.status().code() == StatusCode::kUnavailable || e.status().code() == StatusCode::kUnimplemented) {
    *why = e.status().ToString();
    return nullptr;
  }
  if (!e.ok()) throw std::runtime_error("Engine::Open: " + e.status().ToString());
  return std::move(e).value();
}

inline std::unique_ptr<Session> OpenSession(const Engine& e, const std::string& tenant, const std::string& id,
                                            const SessionOptions& so = {}) {
  auto s = e.OpenSession(tenant, id, so);
  if (!s.ok()) throw std::runtime_error("OpenSession: " + s.status().ToString());
  return std::move(s).value();
}

inline ChatOptions Short(int32_t max_tokens = 8) {
  ChatOptions c;
  c.max_tokens = max_tokens;
  return c;
}

inline ChatResult MustChat(Session& s, const std::string& msg, const ChatOptions& o = Short()) {
  auto r = s.Chat(msg, o);
  if (!r.ok()) throw std::runtime_error("Chat: " + r.status().ToString());
  return std::move(r).value();
}

inline MemoryState MustMemory(const Session& s) {
  auto m = s.Memory();
  if (!m.ok()) throw std::runtime_error("Memory: " + m.status().ToString());
  return std::move(m).value();
}

// Bit-identical banks (same layers, shapes and bytes).
inline bool SameBits(const MemoryState& a, const MemoryState& b) {
  if (a.model_fingerprint != b.model_fingerprint || a.layers.size() != b.layers.size()) return false;
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    const auto& x = a.layers[i];
    const auto& y = b.layers[i];
    if (x.layer != y.layer || x.slots != y.slots || x.dim != y.dim || x.data.size() != y.data.size()) return false;
    if (std::memcmp(x.data.data(), y.data.data(), x.data.size() * sizeof(float)) != 0) return false;
  }
  return true;
}

// max |a - b| / max |b| over all values.
inline double RelDiff(const MemoryState& a, const MemoryState& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    for (std::size_t k = 0; k < a.layers[i].data.size(); ++k) {
      const double x = a.layers[i].data[k], y = b.layers[i].data[k];
      num = std::max(num, std::abs(x - y));
      den = std::max(den, std::abs(y));
    }
  }
  return den == 0.0 ? num : num / den;
}

// Runs sdk_test_child with `args`; returns its exit status, stdout into *out. The child is
// the build's, or the one LM2_SDK_CHILD names (the GPU bundle carries its own).
inline int RunChild(const std::vector<std::string>& args, std::string* out) {
  const char* moved = std::getenv("LM2_SDK_CHILD");
  std::string cmd = moved != nullptr && *moved != '\0' ? moved : LM2_SDK_CHILD;
  for (const auto& a : args) {
    std::string q = "'";
    for (char c : a) q += (c == '\'') ? std::string("'\\''") : std::string(1, c);
    cmd += " " + q + "'";
  }
  cmd += " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) throw std::runtime_error("popen failed");
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
  const int rc = ::pclose(p);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace lm2::sdk_test
