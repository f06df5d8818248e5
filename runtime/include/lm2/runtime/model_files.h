// ModelFiles: an opened, validated model directory, memory-mapped.
//
//   DIR/config.json                  ModelConfig
//   DIR/model.safetensors            or sharded: model-0000k-of-0000K.safetensors plus
//   DIR/model.safetensors.index.json {"weight_map": {tensor name: shard file}}
//   DIR/tokenizer.model              sentencepiece (optional here; the Tokenizer needs it)
//
// Open() validates everything before any tensor is handed out: header length bounds,
// well-formed JSON, known dtypes, shape x dtype size == byte range, ranges inside the file
// and not overlapping, every expected tensor (ExpectedTensors) present with the right
// shape, nothing unexpected. Each failure is a Status naming the file and tensor:
// Corruption for malformed bytes or the wrong set/shapes of tensors, InvalidArgument for
// a bad config, NotFound for a missing config.json or weights file, Unimplemented for a
// valid safetensors dtype that is not a weight dtype (F64, I32, ...).
//
// The index's "metadata" is ignored; a shard holding a tensor the index maps elsewhere,
// a tensor in two shards, or an index entry no shard holds is Corruption. When both
// model.safetensors and the index exist, the index wins (as in lm2ref and Hugging Face).
// Files must not be truncated while mapped (the OS would raise SIGBUS on access).
//
// Ownership: ModelFiles owns the mappings; TensorViews point into them and stay valid
// while the ModelFiles lives. Thread-safe for concurrent reads once opened. Costs: opening
// maps the files (no copy) and reads their headers; Fingerprint() hashes every byte once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/model_config.h"
#include "lm2/runtime/tensor.h"

namespace lm2::runtime {

// One tensor a model of a given config has. The single list that drives loading,
// validation, fingerprinting and tests (docs/lm2-spec.md, "Weights").
struct TensorSpec {
  std::string name;        // e.g. "model.layers.0.memory.read_q.weight"
  Shape shape;             // e.g. {d, d}
};

// Every tensor of `config`, sorted by name (same order as the Python reference's
// lm2ref.model_dir.expected_tensors).
std::vector<TensorSpec> ExpectedTensors(const ModelConfig& config);

class ModelFiles {
 public:
  static Result<std::unique_ptr<ModelFiles>> Open(const std::string& model_dir);
  ~ModelFiles();
  ModelFiles(const ModelFiles&) = delete;
  ModelFiles& operator=(const ModelFiles&) = delete;

  const ModelConfig& config() const;
  const std::string& dir() const;
  // The view of an expected tensor; NotFound for any other name.
  Result<TensorView> Tensor(const std::string& name) const;
  // Views in ExpectedTensors order.
  const std::vector<TensorSpec>& specs() const;
  // The safetensors files holding the weights, names relative to dir(), sorted.
  const std::vector<std::string>& weight_files() const;
  // Sum of every expected tensor's byte size as stored.
  uint64_t weight_bytes() const;

  // SHA-256 (hex) over the canonical config JSON and, in ExpectedTensors order, the name,
  // dtype, shape and bytes of every tensor. A memory bank is only valid for the model it
  // was computed with (every layer up to the last memory layer shapes what is written, so
  // all weights count); this is the value stored beside a bank to refuse another model's.
  // Computed on first call (one pass over the weights), then cached; thread-safe.
  //
  // Exact byte stream hashed (u64 = 8 bytes little-endian; str = u64 length + bytes):
  //   str "lm2-model-fingerprint-v1", str ModelConfig::CanonicalJson(), then per tensor
  //   in ExpectedTensors order: str name, str dtype ("F32"/"F16"/"BF16"), u64 rank,
  //   u64 each dim, str tensor bytes as stored.
  // So the same weights stored as F32 and BF16 have different fingerprints (they compute
  // different banks). Lowercase hex, 64 characters; empty only if OpenSSL itself failed
  // (an empty fingerprint must never be treated as matching).
  const std::string& Fingerprint() const;

 private:
  struct Impl;
  explicit ModelFiles(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lm2::runtime
