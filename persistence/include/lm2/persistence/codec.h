// Snapshot codec: MemoryState + VersionInfo <-> FlatBuffers bytes (schema/snapshot.fbs).
//
// Decoding never trusts its input: the FlatBuffers verifier runs first, then every size
// is checked against the declared shapes (no overflow, no short tensor), then the model
// fingerprint is compared with the expected one. Encoding is one pass over the bank
// plus, for fp32, one memcpy; decoding likewise.
//
// Thread-safety: free functions without shared state.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "lm2/core/memory_state.h"
#include "lm2/core/status.h"
#include "lm2/persistence/types.h"

namespace flatbuffers {
class Allocator;
class DetachedBuffer;
}

namespace lm2::persistence {

// An encoded (plaintext) record. Owns its bytes and wipes them when destroyed, since
// they are the unencrypted bank. Move-only.
class EncodedBuffer {
 public:
  EncodedBuffer();
  explicit EncodedBuffer(flatbuffers::DetachedBuffer&& buf);
  EncodedBuffer(EncodedBuffer&&) noexcept;
  EncodedBuffer& operator=(EncodedBuffer&&) noexcept;
  EncodedBuffer(const EncodedBuffer&) = delete;
  EncodedBuffer& operator=(const EncodedBuffer&) = delete;
  ~EncodedBuffer();

  const uint8_t* data() const;
  uint8_t* mutable_data();  // e.g. to encrypt the record in place
  std::size_t size() const;

 private:
  std::unique_ptr<flatbuffers::DetachedBuffer> buf_;
};

// Version of the persisted layout written by this build. Readers refuse newer ones.
inline constexpr uint32_t kFormatVersion = 1;

// Largest encoded snapshot: FlatBuffers offsets are 32-bit signed.
inline constexpr uint64_t kMaxEncodedBytes = (uint64_t{1} << 31) - 1;

struct SnapshotIds {
  std::string_view tenant;
  std::string_view session;
};

// Encodes a snapshot. `info.bank_values` is filled from `state`. InvalidArgument for a
// shape that does not match its data, a non-finite value with kI8, or a bank too large.
// `allocator` provides the encoding's memory (default nullptr: the heap), e.g. a buffer
// reused across commits; it must outlive the result, which hands the memory back to it.
Result<EncodedBuffer> EncodeSnapshot(const SnapshotIds& ids, const VersionInfo& info,
                                     const MemoryState& state, DType dtype,
                                     flatbuffers::Allocator* allocator = nullptr);

// Decodes and validates. Corruption for anything malformed; FailedPrecondition when
// `expected_fingerprint` is non-empty and differs from the stored one (a bank of another
// model); Unimplemented for a newer format version. `ids` must match the stored ids.
Status DecodeSnapshot(const uint8_t* data, std::size_t size, const SnapshotIds& ids,
                      std::string_view expected_fingerprint, VersionInfo* info,
                      MemoryState* state);

// Encodes/decodes the small listable version description.
Result<EncodedBuffer> EncodeVersionInfo(const SnapshotIds& ids, const VersionInfo& info);
Status DecodeVersionInfo(const uint8_t* data, std::size_t size, VersionInfo* info);

Result<EncodedBuffer> EncodeTranscript(uint64_t version, const TurnTranscript& t);
Status DecodeTranscript(const uint8_t* data, std::size_t size, uint64_t version,
                        TurnTranscript* t);

struct HeadRecord {
  uint64_t head_version = 0;
  uint64_t last_version = 0;
  int64_t created_unix_ms = 0;
};
EncodedBuffer EncodeHead(const HeadRecord& head);
Status DecodeHead(const uint8_t* data, std::size_t size, HeadRecord* head);

// Element conversions, exposed for tests and the benchmark.
uint16_t FloatToBf16(float x);
float Bf16ToFloat(uint16_t b);

}  // namespace lm2::persistence
