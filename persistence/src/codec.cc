// Snapshot codec. See codec.h; the schema is schema/snapshot.fbs.
#include "lm2/persistence/codec.h"

#include <openssl/crypto.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "snapshot_generated.h"

namespace lm2::persistence {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the persisted format is little-endian; a big-endian port must byte-swap");

namespace fbs = ::lm2::persistence::fb;

std::size_t ElemSize(DType d) { return d == DType::kF32 ? 4 : d == DType::kBF16 ? 2 : 1; }

// Checks one layer's shape against its data; returns the number of values.
Status CheckShape(const MemoryLayer& l, std::size_t index) {
  if (l.slots <= 0 || l.dim <= 0) {
    return Status::InvalidArgument("layer #" + std::to_string(index) + " has a non-positive shape");
  }
  if (l.slots > std::numeric_limits<int64_t>::max() / l.dim ||
      static_cast<uint64_t>(l.slots * l.dim) != l.data.size()) {
    return Status::InvalidArgument("layer #" + std::to_string(index) +
                                   ": slots * dim does not match the number of values");
  }
  return Status::Ok();
}

void EncodeRowI8(const float* x, std::size_t n, int8_t* q, float* scale) {
  float maxabs = 0.0f;
  for (std::size_t i = 0; i < n; ++i) maxabs = std::max(maxabs, std::fabs(x[i]));
  const float s = maxabs / 127.0f;
  *scale = s;
  if (s == 0.0f) {
    std::memset(q, 0, n);
    return;
  }
  const float inv = 1.0f / s;
  for (std::size_t i = 0; i < n; ++i) {
    float r = std::nearbyint(x[i] * inv);
    r = std::min(127.0f, std::max(-127.0f, r));
    q[i] = static_cast<int8_t>(r);
  }
}

flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<fbs::KeyValue>>> BuildMetadata(
    flatbuffers::FlatBufferBuilder& b, const std::map<std::string, std::string>& md) {
  std::vector<flatbuffers::Offset<fbs::KeyValue>> kvs;
  kvs.reserve(md.size());
  for (const auto& [k, v] : md) kvs.push_back(fbs::CreateKeyValue(b, b.CreateString(k), b.CreateString(v)));
  return b.CreateVector(kvs);
}

flatbuffers::Offset<fbs::VersionInfo> BuildInfo(flatbuffers::FlatBufferBuilder& b,
                                               const SnapshotIds& ids, const VersionInfo& info) {
  auto fp = b.CreateString(info.model_fingerprint);
  auto tenant = b.CreateString(ids.tenant.data(), ids.tenant.size());
  auto session = b.CreateString(ids.session.data(), ids.session.size());
  auto md = BuildMetadata(b, info.metadata);
  return fbs::CreateVersionInfo(b, kFormatVersion, fp, tenant, session, info.version,
                                info.parent_version, info.created_unix_ms, info.turn_count,
                                info.token_count, md, info.bank_values,
                                static_cast<fbs::DType>(info.dtype));
}

std::string Str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

Status ReadInfo(const fbs::VersionInfo* in, VersionInfo* out) {
  if (in == nullptr) return Status::Corruption("record has no version info");
  if (in->format_version() == 0) return Status::Corruption("record has no format version");
  if (in->format_version() > kFormatVersion) {
    return Status::Unimplemented("record format version " + std::to_string(in->format_version()) +
                                 " is newer than this build reads (" +
                                 std::to_string(kFormatVersion) + ")");
  }
  out->version = in->version();
  out->parent_version = in->parent_version();
  out->created_unix_ms = in->created_unix_ms();
  out->turn_count = in->turn_count();
  out->token_count = in->token_count();
  out->model_fingerprint = Str(in->model_fingerprint());
  out->bank_values = in->bank_values();
  switch (in->dtype()) {
    case fbs::DType_F32: out->dtype = DType::kF32; break;
    case fbs::DType_BF16: out->dtype = DType::kBF16; break;
    case fbs::DType_I8: out->dtype = DType::kI8; break;
    default: return Status::Corruption("record has an unknown dtype");
  }
  out->metadata.clear();
  if (in->metadata() != nullptr) {
    for (const auto* kv : *in->metadata()) {
      if (kv == nullptr) return Status::Corruption("null metadata entry");
      out->metadata[Str(kv->key())] = Str(kv->value());
    }
  }
  return Status::Ok();
}

Status CheckSize(std::size_t size) {
  if (size < 8 || size > kMaxEncodedBytes) {
    return Status::Corruption("record size " + std::to_string(size) + " is out of range");
  }
  return Status::Ok();
}

EncodedBuffer Finish(flatbuffers::FlatBufferBuilder& b) { return EncodedBuffer(b.Release()); }

}  // namespace

// ---- EncodedBuffer ----------------------------------------------------------------------
EncodedBuffer::EncodedBuffer() = default;
EncodedBuffer::EncodedBuffer(flatbuffers::DetachedBuffer&& buf)
    : buf_(std::make_unique<flatbuffers::DetachedBuffer>(std::move(buf))) {}
EncodedBuffer::EncodedBuffer(EncodedBuffer&&) noexcept = default;
EncodedBuffer& EncodedBuffer::operator=(EncodedBuffer&&) noexcept = default;
EncodedBuffer::~EncodedBuffer() {
  if (buf_ && buf_->data() != nullptr) OPENSSL_cleanse(buf_->data(), buf_->size());
}
const uint8_t* EncodedBuffer::data() const { return buf_ ? buf_->data() : nullptr; }
uint8_t* EncodedBuffer::mutable_data() { return buf_ ? buf_->data() : nullptr; }
std::size_t EncodedBuffer::size() const { return buf_ ? buf_->size() : 0; }

// ---- Element conversions ----------------------------------------------------------------
uint16_t FloatToBf16(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  }
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float Bf16ToFloat(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

// ---- Snapshot ---------------------------------------------------------------------------
Result<EncodedBuffer> EncodeSnapshot(const SnapshotIds& ids, const VersionInfo& info_in,
                                     const MemoryState& state, DType dtype,
                                     flatbuffers::Allocator* allocator) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kI8) {
    return Status::InvalidArgument("unknown dtype");
  }
  uint64_t payload = 4096 + info_in.model_fingerprint.size() + ids.tenant.size() + ids.session.size();
  for (const auto& [k, v] : info_in.metadata) payload += k.size() + v.size() + 32;
  VersionInfo info = info_in;
  info.bank_values = 0;
  info.dtype = dtype;
  for (std::size_t i = 0; i < state.layers.size(); ++i) {
    const MemoryLayer& l = state.layers[i];
    LM2_RETURN_IF_ERROR(CheckShape(l, i));
    if (i > 0 && l.layer <= state.layers[i - 1].layer) {
      return Status::InvalidArgument("memory layers must be in increasing layer order");
    }
    info.bank_values += l.data.size();
    payload += l.data.size() * ElemSize(dtype) + 64 +
               (dtype == DType::kI8 ? static_cast<uint64_t>(l.slots) * 4 : 0);
  }
  if (payload > kMaxEncodedBytes) {
    return Status::InvalidArgument("memory bank too large for one snapshot (" +
                                   std::to_string(payload) + " bytes encoded, limit 2 GiB)");
  }
  flatbuffers::FlatBufferBuilder b(static_cast<std::size_t>(payload), allocator);
  std::vector<flatbuffers::Offset<fbs::LayerTensor>> layers;
  layers.reserve(state.layers.size());
  for (const MemoryLayer& l : state.layers) {
    const std::size_t n = l.data.size();
    const std::size_t rows = static_cast<std::size_t>(l.slots);
    const std::size_t cols = static_cast<std::size_t>(l.dim);
    flatbuffers::Offset<flatbuffers::Vector<float>> scales;
    if (dtype == DType::kI8) {
      // Quantise into a scratch buffer first: the builder grows downward, so the scales
      // vector must be created before the data vector that is the bulk of the bytes.
      std::vector<int8_t> q(n);
      std::vector<float> s(rows);
      for (std::size_t r = 0; r < rows; ++r) {
        const float* row = l.data.data() + r * cols;
        for (std::size_t c = 0; c < cols; ++c) {
          if (!std::isfinite(row[c])) {
            return Status::InvalidArgument("int8 snapshots need finite values (layer " +
                                           std::to_string(l.layer) + ")");
          }
        }
        EncodeRowI8(row, cols, q.data() + r * cols, &s[r]);
      }
      scales = b.CreateVector(s);
      b.ForceVectorAlignment(n, 1, 16);
      uint8_t* dst = nullptr;
      auto data = b.CreateUninitializedVector(n, 1, &dst);
      std::memcpy(dst, q.data(), n);
      layers.push_back(fbs::CreateLayerTensor(b, l.layer, l.slots, l.dim, fbs::DType_I8,
                                              flatbuffers::Offset<flatbuffers::Vector<uint8_t>>(data),
                                              scales));
      continue;
    }
    const std::size_t bytes = n * ElemSize(dtype);
    b.ForceVectorAlignment(bytes, 1, 16);
    uint8_t* dst = nullptr;
    auto data = b.CreateUninitializedVector(bytes, 1, &dst);
    if (dtype == DType::kF32) {
      std::memcpy(dst, l.data.data(), bytes);
    } else {
      for (std::size_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToBf16(l.data[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
    }
    layers.push_back(fbs::CreateLayerTensor(
        b, l.layer, l.slots, l.dim, dtype == DType::kF32 ? fbs::DType_F32 : fbs::DType_BF16,
        flatbuffers::Offset<flatbuffers::Vector<uint8_t>>(data), scales));
  }
  auto layers_vec = b.CreateVector(layers);
  auto info_off = BuildInfo(b, ids, info);
  b.Finish(fbs::CreateSnapshot(b, info_off, layers_vec));
  return Finish(b);
}

Status DecodeSnapshot(const uint8_t* data, std::size_t size, const SnapshotIds& ids,
                      std::string_view expected_fingerprint, VersionInfo* info,
                      MemoryState* state) {
  LM2_RETURN_IF_ERROR(CheckSize(size));
  flatbuffers::Verifier verifier(data, size, /*max_depth=*/16, /*max_tables=*/1u << 20);
  if (!fbs::VerifySnapshotBuffer(verifier)) {
    return Status::Corruption("snapshot fails FlatBuffers verification");
  }
  const fbs::Snapshot* snap = fbs::GetSnapshot(data);
  const fbs::VersionInfo* fi = snap->info();
  if (fi == nullptr) return Status::Corruption("snapshot has no version info");
  VersionInfo out_info;
  LM2_RETURN_IF_ERROR(ReadInfo(fi, &out_info));
  if (Str(fi->tenant()) != ids.tenant || Str(fi->session()) != ids.session) {
    return Status::Corruption("snapshot belongs to another tenant or session");
  }
  if (!expected_fingerprint.empty() && out_info.model_fingerprint != expected_fingerprint) {
    return Status::FailedPrecondition("snapshot was computed by another model (fingerprint " +
                                      out_info.model_fingerprint.substr(0, 16) + "..., expected " +
                                      std::string(expected_fingerprint.substr(0, 16)) + "...)");
  }
  MemoryState out;
  out.model_fingerprint = out_info.model_fingerprint;
  uint64_t total = 0;
  if (const auto* tensors = snap->layers(); tensors != nullptr) {
    out.layers.reserve(tensors->size());
    for (const fbs::LayerTensor* t : *tensors) {
      if (t == nullptr || t->data() == nullptr) return Status::Corruption("layer without data");
      const int64_t slots = t->slots(), dim = t->dim();
      if (slots <= 0 || dim <= 0 || slots > std::numeric_limits<int64_t>::max() / dim) {
        return Status::Corruption("layer has an invalid shape");
      }
      if (!out.layers.empty() && t->layer() <= out.layers.back().layer) {
        return Status::Corruption("layers out of order");
      }
      DType dt;
      switch (t->dtype()) {
        case fbs::DType_F32: dt = DType::kF32; break;
        case fbs::DType_BF16: dt = DType::kBF16; break;
        case fbs::DType_I8: dt = DType::kI8; break;
        default: return Status::Corruption("layer has an unknown dtype");
      }
      const uint64_t n = static_cast<uint64_t>(slots * dim);
      if (n > size || static_cast<uint64_t>(t->data()->size()) != n * ElemSize(dt)) {
        return Status::Corruption("layer data size does not match its shape");
      }
      if (dt == DType::kI8 &&
          (t->scales() == nullptr || t->scales()->size() != static_cast<uint64_t>(slots))) {
        return Status::Corruption("int8 layer without one scale per row");
      }
      MemoryLayer l;
      l.layer = t->layer();
      l.slots = slots;
      l.dim = dim;
      l.data.resize(static_cast<std::size_t>(n));
      const uint8_t* src = t->data()->data();
      if (dt == DType::kF32) {
        std::memcpy(l.data.data(), src, static_cast<std::size_t>(n) * 4);
      } else if (dt == DType::kBF16) {
        for (std::size_t i = 0; i < n; ++i) {
          uint16_t h;
          std::memcpy(&h, src + 2 * i, 2);
          l.data[i] = Bf16ToFloat(h);
        }
      } else {
        const std::size_t cols = static_cast<std::size_t>(dim);
        for (std::size_t r = 0; r < static_cast<std::size_t>(slots); ++r) {
          const float s = t->scales()->Get(static_cast<flatbuffers::uoffset_t>(r));
          if (!std::isfinite(s) || s < 0.0f) return Status::Corruption("invalid int8 scale");
          for (std::size_t c = 0; c < cols; ++c) {
            l.data[r * cols + c] = static_cast<float>(static_cast<int8_t>(src[r * cols + c])) * s;
          }
        }
      }
      total += n;
      out.layers.push_back(std::move(l));
    }
  }
  if (total != out_info.bank_values) return Status::Corruption("bank size does not match its header");
  *info = std::move(out_info);
  *state = std::move(out);
  return Status::Ok();
}

// ---- Version info, transcript, head -----------------------------------------------------
Result<EncodedBuffer> EncodeVersionInfo(const SnapshotIds& ids, const VersionInfo& info) {
  flatbuffers::FlatBufferBuilder b(512);
  b.Finish(BuildInfo(b, ids, info));
  return Finish(b);
}

Status DecodeVersionInfo(const uint8_t* data, std::size_t size, VersionInfo* info) {
  LM2_RETURN_IF_ERROR(CheckSize(size));
  flatbuffers::Verifier verifier(data, size, 16, 1u << 16);
  if (!verifier.VerifyBuffer<fbs::VersionInfo>(nullptr)) {
    return Status::Corruption("version info fails FlatBuffers verification");
  }
  return ReadInfo(flatbuffers::GetRoot<fbs::VersionInfo>(data), info);
}

Result<EncodedBuffer> EncodeTranscript(uint64_t version, const TurnTranscript& t) {
  flatbuffers::FlatBufferBuilder b(64 + 4 * (t.prompt_tokens.size() + t.reply_tokens.size()));
  auto p = b.CreateVector(t.prompt_tokens);
  auto r = b.CreateVector(t.reply_tokens);
  b.Finish(fbs::CreateTranscript(b, kFormatVersion, version, p, r));
  return Finish(b);
}

Status DecodeTranscript(const uint8_t* data, std::size_t size, uint64_t version,
                        TurnTranscript* t) {
  LM2_RETURN_IF_ERROR(CheckSize(size));
  flatbuffers::Verifier verifier(data, size, 16, 1u << 16);
  if (!verifier.VerifyBuffer<fbs::Transcript>(nullptr)) {
    return Status::Corruption("transcript fails FlatBuffers verification");
  }
  const auto* in = flatbuffers::GetRoot<fbs::Transcript>(data);
  if (in->format_version() == 0 || in->format_version() > kFormatVersion) {
    return Status::Corruption("transcript has an unknown format version");
  }
  if (in->version() != version) return Status::Corruption("transcript belongs to another version");
  TurnTranscript out;
  if (in->prompt_tokens()) out.prompt_tokens.assign(in->prompt_tokens()->begin(), in->prompt_tokens()->end());
  if (in->reply_tokens()) out.reply_tokens.assign(in->reply_tokens()->begin(), in->reply_tokens()->end());
  *t = std::move(out);
  return Status::Ok();
}

EncodedBuffer EncodeHead(const HeadRecord& head) {
  flatbuffers::FlatBufferBuilder b(64);
  b.Finish(fbs::CreateHead(b, head.head_version, head.last_version, head.created_unix_ms));
  return Finish(b);
}

Status DecodeHead(const uint8_t* data, std::size_t size, HeadRecord* head) {
  LM2_RETURN_IF_ERROR(CheckSize(size));
  flatbuffers::Verifier verifier(data, size, 4, 16);
  if (!verifier.VerifyBuffer<fbs::Head>(nullptr)) return Status::Corruption("head record fails verification");
  const auto* in = flatbuffers::GetRoot<fbs::Head>(data);
  if (in->head_version() > in->last_version()) return Status::Corruption("head past last version");
  head->head_version = in->head_version();
  head->last_version = in->last_version();
  head->created_unix_ms = in->created_unix_ms();
  return Status::Ok();
}

}  // namespace lm2::persistence
