// The safetensors names of a layer's tensors (Hugging Face Llama names plus the memory's,
// docs/lm2-spec.md "Weights"): one list for the validation (ExpectedTensors) and both
// backends' loaders.
#pragma once

#include <cstdint>
#include <string>

namespace lm2::runtime {

struct LayerTensorNames {
  explicit LayerTensorNames(int64_t layer)
      : prefix("model.layers." + std::to_string(layer) + "."), memory(prefix + "memory.") {}

  std::string prefix;  // "model.layers.<i>."
  std::string memory;  // "model.layers.<i>.memory."

  std::string q_proj() const { return prefix + "self_attn.q_proj.weight"; }
  std::string k_proj() const { return prefix + "self_attn.k_proj.weight"; }
  std::string v_proj() const { return prefix + "self_attn.v_proj.weight"; }
  std::string o_proj() const { return prefix + "self_attn.o_proj.weight"; }
  std::string gate_proj() const { return prefix + "mlp.gate_proj.weight"; }
  std::string up_proj() const { return prefix + "mlp.up_proj.weight"; }
  std::string down_proj() const { return prefix + "mlp.down_proj.weight"; }
  std::string input_norm() const { return prefix + "input_layernorm.weight"; }
  std::string post_norm() const { return prefix + "post_attention_layernorm.weight"; }
  // Memory layers: the read and write projections, the three gates' weights and biases
  // (`name` one of read_q, read_k, read_v, write_v, out_gate, in_gate, forget_gate), and
  // the optional learned initial bank.
  std::string memory_weight(const char* name) const { return memory + name + ".weight"; }
  std::string memory_bias(const char* name) const { return memory + name + ".bias"; }
  std::string memory_init() const { return memory + "init"; }
};

}  // namespace lm2::runtime
