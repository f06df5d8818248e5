#include "golden.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "model/safetensors.h"

namespace lm2::testing {
namespace {

template <typename T>
std::vector<T> Read(const std::vector<unsigned char>& blob, uint64_t start,
                    const runtime::SafetensorsEntry& e) {
  std::vector<T> out((e.end - e.begin) / sizeof(T));
  std::memcpy(out.data(), blob.data() + start + e.begin, e.end - e.begin);
  return out;
}

}  // namespace

Result<Golden> LoadGolden(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound(path);
  std::vector<unsigned char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  LM2_ASSIGN_OR_RETURN(auto header, runtime::ParseSafetensorsHeader(blob.data(), blob.size()));
  auto json = nlohmann::json::parse(blob.begin() + 8, blob.begin() + static_cast<std::ptrdiff_t>(header.data_start),
                                    nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.contains("__metadata__")) return Status::Corruption(path + ": no metadata");
  Golden g;
  g.model = json["__metadata__"].value("model", "");
  g.context = json["__metadata__"].value("context", "");
  for (const auto& e : header.tensors) {
    if (e.name == "tokens") {
      for (int64_t t : Read<int64_t>(blob, header.data_start, e)) g.tokens.push_back(static_cast<int32_t>(t));
    } else if (e.name == "segment_lengths") {
      g.segment_lengths = Read<int64_t>(blob, header.data_start, e);
    } else if (e.name == "logits") {
      g.logits = Read<double>(blob, header.data_start, e);
      g.vocab = e.shape.at(1);
    } else if (e.name.rfind("memory.", 0) == 0) {
      const auto dot = e.name.find('.', 7);
      const int64_t k = std::stoll(e.name.substr(7, dot - 7));
      const int64_t l = std::stoll(e.name.substr(dot + 1));
      g.memory[{k, l}] = Read<double>(blob, header.data_start, e);
    }
  }
  if (g.tokens.empty() || g.logits.empty() || g.context.empty()) return Status::Corruption(path + ": incomplete golden file");
  return g;
}

double RelativeError(const float* a, const double* b, std::size_t n) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double diff = static_cast<double>(a[i]) - b[i];
    num += diff * diff;
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace lm2::testing
