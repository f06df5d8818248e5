// Tensor dtypes, shapes and non-owning views shared by the loader and the backends.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lm2::runtime {

// Weight storage types accepted in model files (safetensors tags F32, F16, BF16).
enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

std::size_t DTypeSize(DType dtype);
std::string_view DTypeName(DType dtype);  // "F32", "F16", "BF16"
// The DType of a safetensors tag; nullopt for any other tag (including F64, I32, ...).
std::optional<DType> DTypeFromName(std::string_view name);

using Shape = std::vector<int64_t>;
int64_t NumElements(const Shape& shape);
std::string ShapeString(const Shape& shape);  // "[64, 128]"

// A read-only view of a tensor's bytes (row-major, little-endian) owned by someone else,
// typically a memory-mapped model file that outlives the view. `data` is not guaranteed to
// be aligned to DTypeSize (a safetensors file may place a tensor at any byte offset; files
// written by lm2ref keep every tensor aligned): read through ConvertToF32 or memcpy, or
// check the alignment before casting.
struct TensorView {
  DType dtype = DType::kF32;
  Shape shape;
  const void* data = nullptr;
  std::size_t nbytes = 0;
};

// Converts n elements of `src` (any DType) to fp32: bf16 and f16 are widened exactly
// (subnormals, infinities and NaN payloads included). `src` may be unaligned.
void ConvertToF32(DType dtype, const void* src, float* dst, std::size_t n);
// One element: IEEE binary16 bits / bfloat16 bits to fp32, exactly.
float HalfToFloat(uint16_t bits);
float BF16ToFloat(uint16_t bits);

}  // namespace lm2::runtime
