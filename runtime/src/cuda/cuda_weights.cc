#include "cuda/cuda_weights.h"

#include <cstring>
#include <initializer_list>
#include <utility>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_resources.h"
#include "model/tensor_names.h"
#include "lm2/runtime/tensor.h"

namespace lm2::runtime::cuda {

uint16_t FloatToBf16Bits(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

namespace {

// A synchronous host-to-device copy, clear of other threads' graph captures.
Status CopyIn(void* dst, const void* src, std::size_t bytes) {
  DeviceCallScope scope(CaptureExclusion());
  return CudaStatus(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy(weights)");
}

class Uploader {
 public:
  explicit Uploader(const ModelFiles& files, CudaWeights& w) : files_(files), w_(w) {}

  // A matrix as bf16: stored BF16 bytes are copied as they are; F32 and F16 are widened
  // to fp32 (exactly) and rounded to bf16 on the host, one tensor at a time.
  Status Matrix(const std::string& name, const __nv_bfloat16** out) { return Stacked({{name, out}}, nullptr); }

  // Matrices stacked row-wise in one buffer (all [rows_i, in] with the same in), in the
  // order given; each pointer is set to its block, `stacked` (if not null) to the whole.
  Status Stacked(std::initializer_list<std::pair<std::string, const __nv_bfloat16**>> parts,
                 const __nv_bfloat16** stacked) {
    std::vector<TensorView> views;
    std::size_t total = 0;
    for (const auto& part : parts) {
      LM2_ASSIGN_OR_RETURN(TensorView v, files_.Tensor(part.first));
      total += static_cast<std::size_t>(NumElements(v.shape));
      views.push_back(v);
    }
    LM2_ASSIGN_OR_RETURN(auto buf, DeviceBuffer<__nv_bfloat16>::Allocate(total));
    std::size_t offset = 0;
    auto part = parts.begin();
    for (const TensorView& v : views) {
      const auto n = static_cast<std::size_t>(NumElements(v.shape));
      __nv_bfloat16* dst = buf.data() + offset;
      if (v.dtype == DType::kBF16) {
        LM2_RETURN_IF_ERROR(CopyIn(dst, v.data, n * sizeof(uint16_t)));
      } else {
        widened_.resize(n);
        ConvertToF32(v.dtype, v.data, widened_.data(), n);
        rounded_.resize(n);
        for (std::size_t i = 0; i < n; ++i) rounded_[i] = FloatToBf16Bits(widened_[i]);
        LM2_RETURN_IF_ERROR(CopyIn(dst, rounded_.data(), n * sizeof(uint16_t)));
      }
      *(part++)->second = dst;
      offset += n;
    }
    if (stacked != nullptr) *stacked = buf.data();
    w_.device_bytes += buf.bytes();
    w_.matrices.push_back(std::move(buf));
    return Status::Ok();
  }

  // A vector (or the learned memory init) as fp32, exactly as stored.
  Status Vector(const std::string& name, const float** out) {
    LM2_ASSIGN_OR_RETURN(TensorView v, files_.Tensor(name));
    const auto n = static_cast<std::size_t>(NumElements(v.shape));
    widened_.resize(n);
    ConvertToF32(v.dtype, v.data, widened_.data(), n);
    return Upload(widened_, out);
  }

  // Host fp32 data to a new device buffer.
  Status Upload(const std::vector<float>& host, const float** out) {
    LM2_ASSIGN_OR_RETURN(auto buf, DeviceBuffer<float>::Allocate(host.size()));
    LM2_RETURN_IF_ERROR(CopyIn(buf.data(), host.data(), host.size() * sizeof(float)));
    *out = buf.data();
    w_.device_bytes += buf.bytes();
    w_.vectors.push_back(std::move(buf));
    return Status::Ok();
  }

 private:
  const ModelFiles& files_;
  CudaWeights& w_;
  std::vector<float> widened_;   // reused across tensors: one conversion buffer
  std::vector<uint16_t> rounded_;
};

}  // namespace

Result<std::unique_ptr<CudaWeights>> CudaWeights::Upload(const ModelFiles& files, int device) {
  auto w = std::make_unique<CudaWeights>();
  w->device = device;
  const ModelConfig& cfg = files.config();
  Uploader up(files, *w);
  LM2_RETURN_IF_ERROR(up.Matrix("model.embed_tokens.weight", &w->embed));
  LM2_RETURN_IF_ERROR(up.Vector("model.norm.weight", &w->final_norm));
  if (cfg.tie_word_embeddings) {
    w->lm_head = w->embed;
  } else {
    LM2_RETURN_IF_ERROR(up.Matrix("lm_head.weight", &w->lm_head));
  }
  // Identity initial bank (row n = e_{n mod d}), shared by every memory layer without a
  // learned init.
  const float* identity = nullptr;
  if (cfg.has_memory() && !cfg.memory_learned_init) {
    const int64_t N = cfg.memory_slots, d = cfg.hidden_size;
    std::vector<float> host(static_cast<std::size_t>(N * d), 0.0f);
    for (int64_t n = 0; n < N; ++n) host[static_cast<std::size_t>(n * d + n % d)] = 1.0f;
    LM2_RETURN_IF_ERROR(up.Upload(host, &identity));
  }
  w->layers.resize(static_cast<std::size_t>(cfg.num_layers));
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    CudaLayerWeights& l = w->layers[static_cast<std::size_t>(i)];
    const LayerTensorNames n(i);
    CudaMemoryWeights& mw = l.memory;
    l.has_memory = cfg.layer_has_memory(i);
    const int64_t qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
    if (l.has_memory) {
      LM2_RETURN_IF_ERROR(up.Stacked({{n.q_proj(), &l.q_proj},
                                      {n.k_proj(), &l.k_proj},
                                      {n.v_proj(), &l.v_proj},
                                      {n.memory_weight("read_q"), &mw.read_q},
                                      {n.memory_weight("write_v"), &mw.write_v}},
                                     &l.x_proj));
      l.x_proj_rows = qkv_rows + 2 * cfg.hidden_size;
    } else {
      LM2_RETURN_IF_ERROR(up.Stacked({{n.q_proj(), &l.q_proj}, {n.k_proj(), &l.k_proj}, {n.v_proj(), &l.v_proj}},
                                     &l.x_proj));
      l.x_proj_rows = qkv_rows;
    }
    if (l.has_memory && cfg.num_heads * cfg.head_dim == cfg.hidden_size) {
      LM2_RETURN_IF_ERROR(
          up.Stacked({{n.o_proj(), &l.o_proj}, {n.memory_weight("out_gate"), &mw.out_gate_w}}, &l.o_out_gate));
    } else {
      LM2_RETURN_IF_ERROR(up.Matrix(n.o_proj(), &l.o_proj));
    }
    LM2_RETURN_IF_ERROR(up.Stacked({{n.gate_proj(), &l.gate_proj}, {n.up_proj(), &l.up_proj}}, &l.gate_up));
    LM2_RETURN_IF_ERROR(up.Matrix(n.down_proj(), &l.down_proj));
    LM2_RETURN_IF_ERROR(up.Vector(n.input_norm(), &l.input_norm));
    LM2_RETURN_IF_ERROR(up.Vector(n.post_norm(), &l.post_norm));
    if (!l.has_memory) continue;
    LM2_RETURN_IF_ERROR(
        up.Stacked({{n.memory_weight("read_k"), &mw.read_k}, {n.memory_weight("read_v"), &mw.read_v}}, &mw.read_kv));
    if (l.o_out_gate == nullptr) LM2_RETURN_IF_ERROR(up.Matrix(n.memory_weight("out_gate"), &mw.out_gate_w));
    LM2_RETURN_IF_ERROR(up.Vector(n.memory_bias("out_gate"), &mw.out_gate_b));
    LM2_RETURN_IF_ERROR(up.Stacked(
        {{n.memory_weight("in_gate"), &mw.in_gate_w}, {n.memory_weight("forget_gate"), &mw.forget_gate_w}}, &mw.gates));
    LM2_RETURN_IF_ERROR(up.Vector(n.memory_bias("in_gate"), &mw.in_gate_b));
    LM2_RETURN_IF_ERROR(up.Vector(n.memory_bias("forget_gate"), &mw.forget_gate_b));
    if (cfg.memory_learned_init) {
      LM2_RETURN_IF_ERROR(up.Vector(n.memory_init(), &mw.init));
    } else {
      mw.init = identity;
    }
  }
  return w;
}

}  // namespace lm2::runtime::cuda
