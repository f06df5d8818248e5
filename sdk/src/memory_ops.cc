#include "memory_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>

#include "engine_core.h"

namespace lm2::internal {
namespace {
inline std::size_t Z(int64_t v) { return static_cast<std::size_t>(v); }
}  // namespace

std::vector<LayerSlots> SlotNorms(const MemoryState& m) {
  std::vector<LayerSlots> out;
  for (const MemoryLayer& l : m.layers) {
    LayerSlots ls{l.layer, std::vector<float>(Z(l.slots), 0.0f)};
    for (int64_t n = 0; n < l.slots; ++n) {
      double s = 0.0;
      for (int64_t k = 0; k < l.dim; ++k) {
        const double v = l.data[Z(n * l.dim + k)];
        s += v * v;
      }
      ls.values[Z(n)] = static_cast<float>(std::sqrt(s));
    }
    out.push_back(std::move(ls));
  }
  return out;
}

Result<std::vector<LayerSlots>> SlotDiff(const MemoryState& before, const MemoryState& after) {
  if (before.layers.size() != after.layers.size()) return Status::InvalidArgument("banks have different layer counts");
  std::vector<LayerSlots> out;
  for (std::size_t i = 0; i < after.layers.size(); ++i) {
    const MemoryLayer& a = before.layers[i];
    const MemoryLayer& b = after.layers[i];
    if (a.layer != b.layer || a.slots != b.slots || a.dim != b.dim || a.data.size() != b.data.size()) {
      return Status::InvalidArgument("banks have different shapes");
    }
    LayerSlots ls{b.layer, std::vector<float>(Z(b.slots), 0.0f)};
    for (int64_t n = 0; n < b.slots; ++n) {
      double s = 0.0;
      for (int64_t k = 0; k < b.dim; ++k) {
        const double v = static_cast<double>(b.data[Z(n * b.dim + k)]) - static_cast<double>(a.data[Z(n * b.dim + k)]);
        s += v * v;
      }
      ls.values[Z(n)] = static_cast<float>(std::sqrt(s));
    }
    out.push_back(std::move(ls));
  }
  return out;
}

Status ApplyClear(MemoryState& m, const MemoryState& initial, const ClearSpec& spec) {
  if (m.layers.size() != initial.layers.size()) return Status::Internal("bank and initial bank differ in layers");
  for (int32_t want : spec.layers) {
    const bool found = std::any_of(m.layers.begin(), m.layers.end(), [&](const MemoryLayer& l) { return l.layer == want; });
    if (!found) return Status::InvalidArgument("layer " + std::to_string(want) + " has no memory");
  }
  for (int64_t s : spec.slots) {
    if (s < 0 || m.layers.empty() || s >= m.layers[0].slots) {
      return Status::InvalidArgument("slot " + std::to_string(s) + " is out of range [0, " +
                                     std::to_string(m.layers.empty() ? 0 : m.layers[0].slots) + ")");
    }
  }
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    MemoryLayer& l = m.layers[i];
    if (!spec.layers.empty() && std::find(spec.layers.begin(), spec.layers.end(), l.layer) == spec.layers.end()) continue;
    const MemoryLayer& init = initial.layers[i];
    if (spec.slots.empty()) {
      l.data = init.data;
      continue;
    }
    for (int64_t s : spec.slots) {
      std::copy_n(init.data.begin() + static_cast<std::ptrdiff_t>(s * l.dim), l.dim,
                  l.data.begin() + static_cast<std::ptrdiff_t>(s * l.dim));
    }
  }
  return Status::Ok();
}

std::string JoinInts(const std::vector<int64_t>& v) {
  std::string out;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) out.push_back(',');
    out += std::to_string(v[i]);
  }
  return out;
}

Result<std::vector<int64_t>> ParseInts(const std::string& s) {
  std::vector<int64_t> out;
  std::size_t at = 0;
  while (at < s.size()) {
    std::size_t end = s.find(',', at);
    if (end == std::string::npos) end = s.size();
    const std::string item = s.substr(at, end - at);
    char* stop = nullptr;
    const long long v = std::strtoll(item.c_str(), &stop, 10);
    if (item.empty() || *stop != '\0') return Status::Corruption("bad integer list '" + s + "' in version metadata");
    out.push_back(v);
    at = end + 1;
  }
  return out;
}

Result<ClearSpec> ClearSpecFromMetadata(const std::map<std::string, std::string>& meta) {
  ClearSpec spec;
  auto l = meta.find(kMetaClearLayers);
  auto s = meta.find(kMetaClearSlots);
  if (l == meta.end() || s == meta.end()) return Status::Corruption("clear version without its layers/slots");
  LM2_ASSIGN_OR_RETURN(std::vector<int64_t> layers, ParseInts(l->second));
  LM2_ASSIGN_OR_RETURN(spec.slots, ParseInts(s->second));
  for (int64_t x : layers) spec.layers.push_back(static_cast<int32_t>(x));
  return spec;
}

std::string Preview(std::string_view text, std::size_t max_bytes) {
  std::string out;
  const bool cut = text.size() > max_bytes;
  std::size_t n = std::min(text.size(), max_bytes);
  // Do not end inside a multi-byte character: back up over continuation bytes.
  while (cut && n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  for (std::size_t i = 0; i < n; ++i) out.push_back(text[i] == '\n' || text[i] == '\r' ? ' ' : text[i]);
  if (cut) out += "...";
  return out;
}

}  // namespace lm2::internal
