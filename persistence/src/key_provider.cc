// Keyring, file and environment KEK providers. Key bytes never enter a message.
#include "lm2/persistence/key_provider.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <sys/stat.h>

#include <cctype>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

namespace lm2::persistence {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

Result<SecretBytes> ParseHexKey(std::string_view hex) {
  if (hex.size() != 2 * kKekBytes) {
    return Status::InvalidArgument("a KEK must be 64 hex digits (256 bits)");
  }
  SecretBytes key(kKekBytes);
  for (std::size_t i = 0; i < kKekBytes; ++i) {
    const int hi = HexValue(hex[2 * i]), lo = HexValue(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status::InvalidArgument("a KEK has a non-hex digit");
    key.data()[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return key;
}

std::vector<std::string_view> SplitWs(std::string_view s) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    std::size_t j = i;
    while (j < s.size() && !std::isspace(static_cast<unsigned char>(s[j]))) ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

std::string KeyId(std::string_view tenant, uint32_t version) {
  return std::string(tenant) + "/" + std::to_string(version);
}

}  // namespace

Result<std::unique_ptr<KeyringKeyProvider>> KeyringKeyProvider::Parse(std::string_view text) {
  auto ring = std::make_unique<KeyringKeyProvider>();
  std::vector<std::string_view> trimmed = SplitWs(text);
  if (trimmed.size() == 1 && trimmed[0].size() == 2 * kKekBytes) {
    LM2_ASSIGN_OR_RETURN(SecretBytes key, ParseHexKey(trimmed[0]));
    LM2_RETURN_IF_ERROR(ring->Add("*", 1, std::move(key)));
    return ring;
  }
  std::size_t line_no = 0;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find_first_of("\n;", start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(start, end - start);
    start = end + 1;
    ++line_no;
    if (auto hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    std::vector<std::string_view> f = SplitWs(line);
    if (f.empty()) continue;
    const std::string where = "keyring entry " + std::to_string(line_no);
    if (f.size() != 3) return Status::InvalidArgument(where + ": expected 'tenant version hexkey'");
    uint32_t version = 0;
    auto [p, ec] = std::from_chars(f[1].data(), f[1].data() + f[1].size(), version);
    if (ec != std::errc() || p != f[1].data() + f[1].size() || version == 0) {
      return Status::InvalidArgument(where + ": version must be a positive integer");
    }
    auto key = ParseHexKey(f[2]);
    if (!key.ok()) return key.status().WithContext(where);
    LM2_RETURN_IF_ERROR(ring->Add(f[0], version, std::move(key).value()));
  }
  return ring;
}

Status KeyringKeyProvider::Add(std::string_view tenant, uint32_t version, SecretBytes key) {
  if (key.size() != kKekBytes) return Status::InvalidArgument("a KEK must be 32 bytes");
  if (tenant.empty() || tenant.find('/') != std::string_view::npos) {
    return Status::InvalidArgument("a keyring tenant must be non-empty and contain no '/'");
  }
  std::lock_guard<std::mutex> lock(mu_);
  keys_[{std::string(tenant), version}] = std::move(key);
  return Status::Ok();
}

void KeyringKeyProvider::Remove(std::string_view tenant, uint32_t version) {
  std::lock_guard<std::mutex> lock(mu_);
  keys_.erase({std::string(tenant), version});
}

Result<Kek> KeyringKeyProvider::Derive(std::string_view tenant, uint32_t version,
                                       const SecretBytes& master) {
  Kek kek{KeyId("*", version), SecretBytes(kKekBytes)};
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
  static constexpr unsigned char kSalt[] = "lm2-kek-v1";
  std::size_t out_len = kKekBytes;
  const bool ok =
      ctx != nullptr && EVP_PKEY_derive_init(ctx) > 0 &&
      EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
      EVP_PKEY_CTX_set1_hkdf_salt(ctx, kSalt, sizeof(kSalt) - 1) > 0 &&
      EVP_PKEY_CTX_set1_hkdf_key(ctx, master.data(), static_cast<int>(master.size())) > 0 &&
      EVP_PKEY_CTX_add1_hkdf_info(ctx, reinterpret_cast<const unsigned char*>(tenant.data()),
                                  static_cast<int>(tenant.size())) > 0 &&
      EVP_PKEY_derive(ctx, kek.key.data(), &out_len) > 0 && out_len == kKekBytes;
  EVP_PKEY_CTX_free(ctx);
  if (!ok) return Status::Internal("HKDF failed");
  return kek;
}

Result<Kek> KeyringKeyProvider::CurrentKek(std::string_view tenant) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string t(tenant);
  for (const std::string& who : {t, std::string("*")}) {
    auto it = keys_.upper_bound({who, UINT32_MAX});
    if (it == keys_.begin()) continue;
    --it;
    if (it->first.first != who) continue;
    if (who == "*") return Derive(tenant, it->first.second, it->second);
    return Kek{KeyId(who, it->first.second), it->second.Clone()};
  }
  return Status::NotFound("no key-encryption key for this tenant");
}

Result<Kek> KeyringKeyProvider::GetKek(std::string_view tenant, std::string_view key_id) {
  const auto slash = key_id.rfind('/');
  if (slash == std::string_view::npos) return Status::PermissionDenied("malformed key id");
  const std::string_view who = key_id.substr(0, slash);
  if (who != "*" && who != tenant) return Status::PermissionDenied("key id names another tenant");
  uint32_t version = 0;
  const std::string_view v = key_id.substr(slash + 1);
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), version);
  if (ec != std::errc() || p != v.data() + v.size()) return Status::PermissionDenied("malformed key id");
  std::lock_guard<std::mutex> lock(mu_);
  auto it = keys_.find({std::string(who), version});
  if (it == keys_.end()) {
    return Status::PermissionDenied("key-encryption key " + std::string(key_id) + " is not available");
  }
  if (who == "*") return Derive(tenant, version, it->second);
  return Kek{std::string(key_id), it->second.Clone()};
}

Result<std::unique_ptr<KeyProvider>> OpenFileKeyProvider(const std::string& path,
                                                         const FileKeyProviderOptions& options) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return Status::NotFound("keyring file not found: " + path);
  if (options.require_private_file && (st.st_mode & 077) != 0) {
    return Status::PermissionDenied("keyring file " + path +
                                    " is accessible to group or others (chmod 600)");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot read keyring file " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  auto ring = KeyringKeyProvider::Parse(text);
  OPENSSL_cleanse(text.data(), text.size());
  if (!ring.ok()) return ring.status().WithContext(path);
  return std::unique_ptr<KeyProvider>(std::move(ring).value());
}

Result<std::unique_ptr<KeyProvider>> OpenEnvKeyProvider(const std::string& variable) {
  const char* value = std::getenv(variable.c_str());
  if (value == nullptr) return Status::NotFound("environment variable " + variable + " is not set");
  auto ring = KeyringKeyProvider::Parse(value);
  if (!ring.ok()) return ring.status().WithContext(variable);
  return std::unique_ptr<KeyProvider>(std::move(ring).value());
}

}  // namespace lm2::persistence
