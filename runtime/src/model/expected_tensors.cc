// ExpectedTensors: the one list of a model's tensors (mirrors lm2ref.model_dir.expected_tensors).
#include <algorithm>

#include "lm2/runtime/model_files.h"
#include "model/tensor_names.h"

namespace lm2::runtime {

std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c) {
  const int64_t d = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  const int64_t q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  std::vector<TensorSpec> out = {{"model.embed_tokens.weight", {v, d}}, {"model.norm.weight", {d}}};
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {v, d}});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerTensorNames n(i);
    out.push_back({n.q_proj(), {q_out, d}});
    out.push_back({n.k_proj(), {kv_out, d}});
    out.push_back({n.v_proj(), {kv_out, d}});
    out.push_back({n.o_proj(), {d, q_out}});
    out.push_back({n.gate_proj(), {f, d}});
    out.push_back({n.up_proj(), {f, d}});
    out.push_back({n.down_proj(), {d, f}});
    out.push_back({n.input_norm(), {d}});
    out.push_back({n.post_norm(), {d}});
    if (c.layer_has_memory(i)) {
      for (const char* w : {"read_q", "read_k", "read_v", "write_v"}) out.push_back({n.memory_weight(w), {d, d}});
      for (const char* g : {"out_gate", "in_gate", "forget_gate"}) {
        out.push_back({n.memory_weight(g), {d, d}});
        out.push_back({n.memory_bias(g), {d}});
      }
      if (c.memory_learned_init) out.push_back({n.memory_init(), {c.memory_slots, d}});
    }
  }
  std::sort(out.begin(), out.end(), [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });
  return out;
}

}  // namespace lm2::runtime
