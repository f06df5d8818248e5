#include "cpu/cpu_weights.h"

#include <cstdint>
#include <string>

#include "model/tensor_names.h"

namespace lm2::runtime::cpu {
namespace {

class Binder {
 public:
  explicit Binder(CpuWeights& w) : w_(w) {}

  // The fp32 data of tensor `name`: in place when stored as aligned F32, else widened.
  Status Bind(const std::string& name, const float** out) {
    auto view = w_.files->Tensor(name);
    if (!view.ok()) return view.status();
    const TensorView& v = *view;
    const auto addr = reinterpret_cast<std::uintptr_t>(v.data);
    if (v.dtype == DType::kF32 && addr % alignof(float) == 0) {
      *out = static_cast<const float*>(v.data);
      return Status::Ok();
    }
    const auto n = static_cast<std::size_t>(NumElements(v.shape));
    std::vector<float>& buf = w_.owned.emplace_back(n);
    ConvertToF32(v.dtype, v.data, buf.data(), n);
    *out = buf.data();
    return Status::Ok();
  }

 private:
  CpuWeights& w_;
};

}  // namespace

Result<std::unique_ptr<CpuWeights>> CpuWeights::Load(std::shared_ptr<const ModelFiles> files) {
  auto w = std::make_unique<CpuWeights>();
  w->files = std::move(files);
  const ModelConfig& cfg = w->files->config();
  Binder b(*w);
  LM2_RETURN_IF_ERROR(b.Bind("model.embed_tokens.weight", &w->embed));
  LM2_RETURN_IF_ERROR(b.Bind("model.norm.weight", &w->final_norm));
  if (cfg.tie_word_embeddings) {
    w->lm_head = w->embed;
  } else {
    LM2_RETURN_IF_ERROR(b.Bind("lm_head.weight", &w->lm_head));
  }
  w->layers.resize(static_cast<std::size_t>(cfg.num_layers));
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    LayerWeights& l = w->layers[static_cast<std::size_t>(i)];
    const LayerTensorNames n(i);
    LM2_RETURN_IF_ERROR(b.Bind(n.q_proj(), &l.q_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.k_proj(), &l.k_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.v_proj(), &l.v_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.o_proj(), &l.o_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.gate_proj(), &l.gate_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.up_proj(), &l.up_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.down_proj(), &l.down_proj));
    LM2_RETURN_IF_ERROR(b.Bind(n.input_norm(), &l.input_norm));
    LM2_RETURN_IF_ERROR(b.Bind(n.post_norm(), &l.post_norm));
    l.has_memory = cfg.layer_has_memory(i);
    if (!l.has_memory) continue;
    MemoryWeights& mw = l.memory;
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("read_q"), &mw.read_q));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("read_k"), &mw.read_k));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("read_v"), &mw.read_v));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("write_v"), &mw.write_v));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("out_gate"), &mw.out_gate_w));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_bias("out_gate"), &mw.out_gate_b));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("in_gate"), &mw.in_gate_w));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_bias("in_gate"), &mw.in_gate_b));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_weight("forget_gate"), &mw.forget_gate_w));
    LM2_RETURN_IF_ERROR(b.Bind(n.memory_bias("forget_gate"), &mw.forget_gate_b));
    if (cfg.memory_learned_init) LM2_RETURN_IF_ERROR(b.Bind(n.memory_init(), &mw.init));
  }
  return w;
}

}  // namespace lm2::runtime::cpu
