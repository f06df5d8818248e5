// Validating parser of a safetensors header (format: tools/lm2ref/safetensors_io.py).
//
//   8 bytes  little-endian u64 N, the JSON header length
//   N bytes  {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
//             "__metadata__": {"str": "str"}}
//   rest     the data buffer; offsets are relative to its start
//
// Every rule of lm2ref's parse_header is checked here, so a file one accepts the other
// accepts too. Pure function over bytes: no I/O, no allocation beyond the result.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/tensor.h"

namespace lm2::runtime {

// Upper bound on the JSON header, the same as lm2ref and the reference implementation.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull * 1024 * 1024;

struct SafetensorsEntry {
  std::string name;
  std::string dtype_tag;        // as written: "F32", "I64", ...
  std::optional<DType> dtype;   // nullopt: a valid safetensors dtype that is not a weight dtype
  Shape shape;
  uint64_t begin = 0;           // [begin, end) relative to the data buffer
  uint64_t end = 0;
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> tensors;  // sorted by name
  uint64_t data_start = 0;                // 8 + N: file offset of the data buffer
};

// Validates the header of a file whose whole content is [data, data + size). Corruption
// (message without the file name; the caller adds it) on anything malformed.
Result<SafetensorsHeader> ParseSafetensorsHeader(const unsigned char* data, std::size_t size);

}  // namespace lm2::runtime
