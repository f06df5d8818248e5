// ModelFiles: opening, validating and fingerprinting a model directory.
#include "lm2/runtime/model_files.h"

#include <openssl/evp.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "model/mapped_file.h"
#include "model/safetensors.h"

namespace lm2::runtime {
namespace {

using json = nlohmann::json;

constexpr const char* kSingleName = "model.safetensors";
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kFingerprintTag = "lm2-model-fingerprint-v1";

// Where a tensor was found.
struct Found {
  std::size_t file = 0;
  SafetensorsEntry entry;
};

bool FileExists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

// Reads DIR/model.safetensors.index.json into tensor name -> shard file name.
Result<std::map<std::string, std::string>> ReadIndex(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  const std::string s = text.str();
  const json j = json::parse(s, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption(path + ": not valid JSON");
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    return Status::Corruption(path + ": no \"weight_map\" object");
  }
  std::map<std::string, std::string> out;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) return Status::Corruption(path + ": weight_map[\"" + name + "\"] must be a file name");
    std::string f = file.get<std::string>();
    if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos || f.find('\\') != std::string::npos ||
        f.find('\0') != std::string::npos) {
      return Status::Corruption(path + ": shard name \"" + f + "\" must be a plain file name");
    }
    out.emplace(name, std::move(f));
  }
  return out;
}

std::string JoinNames(const std::vector<std::string>& names) {
  std::string out;
  for (std::size_t i = 0; i < names.size() && i < 5; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > 5) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

void PutU64(EVP_MD_CTX* ctx, uint64_t v, bool* ok) {
  unsigned char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
  *ok = *ok && EVP_DigestUpdate(ctx, b, 8) == 1;
}

void PutBytes(EVP_MD_CTX* ctx, const void* p, std::size_t n, bool* ok) {
  PutU64(ctx, n, ok);
  const auto* bytes = static_cast<const unsigned char*>(p);
  constexpr std::size_t kChunk = std::size_t{64} << 20;
  for (std::size_t off = 0; off < n && *ok; off += kChunk) {
    *ok = EVP_DigestUpdate(ctx, bytes + off, std::min(kChunk, n - off)) == 1;
  }
}

}  // namespace

struct ModelFiles::Impl {
  std::string dir;
  ModelConfig config;
  std::vector<TensorSpec> specs;
  std::vector<std::unique_ptr<MappedFile>> files;
  std::vector<std::string> file_names;
  std::vector<TensorView> views;  // parallel to specs
  std::unordered_map<std::string, std::size_t> index;
  uint64_t weight_bytes = 0;
  mutable std::once_flag fingerprint_once;
  mutable std::string fingerprint;

  std::string ComputeFingerprint() const;
};

std::string ModelFiles::Impl::ComputeFingerprint() const {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr) return {};
  bool ok = EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1;
  const std::string tag = kFingerprintTag;
  const std::string cfg = config.CanonicalJson();
  PutBytes(ctx, tag.data(), tag.size(), &ok);
  PutBytes(ctx, cfg.data(), cfg.size(), &ok);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const TensorView& v = views[i];
    const std::string_view dtype = DTypeName(v.dtype);
    PutBytes(ctx, specs[i].name.data(), specs[i].name.size(), &ok);
    PutBytes(ctx, dtype.data(), dtype.size(), &ok);
    PutU64(ctx, v.shape.size(), &ok);
    for (int64_t dim : v.shape) PutU64(ctx, static_cast<uint64_t>(dim), &ok);
    PutBytes(ctx, v.data, v.nbytes, &ok);
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  ok = ok && EVP_DigestFinal_ex(ctx, digest, &len) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) return {};
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) {
    hex += kHex[digest[i] >> 4];
    hex += kHex[digest[i] & 15];
  }
  return hex;
}

Result<std::unique_ptr<ModelFiles>> ModelFiles::Open(const std::string& model_dir) {
  auto impl = std::make_unique<Impl>();
  impl->dir = model_dir;
  LM2_ASSIGN_OR_RETURN(impl->config, ModelConfig::Load(model_dir));
  impl->specs = ExpectedTensors(impl->config);

  // Which files hold the weights.
  const std::string index_path = model_dir + "/" + kIndexName;
  std::map<std::string, std::string> weight_map;
  const bool sharded = FileExists(index_path);
  if (sharded) {
    LM2_ASSIGN_OR_RETURN(weight_map, ReadIndex(index_path));
    std::set<std::string> shards;
    for (const auto& [name, file] : weight_map) shards.insert(file);
    impl->file_names.assign(shards.begin(), shards.end());
  } else if (FileExists(model_dir + "/" + kSingleName)) {
    impl->file_names.push_back(kSingleName);
  } else {
    return Status::NotFound(model_dir + ": no weights (neither " + kSingleName + " nor " + kIndexName + ")");
  }

  // Map every file (a missing shard is reported before any header), then validate headers.
  for (const std::string& name : impl->file_names) {
    auto mapped = MappedFile::Open(model_dir + "/" + name);
    if (!mapped.ok()) {
      return sharded ? mapped.status().WithContext(std::string(kIndexName) + " names a shard that cannot be read")
                     : mapped.status();
    }
    impl->files.push_back(std::move(mapped).value());
  }
  std::map<std::string, Found> found;
  for (std::size_t f = 0; f < impl->file_names.size(); ++f) {
    const MappedFile& file = *impl->files[f];
    const std::string& path = file.path();
    auto header = ParseSafetensorsHeader(file.data(), file.size());
    if (!header.ok()) return header.status().WithContext(path);
    for (SafetensorsEntry& e : header->tensors) {
      if (sharded) {
        auto it = weight_map.find(e.name);
        if (it == weight_map.end() || it->second != impl->file_names[f]) {
          return Status::Corruption(path + ": " + e.name + ": tensor is not mapped to this shard in " + kIndexName);
        }
      }
      const std::string name = e.name;
      e.begin += header->data_start;  // make offsets absolute in the file
      e.end += header->data_start;
      if (!found.emplace(name, Found{f, std::move(e)}).second) {
        return Status::Corruption(path + ": " + name + ": tensor appears in two files");
      }
    }
  }
  if (sharded) {
    std::vector<std::string> unheld;
    for (const auto& [name, file] : weight_map) {
      if (!found.count(name)) unheld.push_back(name + " (" + file + ")");
    }
    if (!unheld.empty()) {
      return Status::Corruption(index_path + ": names tensors no shard holds: " + JoinNames(unheld));
    }
  }

  // The set of tensors must be exactly ExpectedTensors, each with its shape.
  std::vector<std::string> missing, unexpected;
  std::set<std::string> expected_names;
  for (const TensorSpec& spec : impl->specs) {
    expected_names.insert(spec.name);
    if (!found.count(spec.name)) missing.push_back(spec.name + " " + ShapeString(spec.shape));
  }
  for (const auto& [name, where] : found) {
    if (!expected_names.count(name)) unexpected.push_back(name + " (" + impl->file_names[where.file] + ")");
  }
  if (!missing.empty()) return Status::Corruption(model_dir + ": missing tensors: " + JoinNames(missing));
  if (!unexpected.empty()) return Status::Corruption(model_dir + ": unexpected tensors: " + JoinNames(unexpected));

  impl->views.reserve(impl->specs.size());
  for (std::size_t i = 0; i < impl->specs.size(); ++i) {
    const TensorSpec& spec = impl->specs[i];
    const Found& at = found.at(spec.name);
    const std::string where = model_dir + "/" + impl->file_names[at.file] + ": " + spec.name;
    if (at.entry.shape != spec.shape) {
      return Status::Corruption(where + ": shape " + ShapeString(at.entry.shape) + ", expected " +
                                ShapeString(spec.shape));
    }
    if (!at.entry.dtype) {
      return Status::Unimplemented(where + ": dtype " + at.entry.dtype_tag +
                                   " is not a weight dtype (F32, F16 or BF16)");
    }
    TensorView v;
    v.dtype = *at.entry.dtype;
    v.shape = spec.shape;
    v.nbytes = static_cast<std::size_t>(at.entry.end - at.entry.begin);
    v.data = impl->files[at.file]->data() + at.entry.begin;
    impl->weight_bytes += v.nbytes;
    impl->index.emplace(spec.name, i);
    impl->views.push_back(std::move(v));
  }
  return std::unique_ptr<ModelFiles>(new ModelFiles(std::move(impl)));
}

ModelFiles::ModelFiles(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ModelFiles::~ModelFiles() = default;

const ModelConfig& ModelFiles::config() const { return impl_->config; }
const std::string& ModelFiles::dir() const { return impl_->dir; }
const std::vector<TensorSpec>& ModelFiles::specs() const { return impl_->specs; }
const std::vector<std::string>& ModelFiles::weight_files() const { return impl_->file_names; }
uint64_t ModelFiles::weight_bytes() const { return impl_->weight_bytes; }

Result<TensorView> ModelFiles::Tensor(const std::string& name) const {
  auto it = impl_->index.find(name);
  if (it == impl_->index.end()) return Status::NotFound(impl_->dir + ": no tensor named " + name);
  return impl_->views[it->second];
}

const std::string& ModelFiles::Fingerprint() const {
  std::call_once(impl_->fingerprint_once, [this] { impl_->fingerprint = impl_->ComputeFingerprint(); });
  return impl_->fingerprint;
}

}  // namespace lm2::runtime
