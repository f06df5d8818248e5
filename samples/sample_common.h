// Shared by the small samples: argument parsing and opening an engine with a local key file.
#pragma once

#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>

#include "lm2/engine.h"

namespace sample {

// --key value pairs; a key given without a value is "".
inline std::map<std::string, std::string> ParseArgs(int argc, char** argv) {
  std::map<std::string, std::string> out;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0) continue;
    out[k.substr(2)] = (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) ? argv[++i] : "";
  }
  return out;
}

inline std::string Get(const std::map<std::string, std::string>& a, const std::string& k, const std::string& def) {
  auto it = a.find(k);
  return it == a.end() || it->second.empty() ? def : it->second;
}

inline bool Exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

// The shipped demo model when present (run from the repository root), else the tiny random
// test model.
inline std::string DefaultModel() {
  return Exists("models/lm2-demo/config.json") ? "models/lm2-demo" : "tests/data/models/tiny-lm2";
}

// The engine on --model (default: DefaultModel()) with the store
// and key file under --data (default: ./lm2-sample-data). Creates the key file (0600) on
// first run and says so. Exits on error.
inline std::unique_ptr<lm2::Engine> OpenEngine(const std::map<std::string, std::string>& args) {
  const std::string model = Get(args, "model", DefaultModel());
  const std::string data = Get(args, "data", "lm2-sample-data");
  ::mkdir(data.c_str(), 0700);
  lm2::EngineOptions o;
  o.model_dir = model;
  o.store_path = data + "/store";
  o.key_file = data + "/master.key";
  if (!Exists(o.key_file)) {
    if (lm2::Status s = lm2::CreateKeyFile(o.key_file); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      std::exit(1);
    }
    std::printf("created key file %s (mode 0600)\n", o.key_file.c_str());
  }
  auto e = lm2::Engine::Open(o);
  if (!e.ok()) {
    std::fprintf(stderr, "%s\n", e.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(e).value();
}

inline void Check(const lm2::Status& s) {
  if (s.ok()) return;
  std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
  std::exit(1);
}

template <typename T>
T Must(lm2::Result<T> r) {
  Check(r.status());
  return std::move(r).value();
}

// Sum over layers and slots of the slot norms: a one-number digest of a memory bank.
inline double NormDigest(const lm2::Session& s) {
  double sum = 0.0;
  for (const auto& l : Must(s.SlotNorms())) {
    for (float v : l.values) sum += static_cast<double>(v);
  }
  return sum;
}

}  // namespace sample
