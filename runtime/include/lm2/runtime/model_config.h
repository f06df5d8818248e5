// ModelConfig: config.json of an lm2 model directory (docs/lm2-spec.md, "config.json").
//
// Hugging Face LlamaConfig keys plus the memory keys. A config without memory keys
// ("architectures": ["LlamaForCausalLM"]) is a vanilla Llama model. Plain value type.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/status.h"

namespace lm2::runtime {

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;               // d
  int64_t intermediate_size = 0;         // SwiGLU width
  int64_t num_layers = 0;                // num_hidden_layers
  int64_t num_heads = 0;                 // num_attention_heads
  int64_t num_kv_heads = 0;              // num_key_value_heads (default num_heads)
  int64_t head_dim = 0;                  // default hidden_size / num_heads
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  int32_t bos_token_id = 1;
  int32_t eos_token_id = 2;
  // Memory. memory_slots == 0: vanilla model, memory_layers empty.
  int64_t memory_slots = 0;              // N
  int64_t memory_heads = 1;              // H_m
  std::vector<int64_t> memory_layers;    // sorted, unique; default every layer
  int64_t memory_segment_tokens = 0;     // 0: segments end only where the caller says
  bool memory_learned_init = false;      // true: model.layers.i.memory.init [N, d] exists

  bool has_memory() const { return !memory_layers.empty(); }
  bool layer_has_memory(int64_t layer) const;
  int64_t memory_head_dim() const { return hidden_size / memory_heads; }

  // Parses and validates config.json text: unknown architectures, unsupported features
  // (rope_scaling, biases, activations other than silu) and impossible shapes are
  // InvalidArgument with a message naming the key.
  static Result<ModelConfig> FromJson(std::string_view json_text);
  // Reads DIR/config.json.
  static Result<ModelConfig> Load(const std::string& model_dir);
  // Checks every invariant FromJson checks (for configs built in code).
  Status Validate() const;
  // A canonical JSON of every field above (sorted keys, fixed formatting): the config part
  // of the model fingerprint.
  std::string CanonicalJson() const;
};

}  // namespace lm2::runtime
