// AES-256-GCM records and DEK wrapping with OpenSSL EVP. See envelope.h for layouts.
#include "lm2/persistence/envelope.h"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

namespace lm2::persistence {
namespace {

constexpr char kRecordMagic[4] = {'L', 'M', '2', 'E'};
constexpr char kKeyMagic[4] = {'L', 'M', '2', 'K'};
constexpr uint8_t kEnvelopeFormat = 1;
constexpr std::size_t kChunk = std::size_t{1} << 30;  // EVP takes int lengths

void AppendU32(std::string* s, uint64_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void AppendU64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void AppendLp(std::string* s, std::string_view v) {
  AppendU32(s, v.size());
  s->append(v);
}

std::string RecordAad(const RecordBinding& b, const uint8_t* header) {
  std::string aad = "lm2-record-v1";
  aad.append(reinterpret_cast<const char*>(header), 6);
  AppendLp(&aad, b.tenant);
  AppendLp(&aad, b.session);
  AppendU64(&aad, b.version);
  aad.push_back(static_cast<char>(b.kind));
  return aad;
}

std::string DekAad(std::string_view tenant, std::string_view session, std::string_view key_id) {
  std::string aad = "lm2-dek-v1";
  AppendLp(&aad, tenant);
  AppendLp(&aad, session);
  AppendLp(&aad, key_id);
  return aad;
}

struct CtxDeleter {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using Ctx = std::unique_ptr<EVP_CIPHER_CTX, CtxDeleter>;

// One GCM pass. encrypt: out gets ciphertext and `tag` is written; decrypt: `tag` is
// checked. Returns false on any failure (including authentication).
bool Gcm(bool encrypt, const uint8_t* key, const uint8_t* nonce, std::string_view aad,
         const uint8_t* in, std::size_t n, uint8_t* out, uint8_t* tag) {
  Ctx ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return false;
  auto init = encrypt ? EVP_EncryptInit_ex : EVP_DecryptInit_ex;
  if (init(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1) return false;
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kNonceBytes), nullptr) != 1) return false;
  if (init(ctx.get(), nullptr, nullptr, key, nonce) != 1) return false;
  int len = 0;
  auto update = encrypt ? EVP_EncryptUpdate : EVP_DecryptUpdate;
  if (update(ctx.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
             static_cast<int>(aad.size())) != 1) {
    return false;
  }
  for (std::size_t off = 0; off < n; off += kChunk) {
    const int chunk = static_cast<int>(std::min(kChunk, n - off));
    if (update(ctx.get(), out + off, &len, in + off, chunk) != 1 || len != chunk) return false;
  }
  if (encrypt) {
    if (EVP_EncryptFinal_ex(ctx.get(), out + n, &len) != 1) return false;
    return EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes), tag) == 1;
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag) != 1) return false;
  return EVP_DecryptFinal_ex(ctx.get(), out + n, &len) == 1;
}

}  // namespace

Result<SecretBytes> RandomKey(std::size_t bytes) {
  SecretBytes key(bytes);
  if (RAND_bytes(key.data(), static_cast<int>(bytes)) != 1) return Status::Internal("RAND_bytes failed");
  return key;
}

namespace {

// Writes the record header (magic, format, kind, fresh nonce) into h[0, kRecordHeaderBytes).
Status WriteHeader(const RecordBinding& binding, uint8_t* h) {
  std::memcpy(h, kRecordMagic, 4);
  h[4] = kEnvelopeFormat;
  h[5] = static_cast<uint8_t>(binding.kind);
  if (RAND_bytes(h + 6, static_cast<int>(kNonceBytes)) != 1) return Status::Internal("RAND_bytes failed");
  return Status::Ok();
}

Status CheckHeader(const RecordBinding& binding, const uint8_t* header) {
  if (std::memcmp(header, kRecordMagic, 4) != 0) return Status::Corruption("record has a bad magic");
  if (header[4] != kEnvelopeFormat) return Status::Corruption("record has an unknown envelope format");
  if (header[5] != static_cast<uint8_t>(binding.kind)) return Status::Corruption("record has the wrong kind");
  return Status::Ok();
}

Status AuthFailure() {
  return Status::Corruption(
      "record fails authentication (altered, truncated, moved to another tenant, session or "
      "version, or sealed under another key)");
}

}  // namespace

Result<SealedRecord> SealRecord(const SecretBytes& dek, const RecordBinding& binding,
                                const uint8_t* plaintext, std::size_t size) {
  if (dek.size() != kDekBytes) return Status::InvalidArgument("data key must be 32 bytes");
  if (size > std::numeric_limits<std::size_t>::max() - kRecordOverheadBytes) {
    return Status::InvalidArgument("record too large");
  }
  SealedRecord rec;
  rec.size = kRecordOverheadBytes + size;
  rec.data = std::make_unique_for_overwrite<uint8_t[]>(rec.size);
  uint8_t* h = rec.data.get();
  LM2_RETURN_IF_ERROR(WriteHeader(binding, h));
  const std::string aad = RecordAad(binding, h);
  if (!Gcm(true, dek.data(), h + 6, aad, plaintext, size, h + kRecordHeaderBytes,
           h + kRecordHeaderBytes + size)) {
    return Status::Internal("AES-256-GCM encryption failed");
  }
  return rec;
}

Status SealRecordInPlace(const SecretBytes& dek, const RecordBinding& binding, uint8_t* data,
                         std::size_t size, RecordFrame* frame) {
  if (dek.size() != kDekBytes) return Status::InvalidArgument("data key must be 32 bytes");
  LM2_RETURN_IF_ERROR(WriteHeader(binding, frame->header));
  // GCM writes nothing in Final, so the body is the only output besides the tag.
  if (!Gcm(true, dek.data(), frame->header + 6, RecordAad(binding, frame->header), data, size, data,
           frame->tag)) {
    return Status::Internal("AES-256-GCM encryption failed");
  }
  return Status::Ok();
}

Result<SecretBytes> OpenRecord(const SecretBytes& dek, const RecordBinding& binding,
                               const uint8_t* record, std::size_t size) {
  if (dek.size() != kDekBytes) return Status::InvalidArgument("data key must be 32 bytes");
  if (size < kRecordOverheadBytes) return Status::Corruption("record truncated");
  LM2_RETURN_IF_ERROR(CheckHeader(binding, record));
  const std::size_t n = size - kRecordOverheadBytes;
  SecretBytes plain(n + 16);  // + room for EVP's Final (writes nothing for GCM)
  uint8_t tag[kTagBytes];
  std::memcpy(tag, record + kRecordHeaderBytes + n, kTagBytes);
  if (!Gcm(false, dek.data(), record + 6, RecordAad(binding, record), record + kRecordHeaderBytes,
           n, plain.data(), tag)) {
    return AuthFailure();
  }
  plain.Truncate(n);
  return plain;
}

Status OpenRecordInPlace(const SecretBytes& dek, const RecordBinding& binding, const uint8_t* header,
                         uint8_t* data, std::size_t size, const uint8_t* tag) {
  if (dek.size() != kDekBytes) return Status::InvalidArgument("data key must be 32 bytes");
  LM2_RETURN_IF_ERROR(CheckHeader(binding, header));
  uint8_t t[kTagBytes];
  std::memcpy(t, tag, kTagBytes);
  if (!Gcm(false, dek.data(), header + 6, RecordAad(binding, header), data, size, data, t)) {
    return AuthFailure();
  }
  return Status::Ok();
}

Result<std::string> WrapDek(const Kek& kek, std::string_view tenant, std::string_view session,
                            const SecretBytes& dek) {
  if (kek.key.size() != kKekBytes || dek.size() != kDekBytes) {
    return Status::InvalidArgument("KEK and DEK must be 32 bytes");
  }
  if (kek.key_id.size() > 0xffff) return Status::InvalidArgument("key id too long");
  std::string out(kKeyMagic, 4);
  out.push_back(static_cast<char>(kEnvelopeFormat));
  out.push_back(static_cast<char>(kek.key_id.size() & 0xff));
  out.push_back(static_cast<char>(kek.key_id.size() >> 8));
  out += kek.key_id;
  const std::size_t nonce_at = out.size();
  out.resize(nonce_at + kNonceBytes + kDekBytes + kTagBytes);
  auto* p = reinterpret_cast<uint8_t*>(out.data());
  if (RAND_bytes(p + nonce_at, static_cast<int>(kNonceBytes)) != 1) return Status::Internal("RAND_bytes failed");
  if (!Gcm(true, kek.key.data(), p + nonce_at, DekAad(tenant, session, kek.key_id), dek.data(),
           kDekBytes, p + nonce_at + kNonceBytes, p + nonce_at + kNonceBytes + kDekBytes)) {
    return Status::Internal("AES-256-GCM key wrap failed");
  }
  return out;
}

Result<std::string> WrappedKeyId(std::string_view w) {
  if (w.size() < 7 || std::memcmp(w.data(), kKeyMagic, 4) != 0 ||
      static_cast<uint8_t>(w[4]) != kEnvelopeFormat) {
    return Status::Corruption("wrapped data key is malformed");
  }
  const std::size_t id_len = static_cast<uint8_t>(w[5]) | (static_cast<std::size_t>(static_cast<uint8_t>(w[6])) << 8);
  if (w.size() != 7 + id_len + kNonceBytes + kDekBytes + kTagBytes) {
    return Status::Corruption("wrapped data key has the wrong size");
  }
  return std::string(w.substr(7, id_len));
}

Result<SecretBytes> UnwrapDek(KeyProvider& keys, std::string_view tenant, std::string_view session,
                              std::string_view wrapped) {
  LM2_ASSIGN_OR_RETURN(std::string key_id, WrappedKeyId(wrapped));
  LM2_ASSIGN_OR_RETURN(Kek kek, keys.GetKek(tenant, key_id));
  if (kek.key.size() != kKekBytes) return Status::PermissionDenied("KEK has the wrong size");
  const auto* p = reinterpret_cast<const uint8_t*>(wrapped.data()) + 7 + key_id.size();
  SecretBytes dek(kDekBytes + 16);
  uint8_t tag[kTagBytes];
  std::memcpy(tag, p + kNonceBytes + kDekBytes, kTagBytes);
  if (!Gcm(false, kek.key.data(), p, DekAad(tenant, session, key_id), p + kNonceBytes, kDekBytes,
           dek.data(), tag)) {
    return Status::PermissionDenied("data key does not unwrap with key " + key_id +
                                    " (wrong key-encryption key, or a key of another session)");
  }
  dek.Truncate(kDekBytes);
  return dek;
}

}  // namespace lm2::persistence
