// Helpers for the loader tests: temp directories, and an independent safetensors
// reader/writer (nlohmann-json, no lm2 code) for building fixtures and cross-checking.
#pragma once

#include "support/paths.h"
#include "support/temp_dir.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

namespace lm2::testing {

namespace fs = std::filesystem;
using nlohmann::json;


inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Copies a committed test model (config.json, weights, tokenizer) into `dir`.
inline void CopyModel(const std::string& name, const std::string& dir) {
  for (const auto& e : fs::directory_iterator(TestModel(name))) {
    fs::copy_file(e.path(), fs::path(dir) / e.path().filename(), fs::copy_options::overwrite_existing);
  }
}

// A safetensors file split into its JSON header and data buffer.
struct StFile {
  json header = json::object();
  std::string data;
};

inline StFile ParseSt(const std::string& bytes) {
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  StFile f;
  f.header = json::parse(bytes.substr(8, n));
  f.data = bytes.substr(8 + n);
  return f;
}

inline StFile ReadSt(const std::string& path) { return ParseSt(ReadFile(path)); }

inline std::string U64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// Serialises with the header padded to 8 bytes, like lm2ref.
inline std::string StBytes(const StFile& f) {
  std::string h = f.header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  return U64(h.size()) + h + f.data;
}

inline void WriteSt(const std::string& path, const StFile& f) { WriteFile(path, StBytes(f)); }

// The bytes of one tensor of a parsed file.
inline std::string TensorBytes(const StFile& f, const std::string& name) {
  const auto& offs = f.header.at(name).at("data_offsets");
  const auto b = offs[0].get<std::size_t>(), e = offs[1].get<std::size_t>();
  return f.data.substr(b, e - b);
}

// Builds a file from name -> (dtype tag, shape, bytes), tensors laid out in name order.
struct StTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
inline StFile BuildSt(const std::vector<std::pair<std::string, StTensor>>& tensors) {
  StFile f;
  f.header["__metadata__"] = {{"format", "pt"}};
  for (const auto& [name, t] : tensors) {
    f.header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {f.data.size(), f.data.size() + t.bytes.size()}}};
    f.data += t.bytes;
  }
  return f;
}

}  // namespace lm2::testing
