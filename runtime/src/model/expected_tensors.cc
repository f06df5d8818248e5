// ExpectedTensors: the one list of a model's tensors (mirrors lm2ref.model_dir.expected_tensors).
#include <algorithm>

#include "lm2/runtime/model_files.h"

namespace lm2::runtime {

std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c) {
  const int64_t d = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  const int64_t q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  std::vector<TensorSpec> out = {{"model.embed_tokens.weight", {v, d}}, {"model.norm.weight", {d}}};
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {v, d}});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "self_attn.q_proj.weight", {q_out, d}});
    out.push_back({p + "self_attn.k_proj.weight", {kv_out, d}});
    out.push_back({p + "self_attn.v_proj.weight", {kv_out, d}});
    out.push_back({p + "self_attn.o_proj.weight", {d, q_out}});
    out.push_back({p + "mlp.gate_proj.weight", {f, d}});
    out.push_back({p + "mlp.up_proj.weight", {f, d}});
    out.push_back({p + "mlp.down_proj.weight", {d, f}});
    out.push_back({p + "input_layernorm.weight", {d}});
    out.push_back({p + "post_attention_layernorm.weight", {d}});
    if (c.layer_has_memory(i)) {
      const std::string m = p + "memory.";
      for (const char* n : {"read_q", "read_k", "read_v", "write_v"}) out.push_back({m + n + ".weight", {d, d}});
      for (const char* n : {"out_gate", "in_gate", "forget_gate"}) {
        out.push_back({m + n + ".weight", {d, d}});
        out.push_back({m + n + ".bias", {d}});
      }
      if (c.memory_learned_init) out.push_back({m + "init", {c.memory_slots, d}});
    }
  }
  std::sort(out.begin(), out.end(), [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });
  return out;
}

}  // namespace lm2::runtime
