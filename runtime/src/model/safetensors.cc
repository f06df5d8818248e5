#include "model/safetensors.h"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

namespace lm2::runtime {
namespace {

using json = nlohmann::json;

// Element sizes of every safetensors dtype tag lm2ref knows.
std::optional<uint64_t> TagSize(const std::string& tag) {
  static const std::pair<const char*, uint64_t> kTags[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  for (const auto& [name, size] : kTags) {
    if (tag == name) return size;
  }
  return std::nullopt;
}

bool AsU64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

Status Bad(const std::string& msg) { return Status::Corruption(msg); }

}  // namespace

Result<SafetensorsHeader> ParseSafetensorsHeader(const unsigned char* data, std::size_t size) {
  if (size < 8) return Bad("file of " + std::to_string(size) + " bytes is shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxSafetensorsHeaderBytes) {
    return Bad("header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxSafetensorsHeaderBytes) +
               "-byte limit");
  }
  if (n > size - 8) {
    return Bad("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
               " bytes)");
  }
  const json header = json::parse(data + 8, data + 8 + n, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return Bad("header is not valid JSON");
  if (!header.is_object()) return Bad("header is not a JSON object");

  SafetensorsHeader out;
  out.data_start = 8 + n;
  const uint64_t data_len = size - 8 - n;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (info.is_null()) continue;
      if (!info.is_object()) return Bad("__metadata__ must map str to str");
      for (const auto& [k, v] : info.items()) {
        if (!v.is_string()) return Bad("__metadata__ must map str to str (key \"" + k + "\")");
      }
      continue;
    }
    if (!info.is_object() || info.size() != 3 || !info.contains("dtype") || !info.contains("shape") ||
        !info.contains("data_offsets")) {
      return Bad(name + ": entry must have exactly dtype, shape, data_offsets");
    }
    SafetensorsEntry e;
    e.name = name;
    const json& dtype = info["dtype"];
    if (!dtype.is_string()) return Bad(name + ": dtype must be a string");
    e.dtype_tag = dtype.get<std::string>();
    const std::optional<uint64_t> elem_size = TagSize(e.dtype_tag);
    if (!elem_size) return Bad(name + ": unknown dtype \"" + e.dtype_tag + "\"");
    e.dtype = DTypeFromName(e.dtype_tag);

    const json& shape = info["shape"];
    if (!shape.is_array()) return Bad(name + ": shape must be a list of non-negative integers");
    uint64_t nbytes = *elem_size;
    for (const json& dim : shape) {
      uint64_t d = 0;
      if (!AsU64(dim, &d) || d > static_cast<uint64_t>(INT64_MAX)) {
        return Bad(name + ": shape must be a list of non-negative integers");
      }
      if (__builtin_mul_overflow(nbytes, d, &nbytes)) return Bad(name + ": shape " + shape.dump() + " overflows");
      e.shape.push_back(static_cast<int64_t>(d));
    }

    const json& offs = info["data_offsets"];
    if (!offs.is_array() || offs.size() != 2 || !AsU64(offs[0], &e.begin) || !AsU64(offs[1], &e.end) ||
        e.begin > e.end) {
      return Bad(name + ": data_offsets must be [begin, end] with 0 <= begin <= end");
    }
    if (e.end > data_len) {
      return Bad(name + ": data range [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                 ") runs past the end of the file (data buffer of " + std::to_string(data_len) + " bytes)");
    }
    if (e.end - e.begin != nbytes) {
      return Bad(name + ": shape " + ShapeString(e.shape) + " x " + e.dtype_tag + " needs " + std::to_string(nbytes) +
                 " bytes, its range holds " + std::to_string(e.end - e.begin));
    }
    out.tensors.push_back(std::move(e));
  }

  // Ranges must not overlap (gaps are allowed, as in lm2ref).
  std::vector<const SafetensorsEntry*> by_offset;
  by_offset.reserve(out.tensors.size());
  for (const auto& e : out.tensors) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry* e : by_offset) {
    if (e->begin < pos) return Bad(e->name + ": data range overlaps that of " + prev->name);
    pos = e->end;
    prev = e;
  }
  std::sort(out.tensors.begin(), out.tensors.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; });
  return out;
}

}  // namespace lm2::runtime
