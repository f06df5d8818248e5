// The whole LM2 forward on the CPU (docs/lm2-spec.md), over the ops of cpu_ops.h.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <cblas.h>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_weights.h"
#include "lm2/runtime/cpu_backend.h"

namespace lm2::runtime {
namespace cpu {
namespace {

inline std::size_t Z(int64_t v) { return static_cast<std::size_t>(v); }

struct LayerState {
  std::vector<float> k_cache, v_cache;  // [S, Hkv*Dh], grown as the context grows
  // Memory layers only:
  std::vector<float> bank;              // M [N, d], fixed during a segment
  std::vector<float> mem_k, mem_v;      // memory K/V of the open segment [N, d]
  std::vector<float> mass;              // Σ_t A      [Hm, N]
  std::vector<float> acc;               // Σ_t Aᵀ C   [N, d] (head j in columns j*dh..)
};

// Scratch buffers of one Forward, kept in the state so decode does not allocate.
struct Scratch {
  std::vector<float> h, x, q, attn_out, a, mq, mattn, e, gate, offer, ffn_gate, ffn_up, logits_in;
  std::vector<int64_t> positions;
};

class CpuState final : public SequenceState {
 public:
  explicit CpuState(const void* owner) : owner_(owner) {}
  int64_t context_length() const override { return pos_; }
  bool segment_open() const override { return segment_open_; }
  int64_t segment_tokens() const override { return segment_open_ ? segment_tokens_ : 0; }

  const void* owner_;
  std::vector<LayerState> layers_;
  int64_t pos_ = 0;
  bool segment_open_ = false;
  int64_t segment_tokens_ = 0;
  Scratch scratch_;
};

void Resize(std::vector<float>& v, int64_t n) {
  if (v.size() < Z(n)) v.resize(Z(n));
}

class CpuModel final : public Model {
 public:
  explicit CpuModel(std::unique_ptr<CpuWeights> w) : w_(std::move(w)), cfg_(w_->files->config()) {}

  const ModelConfig& config() const override { return cfg_; }
  const std::string& fingerprint() const override { return w_->files->Fingerprint(); }
  std::string backend_name() const override { return "cpu"; }

  bool OwnsState(const SequenceState& state) const override {
    const auto* s = dynamic_cast<const CpuState*>(&state);
    return s != nullptr && s->owner_ == this;
  }

  Result<std::unique_ptr<SequenceState>> NewState() const override {
    auto s = std::make_unique<CpuState>(this);
    s->layers_.resize(Z(cfg_.num_layers));
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size;
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      const LayerWeights& lw = w_->layers[Z(i)];
      if (!lw.has_memory) continue;
      std::vector<float>& bank = s->layers_[Z(i)].bank;
      bank.assign(Z(N * d), 0.0f);
      if (lw.memory.init != nullptr) {
        std::copy(lw.memory.init, lw.memory.init + N * d, bank.begin());
      } else {
        for (int64_t n = 0; n < N; ++n) bank[Z(n * d + n % d)] = 1.0f;  // row n = e_{n mod d}
      }
    }
    return std::unique_ptr<SequenceState>(std::move(s));
  }

  Status Forward(SequenceState& base, std::span<const int32_t> tokens, LogitsMode mode,
                 std::vector<float>* logits) const override {
    LM2_ASSIGN_OR_RETURN(CpuState* s, Own(base));
    LM2_RETURN_IF_ERROR(CheckForward(s->pos_, tokens, mode, logits));
    const auto T = static_cast<int64_t>(tokens.size());
    if (!s->segment_open_) BeginSegment(*s);
    if (T == 0) {
      if (logits != nullptr) logits->clear();
      return Status::Ok();
    }
    RunLayers(*s, tokens, mode);
    s->pos_ += T;
    s->segment_tokens_ += T;
    if (mode != LogitsMode::kNone) ComputeLogits(*s, T, mode, logits);
    return Status::Ok();
  }

  Status EndSegment(SequenceState& base) const override {
    LM2_ASSIGN_OR_RETURN(CpuState* s, Own(base));
    if (!s->segment_open_) return Status::Ok();
    if (s->segment_tokens_ > 0) {
      const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size, Hm = cfg_.memory_heads;
      std::vector<float> u(Z(N * d)), in_pre(Z(N * d)), forget_pre(Z(N * d));
      for (int64_t i = 0; i < cfg_.num_layers; ++i) {
        const LayerWeights& lw = w_->layers[Z(i)];
        if (!lw.has_memory) continue;
        LayerState& ls = s->layers_[Z(i)];
        WriteUpdate(ls.mass.data(), ls.acc.data(), N, d, Hm, u.data());
        Linear(u.data(), N, d, lw.memory.in_gate_w, d, in_pre.data());
        AddBias(in_pre.data(), N, d, lw.memory.in_gate_b);
        Linear(u.data(), N, d, lw.memory.forget_gate_w, d, forget_pre.data());
        AddBias(forget_pre.data(), N, d, lw.memory.forget_gate_b);
        GatedMemoryUpdate(u.data(), in_pre.data(), forget_pre.data(), N * d, ls.bank.data());
      }
    }
    s->segment_open_ = false;
    s->segment_tokens_ = 0;
    return Status::Ok();
  }

  void ResetContext(SequenceState& base) const override {
    auto* s = dynamic_cast<CpuState*>(&base);
    if (s == nullptr || s->owner_ != this) return;
    s->pos_ = 0;  // the caches' contents past pos_ are dead; their capacity is reused
  }

  Status ExportBanks(const SequenceState& base, MemoryState& out) const override {
    const auto* s = dynamic_cast<const CpuState*>(&base);
    if (s == nullptr || s->owner_ != this) return Status::InvalidArgument("state belongs to another model");
    if (s->segment_open_) {
      return Status::FailedPrecondition("ExportMemory: a segment is open; end it first");
    }
    ShapeExport(out);
    for (MemoryLayer& ml : out.layers) {
      const std::vector<float>& bank = s->layers_[Z(ml.layer)].bank;
      std::copy(bank.begin(), bank.end(), ml.data.begin());
    }
    return Status::Ok();
  }

  Result<std::vector<std::vector<float>>> SegmentReadMass(const SequenceState& base) const override {
    const auto* s = dynamic_cast<const CpuState*>(&base);
    if (s == nullptr || s->owner_ != this) return Status::InvalidArgument("state belongs to another model");
    if (!s->segment_open_) return Status::FailedPrecondition("SegmentReadMass: no segment is open");
    std::vector<std::vector<float>> out;
    for (int64_t layer : cfg_.memory_layers) out.push_back(ReadMassPerSlot(s->layers_[Z(layer)].mass.data()));
    return out;
  }

  Status ImportMemory(SequenceState& base, const MemoryState& memory) const override {
    LM2_ASSIGN_OR_RETURN(CpuState* s, Own(base));
    if (s->segment_open_) return Status::FailedPrecondition("ImportMemory: a segment is open");
    LM2_RETURN_IF_ERROR(CheckImport(memory));
    for (const MemoryLayer& ml : memory.layers) s->layers_[Z(ml.layer)].bank = ml.data;
    return Status::Ok();
  }

 private:
  Result<CpuState*> Own(SequenceState& base) const {
    auto* s = dynamic_cast<CpuState*>(&base);
    if (s == nullptr || s->owner_ != this) return Status::InvalidArgument("state belongs to another model");
    return s;
  }

  // Opens a segment: memory K/V from the bank as it is now, write sums zeroed.
  void BeginSegment(CpuState& s) const {
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size;
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      const LayerWeights& lw = w_->layers[Z(i)];
      if (!lw.has_memory) continue;
      LayerState& ls = s.layers_[Z(i)];
      ls.mem_k.resize(Z(N * d));
      ls.mem_v.resize(Z(N * d));
      Linear(ls.bank.data(), N, d, lw.memory.read_k, d, ls.mem_k.data());
      Linear(ls.bank.data(), N, d, lw.memory.read_v, d, ls.mem_v.data());
      ls.mass.assign(Z(cfg_.memory_heads * N), 0.0f);
      ls.acc.assign(Z(N * d), 0.0f);
    }
    s.segment_open_ = true;
    s.segment_tokens_ = 0;
  }

  // The layers over `tokens`, the final hidden states of the rows `mode` reads left in sc.h:
  // the last layer takes its attention output, output gate and FFN for those rows only (the
  // last, or none), the K/V cache rows and write sums of every row as before.
  void RunLayers(CpuState& s, std::span<const int32_t> tokens, LogitsMode mode) const {
    const auto T = static_cast<int64_t>(tokens.size());
    const int64_t d = cfg_.hidden_size, H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, Dh = cfg_.head_dim;
    const int64_t F = cfg_.intermediate_size, N = cfg_.memory_slots, Hm = cfg_.memory_heads;
    const int64_t qdim = H * Dh, kvdim = Hkv * Dh, S = s.pos_ + T;
    const float eps = static_cast<float>(cfg_.rms_norm_eps);
    Scratch& sc = s.scratch_;
    Resize(sc.h, T * d);
    Resize(sc.x, T * d);
    Resize(sc.q, T * qdim);
    Resize(sc.attn_out, T * qdim);
    Resize(sc.a, T * d);
    Resize(sc.ffn_gate, T * F);
    Resize(sc.ffn_up, T * F);
    sc.positions.resize(Z(T));
    std::iota(sc.positions.begin(), sc.positions.end(), s.pos_);
    if (cfg_.has_memory()) {
      Resize(sc.mq, T * d);
      Resize(sc.mattn, Hm * T * N);
      Resize(sc.e, T * d);
      Resize(sc.gate, T * d);
      Resize(sc.offer, T * d);
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* row = w_->embed + static_cast<int64_t>(tokens[Z(t)]) * d;
      std::copy(row, row + d, sc.h.begin() + t * d);
    }
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      const LayerWeights& lw = w_->layers[Z(i)];
      LayerState& ls = s.layers_[Z(i)];
      // The rows [r0, T) this layer takes past its attention.
      const bool last = i + 1 == cfg_.num_layers;
      const int64_t r0 = !last || mode == LogitsMode::kAll ? 0 : mode == LogitsMode::kLast ? T - 1 : T;
      const int64_t nr = T - r0;
      Resize(ls.k_cache, S * kvdim);
      Resize(ls.v_cache, S * kvdim);
      float* k_new = ls.k_cache.data() + s.pos_ * kvdim;
      float* v_new = ls.v_cache.data() + s.pos_ * kvdim;

      RmsNorm(sc.h.data(), lw.input_norm, T, d, eps, sc.x.data());
      Linear(sc.x.data(), T, d, lw.q_proj, qdim, sc.q.data());
      Linear(sc.x.data(), T, d, lw.k_proj, kvdim, k_new);
      Linear(sc.x.data(), T, d, lw.v_proj, kvdim, v_new);
      Rope(sc.q.data(), T, H, Dh, sc.positions.data(), cfg_.rope_theta);
      Rope(k_new, T, Hkv, Dh, sc.positions.data(), cfg_.rope_theta);
      // Rows r0 ... of q are the last nr positions of the cache (row r0's output in row r0).
      if (nr > 0) {
        CausalAttention(sc.q.data() + r0 * qdim, ls.k_cache.data(), ls.v_cache.data(), nr, S, H, Hkv, Dh,
                        sc.attn_out.data() + r0 * qdim);
      }
      Linear(sc.attn_out.data() + r0 * qdim, nr, qdim, lw.o_proj, d, sc.a.data() + r0 * d);

      float* h = sc.h.data() + r0 * d;
      if (lw.has_memory) {  // the read and write over every row, the output gate over rows r0 ...
        const MemoryWeights& mw = lw.memory;
        Linear(sc.x.data(), T, d, mw.read_q, d, sc.mq.data());
        MemoryRead(sc.mq.data(), ls.mem_k.data(), ls.mem_v.data(), T, N, d, Hm, sc.mattn.data(),
                   sc.e.data());
        const float* e = sc.e.data() + r0 * d;
        float* gate = sc.gate.data() + r0 * d;
        Linear(e, nr, d, mw.out_gate_w, d, gate);
        AddBias(gate, nr, d, mw.out_gate_b);
        GatedResidual(h, sc.a.data() + r0 * d, gate, e, nr * d);
        Linear(sc.x.data(), T, d, mw.write_v, d, sc.offer.data());
        AccumulateWrite(sc.mattn.data(), sc.offer.data(), T, N, d, Hm, ls.mass.data(), ls.acc.data());
      } else {
        AddInPlace(h, sc.a.data() + r0 * d, nr * d);
      }

      RmsNorm(h, lw.post_norm, nr, d, eps, sc.x.data());
      Linear(sc.x.data(), nr, d, lw.gate_proj, F, sc.ffn_gate.data());
      Linear(sc.x.data(), nr, d, lw.up_proj, F, sc.ffn_up.data());
      SwiGlu(sc.ffn_gate.data(), sc.ffn_up.data(), nr * F, sc.ffn_gate.data());
      Linear(sc.ffn_gate.data(), nr, F, lw.down_proj, d, h, /*accumulate=*/true);
    }
  }

  void ComputeLogits(CpuState& s, int64_t T, LogitsMode mode, std::vector<float>* logits) const {
    const int64_t d = cfg_.hidden_size, V = cfg_.vocab_size;
    const int64_t first = mode == LogitsMode::kLast ? T - 1 : 0;
    const int64_t rows = T - first;
    Scratch& sc = s.scratch_;
    Resize(sc.logits_in, rows * d);
    RmsNorm(sc.h.data() + first * d, w_->final_norm, rows, d, static_cast<float>(cfg_.rms_norm_eps),
            sc.logits_in.data());
    logits->resize(Z(rows * V));
    Linear(sc.logits_in.data(), rows, d, w_->lm_head, V, logits->data());
  }

  std::unique_ptr<CpuWeights> w_;
  const ModelConfig& cfg_;
};

}  // namespace
}  // namespace cpu

Result<std::unique_ptr<Model>> LoadCpuModel(std::shared_ptr<const ModelFiles> files,
                                            const CpuOptions& options) {
  if (files == nullptr) return Status::InvalidArgument("LoadCpuModel: no model files");
  if (options.threads < 0) return Status::InvalidArgument("CpuOptions::threads must be >= 0");
  if (options.threads > 0) openblas_set_num_threads(options.threads);
  const ModelConfig& cfg = files->config();
  // BLAS takes int dimensions: refuse shapes whose products could overflow them.
  const int64_t kMax = int64_t{1} << 30;
  if (cfg.vocab_size * cfg.hidden_size >= kMax * 2 || cfg.max_position_embeddings * cfg.num_heads >= kMax ||
      cfg.memory_slots * cfg.hidden_size >= kMax * 2) {
    return Status::Unimplemented("model dimensions exceed what the CPU backend's BLAS calls address");
  }
  LM2_ASSIGN_OR_RETURN(auto weights, cpu::CpuWeights::Load(std::move(files)));
  return std::unique_ptr<Model>(std::make_unique<cpu::CpuModel>(std::move(weights)));
}

}  // namespace lm2::runtime
