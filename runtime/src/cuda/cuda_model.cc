// The whole LM2 forward on one CUDA device (docs/cuda.md), over the ops of cuda_ops.h.
//
// The same sequence of ops as cpu/cpu_model.cc, on device buffers. Each state owns a
// stream and a cuBLAS handle; every public call enqueues its work on the state's stream
// and synchronises once before returning, so a device fault is reported by the call that
// caused it. A failure after device work began (a fault, out of memory mid-forward) marks
// the state unusable: its write sums may hold half a step, and continuing would compute a
// wrong memory silently.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <latch>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/cuda_resources.h"
#include "cuda/cuda_weights.h"
#include "cuda/kernel_modules.h"
#include "lm2/runtime/cuda_backend.h"
#include "lm2/runtime/cuda_devices.h"

namespace lm2::runtime {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

inline std::size_t Z(int64_t v) { return static_cast<std::size_t>(v); }

// Each cuBLAS handle's workspace (a state's, set on its handle: graph capture needs one).
constexpr std::size_t kCublasWorkspace = std::size_t{8} << 20;

// cuBLAS GEMMs over a chunk's rows run over a multiple of this many rows (GemmRows), and the
// warm-up at load runs every such count up to kWarmGemmRows.
constexpr int64_t kGemmRowStep = 64;
constexpr int64_t kWarmGemmRows = 512;

// The rows of a chunk whose final hidden states the call reads (the LM head's input): each
// row, the chunk's last (a prompt's logits), or none (a chunk before a prompt's last, or a
// call without logits). The last layer computes its attention output, output gate and FFN
// for those rows only (RunLayers); every layer's K/V cache rows and write sums are made for
// the whole chunk either way.
enum class ChunkRows { kAll, kLast, kNone };

// A cuBLAS handle with a workspace of its own set on it: GEMMs on different streams at once
// need a handle (and workspace) each.
struct Blas {
  CublasHandle handle;
  DeviceBuffer<char> workspace;

  static Result<Blas> Create() {
    Blas b;
    LM2_ASSIGN_OR_RETURN(b.handle, CublasHandle::Create());
    LM2_ASSIGN_OR_RETURN(b.workspace, DeviceBuffer<char>::Allocate(kCublasWorkspace));
    LM2_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(b.handle.get(), b.workspace.data(), kCublasWorkspace));
    return b;
  }
  cublasHandle_t get() const { return handle.get(); }
  bool empty() const { return handle.get() == nullptr; }
};

// A stream and the cuBLAS handle (with its workspace) whose GEMMs run on it. Making them cost
// a new state ~0.15 ms of its 0.3-0.6 (H200: two streams and a handle; a new handle's first
// GEMM also takes 0.2-0.3 ms more than its later ones, lm2_cuda_bench's setup costs), so a
// state's lanes go back to its model's LanePool when the state ends, and new states take
// kept ones first.
struct Lane {
  CudaStream stream;
  Blas blas;  // empty for a side stream that has run no GEMM
};

// The lanes of ended states, kept for new ones (thread-safe; shared by the model and its
// states, so that a state ending after its model still finds it).
class LanePool {
 public:
  // A kept lane, else a new stream. With `blas`, one with a handle if any is kept (else a
  // handle is made for it); without, one without a handle first, so that handles go where
  // they are wanted.
  Result<Lane> Take(bool blas) {
    Lane lane;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = std::find_if(kept_.rbegin(), kept_.rend(), [&](const Lane& l) { return l.blas.empty() != blas; });
      if (it == kept_.rend() && !kept_.empty()) it = kept_.rbegin();
      if (it != kept_.rend()) {
        lane = std::move(*it);
        kept_.erase(std::next(it).base());
      }
    }
    if (lane.stream.get() == nullptr) {
      LM2_ASSIGN_OR_RETURN(lane.stream, CudaStream::Create());
    }
    if (blas && lane.blas.empty()) {
      LM2_ASSIGN_OR_RETURN(lane.blas, Blas::Create());
    }
    return lane;
  }

  // Keeps `lane`, whose stream has no work left, up to kKept lanes; else it is destroyed on
  // return, outside the lock (freeing its workspace waits for the device).
  void Give(Lane lane) {
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_.size() < kKept) kept_.push_back(std::move(lane));
  }

 private:
  static constexpr std::size_t kKept = 16;  // a state holds two: eight states' worth
  std::mutex mu_;
  std::vector<Lane> kept_;
};

struct LayerState {
  float* k_cache = nullptr;  // this layer's KV cache [capacity, Hkv*Dh] in CudaState::kv_cache_
  float* v_cache = nullptr;
  // Memory layers only ([N, d] unless said):
  DeviceBuffer<float> bank;              // M, fixed during a segment
  DeviceBuffer<bf16> own_kv;             // memory K then V of this bank [2, N, d] (MemoryKv), made
                                         // for a segment on a bank not the model's initial one
  const bf16* mem_k = nullptr;           // the open segment's memory K / V (bf16: read every token):
  const bf16* mem_v = nullptr;           // own_kv's halves, or the model's for the initial bank
  DeviceBuffer<float> mass;              // Σ_t A [Hm, N]
  DeviceBuffer<float> acc;               // Σ_t Aᵀ C (decode tokens join it when flushed)
  // Decode tokens staged for the write sums (FlushWrites), in one of MemoryStage's forms:
  // where the model stages tokens (stages_tokens_), their bf16 queries, offers and softmax
  // shifts (this layer's part of CudaState::staged_tokens_; their masses join with them),
  // else their probabilities [flush, Hm, N] and write offers [flush, d] (16 MiB at the
  // paper's shape and 64 tokens; their masses join at once).
  float* staged = nullptr;
  DeviceBuffer<float> pending_attn;
  DeviceBuffer<float> pending_offer;
};

// Per-call scratch, grown to the longest chunk seen (decode keeps it at one row).
struct Scratch {
  DeviceBuffer<float> h;         // the residual stream [T, d]
  DeviceBuffer<float> proj;      // [T, x_proj_rows]: q | k | v | memory q | write offer
  DeviceBuffer<float> q, attn_out, a, mattn, e, gate, gate_up, logits;
  DeviceBuffer<float> scores;    // [H, T, S] of the GEMM attention path
  DeviceBuffer<float> read_partial;  // the decode memory read's partial sums
  DeviceBuffer<float> attn_split;    // the decode attention's key-range partials and counters (zero between calls)
  DeviceBuffer<bf16> read_b;     // the multi-token memory read's bf16 operands (MemoryReadScratch)
  DeviceBuffer<float> read_stats;  // the tiled multi-token read's softmax statistics (MemoryReadWriteScratch)
  DeviceBuffer<float> write_u;   // the segment write's update u [N, d]
  DeviceBuffer<float> write_gates;  // and its two gates' pre-activations [2, N, d]
  DeviceBuffer<bf16> xb;         // a normed input in bf16, shared by the GEMMs that read it
  DeviceBuffer<bf16> yb;         // other GEMM inputs rounded to bf16
  DeviceBuffer<bf16> kv_b;       // tiled attention: a layer's KV cache rows [0, S) in bf16, K then V
  DeviceBuffer<int32_t> ids;
  DeviceBuffer<int64_t> positions;
  DeviceBuffer<float2> rope;  // each row's rotary factors [rows, head_dim / 2], for all the layers
  DeviceBuffer<int32_t> next_ids;  // sampled decode steps: each row's token
  DeviceBuffer<int64_t> step_in;   // a decode step's inputs (StepInputs)
  // Sampled decode steps (SampleRows): the rules, their penalty ids and the sort's buffers.
  DeviceBuffer<DeviceTokenRule> rules;
  DeviceBuffer<int32_t> history;
  DeviceBuffer<float> sample_keys, sorted_keys;
  DeviceBuffer<int32_t> sample_ids, sorted_ids, segments;
  DeviceBuffer<SampleRowPlan> sample_plans;
  DeviceBuffer<char> sort_temp;
  // ForwardBatch's pointer table (BatchTable), on the device and as last uploaded.
  DeviceBuffer<void*> table;
  std::vector<void*> table_host;
};

// The per-session device pointers of a batched decode step, one array (Scratch::table):
// per layer a block of B pointers each to the sessions' KV cache K, KV cache V, memory K,
// memory V, slot masses, staged probabilities, staged offers and staged tokens (the memory
// ones null in layers without memory, the staging ones in the form the model does not use).
struct BatchTable {
  void** base = nullptr;
  int64_t B = 0;
  // The step's inputs (StepInputs, uploaded in one copy): each row's token, position and
  // write-staging slot, and the greedy picks' keys (zero until the LM head adds them).
  const int32_t* ids = nullptr;
  const int64_t* positions = nullptr;
  const int64_t* slots = nullptr;
  uint64_t* keys = nullptr;
  // The most keys a row's self-attention sees (its position + 1): the split decode
  // attention's grid is sized for it (AttentionDecodeSplitGrid).
  int64_t max_keys = 0;
  static constexpr int64_t kArrays = 8;
  void** Array(int64_t layer, int64_t k) const { return base + (layer * kArrays + k) * B; }
  float* const* KCaches(int64_t i) const { return reinterpret_cast<float* const*>(Array(i, 0)); }
  float* const* VCaches(int64_t i) const { return reinterpret_cast<float* const*>(Array(i, 1)); }
  const bf16* const* MemK(int64_t i) const { return reinterpret_cast<const bf16* const*>(Array(i, 2)); }
  const bf16* const* MemV(int64_t i) const { return reinterpret_cast<const bf16* const*>(Array(i, 3)); }
  float* const* Mass(int64_t i) const { return reinterpret_cast<float* const*>(Array(i, 4)); }
  float* const* PendingAttn(int64_t i) const { return reinterpret_cast<float* const*>(Array(i, 5)); }
  float* const* PendingOffer(int64_t i) const { return reinterpret_cast<float* const*>(Array(i, 6)); }
  float* const* Staged(int64_t i) const { return reinterpret_cast<float* const*>(Array(i, 7)); }
};

// Where a decode step's inputs sit in its one upload (int64 elements, B rows): positions,
// write-staging slots, the greedy picks' keys (uploaded as zeros), then the token ids as
// int32 (two per element).
struct StepInputs {
  int64_t B;
  int64_t positions = 0, slots = B, keys = 2 * B, ids = 3 * B;
  int64_t Elements() const { return 3 * B + (B + 1) / 2; }
};

class CudaState final : public SequenceState {
 public:
  CudaState(const void* owner, std::shared_ptr<LanePool> lanes) : owner_(owner), lanes_(std::move(lanes)) {}
  // Its two lanes go back to the model's pool once their streams are idle (not after a
  // device error: those streams' state is not known).
  ~CudaState() override {
    if (lanes_ == nullptr || broken_ || stream_.get() == nullptr || side_stream_.get() == nullptr) return;
    if (!stream_.Synchronize().ok() || !side_stream_.Synchronize().ok()) return;
    lanes_->Give({std::move(stream_), std::move(cublas_)});
    lanes_->Give({std::move(side_stream_), std::move(side_cublas_)});
  }
  CudaState(const CudaState&) = delete;
  CudaState& operator=(const CudaState&) = delete;
  int64_t context_length() const override { return pos_; }
  bool segment_open() const override { return segment_open_; }
  int64_t segment_tokens() const override { return segment_open_ ? segment_tokens_ : 0; }

  const void* owner_;
  std::shared_ptr<LanePool> lanes_;  // where stream_ and side_stream_ (with their handles) go back
  CudaStream stream_;
  CudaStream side_stream_;    // the memory reads beside attention (concurrent_memory_read)
  CudaEvent fork_, join_;     // ordering the side stream after / before the main one
  Blas cublas_;
  // The side stream's GEMMs: a segment's own memory K/V made beside the main stream's work
  // (KvPending, memory_kv_at_segment_end). Made with the first such segment.
  Blas side_cublas_;
  std::vector<LayerState> layers_;
  // Every layer's KV cache in one allocation [layers, 2 (K, V), kv_capacity_, Hkv*Dh]: a new
  // state's first prompt makes one device allocation for it, not two a layer.
  DeviceBuffer<float> kv_cache_;
  // Every memory layer's staged decode tokens (LayerState::staged), one after another,
  // StagedTokensFloats(write_flush_tokens, d, Hm) floats each (1 MiB at the paper's shape
  // and up to 128 tokens): one allocation and two memsets for a new state.
  DeviceBuffer<float> staged_tokens_;
  int64_t kv_capacity_ = 0;  // rows of every layer's k_cache / v_cache
  int64_t pos_ = 0;
  bool segment_open_ = false;
  int64_t segment_tokens_ = 0;
  // The banks are the model's initial ones (a new state): a segment opening on them reads
  // the model's memory K/V (CudaModel::initial_kv_) instead of computing its own.
  bool bank_initial_ = true;
  // The open segment reads the model's memory K/V (CudaModel::initial_kv_), set when it
  // opens; else its own (own_kv).
  bool kv_shared_ = false;
  // own_kv holds the memory K/V of the banks as they are now (made since they last
  // changed): a segment opening on them makes none. EndSegment makes them on the side stream
  // right after its write (CudaOptions::memory_kv_at_segment_end; kv_made_ records their
  // end, which the next segment's work and an import wait for); a segment's first forward
  // makes them otherwise (KvPending). Cleared when the banks change.
  bool kv_current_ = false;
  CudaEvent kv_made_;
  DeviceBuffer<bf16> bank_b_;  // a bank in bf16, the memory K/V GEMMs' input [N, d]
  // The open segment has added nothing to the write sums yet, and BeginSegment leaves mass
  // and acc as they were: the first tiled chunk stores its sums, any other first writer
  // zeroes them first (ZeroSums).
  bool sums_empty_ = false;
  int64_t staged_ = 0;       // decode tokens staged for the write sums, not yet flushed
  bool broken_ = false;      // a device error left the state inconsistent
  Scratch scratch_;
  PinnedBuffer<int32_t> ids_host_;
  PinnedBuffer<int64_t> positions_host_;
  PinnedBuffer<float> staging_;  // bank export and import: two pieces (TransferPieceFloats)
  CudaEvent transferred_[2];      // the device copy last enqueued on each staging piece
  PinnedBuffer<float> logits_host_;  // decode steps' logits
  PinnedBuffer<int32_t> next_host_;  // sampled decode steps' tokens
  PinnedBuffer<uint64_t> next_keys_host_;  // greedy decode steps' picks, as keys
  PinnedBuffer<int64_t> step_host_;  // a decode step's inputs as uploaded (StepInputs)
  PinnedBuffer<DeviceTokenRule> rules_host_;  // sampled decode steps' rules
  PinnedBuffer<int32_t> history_host_;        // and their distinct penalty ids
  CudaGraph decode_graph_;       // the last decode step captured with this state as the lead
  std::vector<const void*> decode_graph_key_;  // what it was captured over
  std::vector<const void*> decode_seen_key_;   // the key of the last step it led without a graph
};

// Makes the model's device current for the calling thread (CUDA's current device is
// per thread; a session may move between threads).
Status UseDevice(int device) { return CudaStatus(cudaSetDevice(device), "cudaSetDevice"); }

// A bank's memory K then V into kv [2, N, d] (bf16): bank_b = bf16(bank) (scratch, N x d),
// then both products in one batched GEMM (LinearPairToBf16).
Status MemoryKv(cublasHandle_t blas, const float* bank, bf16* bank_b, const CudaMemoryWeights& mw, int64_t N,
                int64_t d, bf16* kv, cudaStream_t st) {
  LM2_RETURN_IF_ERROR(ConvertF32ToBf16(bank, N * d, bank_b, st));
  return LinearPairToBf16(blas, bank_b, N, d, mw.read_kv, d, kv, st);
}

class CudaModel final : public Model {
 public:
  CudaModel(std::shared_ptr<const ModelFiles> files, std::unique_ptr<CudaWeights> w, const CudaOptions& options)
      : files_(std::move(files)), w_(std::move(w)), cfg_(files_->config()), options_(options) {
    // The most rows (up to the option) every layer's input width allows.
    gemv_rows_ = GemvRowsFor(options_.gemv_max_rows,
                             {cfg_.hidden_size, cfg_.num_heads * cfg_.head_dim, cfg_.intermediate_size});
    // Multi-token chunks read and write memory, and attend, tile by tile on tensor cores
    // where the head width and the device allow (mma.sync bf16: compute capability 8.0 and
    // later).
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, w_->device) != cudaSuccess) {
      (void)cudaGetLastError();
      major = 0;
    }
    tiled_memory_ = options_.tiled_memory && cfg_.has_memory() && major >= 8 &&
                    MemoryReadWriteSupported(cfg_.hidden_size, cfg_.memory_heads);
    tiled_attention_ = options_.tiled_attention && major >= 8 && CausalAttentionTiledSupported(cfg_.head_dim);
    stages_tokens_ = tiled_memory_ && DecodeStagesTokens(cfg_.hidden_size, cfg_.memory_heads);
  }

  // The weights go back to the device's memory pool, which then hands what it keeps unused
  // back to the driver (states still alive keep theirs).
  ~CudaModel() override {
    const int device = w_->device;
    w_.reset();
    lanes_.reset();  // the kept handles' workspaces (states still alive hold the pool on)
    TrimDevicePool(device);
  }
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  // The initial bank's memory K/V of every memory layer, which every new state's first
  // segment reads (CudaOptions::share_initial_memory_kv): made once at load, on a stream,
  // handle and workspace like a state's.
  Status PrepareInitialMemoryKv() {
    if (!cfg_.has_memory() || !options_.share_initial_memory_kv) return Status::Ok();
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size;
    LM2_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create());
    LM2_ASSIGN_OR_RETURN(Blas blas, Blas::Create());
    LM2_ASSIGN_OR_RETURN(auto bank_b, DeviceBuffer<bf16>::Allocate(Z(N * d)));
    std::vector<DeviceBuffer<bf16>> kv(Z(cfg_.num_layers));
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      const CudaLayerWeights& lw = w_->layers[Z(i)];
      if (!lw.has_memory) continue;
      LM2_ASSIGN_OR_RETURN(kv[Z(i)], DeviceBuffer<bf16>::Allocate(Z(2 * N * d)));
      LM2_RETURN_IF_ERROR(
          MemoryKv(blas.get(), lw.memory.init, bank_b.data(), lw.memory, N, d, kv[Z(i)].data(), stream.get()));
    }
    LM2_RETURN_IF_ERROR(stream.Synchronize());
    initial_kv_ = std::move(kv);
    return Status::Ok();
  }

  // One short turn on a throwaway state (CudaOptions::warm_up): a prompt long enough for
  // the multi-token paths, greedy steps across a memory-write flush, a sampled step, a step
  // with the logits copied out, the segment's end, a second segment's prompt (or token), and
  // prompts of every GEMM row count up to kWarmGemmRows. Its buffers (scratch for 512 rows:
  // ~90 MB at the paper's shape) go back to the memory pool for the first real state.
  Status WarmUp() const {
    LM2_ASSIGN_OR_RETURN(auto state, NewState());
    const int64_t max_pos = cfg_.max_position_embeddings;
    const int64_t steps = std::min<int64_t>(options_.write_flush_tokens + 1, std::max<int64_t>(max_pos - 2, 0));
    const int64_t prompt =
        std::max<int64_t>(1, std::min<int64_t>(options_.attention_gemm_min_tokens + 1, max_pos - steps - 1));
    std::vector<int32_t> tokens(static_cast<std::size_t>(prompt));
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = static_cast<int32_t>(static_cast<int64_t>(i) % cfg_.vocab_size);
    }
    std::vector<float> logits;
    LM2_RETURN_IF_ERROR(Forward(*state, tokens, LogitsMode::kLast, &logits));
    SequenceState* const one[] = {state.get()};
    std::vector<int32_t> next = {0};
    for (int64_t i = 0; i < steps; ++i) LM2_RETURN_IF_ERROR(ForwardBatchGreedy(one, std::vector<int32_t>(next), &next));
    if (state->context_length() + 2 <= max_pos) {
      const TokenRule rule{.temperature = 0.8f, .top_p = 0.9f, .repetition_penalty = 1.1f, .draw = 0.5,
                           .history = tokens};
      LM2_RETURN_IF_ERROR(ForwardBatchSample(one, std::vector<int32_t>(next), std::span(&rule, 1), &next));
      LM2_RETURN_IF_ERROR(Forward(*state, next, LogitsMode::kLast, &logits));
    }
    LM2_RETURN_IF_ERROR(EndSegment(*state));
    // A second segment opens on the committed bank with a prompt: its memory K/V made by the
    // state, beside the prompt's layers (the side stream's own cuBLAS handle).
    const int64_t context = state->context_length();
    if (context + prompt <= max_pos) {
      LM2_RETURN_IF_ERROR(Forward(*state, tokens, LogitsMode::kLast, &logits));
    } else if (context + 1 <= max_pos) {
      LM2_RETURN_IF_ERROR(Forward(*state, next, LogitsMode::kNone, nullptr));
    }
    // A prompt of each GEMM row count (GemmRows) up to kWarmGemmRows, so that no later prompt
    // up to that length makes a cuBLAS call the process has not made before.
    const int64_t longest = std::min({kWarmGemmRows, options_.max_chunk_tokens, max_pos});
    for (int64_t rows = kGemmRowStep; rows <= longest; rows += kGemmRowStep) {
      ResetContext(*state);
      tokens.resize(Z(rows));
      for (int64_t i = 0; i < rows; ++i) tokens[Z(i)] = static_cast<int32_t>(i % cfg_.vocab_size);
      LM2_RETURN_IF_ERROR(Forward(*state, tokens, LogitsMode::kLast, &logits));
    }
    return EndSegment(*state);
  }

  const ModelConfig& config() const override { return cfg_; }
  const std::string& fingerprint() const override { return files_->Fingerprint(); }
  std::string backend_name() const override { return "cuda:" + std::to_string(w_->device); }

  bool BatchesSteps() const override { return true; }

  bool OwnsState(const SequenceState& state) const override {
    const auto* s = dynamic_cast<const CudaState*>(&state);
    return s != nullptr && s->owner_ == this;
  }

  Result<std::unique_ptr<SequenceState>> NewState() const override {
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    auto s = std::make_unique<CudaState>(this, lanes_);
    LM2_ASSIGN_OR_RETURN(Lane main, lanes_->Take(/*blas=*/true));
    LM2_ASSIGN_OR_RETURN(Lane side, lanes_->Take(/*blas=*/false));
    s->stream_ = std::move(main.stream);
    s->cublas_ = std::move(main.blas);
    s->side_stream_ = std::move(side.stream);
    s->side_cublas_ = std::move(side.blas);
    LM2_ASSIGN_OR_RETURN(s->fork_, CudaEvent::Create());
    LM2_ASSIGN_OR_RETURN(s->join_, CudaEvent::Create());
    LM2_ASSIGN_OR_RETURN(s->kv_made_, CudaEvent::Create());
    LM2_ASSIGN_OR_RETURN(s->transferred_[0], CudaEvent::Create());
    LM2_ASSIGN_OR_RETURN(s->transferred_[1], CudaEvent::Create());
    s->layers_.resize(Z(cfg_.num_layers));
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size, Hm = cfg_.memory_heads;
    const int64_t flush = options_.write_flush_tokens, per_layer = StagedTokensFloats(flush, d, Hm);
    const cudaStream_t st = s->stream_.get();
    if (stages_tokens_) {
      const auto layers = static_cast<int64_t>(cfg_.memory_layers.size());
      LM2_ASSIGN_OR_RETURN(s->staged_tokens_, DeviceBuffer<float>::Allocate(Z(layers * per_layer)));
      LM2_RETURN_IF_ERROR(ClearStagedTokens(s->staged_tokens_.data(), layers, flush, d, Hm, st));
    }
    for (int64_t i = 0, k = 0; i < cfg_.num_layers; ++i) {
      const CudaLayerWeights& lw = w_->layers[Z(i)];
      if (!lw.has_memory) continue;
      LayerState& ls = s->layers_[Z(i)];
      LM2_ASSIGN_OR_RETURN(ls.bank, DeviceBuffer<float>::Allocate(Z(N * d)));
      LM2_ASSIGN_OR_RETURN(ls.mass, DeviceBuffer<float>::Allocate(Z(Hm * N)));
      LM2_ASSIGN_OR_RETURN(ls.acc, DeviceBuffer<float>::Allocate(Z(N * d)));
      if (stages_tokens_) {
        ls.staged = s->staged_tokens_.data() + k++ * per_layer;
      } else {
        LM2_ASSIGN_OR_RETURN(ls.pending_attn, DeviceBuffer<float>::Allocate(Z(flush * Hm * N)));
        LM2_ASSIGN_OR_RETURN(ls.pending_offer, DeviceBuffer<float>::Allocate(Z(flush * d)));
      }
      LM2_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(ls.bank.data(), lw.memory.init, ls.bank.bytes(), cudaMemcpyDeviceToDevice, st));
    }
    LM2_RETURN_IF_ERROR(s->stream_.Synchronize());
    return std::unique_ptr<SequenceState>(std::move(s));
  }

  Status Forward(SequenceState& base, std::span<const int32_t> tokens, LogitsMode mode,
                 std::vector<float>* logits) const override {
    LM2_ASSIGN_OR_RETURN(CudaState* s, Own(base));
    LM2_RETURN_IF_ERROR(CheckForward(s->pos_, tokens, mode, logits));
    const auto T = static_cast<int64_t>(tokens.size());
    const bool step = T == 1 && mode != LogitsMode::kNone;  // a decode step: the (graph-replayed) batch path
    const std::vector<CudaState*> one = {s};
    // The device memory the call needs, before any of it runs: running out of it
    // (ResourceExhausted) leaves the state as it was.
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    LM2_RETURN_IF_ERROR(step ? ReserveBatch(one, StepOutput::kLogits, {}) : ReserveTokens(*s, T, mode));
    return Guarded(*s, [&]() -> Status {
      if (!s->segment_open_) LM2_RETURN_IF_ERROR(BeginSegment(*s));
      if (T == 0) {
        if (logits != nullptr) logits->clear();
        return Status::Ok();
      }
      if (step) return RunBatch(one, tokens, logits, nullptr, {});
      LM2_RETURN_IF_ERROR(RunTokens(*s, tokens, mode, logits));
      s->pos_ += T;
      s->segment_tokens_ += T;
      return Status::Ok();
    });
  }

  Status ForwardBatch(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                      std::vector<float>* logits) const override {
    LM2_RETURN_IF_ERROR(CheckBatch(states, tokens, logits));
    return Batch(states, tokens, logits, nullptr);
  }

  Status ForwardBatchSample(std::span<SequenceState* const> states, std::span<const int32_t> tokens,
                            std::span<const TokenRule> rules, std::vector<int32_t>* next) const override {
    LM2_RETURN_IF_ERROR(CheckSampleBatch(states, tokens, rules, next));
    return Batch(states, tokens, nullptr, next, rules);
  }

  // What a decode step returns.
  enum class StepOutput {
    kLogits,   // the logits [B, V] to the host
    kArgmax,   // each row's argmax, picked inside the step
    kSampled,  // the logits stay on the device; SampleRows picks after the step
  };

  // A step's output: the logits without `next`, else the picks (on the GPU's argmax where
  // every rule is greedy).
  static StepOutput StepOutputOf(const std::vector<int32_t>* next, std::span<const TokenRule> rules) {
    if (next == nullptr) return StepOutput::kLogits;
    return std::all_of(rules.begin(), rules.end(), [](const TokenRule& r) { return r.argmax_only(); })
               ? StepOutput::kArgmax
               : StepOutput::kSampled;
  }

  // ForwardBatch(Sample) after the checks: one step of the batch, every state marked broken
  // if it fails after its buffers were reserved.
  Status Batch(std::span<SequenceState* const> states, std::span<const int32_t> tokens, std::vector<float>* logits,
               std::vector<int32_t>* next = nullptr, std::span<const TokenRule> rules = {}) const {
    std::vector<CudaState*> batch;
    for (SequenceState* s : states) {
      auto* cs = static_cast<CudaState*>(s);  // OwnsState checked the type
      if (cs->broken_) return Broken();
      batch.push_back(cs);
    }
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    // Out of device memory here leaves every state as it was; a failure past it breaks them.
    LM2_RETURN_IF_ERROR(ReserveBatch(batch, StepOutputOf(next, rules), rules));
    const Status st = RunBatch(batch, tokens, logits, next, rules);
    if (!st.ok()) {
      for (CudaState* s : batch) s->broken_ = true;
    }
    return st;
  }

  Status EndSegment(SequenceState& base) const override {
    LM2_ASSIGN_OR_RETURN(CudaState* s, Own(base));
    if (!s->segment_open_) return Status::Ok();
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    if (s->segment_tokens_ > 0) LM2_RETURN_IF_ERROR(ReserveWrite(*s));  // (as Forward's reservation)
    return Guarded(*s, [&]() -> Status {
      LM2_RETURN_IF_ERROR(FlushWrites(*s));
      if (s->segment_tokens_ > 0) {
        LM2_RETURN_IF_ERROR(ApplyWrite(*s));
        s->bank_initial_ = false;
        s->kv_current_ = false;
        if (options_.memory_kv_at_segment_end && cfg_.has_memory()) {
          // The next segment's memory K/V, on the side stream behind the write: they run
          // while the caller goes on (a chat's next prompt finds them made).
          LM2_RETURN_IF_ERROR(EnsureOwnKv(*s));
          const cudaStream_t side = s->side_stream_.get();
          LM2_RETURN_IF_ERROR(s->fork_.Order(s->stream_.get(), side));
          LM2_RETURN_IF_ERROR(MakeEveryMemoryKv(*s, s->side_cublas_.get(), side));
          LM2_RETURN_IF_ERROR(s->kv_made_.Record(side));
        }
      }
      LM2_RETURN_IF_ERROR(s->stream_.Synchronize());
      s->segment_open_ = false;
      s->segment_tokens_ = 0;
      return Status::Ok();
    });
  }

  void ResetContext(SequenceState& base) const override {
    auto* s = dynamic_cast<CudaState*>(&base);
    if (s == nullptr || s->owner_ != this) return;
    s->pos_ = 0;  // rows past pos_ are dead; the cache's capacity is reused
  }

  Status ExportBanks(const SequenceState& base, MemoryState& out) const override {
    const auto* cs = dynamic_cast<const CudaState*>(&base);
    if (cs == nullptr || cs->owner_ != this) return Status::InvalidArgument("state belongs to another model");
    if (cs->broken_) return Broken();
    if (cs->segment_open_) return Status::FailedPrecondition("ExportMemory: a segment is open; end it first");
    // The staging buffer and its events are scratch, not state: exporting does not change
    // the state.
    auto* s = const_cast<CudaState*>(cs);
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    ShapeExport(out);
    std::vector<BankPiece<float>> pieces;
    for (MemoryLayer& ml : out.layers) {
      AddPieces(s->layers_[Z(ml.layer)].bank.data(), ml.data.data(), static_cast<int64_t>(ml.data.size()), pieces);
    }
    return BanksToHost(*s, pieces);
  }

  Status ImportMemory(SequenceState& base, const MemoryState& memory) const override {
    LM2_ASSIGN_OR_RETURN(CudaState* s, Own(base));
    if (s->segment_open_) return Status::FailedPrecondition("ImportMemory: a segment is open");
    LM2_RETURN_IF_ERROR(CheckImport(memory));
    if (memory.layers.empty()) return Status::Ok();
    s->bank_initial_ = false;
    s->kv_current_ = false;
    std::vector<BankPiece<const float>> pieces;
    for (const MemoryLayer& ml : memory.layers) {
      AddPieces(s->layers_[Z(ml.layer)].bank.data(), ml.data.data(), static_cast<int64_t>(ml.data.size()), pieces);
    }
    // A failed copy may leave some layers replaced and others not: that breaks the state.
    // The copies wait for memory K/V still being made from the banks they replace.
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    LM2_RETURN_IF_ERROR(EnsureCapacity(s->staging_, Z(2 * TransferPieceFloats())));  // (before: the state as it was)
    return Guarded(*s, [&]() -> Status {
      LM2_RETURN_IF_ERROR(s->kv_made_.Wait(s->stream_.get()));
      return BanksToDevice(*s, pieces);
    });
  }

  Result<std::vector<std::vector<float>>> SegmentReadMass(const SequenceState& base) const override {
    const auto* s = dynamic_cast<const CudaState*>(&base);
    if (s == nullptr || s->owner_ != this) return Status::InvalidArgument("state belongs to another model");
    if (s->broken_) return Broken();
    if (!s->segment_open_) return Status::FailedPrecondition("SegmentReadMass: no segment is open");
    LM2_RETURN_IF_ERROR(UseDevice(w_->device));
    if (stages_tokens_ && s->staged_ > 0) {
      // Staged decode tokens' masses join when they are flushed: flush them now (where the
      // state keeps its sums changes, not what they are).
      auto& flushing = const_cast<CudaState&>(*s);
      LM2_RETURN_IF_ERROR(Guarded(flushing, [&] { return FlushWrites(flushing); }));
    }
    const int64_t N = cfg_.memory_slots, Hm = cfg_.memory_heads;
    std::vector<std::vector<float>> out;
    std::vector<float> mass(Z(Hm * N));
    for (int64_t layer : cfg_.memory_layers) {
      if (s->sums_empty_) {  // nothing read yet (the buffer is not zeroed until a write)
        out.emplace_back(Z(N), 0.0f);
        continue;
      }
      LM2_RETURN_IF_ERROR(s->layers_[Z(layer)].mass.CopyToHost(mass.data(), mass.size(), s->stream_.get()));
      out.push_back(ReadMassPerSlot(mass.data()));
    }
    return out;
  }

 private:
  static Status Broken() {
    return Status::FailedPrecondition(
        "this state is unusable after an earlier device error (its memory write may be half applied); "
        "start a new state and import the last exported memory");
  }

  Result<CudaState*> Own(SequenceState& base) const {
    auto* s = dynamic_cast<CudaState*>(&base);
    if (s == nullptr || s->owner_ != this) return Status::InvalidArgument("state belongs to another model");
    if (s->broken_) return Broken();
    return s;
  }

  // Runs device work for `s`; any failure marks the state broken.
  template <typename Fn>
  Status Guarded(CudaState& s, Fn&& fn) const {
    Status st = UseDevice(w_->device);
    if (st.ok()) st = fn();
    if (!st.ok()) s.broken_ = true;
    return st;
  }

  // Bank transfers: `count` floats between a device bank and pageable host memory, in pieces
  // of at most TransferPieceFloats(), each through one of the state's two pinned staging
  // pieces. Two pieces are in flight at once: while the device copies one, the host copies
  // the other between the staging and the caller's memory, in slices on
  // bank_transfer_threads threads (one host thread copies ~7-8 GB/s). Host is float
  // (export) or const float (import).
  template <typename Host>
  struct BankPiece {
    float* device;
    Host* host;
    int64_t count;
  };
  int64_t TransferPieceFloats() const { return options_.bank_transfer_piece_bytes / int64_t{sizeof(float)}; }
  template <typename Host>
  void AddPieces(float* device, Host* host, int64_t count, std::vector<BankPiece<Host>>& pieces) const {
    const int64_t piece = TransferPieceFloats();
    for (int64_t at = 0; at < count; at += piece) {
      pieces.push_back({device + at, host + at, std::min(piece, count - at)});
    }
  }
  float* StagingPiece(CudaState& s, std::size_t k) const {
    return s.staging_.data() + static_cast<int64_t>(k % 2) * TransferPieceFloats();
  }

  // Runs copy(k, first, count) for every piece k in order, each piece's floats split into
  // slices copied at once by the calling thread and up to bank_transfer_threads - 1 threads
  // started for the call; once every slice of piece k is copied, between(k) runs on one of
  // them (the device work around the next piece) before any slice of piece k + 1. The first
  // failure of between stops the copies and is returned.
  template <typename Host, typename Copy, typename Between>
  Status CopyPieces(const std::vector<BankPiece<Host>>& pieces, Copy&& copy, Between&& between) const {
    const std::size_t n = pieces.size();
    if (n == 0) return Status::Ok();
    Status status = Status::Ok();
    std::size_t done = 0;
    auto completion = [&]() noexcept {
      if (status.ok()) status = between(done);
      ++done;
    };
    int threads = 1;  // the helpers that started, and this thread
    std::latch ready(1);
    std::barrier<decltype(completion)>* sync = nullptr;
    auto work = [&](int t) {
      for (std::size_t k = 0; k < n; ++k) {
        if (status.ok()) {
          const int64_t first = pieces[k].count * t / threads, last = pieces[k].count * (t + 1) / threads;
          copy(k, first, last - first);
        }
        sync->arrive_and_wait();
      }
    };
    const int wanted = options_.bank_transfer_threads;
    std::vector<std::jthread> helpers;
    helpers.reserve(static_cast<std::size_t>(wanted - 1));  // no allocation once a helper waits
    for (int t = 1; t < wanted; ++t) {
      try {
        helpers.emplace_back([&, t] {
          (void)UseDevice(w_->device);  // between() may run here
          ready.wait();
          work(t);
        });
      } catch (const std::system_error&) {
        break;  // fewer threads, the same copies
      }
      ++threads;
    }
    std::barrier<decltype(completion)> barrier(threads, completion);
    sync = &barrier;
    ready.count_down();
    work(0);
    helpers.clear();  // joined
    return status;
  }

  // Device -> host: piece k's copy into staging piece k % 2 (and an event), the host waits
  // for it, copies it out, then enqueues piece k + 2 into the same staging piece.
  Status BanksToHost(CudaState& s, const std::vector<BankPiece<float>>& pieces) const {
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.staging_, Z(2 * TransferPieceFloats())));
    const cudaStream_t st = s.stream_.get();
    const auto enqueue = [&](std::size_t k) -> Status {
      const BankPiece<float>& p = pieces[k];
      LM2_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(StagingPiece(s, k), p.device, Z(p.count) * sizeof(float),
                                               cudaMemcpyDeviceToHost, st));
      return s.transferred_[k % 2].Record(st);
    };
    const std::size_t n = pieces.size();
    Status status = Status::Ok();
    for (std::size_t k = 0; k < n && k < 2 && status.ok(); ++k) status = enqueue(k);
    if (status.ok() && n > 0) status = s.transferred_[0].Synchronize();
    if (status.ok()) {
      status = CopyPieces(
          pieces,
          [&](std::size_t k, int64_t first, int64_t count) {
            std::memcpy(pieces[k].host + first, StagingPiece(s, k) + first, Z(count) * sizeof(float));
          },
          [&](std::size_t k) -> Status {
            if (k + 2 < n) LM2_RETURN_IF_ERROR(enqueue(k + 2));
            return k + 1 < n ? s.transferred_[(k + 1) % 2].Synchronize() : Status::Ok();
          });
    }
    // After a failure no copy may still be writing into the staging when it is next used.
    if (!status.ok()) (void)s.stream_.Synchronize();
    return status;
  }

  // Host -> device: piece k into staging piece k % 2 once the device copy that last read
  // that piece (piece k - 2) is done, then its copy to the device enqueued.
  Status BanksToDevice(CudaState& s, const std::vector<BankPiece<const float>>& pieces) const {
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.staging_, Z(2 * TransferPieceFloats())));
    const cudaStream_t st = s.stream_.get();
    const std::size_t n = pieces.size();
    Status status = CopyPieces(
        pieces,
        [&](std::size_t k, int64_t first, int64_t count) {
          std::memcpy(StagingPiece(s, k) + first, pieces[k].host + first, Z(count) * sizeof(float));
        },
        [&](std::size_t k) -> Status {
          const BankPiece<const float>& p = pieces[k];
          LM2_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p.device, StagingPiece(s, k), Z(p.count) * sizeof(float),
                                                   cudaMemcpyHostToDevice, st));
          LM2_RETURN_IF_ERROR(s.transferred_[k % 2].Record(st));
          return k + 1 < n && k + 1 >= 2 ? s.transferred_[(k + 1) % 2].Synchronize() : Status::Ok();
        });
    const Status synced = s.stream_.Synchronize();
    return status.ok() ? synced : status;
  }

  // Opens a segment: memory K/V from the bank as it is now (the model's own for the
  // initial bank; the state's own, unless made since the banks last changed, by the
  // segment's first forward: KvPending),
  // the write sums empty (sums_empty_: zeroed by their first writer).
  Status BeginSegment(CudaState& s) const {
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size;
    const bool shared = ReadsInitialKv(s);
    if (cfg_.has_memory() && !shared) LM2_RETURN_IF_ERROR(EnsureOwnKv(s));
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      const CudaLayerWeights& lw = w_->layers[Z(i)];
      if (!lw.has_memory) continue;
      LayerState& ls = s.layers_[Z(i)];
      const bf16* kv = shared ? initial_kv_[Z(i)].data() : ls.own_kv.data();
      ls.mem_k = kv;
      ls.mem_v = kv + N * d;
    }
    // K/V made at the last segment's end: the segment's work waits for them on the device.
    if (!shared && s.kv_current_) LM2_RETURN_IF_ERROR(s.kv_made_.Wait(s.stream_.get()));
    s.kv_shared_ = shared;
    s.segment_open_ = true;
    s.segment_tokens_ = 0;
    s.staged_ = 0;
    s.sums_empty_ = cfg_.has_memory();
    return Status::Ok();
  }

  // Whether a segment opened now reads the initial bank's memory K/V, made at load.
  bool ReadsInitialKv(const CudaState& s) const { return s.bank_initial_ && !initial_kv_.empty(); }

  // The buffers a state's own memory K/V need: each memory layer's own_kv, the bf16 bank
  // the GEMMs read and the side stream's cuBLAS handle.
  Status EnsureOwnKv(CudaState& s) const {
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size;
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.bank_b_, Z(N * d)));
    if (s.side_cublas_.empty()) {
      LM2_ASSIGN_OR_RETURN(s.side_cublas_, Blas::Create());
    }
    for (int64_t i = NextMemoryLayer(0); i < cfg_.num_layers; i = NextMemoryLayer(i + 1)) {
      LM2_RETURN_IF_ERROR(EnsureCapacity(s.layers_[Z(i)].own_kv, Z(2 * N * d)));
    }
    return Status::Ok();
  }

  // Layer i's memory K/V of the open segment from the state's bank, on `st` with `blas`.
  Status MakeMemoryKv(CudaState& s, int64_t i, cublasHandle_t blas, cudaStream_t st) const {
    LayerState& ls = s.layers_[Z(i)];
    return MemoryKv(blas, ls.bank.data(), s.bank_b_.data(), w_->layers[Z(i)].memory, cfg_.memory_slots,
                    cfg_.hidden_size, ls.own_kv.data(), st);
  }

  // The first memory layer from layer `from` on (num_layers if none).
  int64_t NextMemoryLayer(int64_t from) const {
    while (from < cfg_.num_layers && !w_->layers[Z(from)].has_memory) ++from;
    return from;
  }

  // Every memory layer's K/V from the state's banks, on `st` with `blas`; they are then
  // current (kv_current_).
  Status MakeEveryMemoryKv(CudaState& s, cublasHandle_t blas, cudaStream_t st) const {
    for (int64_t i = NextMemoryLayer(0); i < cfg_.num_layers; i = NextMemoryLayer(i + 1)) {
      LM2_RETURN_IF_ERROR(MakeMemoryKv(s, i, blas, st));
    }
    s.kv_current_ = true;
    return Status::Ok();
  }

  // Whether the open segment reads its own memory K/V and they are still to make: its first
  // forward makes them, on the side stream beside its first tiled chunk, layer by layer
  // ahead of each layer's read (RunLayers), or all at once first (MakePendingMemoryKv).
  bool KvPending(const CudaState& s) const {
    return s.segment_open_ && cfg_.has_memory() && !s.kv_shared_ && !s.kv_current_;
  }

  // Makes the open segment's memory K/V if still pending, on the state's stream.
  Status MakePendingMemoryKv(CudaState& s) const {
    return KvPending(s) ? MakeEveryMemoryKv(s, s.cublas_.get(), s.stream_.get()) : Status::Ok();
  }

  // Whether a chunk of n tokens reads memory on the side stream in every memory layer
  // (RunLayers' side_read), so that it can make the pending memory K/V there too.
  bool SideReadsChunk(int64_t n) const { return options_.concurrent_memory_read && tiled_memory_ && n > 1; }

  // Zeroes the open segment's write sums (sums_empty_) before a writer that adds to them.
  Status ZeroSums(CudaState& s) const {
    if (!s.sums_empty_) return Status::Ok();
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      if (!w_->layers[Z(i)].has_memory) continue;
      LayerState& ls = s.layers_[Z(i)];
      LM2_RETURN_IF_ERROR(ls.mass.FillBytes(0, s.stream_.get()));
      LM2_RETURN_IF_ERROR(ls.acc.FillBytes(0, s.stream_.get()));
    }
    s.sums_empty_ = false;
    return Status::Ok();
  }

  // Adds the staged decode tokens to the write sums of every memory layer.
  Status FlushWrites(CudaState& s) const {
    if (s.staged_ == 0) return Status::Ok();
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size, Hm = cfg_.memory_heads;
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      if (!w_->layers[Z(i)].has_memory) continue;
      LayerState& ls = s.layers_[Z(i)];
      if (stages_tokens_) {
        LM2_RETURN_IF_ERROR(FlushStagedTokens(ls.mem_k, ls.staged, s.staged_, options_.write_flush_tokens, N, d,
                                              Hm, ls.mass.data(), ls.acc.data(), s.stream_.get()));
      } else {
        LM2_RETURN_IF_ERROR(FlushStagedWrites(s.cublas_.get(), ls.pending_attn.data(), ls.pending_offer.data(),
                                              s.staged_, N, d, Hm, ls.acc.data(), s.stream_.get()));
      }
    }
    s.staged_ = 0;
    return Status::Ok();
  }

  // The gated write of the open segment (eq. 4-6): the update u (fp32, and in bf16 for the
  // gates), both gates' pre-activations by one batched GEMM, the commit with their biases.
  Status ApplyWrite(CudaState& s) const {
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size, Hm = cfg_.memory_heads;
    const cudaStream_t st = s.stream_.get();
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {  // (buffers: ReserveWrite)
      const CudaLayerWeights& lw = w_->layers[Z(i)];
      if (!lw.has_memory) continue;
      LayerState& ls = s.layers_[Z(i)];
      float* u = s.scratch_.write_u.data();
      float* gates_pre = s.scratch_.write_gates.data();  // [2, N, d]: input gate, forget gate
      bf16* u_b = s.scratch_.xb.data();
      LM2_RETURN_IF_ERROR(WriteUpdate(ls.mass.data(), ls.acc.data(), N, d, Hm, u, u_b, st));
      LM2_RETURN_IF_ERROR(LinearPair(s.cublas_.get(), u_b, N, d, lw.memory.gates, d, gates_pre, st));
      LM2_RETURN_IF_ERROR(GatedMemoryUpdate(u, gates_pre, lw.memory.in_gate_b, gates_pre + N * d,
                                            lw.memory.forget_gate_b, N, d, ls.bank.data(), st));
    }
    return Status::Ok();
  }

  // The buffers EndSegment needs: ApplyWrite's, and the next segment's memory K/V.
  Status ReserveWrite(CudaState& s) const {
    if (!cfg_.has_memory()) return Status::Ok();
    const int64_t N = cfg_.memory_slots, d = cfg_.hidden_size;
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.scratch_.write_u, Z(N * d)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.scratch_.write_gates, Z(2 * N * d)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.scratch_.xb, Z(N * d)));
    return options_.memory_kv_at_segment_end ? EnsureOwnKv(s) : Status::Ok();
  }

  // Reservations: the device (and pinned) buffers a call will use, grown before any of its
  // work is enqueued, so that running out of memory (ResourceExhausted) fails the call
  // before it changes the state. Growth keeps what a buffer must keep (the KV cache's rows)
  // and may free scratch, which every call sizes again. The calls' own EnsureCapacity
  // checks after them find the buffers large enough.

  // Opening a segment: the state's own memory K/V unless it reads the initial bank's.
  Status ReserveSegment(CudaState& s) const {
    return s.segment_open_ || !cfg_.has_memory() || ReadsInitialKv(s) ? Status::Ok() : EnsureOwnKv(s);
  }

  // RunTokens over T tokens.
  Status ReserveTokens(CudaState& s, int64_t T, LogitsMode mode) const {
    LM2_RETURN_IF_ERROR(ReserveSegment(s));
    if (T == 0) return Status::Ok();
    const int64_t chunk = std::min(T, options_.max_chunk_tokens), S = s.pos_ + T;
    const int64_t kvdim = cfg_.num_kv_heads * cfg_.head_dim;
    Scratch& sc = s.scratch_;
    LM2_RETURN_IF_ERROR(EnsureKvCapacity(s, S));
    LM2_RETURN_IF_ERROR(EnsureScratch(s, chunk));
    if (TiledAttention(chunk)) {
      LM2_RETURN_IF_ERROR(EnsureCapacity(sc.kv_b, Z(2 * S * kvdim)));
    } else if (chunk >= options_.attention_gemm_min_tokens) {  // the last chunk's scores are the most
      LM2_RETURN_IF_ERROR(EnsureCapacity(sc.scores, Z(cfg_.num_heads * chunk * S)));
    }
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.ids, Z(T)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.positions, Z(T)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.ids_host_, Z(T)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.positions_host_, Z(T)));
    if (mode == LogitsMode::kNone) return Status::Ok();
    return EnsureCapacity(sc.logits, Z((mode == LogitsMode::kAll ? chunk : 1) * cfg_.vocab_size));
  }

  // A decode step of `batch` (RunBatch) with `output`; sampled steps by `rules`.
  Status ReserveBatch(const std::vector<CudaState*>& batch, StepOutput output, std::span<const TokenRule> rules) const {
    const auto B = static_cast<int64_t>(batch.size());
    const int64_t V = cfg_.vocab_size;
    for (CudaState* s : batch) {
      LM2_RETURN_IF_ERROR(ReserveSegment(*s));
      LM2_RETURN_IF_ERROR(EnsureKvCapacity(*s, s->pos_ + 1));  // synchronises when it moves rows
    }
    CudaState& lead = *batch[0];
    Scratch& sc = lead.scratch_;
    LM2_RETURN_IF_ERROR(EnsureScratch(lead, B, /*batch_step=*/true));
    const StepInputs in{B};
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.step_in, Z(in.Elements())));
    LM2_RETURN_IF_ERROR(EnsureCapacity(lead.step_host_, Z(in.Elements())));
    const std::size_t table = Z(cfg_.num_layers * BatchTable::kArrays * B);
    if (sc.table.size() < table) sc.table_host.clear();  // a new table holds nothing yet
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.table, table));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.logits, Z(B * V)));
    if (output == StepOutput::kLogits) return EnsureCapacity(lead.logits_host_, Z(B * V));
    if (output == StepOutput::kArgmax) return EnsureCapacity(lead.next_keys_host_, Z(B));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.next_ids, Z(B)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(lead.next_host_, Z(B)));
    // SampleOnDevice's (its penalty history, a few ids, is sized there).
    LM2_RETURN_IF_ERROR(EnsureCapacity(lead.rules_host_, rules.size()));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.rules, rules.size()));
    LM2_ASSIGN_OR_RETURN(const std::size_t temp_bytes, SampleRowsTempBytes(B, V));
    for (DeviceBuffer<float>* buf : {&sc.sample_keys, &sc.sorted_keys}) LM2_RETURN_IF_ERROR(EnsureCapacity(*buf, Z(B * V)));
    for (DeviceBuffer<int32_t>* buf : {&sc.sample_ids, &sc.sorted_ids}) LM2_RETURN_IF_ERROR(EnsureCapacity(*buf, Z(B * V)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.segments, Z(2 * B)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.sample_plans, Z(B)));
    return EnsureCapacity(sc.sort_temp, std::max<std::size_t>(temp_bytes, 1));
  }

  // Grows every layer's KV cache to hold `rows` positions, keeping the first pos_ rows.
  Status EnsureKvCapacity(CudaState& s, int64_t rows) const {
    if (rows <= s.kv_capacity_) return Status::Ok();
    int64_t cap = std::max<int64_t>(s.kv_capacity_ * 2, 256);
    cap = std::min(std::max(cap, rows), cfg_.max_position_embeddings);
    const int64_t kvdim = cfg_.num_kv_heads * cfg_.head_dim;
    const cudaStream_t st = s.stream_.get();
    LM2_ASSIGN_OR_RETURN(auto grown, DeviceBuffer<float>::Allocate(Z(cfg_.num_layers * 2 * cap * kvdim)));
    const auto k_rows = [&](int64_t layer) { return grown.data() + 2 * layer * cap * kvdim; };
    // The rows so far move over; the copies end before the old buffer is freed and before a
    // batched step reads the new one on another stream. A fresh state has no rows: no wait
    // then, so its first prefill is enqueued at once.
    if (s.pos_ > 0) {
      for (int64_t i = 0; i < cfg_.num_layers; ++i) {
        const LayerState& ls = s.layers_[Z(i)];
        float* const k = k_rows(i);
        for (const auto& [to, from] : {std::pair{k, ls.k_cache}, std::pair{k + cap * kvdim, ls.v_cache}}) {
          LM2_CUDA_RETURN_IF_ERROR(
              cudaMemcpyAsync(to, from, Z(s.pos_ * kvdim) * sizeof(float), cudaMemcpyDeviceToDevice, st));
        }
      }
      LM2_RETURN_IF_ERROR(s.stream_.Synchronize());
    }
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      s.layers_[Z(i)].k_cache = k_rows(i);
      s.layers_[Z(i)].v_cache = k_rows(i) + cap * kvdim;
    }
    s.kv_cache_ = std::move(grown);
    s.kv_capacity_ = cap;
    return Status::Ok();
  }

  // Scratch for chunks of up to `rows` tokens, or (batch_step) a decode step of `rows` sessions.
  Status EnsureScratch(CudaState& s, int64_t rows, bool batch_step = false) const {
    const int64_t d = cfg_.hidden_size, qdim = cfg_.num_heads * cfg_.head_dim, F = cfg_.intermediate_size;
    const int64_t N = cfg_.memory_slots, Hm = cfg_.memory_heads;
    Scratch& sc = s.scratch_;
    int64_t proj_rows = 0;
    for (const CudaLayerWeights& lw : w_->layers) proj_rows = std::max(proj_rows, lw.x_proj_rows);
    // What the GEMMs read or write holds their rows (GemmRows).
    const int64_t g = GemmRows(rows, batch_step);
    for (DeviceBuffer<float>* b : {&sc.h, &sc.a}) LM2_RETURN_IF_ERROR(EnsureCapacity(*b, Z(g * d)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.q, Z(rows * qdim)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.attn_out, Z(g * qdim)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.proj, Z(g * proj_rows)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.gate_up, Z(g * 2 * std::max(F, d))));  // (or OutputGateWithO's [2, g, d])
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.rope, Z(rows * (cfg_.head_dim / 2))));
    // The decode attention's key ranges: one size for any batch, reserved by every decode step
    // and chunk of a model that can split (SplitsAttention(1)), so that a step of another size
    // that splits (a batch of 3 after batches of 40) finds it without allocating; a chunk's
    // last layer attends for its last row alone with it (RunLayers).
    if (SplitsAttention(1)) {
      const std::size_t before = sc.attn_split.size();  // grows only as a new buffer, zeroed once
      LM2_RETURN_IF_ERROR(EnsureCapacity(sc.attn_split, Z(AttentionDecodeSplitScratch(cfg_.num_heads, cfg_.head_dim))));
      if (sc.attn_split.size() != before) LM2_RETURN_IF_ERROR(sc.attn_split.FillBytes(0, s.stream_.get()));
    }
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.xb, Z(g * d)));
    LM2_RETURN_IF_ERROR(EnsureCapacity(sc.yb, Z(g * std::max({2 * d, qdim, F}))));  // (OutputGateWithO: [2, g, d])
    if (cfg_.has_memory()) {
      for (DeviceBuffer<float>* b : {&sc.e, &sc.gate}) LM2_RETURN_IF_ERROR(EnsureCapacity(*b, Z(g * d)));
      // The decode memory read's rows: a batched step's sessions, else one (a one-token
      // chunk; longer chunks take MemoryReadWrite or MemoryRead, which do not use its
      // partial sums: sized by the chunk they were 1.1 MB per row at the paper's shape).
      const int64_t decode_rows = batch_step ? rows : 1;
      LM2_RETURN_IF_ERROR(EnsureCapacity(sc.read_partial, Z(MemoryReadDecodeScratch(decode_rows, N, d, Hm))));
      // The probabilities [Hm, rows, N]: a decode step's that stages them, or every chunk's
      // when not tiled (one row else: a one-token chunk's).
      const int64_t attn_rows = (batch_step && !stages_tokens_) || !tiled_memory_ ? rows : 1;
      LM2_RETURN_IF_ERROR(EnsureCapacity(sc.mattn, Z(Hm * attn_rows * N)));
      if (tiled_memory_) {
        LM2_RETURN_IF_ERROR(EnsureCapacity(sc.read_stats, Z(MemoryReadWriteScratch(rows, d, Hm))));
      } else {
        LM2_RETURN_IF_ERROR(EnsureCapacity(sc.read_b, Z(MemoryReadScratch(rows, N, d, Hm))));
      }
    }
    return Status::Ok();
  }

  // Runs `tokens` in chunks of at most max_chunk_tokens and copies out the logits asked for.
  Status RunTokens(CudaState& s, std::span<const int32_t> tokens, LogitsMode mode, std::vector<float>* logits) const {
    const auto T = static_cast<int64_t>(tokens.size());
    const int64_t V = cfg_.vocab_size;
    const int64_t chunk = std::min(T, options_.max_chunk_tokens);
    const cudaStream_t st = s.stream_.get();
    // (Buffers: ReserveTokens.) Token ids and positions of the whole call, through pinned memory.
    Scratch& sc = s.scratch_;
    std::copy(tokens.begin(), tokens.end(), s.ids_host_.data());
    std::iota(s.positions_host_.data(), s.positions_host_.data() + T, s.pos_);
    LM2_RETURN_IF_ERROR(sc.ids.CopyFromHost(s.ids_host_.data(), Z(T), st));
    LM2_RETURN_IF_ERROR(sc.positions.CopyFromHost(s.positions_host_.data(), Z(T), st));

    if (mode == LogitsMode::kAll) logits->resize(Z(T * V));
    if (mode == LogitsMode::kLast) logits->resize(Z(V));
    // A first chunk on the tiled path stores the write sums (sums_empty_); others add to them.
    if (!(tiled_memory_ && chunk > 1)) LM2_RETURN_IF_ERROR(ZeroSums(s));
    // Pending memory K/V: made layer by layer beside the first chunk where its reads run on
    // the side stream (RunLayers), else all of them first.
    if (!SideReadsChunk(chunk)) LM2_RETURN_IF_ERROR(MakePendingMemoryKv(s));
    for (int64_t c = 0; c < T; c += chunk) {
      const int64_t n = std::min(chunk, T - c);
      const bool last_chunk = c + n == T;
      const ChunkRows rows = mode == LogitsMode::kAll                  ? ChunkRows::kAll
                             : mode == LogitsMode::kLast && last_chunk ? ChunkRows::kLast
                                                                       : ChunkRows::kNone;
      LM2_RETURN_IF_ERROR(RunLayers(s, c, n, s.pos_ + c, rows));
      s.sums_empty_ = false;
      if (mode == LogitsMode::kAll) {
        LM2_RETURN_IF_ERROR(ComputeLogits(s, 0, n, logits->data() + c * V));
      } else if (rows == ChunkRows::kLast) {
        LM2_RETURN_IF_ERROR(ComputeLogits(s, n - 1, 1, logits->data()));
      }
    }
    return s.stream_.Synchronize();
  }

  // One decode step of every state in `batch` as one forward, on the first state's stream,
  // cuBLAS handle and scratch (the others are idle: every call synchronises before it
  // returns, and a state is driven by one thread at a time). Returns the logits [B, V], or
  // with `next` instead the token each of `rules` picks, picked on the device.
  Status RunBatch(const std::vector<CudaState*>& batch, std::span<const int32_t> tokens, std::vector<float>* logits,
                  std::vector<int32_t>* next, std::span<const TokenRule> rules) const {
    const auto B = static_cast<int64_t>(batch.size());
    for (CudaState* s : batch) {
      if (!s->segment_open_) LM2_RETURN_IF_ERROR(BeginSegment(*s));
      if (KvPending(*s) || s->sums_empty_) {
        // The segment's first step: its memory K/V made and the sums it adds to zeroed, on
        // the state's own stream; the batch runs on the lead's, so wait for both.
        LM2_RETURN_IF_ERROR(MakePendingMemoryKv(*s));
        LM2_RETURN_IF_ERROR(ZeroSums(*s));
        LM2_RETURN_IF_ERROR(s->stream_.Synchronize());
      }
    }
    CudaState& lead = *batch[0];  // (buffers: ReserveBatch)
    Scratch& sc = lead.scratch_;
    const cudaStream_t st = lead.stream_.get();
    // The step's inputs, one upload (StepInputs): positions, staging slots, zeroed keys, ids.
    const StepInputs in{B};
    int64_t* host_in = lead.step_host_.data();
    for (int64_t b = 0; b < B; ++b) {
      host_in[in.positions + b] = batch[Z(b)]->pos_;
      host_in[in.slots + b] = batch[Z(b)]->staged_;
      host_in[in.keys + b] = 0;
    }
    std::memcpy(host_in + in.ids, tokens.data(), Z(B) * sizeof(int32_t));
    LM2_ASSIGN_OR_RETURN(BatchTable table, UploadBatchTable(batch, lead));
    int64_t* dev_in = sc.step_in.data();
    table.positions = dev_in + in.positions;
    for (const CudaState* st_b : batch) table.max_keys = std::max(table.max_keys, st_b->pos_ + 1);
    table.slots = dev_in + in.slots;
    table.keys = reinterpret_cast<uint64_t*>(dev_in + in.keys);
    table.ids = reinterpret_cast<const int32_t*>(dev_in + in.ids);
    const int64_t V = cfg_.vocab_size;
    const StepOutput output = StepOutputOf(next, rules);
    // The step reads its inputs from pinned memory (one upload) and leaves the logits (or
    // the picks) there, so all of it can be captured and replayed.
    auto step = [&]() -> Status {
      LM2_RETURN_IF_ERROR(sc.step_in.CopyFromHost(host_in, Z(in.Elements()), st));
      LM2_RETURN_IF_ERROR(RunLayers(lead, 0, B, 0, ChunkRows::kAll, &table));
      if (output == StepOutput::kSampled) return LogitsOnDevice(lead, 0, B);
      if (output == StepOutput::kArgmax) {
        LM2_RETURN_IF_ERROR(LogitsOnDevice(lead, 0, B, table.keys));
        return CudaStatus(cudaMemcpyAsync(lead.next_keys_host_.data(), table.keys, Z(B) * sizeof(uint64_t),
                                          cudaMemcpyDeviceToHost, st),
                          "cudaMemcpyAsync(keys)");
      }
      LM2_RETURN_IF_ERROR(LogitsOnDevice(lead, 0, B));
      return CudaStatus(cudaMemcpyAsync(lead.logits_host_.data(), sc.logits.data(), Z(B * V) * sizeof(float),
                                        cudaMemcpyDeviceToHost, st),
                        "cudaMemcpyAsync(logits)");
    };
    if (options_.cuda_graphs) {
      std::vector<const void*> key = GraphKey(lead, B, output, table.max_keys);
      bool replay = !lead.decode_graph_.empty() && key == lead.decode_graph_key_;
      if (!replay && key != lead.decode_seen_key_) {
        // A key that is neither the graph's nor that of the lead's last step without one
        // runs without a graph: capturing and instantiating costs more than a step (3-7 ms
        // at the paper's shape), and a DecodeBatcher's batch changes size whenever a
        // conversation ends or joins. A key seen twice in a row is captured.
        lead.decode_seen_key_ = std::move(key);
      } else if (!replay) {
        lead.decode_graph_ = CudaGraph();
        lead.decode_graph_key_.clear();
        auto captured = CudaGraph::Capture(st, step);
        if (captured.ok()) {
          lead.decode_graph_ = std::move(captured).value();
          lead.decode_graph_key_ = std::move(key);
          replay = true;
        } else if (const StatusCode code = captured.status().code();
                   code != StatusCode::kUnavailable && code != StatusCode::kResourceExhausted) {
          return captured.status();
        }
        // Nothing ran. Unavailable: another thread's device work broke the capture;
        // ResourceExhausted: the device had no memory left to instantiate the graph (the
        // step's own buffers are reserved). Either way this step runs without the graph,
        // and the next one captures again.
      }
      LM2_RETURN_IF_ERROR(replay ? lead.decode_graph_.Launch(st) : step());
    } else {
      LM2_RETURN_IF_ERROR(step());
    }
    if (output == StepOutput::kSampled) LM2_RETURN_IF_ERROR(SampleOnDevice(lead, rules));
    LM2_RETURN_IF_ERROR(lead.stream_.Synchronize());
    if (output == StepOutput::kLogits) {
      logits->assign(lead.logits_host_.data(), lead.logits_host_.data() + B * V);
    } else if (output == StepOutput::kArgmax) {
      next->resize(Z(B));
      for (int64_t b = 0; b < B; ++b) (*next)[Z(b)] = ArgmaxKeyToken(lead.next_keys_host_.data()[b]);
    } else {
      next->assign(lead.next_host_.data(), lead.next_host_.data() + B);
    }
    // Full staging buffers are flushed, each on its state's stream, then waited for.
    std::vector<CudaState*> flushed;
    for (CudaState* s : batch) {
      s->pos_ += 1;
      s->segment_tokens_ += 1;
      if (++s->staged_ == options_.write_flush_tokens) {
        LM2_RETURN_IF_ERROR(FlushWrites(*s));
        flushed.push_back(s);
      }
    }
    for (CudaState* s : flushed) LM2_RETURN_IF_ERROR(s->stream_.Synchronize());
    return Status::Ok();
  }

  // Picks each row's token from the step's logits (in the lead's scratch) by `rules`, on the
  // lead's stream, into the pinned next_host_: the rules and their distinct penalty ids go up
  // through pinned buffers, SampleRows runs, B ids come back. The caller synchronises.
  Status SampleOnDevice(CudaState& lead, std::span<const TokenRule> rules) const {
    Scratch& sc = lead.scratch_;
    const cudaStream_t st = lead.stream_.get();
    const auto B = static_cast<int64_t>(rules.size());
    const int64_t V = cfg_.vocab_size;
    std::vector<int32_t> ids;  // every row's distinct penalty ids, concatenated
    SampleRowKinds kinds{.temperature = false, .sorts = false, .penalty = false};
    for (int64_t b = 0; b < B; ++b) {
      const TokenRule& r = rules[Z(b)];
      DeviceTokenRule& dr = lead.rules_host_.data()[b];
      dr = DeviceTokenRule{.draw = r.draw, .temperature = r.temperature, .top_p = r.top_p,
                           .repetition_penalty = r.repetition_penalty, .top_k = r.top_k,
                           .history_begin = static_cast<int32_t>(ids.size()), .history_end = 0};
      if (r.repetition_penalty != 1.0f) AppendDistinctIds(r.history, ids);
      dr.history_end = static_cast<int32_t>(ids.size());
      kinds.temperature = kinds.temperature || r.temperature != 0.0f;
      kinds.sorts = kinds.sorts || r.sorts();
    }
    kinds.penalty = !ids.empty();
    LM2_RETURN_IF_ERROR(sc.rules.CopyFromHost(lead.rules_host_.data(), Z(B), st));
    if (!ids.empty()) {
      LM2_RETURN_IF_ERROR(EnsureCapacity(lead.history_host_, ids.size()));
      LM2_RETURN_IF_ERROR(EnsureCapacity(sc.history, ids.size()));
      std::copy(ids.begin(), ids.end(), lead.history_host_.data());
      LM2_RETURN_IF_ERROR(sc.history.CopyFromHost(lead.history_host_.data(), ids.size(), st));
    }
    LM2_ASSIGN_OR_RETURN(const std::size_t temp_bytes, SampleRowsTempBytes(B, V));  // (buffers: ReserveBatch)
    const SampleRowsScratch scratch{.keys = sc.sample_keys.data(), .ids = sc.sample_ids.data(),
                                    .sorted_keys = sc.sorted_keys.data(), .sorted_ids = sc.sorted_ids.data(),
                                    .segment_begin = sc.segments.data(), .segment_end = sc.segments.data() + B,
                                    .plans = sc.sample_plans.data(), .temp = sc.sort_temp.data(),
                                    .temp_bytes = temp_bytes};
    LM2_RETURN_IF_ERROR(SampleRows(sc.logits.data(), B, V, sc.rules.data(), ids.empty() ? nullptr : sc.history.data(),
                                   kinds, scratch, sc.next_ids.data(), st));
    return sc.next_ids.CopyToHostAsync(lead.next_host_.data(), Z(B), st);
  }

  // Every address a captured decode step of `lead` with B rows uses, besides the weights and
  // what the pointer table holds (read when the graph runs): a graph is replayed only while
  // these are unchanged.
  // The split attention's grid (sized for the step's longest row) is part of the key too: a
  // step whose rows outgrow the captured grid is captured again (at 129, 257, 513 and 1,025
  // keys).
  std::vector<const void*> GraphKey(CudaState& lead, int64_t B, StepOutput output, int64_t max_keys) const {
    const Scratch& sc = lead.scratch_;
    const int64_t grid = SplitsAttention(B) ? AttentionDecodeSplitGrid(max_keys) : 0;
    return {reinterpret_cast<const void*>(static_cast<std::intptr_t>(B)),
            reinterpret_cast<const void*>(static_cast<std::intptr_t>(output)),
            reinterpret_cast<const void*>(static_cast<std::intptr_t>(grid)), sc.attn_split.data(), sc.next_ids.data(),
            lead.next_host_.data(), lead.next_keys_host_.data(), sc.table.data(), sc.step_in.data(),
            lead.step_host_.data(), sc.rope.data(),
            sc.h.data(), sc.proj.data(), sc.q.data(), sc.attn_out.data(), sc.a.data(), sc.mattn.data(), sc.e.data(),
            sc.gate.data(), sc.gate_up.data(), sc.xb.data(), sc.yb.data(), sc.read_partial.data(), sc.logits.data(),
            lead.logits_host_.data(), lead.cublas_.workspace.data()};
  }

  // Builds the batch's pointer table and uploads it when it differs from the last one (it
  // changes only when the batch's states or their buffers do).
  Result<BatchTable> UploadBatchTable(const std::vector<CudaState*>& batch, CudaState& lead) const {
    BatchTable t;
    t.B = static_cast<int64_t>(batch.size());
    std::vector<void*> next(Z(cfg_.num_layers * BatchTable::kArrays * t.B), nullptr);
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      for (int64_t b = 0; b < t.B; ++b) {
        LayerState& ls = batch[Z(b)]->layers_[Z(i)];
        void* ptrs[BatchTable::kArrays] = {ls.k_cache,
                                           ls.v_cache,
                                           const_cast<bf16*>(ls.mem_k),
                                           const_cast<bf16*>(ls.mem_v),
                                           ls.mass.data(),
                                           ls.pending_attn.data(),
                                           ls.pending_offer.data(),
                                           ls.staged};
        for (int64_t k = 0; k < BatchTable::kArrays; ++k) next[Z((i * BatchTable::kArrays + k) * t.B + b)] = ptrs[k];
      }
    }
    Scratch& sc = lead.scratch_;
    if (next != sc.table_host) {  // (sc.table: sized by ReserveBatch, which cleared table_host if it grew)
      DeviceCallScope scope(CaptureExclusion());  // a pageable copy synchronises
      LM2_RETURN_IF_ERROR(sc.table.CopyFromHost(next.data(), next.size(), lead.stream_.get()));  // staged now
      sc.table_host = std::move(next);
    }
    t.base = sc.table.data();
    return t;
  }

  // One chunk: tokens [first, first + n) of the call, at cache positions pos0 ..., the final
  // hidden states of `rows` left in sc.h (its other rows' are not computed: ChunkRows). With
  // `batch`, instead one token of each of n states (their caches, banks and positions
  // through the table; `s` is the batch's lead; rows kAll).
  Status RunLayers(CudaState& s, int64_t first, int64_t n, int64_t pos0, ChunkRows rows,
                   const BatchTable* batch = nullptr) const {
    const int64_t d = cfg_.hidden_size, H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, Dh = cfg_.head_dim;
    const int64_t N = cfg_.memory_slots, Hm = cfg_.memory_heads, V = cfg_.vocab_size;
    const int64_t qdim = H * Dh, kvdim = Hkv * Dh, S = pos0 + n;
    const cudaStream_t st = s.stream_.get();
    cublasHandle_t blas = s.cublas_.get();
    Scratch& sc = s.scratch_;
    const int64_t* positions = batch != nullptr ? batch->positions : sc.positions.data() + first;
    const int32_t* ids = batch != nullptr ? batch->ids : sc.ids.data() + first;
    float* h = sc.h.data();
    const int64_t m = GemmRows(n, /*batch_step=*/batch != nullptr);
    // Where not every row is read, the last layer runs its attention output, output gate and
    // FFN for the last row alone or for none: a prompt's last layer does one token's work
    // past its read and write sums (prefill 512 2% faster, 2048 and 4096 3%: docs/cuda.md). The
    // one row goes through the GEMVs (a cuBLAS call would run a rounded block of rows on from
    // the last), so only where they take a row.
    const bool trim = batch == nullptr && n > 1 && rows != ChunkRows::kAll && Small(1);
    // The segment's own memory K/V, still to make (RunTokens left them to this chunk): each
    // memory layer's on the side stream, after the previous layer's read and before its own,
    // so that the GEMMs run beside the main stream's work (the first behind nothing but
    // what the main stream holds so far).
    const bool make_kv = batch == nullptr && KvPending(s);
    if (make_kv) {
      if (!SideReadsChunk(n)) return Status::Internal("RunLayers: memory K/V pending on a chunk without side reads");
      const cudaStream_t side = s.side_stream_.get();
      LM2_RETURN_IF_ERROR(s.fork_.Order(st, side));
      LM2_RETURN_IF_ERROR(MakeMemoryKv(s, NextMemoryLayer(0), s.side_cublas_.get(), side));
    }

    LM2_RETURN_IF_ERROR(EmbeddingLookup(w_->embed, V, d, ids, n, h, st));
    // The rows' rotary factors, once for all the layers.
    LM2_RETURN_IF_ERROR(RopeFactorsBatch(positions, n, Dh, cfg_.rope_theta, sc.rope.data(), st));
    bool deferred_write = false;  // a write sums kernel runs on the side stream past its join
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      const CudaLayerWeights& lw = w_->layers[Z(i)];
      LayerState& ls = s.layers_[Z(i)];
      const int64_t P = lw.x_proj_rows;
      float* proj = sc.proj.data();
      // The rows [r0, r0 + nr) this layer takes past its attention, over mr GEMM rows.
      const bool trimmed = trim && i + 1 == cfg_.num_layers;
      const int64_t r0 = trimmed ? n - 1 : 0;
      const int64_t nr = !trimmed ? n : rows == ChunkRows::kLast ? 1 : 0;
      const int64_t mr = trimmed ? nr : m;
      // A chunk that takes the tiled self-attention (over the cache in bf16, sc.kv_b); from
      // the GEMM path on, its output in bf16 (sc.yb) for o_proj's GEMM, which a memory layer
      // with the two stacked runs with the output gate's (OutputGateWithO, e in bf16 behind
      // the attention output: from the tiled read itself).
      const bool tiled = batch == nullptr && !trimmed && TiledAttention(n);
      const bool attn_bf16 = tiled && !Small(n);
      const bool o_with_gate = attn_bf16 && lw.o_out_gate != nullptr;
      // A chunk whose memory read and write sums are MemoryReadWrite's (decode steps and
      // single tokens have reads of their own); with o_with_gate its read also leaves e in
      // bf16 where OutputGateWithO takes it (else OutputGateWithO converts e itself).
      const bool tiled_read = batch == nullptr && n > 1 && tiled_memory_;
      bf16* e_bf16 = o_with_gate && tiled_read ? sc.yb.data() + m * d : nullptr;

      // Attention: one GEMM for q, k, v (and the memory query and write offer), then RoPE
      // straight into q and the cache rows of this chunk.
      LM2_RETURN_IF_ERROR(NormLinear(s, h, n, m, lw.input_norm, lw.x_proj, P, proj));

      // The memory read (decode: with the write terms staged; tiled chunks: with the write
      // sums) needs only the projection: without cuBLAS it runs on the side stream beside
      // self-attention and o_proj, joined before the output gate.
      const float* mq = proj + qdim + 2 * kvdim;
      const float* offer = mq + d;
      const bool side_read =
          lw.has_memory && options_.concurrent_memory_read && (batch != nullptr || n == 1 || tiled_memory_);
      // A tiled chunk's write sums may run past the join (CudaOptions::defer_memory_write).
      const bool defer_write = side_read && tiled_read && options_.defer_memory_write;
      // A tiled chunk's read and write sums (stored by a segment's first chunk), or one of them.
      auto read_write = [&](cudaStream_t on, MemoryReadWriteParts parts) {
        return MemoryReadWrite(mq, P, offer, P, ls.mem_k, ls.mem_v, n, N, d, Hm, sc.e.data(), !s.sums_empty_,
                               ls.mass.data(), ls.acc.data(), sc.read_stats.data(), on, parts,
                               parts == MemoryReadWriteParts::kWrite ? nullptr : e_bf16);
      };
      auto read_memory = [&](cudaStream_t mst) -> Status {
        if (batch != nullptr) {  // the read stages each token's write terms too
          const MemoryStage stage =
              stages_tokens_
                  ? MemoryStage{.offer = offer, .offer_ld = P, .slots = batch->slots, .staged = batch->Staged(i),
                                .capacity = options_.write_flush_tokens}
                  : MemoryStage{.offer = offer, .offer_ld = P, .slots = batch->slots,
                                .pending_attn = batch->PendingAttn(i), .pending_offer = batch->PendingOffer(i),
                                .mass = batch->Mass(i)};
          return MemoryReadBatch(mq, P, batch->MemK(i), batch->MemV(i), n, N, d, Hm, sc.mattn.data(), sc.e.data(),
                                 sc.read_partial.data(), &stage, mst);
        }
        if (n == 1) {
          return MemoryReadOneToken(mq, P, ls.mem_k, ls.mem_v, N, d, Hm, sc.mattn.data(), sc.e.data(),
                                    sc.read_partial.data(), mst);
        }
        if (tiled_memory_) {  // the write sums too, or after the join
          return read_write(mst, defer_write ? MemoryReadWriteParts::kRead : MemoryReadWriteParts::kBoth);
        }
        return MemoryRead(blas, mq, P, ls.mem_k, ls.mem_v, n, N, d, Hm, sc.mattn.data(), sc.e.data(),
                          sc.read_b.data(), mst);
      };
      // A batched step's RoPE, cache append and self-attention, on stream `on`.
      auto attend_batch = [&](cudaStream_t on) {
        return RopeAttentionDecodeBatch(proj, P, positions, sc.rope.data(), batch->KCaches(i), batch->VCaches(i), n,
                                        H, Hkv, Dh, sc.attn_out.data(),
                                        SplitsAttention(n) ? sc.attn_split.data() : nullptr, batch->max_keys, on);
      };
      // One-session decode steps on the GEMV path may instead keep the read on the main
      // stream, right after the projection (PDL: its K/V loads overlap the projection's end),
      // with self-attention and o_proj (a GEMV: no cuBLAS) on the side stream
      // (CudaOptions::memory_read_leads).
      const bool read_leads = side_read && batch != nullptr && n == 1 && Small(n) && options_.memory_read_leads;
      if (read_leads) {
        const cudaStream_t side = s.side_stream_.get();
        LM2_RETURN_IF_ERROR(s.fork_.Order(st, side));
        LM2_RETURN_IF_ERROR(attend_batch(side));
        LM2_RETURN_IF_ERROR(F32Linear(s, sc.attn_out.data(), n, m, qdim, lw.o_proj, d, sc.a.data(), false, side));
        LM2_RETURN_IF_ERROR(read_memory(st));
        LM2_RETURN_IF_ERROR(s.join_.Order(side, st));
        LM2_RETURN_IF_ERROR(OutputGate(s, n, m, lw.memory, h));
        LM2_RETURN_IF_ERROR(FeedForward(s, n, m, lw, h));
        continue;
      }
      if (side_read) {
        const cudaStream_t side = s.side_stream_.get();
        LM2_RETURN_IF_ERROR(s.fork_.Order(st, side));
        LM2_RETURN_IF_ERROR(read_memory(side));
        LM2_RETURN_IF_ERROR(s.join_.Record(side));  // the main stream waits for the read only
        if (defer_write) {  // the write sums after the join, beside the output gate and the FFN
          LM2_RETURN_IF_ERROR(read_write(side, MemoryReadWriteParts::kWrite));
          deferred_write = true;
        }
        const int64_t next_kv = NextMemoryLayer(i + 1);
        if (make_kv && next_kv < cfg_.num_layers) {
          LM2_RETURN_IF_ERROR(MakeMemoryKv(s, next_kv, s.side_cublas_.get(), side));
        }
      }

      if (batch != nullptr) {  // one token per session, each with its own cache: RoPE, cache append and attention
        LM2_RETURN_IF_ERROR(attend_batch(st));
      } else {
        // A tiled chunk attends over the cache in bf16 (sc.kv_b, sized by RunTokens): the
        // chunk's own rows rounded by SplitQkvRope as it writes them, the rows before it
        // (other chunks' and decode steps') by a conversion pass.
        bf16* k_b = sc.kv_b.data();
        bf16* v_b = k_b + S * kvdim;
        LM2_RETURN_IF_ERROR(SplitQkvRope(proj, n, P, H, Hkv, Dh, sc.rope.data(), sc.q.data(),
                                         ls.k_cache + pos0 * kvdim, ls.v_cache + pos0 * kvdim, st,
                                         tiled ? k_b + pos0 * kvdim : nullptr, tiled ? v_b + pos0 * kvdim : nullptr));
        if (trimmed) {  // the last row's query over the whole cache, as a decode step's, into row 0
          if (nr > 0 && SplitsAttention(1)) {  // over key ranges: 32 blocks over 2,048 keys took 71 µs
            LM2_RETURN_IF_ERROR(CausalAttentionDecodeSplit(sc.q.data() + r0 * qdim, ls.k_cache, ls.v_cache, 1, S, H,
                                                           Hkv, Dh, sc.attn_out.data(), sc.attn_split.data(), st));
          } else if (nr > 0) {
            LM2_RETURN_IF_ERROR(CausalAttention(sc.q.data() + r0 * qdim, ls.k_cache, ls.v_cache, 1, S, H, Hkv, Dh,
                                                sc.attn_out.data(), st));
          }
        } else if (tiled) {
          LM2_RETURN_IF_ERROR(ConvertF32ToBf16(ls.k_cache, pos0 * kvdim, k_b, st));
          LM2_RETURN_IF_ERROR(ConvertF32ToBf16(ls.v_cache, pos0 * kvdim, v_b, st));
          if (attn_bf16) {
            LM2_RETURN_IF_ERROR(CausalAttentionTiled(sc.q.data(), k_b, v_b, n, S, H, Hkv, Dh, sc.yb.data(), st));
          } else {
            LM2_RETURN_IF_ERROR(
                CausalAttentionTiled(sc.q.data(), k_b, v_b, n, S, H, Hkv, Dh, sc.attn_out.data(), st));
          }
        } else if (n >= options_.attention_gemm_min_tokens) {
          LM2_RETURN_IF_ERROR(EnsureCapacity(sc.scores, Z(H * n * S)));
          LM2_RETURN_IF_ERROR(CausalAttentionGemm(blas, sc.q.data(), ls.k_cache, ls.v_cache, n, S, H,
                                                  Hkv, Dh, sc.scores.data(), sc.attn_out.data(), st));
        } else {
          LM2_RETURN_IF_ERROR(CausalAttention(sc.q.data(), ls.k_cache, ls.v_cache, n, S, H, Hkv, Dh,
                                              sc.attn_out.data(), st));
        }
      }
      // The attention output: kept apart in layers with memory (the gate adds it), else
      // added to the residual stream at once. A memory layer's o_proj over a tiled chunk waits
      // for the read instead, to run with the output gate's GEMM as one call (OutputGateWithO:
      // at 512 rows the pair took 15.0 µs against 2 x 10.2 apart, prefill 512 +3-4%, H200).
      float* o_proj_out = lw.has_memory ? sc.a.data() : h;
      if (attn_bf16 && !o_with_gate) {
        LM2_RETURN_IF_ERROR(Linear(blas, sc.yb.data(), m, qdim, lw.o_proj, d, o_proj_out, !lw.has_memory, st));
      } else if (!attn_bf16 && nr > 0) {
        LM2_RETURN_IF_ERROR(F32Linear(s, sc.attn_out.data(), nr, mr, qdim, lw.o_proj, d, o_proj_out + r0 * d,
                                      !lw.has_memory, st));
      }

      if (lw.has_memory) {
        if (side_read) {
          LM2_RETURN_IF_ERROR(s.join_.Wait(st));
        } else {
          LM2_RETURN_IF_ERROR(read_memory(st));
        }
        if (o_with_gate) {
          LM2_RETURN_IF_ERROR(OutputGateWithO(s, n, m, lw, h, /*e_in_bf16=*/e_bf16 != nullptr));
        } else if (nr > 0) {
          LM2_RETURN_IF_ERROR(OutputGate(s, nr, mr, lw.memory, h, r0));
        }
        // The write sums (a batched step's were staged by its read, a tiled chunk's added by it).
        if (batch == nullptr && n == 1) {
          LM2_RETURN_IF_ERROR(
              AccumulateWriteOneToken(sc.mattn.data(), offer, N, d, Hm, ls.mass.data(), ls.acc.data(), st));
        } else if (batch == nullptr && !tiled_memory_) {
          LM2_RETURN_IF_ERROR(
              AccumulateWrite(blas, sc.mattn.data(), offer, P, n, N, d, Hm, ls.mass.data(), ls.acc.data(), st));
        }
      }

      // (With o_with_gate, a memory layer's GEMM chunk of all n rows, its FFN input is normed.)
      if (nr > 0) LM2_RETURN_IF_ERROR(FeedForward(s, nr, mr, lw, h + r0 * d, lw.has_memory && o_with_gate));
    }
    if (deferred_write) LM2_RETURN_IF_ERROR(s.join_.Order(s.side_stream_.get(), st));  // the last write sums
    if (make_kv) s.kv_current_ = true;
    return Status::Ok();
  }

  // The linear layers of a chunk of n rows. Up to gemv_rows_ rows (decode steps) they are
  // the fused GEMV kernels, one pass over the weights with the neighbouring elementwise op
  // inside; longer chunks run cuBLAS GEMMs beside the separate elementwise kernels. Both
  // give the same bf16 inputs; only the fp32 summation order differs.
  bool Small(int64_t n) const { return n <= gemv_rows_; }

  // Whether a decode step of n rows splits its self-attention over long rows' keys
  // (CudaOptions::split_decode_attention; SplitsDecodeAttention): on the GEMV path, where a
  // state's results are the same alone or batched (the split's ranges follow from a row's
  // length alone), and up to 4 rows where a block serves a KV head's 4 query heads (4
  // sessions after 2,048 tokens +14%, H200). At 8 sessions a block per (row, head) already
  // fills the device: the split was 7-9% slower unpacked and no faster packed.
  bool SplitsAttention(int64_t n) const {
    return options_.split_decode_attention &&
           SplitsDecodeAttention(n, gemv_rows_, cfg_.num_heads, cfg_.num_kv_heads);
  }

  // The rows the cuBLAS GEMMs of a chunk of n rows (or of a batched decode step of n
  // sessions) run over: a chunk's n rounded up to a multiple of kGemmRowStep. cuBLAS chooses
  // (and the driver loads) a kernel, and sets up a call shape, the first time the process
  // makes that call: 0.3-4 ms each (H200), which a prompt of a length not seen before paid
  // in each of its five GEMMs. Rounded, all lengths up to 2048
  // share 32 row counts, and the warm-up at load runs those up to kWarmGemmRows. The extra
  // rows hold whatever the scratch held (no op reads their results: every row of a GEMM is
  // computed on its own), and cost next to nothing: cuBLAS's tiles are 64 rows or more.
  // Batched decode steps and the LM head keep their exact rows (a batch of 8 rounded to 64
  // decoded 2% slower; the head's logits are copied out whole).
  int64_t GemmRows(int64_t n, bool batch_step) const {
    return batch_step || Small(n) ? n : (n + kGemmRowStep - 1) / kGemmRowStep * kGemmRowStep;
  }

  // Whether a chunk of n rows takes CausalAttentionTiled.
  bool TiledAttention(int64_t n) const { return tiled_attention_ && n >= options_.attention_gemm_min_tokens; }

  // y[n, out] = bf16(RMSNorm(x; norm)) · Wᵀ; with argmax_keys, also each row's greedy pick
  // (ArgmaxRows' keys): from the GEMV itself (keys zeroed by the caller), else a pass over y.
  // Here and below, a GEMM runs over m >= n rows (GemmRows; x and y hold them).
  Status NormLinear(CudaState& s, const float* x, int64_t n, int64_t m, const float* norm, const bf16* w,
                    int64_t out, float* y, uint64_t* argmax_keys = nullptr) const {
    const int64_t d = cfg_.hidden_size;
    const auto eps = static_cast<float>(cfg_.rms_norm_eps);
    const cudaStream_t st = s.stream_.get();
    if (Small(n)) {
      return Gemv({.input = GemvInput::kRmsNorm, .x = x, .x_ld = d, .norm_weight = norm, .eps = eps, .w = w, .rows = n,
                   .in = d, .out = out,
                   .output = argmax_keys != nullptr ? GemvOutput::kStoreArgmax : GemvOutput::kStore, .y = y,
                   .argmax_keys = argmax_keys},
                  st);
    }
    LM2_RETURN_IF_ERROR(RmsNormBf16(x, norm, n, d, eps, s.scratch_.xb.data(), st));
    LM2_RETURN_IF_ERROR(Linear(s.cublas_.get(), s.scratch_.xb.data(), m, d, w, out, y, false, st));
    return argmax_keys != nullptr ? ArgmaxRows(y, n, out, argmax_keys, st) : Status::Ok();
  }

  // y[n, out] (+)= bf16(x) · Wᵀ for fp32 x [n, in], on stream `on`: the state's main stream,
  // or its second one for chunks of the GEMV's rows (cuBLAS and its workspace belong to the
  // main stream).
  Status F32Linear(CudaState& s, const float* x, int64_t n, int64_t m, int64_t in, const bf16* w, int64_t out,
                   float* y, bool accumulate, cudaStream_t on) const {
    if (Small(n)) {
      return Gemv({.input = GemvInput::kF32, .x = x, .x_ld = in, .w = w, .rows = n, .in = in, .out = out,
                   .output = accumulate ? GemvOutput::kAccumulate : GemvOutput::kStore, .y = y},
                  on);
    }
    if (on != s.stream_.get()) return Status::FailedPrecondition("F32Linear: cuBLAS off the state's main stream");
    return LinearF32(s.cublas_.get(), x, m, in, w, out, y, accumulate, s.scratch_.yb.data(), on);
  }

  // The memory output gate and both residual adds: h += a + sigmoid(e W_ogᵀ + b_og) ⊙ e, for
  // chunk rows [row, row + n) (h, a and e from that row on).
  Status OutputGate(CudaState& s, int64_t n, int64_t m, const CudaMemoryWeights& mw, float* h, int64_t row = 0) const {
    const int64_t d = cfg_.hidden_size;
    const cudaStream_t st = s.stream_.get();
    Scratch& sc = s.scratch_;
    const float* e = sc.e.data() + row * d;
    const float* a = sc.a.data() + row * d;
    float* y = h + row * d;
    if (Small(n)) {
      return Gemv({.input = GemvInput::kF32, .x = e, .x_ld = d, .w = mw.out_gate_w, .rows = n, .in = d, .out = d,
                   .output = GemvOutput::kGatedResidual, .y = y, .bias = mw.out_gate_b, .residual = a, .gated = e},
                  st);
    }
    LM2_RETURN_IF_ERROR(
        LinearF32(s.cublas_.get(), e, m, d, mw.out_gate_w, d, sc.gate.data(), false, sc.yb.data(), st));
    return GatedResidual(y, a, sc.gate.data(), mw.out_gate_b, n, d, e, st);
  }

  // OutputGate's GEMM and o_proj's for a tiled chunk of a memory layer, as one strided-batched
  // GEMM over the weights stacked at load (o_out_gate): x [2, m, d] in sc.yb, the attention
  // output there already (CausalAttentionTiled) and e rounded to bf16 behind it (by the
  // read, with e_in_bf16, else here); the two
  // results [2, m, d] in sc.gate_up (free until the FFN); then the gated residual, in the
  // same kernel as the FFN's input norm: bf16(RMSNorm(h)) left in sc.xb for FeedForward.
  Status OutputGateWithO(CudaState& s, int64_t n, int64_t m, const CudaLayerWeights& lw, float* h,
                         bool e_in_bf16) const {
    const int64_t d = cfg_.hidden_size;
    const cudaStream_t st = s.stream_.get();
    Scratch& sc = s.scratch_;
    bf16* x_pair = sc.yb.data();
    // (Rows [n, m) of either half are whatever the scratch held: no op reads their results.)
    if (!e_in_bf16) LM2_RETURN_IF_ERROR(ConvertF32ToBf16(sc.e.data(), m * d, x_pair + m * d, st));
    float* y_pair = sc.gate_up.data();
    LM2_RETURN_IF_ERROR(LinearTwo(s.cublas_.get(), x_pair, m, d, lw.o_out_gate, d, y_pair, st));
    return GatedResidualRmsNormBf16(h, y_pair, y_pair + m * d, lw.memory.out_gate_b, n, d, sc.e.data(), lw.post_norm,
                                    static_cast<float>(cfg_.rms_norm_eps), sc.xb.data(), st);
  }

  // The SwiGLU FFN: h += bf16(silu(gate) ⊙ up) · W_downᵀ with gate | up = bf16(RMSNorm(h)) ·
  // W_gate_upᵀ. Up to gemv_rows_ rows the gate|up GEMV stores the activation itself, in bf16
  // (sc.yb), and the down GEMV reads it, gate and up taken in fp32; longer chunks run a GEMM
  // whose epilogue applies the SwiGLU (LinearSwiGlu, on Hopper) or else a GEMM into
  // sc.gate_up in bf16 and SwiGluBf16, then the down GEMM (gate and up rounded to bf16
  // first: the two forms' activations differ in the last bits). `normed`: a GEMM chunk's
  // bf16(RMSNorm(h)) is in sc.xb already (OutputGateWithO).
  Status FeedForward(CudaState& s, int64_t n, int64_t m, const CudaLayerWeights& lw, float* h,
                     bool normed = false) const {
    const int64_t d = cfg_.hidden_size, F = cfg_.intermediate_size;
    const cudaStream_t st = s.stream_.get();
    Scratch& sc = s.scratch_;
    if (Small(n)) {
      LM2_RETURN_IF_ERROR(Gemv({.input = GemvInput::kRmsNorm, .x = h, .x_ld = d, .norm_weight = lw.post_norm,
                                .eps = static_cast<float>(cfg_.rms_norm_eps), .w = lw.gate_up, .rows = n, .in = d,
                                .out = 2 * F, .output = GemvOutput::kSwiGluBf16, .y_bf16 = sc.yb.data()},
                               st));
      return Gemv({.input = GemvInput::kBf16, .x = sc.yb.data(), .x_ld = F, .w = lw.down_proj, .rows = n, .in = F,
                   .out = d, .output = GemvOutput::kAccumulate, .y = h},
                  st);
    }
    if (!normed) {
      LM2_RETURN_IF_ERROR(RmsNormBf16(h, lw.post_norm, n, d, static_cast<float>(cfg_.rms_norm_eps), sc.xb.data(), st));
    }
    if (LinearSwiGluSupported(m, d, F)) {
      // Over the m rows, as the GEMMs: its copies of x then never stop partway into a box.
      LM2_RETURN_IF_ERROR(LinearSwiGlu(sc.xb.data(), m, d, lw.gate_up, F, sc.yb.data(), st));
    } else {
      // gate | up stored in bf16 (in the fp32 buffer's first half): the GEMM writes, and
      // SwiGluBf16 reads, half the bytes.
      auto* gate_up = reinterpret_cast<bf16*>(sc.gate_up.data());
      LM2_RETURN_IF_ERROR(LinearToBf16(s.cublas_.get(), sc.xb.data(), m, d, lw.gate_up, 2 * F, gate_up, st));
      LM2_RETURN_IF_ERROR(SwiGluBf16(gate_up, n, F, sc.yb.data(), st));
    }
    return Linear(s.cublas_.get(), sc.yb.data(), m, F, lw.down_proj, d, h, true, st);
  }

  // Logits of chunk rows [row, row + rows) into sc.logits [rows, V] (sized by the caller),
  // with argmax_keys each row's greedy pick too (NormLinear).
  Status LogitsOnDevice(CudaState& s, int64_t row, int64_t rows, uint64_t* argmax_keys = nullptr) const {
    const int64_t d = cfg_.hidden_size, V = cfg_.vocab_size;
    Scratch& sc = s.scratch_;
    return NormLinear(s, sc.h.data() + row * d, rows, rows, w_->final_norm, w_->lm_head, V, sc.logits.data(),
                      argmax_keys);
  }

  // The same, copied to host `out` [rows, V] (waits for the stream).
  Status ComputeLogits(CudaState& s, int64_t row, int64_t rows, float* out) const {
    const int64_t V = cfg_.vocab_size;
    LM2_RETURN_IF_ERROR(EnsureCapacity(s.scratch_.logits, Z(rows * V)));
    LM2_RETURN_IF_ERROR(LogitsOnDevice(s, row, rows));
    return s.scratch_.logits.CopyToHost(out, Z(rows * V), s.stream_.get());
  }

  std::shared_ptr<const ModelFiles> files_;
  std::unique_ptr<CudaWeights> w_;
  const ModelConfig& cfg_;
  CudaOptions options_;
  // Chunks of at most this many rows take the GEMV path: options_.gemv_max_rows, or fewer
  // where a layer's input is too wide for that many rows (x' is staged whole on chip).
  int64_t gemv_rows_ = 0;
  // Multi-token chunks take MemoryReadWrite (else MemoryRead, then AccumulateWrite).
  bool tiled_memory_ = false;
  // Decode steps stage their tokens' queries for the tiled write kernel (MemoryStage::staged)
  // instead of their probabilities.
  bool stages_tokens_ = false;
  // Chunks of attention_gemm_min_tokens or more take CausalAttentionTiled (else the GEMMs).
  bool tiled_attention_ = false;
  // Per layer, the initial bank's memory K then V [2, N, d] (PrepareInitialMemoryKv; empty
  // buffers in layers without memory, none at all with share_initial_memory_kv off).
  std::vector<DeviceBuffer<bf16>> initial_kv_;
  // The streams and cuBLAS handles of ended states, for new ones (NewState).
  std::shared_ptr<LanePool> lanes_ = std::make_shared<LanePool>();
};

}  // namespace
}  // namespace cuda

Result<std::unique_ptr<Model>> LoadCudaModel(std::shared_ptr<const ModelFiles> files, const CudaOptions& options) {
  if (files == nullptr) return Status::InvalidArgument("LoadCudaModel: no model files");
  if (options.max_chunk_tokens <= 0) return Status::InvalidArgument("CudaOptions::max_chunk_tokens must be > 0");
  if (options.write_flush_tokens <= 0) return Status::InvalidArgument("CudaOptions::write_flush_tokens must be > 0");
  if (options.gemv_max_rows < 0 || options.gemv_max_rows > cuda::kGemvMaxRows) {
    return Status::InvalidArgument("CudaOptions::gemv_max_rows must be in [0, " +
                                   std::to_string(cuda::kGemvMaxRows) + "]");
  }
  if (options.attention_gemm_min_tokens <= 0) {
    return Status::InvalidArgument("CudaOptions::attention_gemm_min_tokens must be > 0");
  }
  if (options.bank_transfer_piece_bytes < 16) {
    return Status::InvalidArgument("CudaOptions::bank_transfer_piece_bytes must be >= 16");
  }
  if (options.bank_transfer_threads < 1 || options.bank_transfer_threads > 64) {
    return Status::InvalidArgument("CudaOptions::bank_transfer_threads must be in [1, 64]");
  }
  LM2_ASSIGN_OR_RETURN(auto devices, ListCudaDevices());
  if (options.device < 0 || static_cast<std::size_t>(options.device) >= devices.size()) {
    return Status::Unavailable("CUDA device " + std::to_string(options.device) + " not present (" +
                               std::to_string(devices.size()) + " device(s) found)");
  }
  if (const CudaDeviceInfo& dev = devices[static_cast<std::size_t>(options.device)]; !dev.supported) {
    return Status::Unavailable("CUDA device " + std::to_string(options.device) + " (" + dev.name +
                               ", compute capability " + std::to_string(dev.compute_major) + "." +
                               std::to_string(dev.compute_minor) +
                               ") is not supported by this build: rebuild with its architecture in "
                               "LM2_CUDA_ARCHITECTURES");
  }
  const ModelConfig& cfg = files->config();
  // cuBLAS and the kernels' grids take 32-bit dimensions.
  const int64_t kMax = int64_t{1} << 31;
  if (cfg.vocab_size >= kMax || cfg.memory_slots * cfg.memory_heads >= kMax) {
    return Status::Unimplemented("model dimensions exceed what the CUDA backend addresses");
  }
  if (cfg.head_dim > cuda::kMaxDecodeHeadDim) {  // the decode attention kernel keeps a head's row in registers
    return Status::Unimplemented("head_dim " + std::to_string(cfg.head_dim) + " above " +
                                 std::to_string(cuda::kMaxDecodeHeadDim) + " on the CUDA backend");
  }
  LM2_RETURN_IF_ERROR(cuda::UseDevice(options.device));
  // Every kernel's code on the device now rather than at its first launch, which on a full
  // device could fail after a call's reservations (kernel_modules.h).
  LM2_RETURN_IF_ERROR(cuda::LoadAllKernels().status());
  LM2_ASSIGN_OR_RETURN(auto weights, cuda::CudaWeights::Upload(*files, options.device));
  auto model = std::make_unique<cuda::CudaModel>(std::move(files), std::move(weights), options);
  LM2_RETURN_IF_ERROR(model->PrepareInitialMemoryKv());
  if (options.warm_up) LM2_RETURN_IF_ERROR(model->WarmUp());
  return std::unique_ptr<Model>(std::move(model));
}

}  // namespace lm2::runtime
