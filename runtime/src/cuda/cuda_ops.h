// The CUDA backend's ops: the same shapes and semantics as cpu/cpu_ops.h, on device
// pointers, each enqueued on a caller's stream.
//
// Precisions (docs/cuda.md): activations, norms, gates, attention and the memory bank are
// fp32 with fp32 math; linear-layer weights are bf16 [out, in], multiplied by bf16 copies of
// the activations with fp32 accumulation and an fp32 result (cuBLAS, CUBLAS_COMPUTE_32F).
//
// Every launcher checks shapes (ops/op_shapes.h, shared with the CPU backend) and pointers,
// launches, and returns the launch status; nothing is synchronised, so a fault inside a
// kernel shows at the caller's next synchronisation. Pointers are device memory owned by
// the caller and must not alias unless said. Zero-sized work is a no-op returning OK.
// Kernels live beside their launchers, one .cu file per op.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "lm2/core/status.h"

namespace lm2::runtime::cuda {

// ---- Linear layers (linear.cu) -----------------------------------------------------------

// y[rows, out] = x[rows, in] · W[out, in]ᵀ (+ y when accumulate): bf16 x and W, fp32
// accumulation and fp32 y. Sets `handle`'s stream to `stream`.
Status Linear(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w,
              int64_t out, float* y, bool accumulate, cudaStream_t stream);

// Linear with a bf16 result (rounded from the fp32 accumulation): the memory K and V.
Status LinearToBf16(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in,
                    const __nv_bfloat16* w, int64_t out, __nv_bfloat16* y, cudaStream_t stream);

// Two weights stacked [2, out, in] (w_pair) against one x: y_pair [2, rows, out] = x · W_0ᵀ,
// x · W_1ᵀ, as one strided-batched GEMM (a bank's memory K and V, the two memory gates: at
// 2048 x 2048 x 2048 one GEMM's tiles fill less than a wave of the GPU, two do better). The
// sums as Linear's up to their order; fp32 results, or rounded to bf16.
Status LinearPair(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in,
                  const __nv_bfloat16* w_pair, int64_t out, float* y_pair, cudaStream_t stream);
Status LinearPairToBf16(cublasHandle_t handle, const __nv_bfloat16* x, int64_t rows, int64_t in,
                        const __nv_bfloat16* w_pair, int64_t out, __nv_bfloat16* y_pair, cudaStream_t stream);

// Two inputs against two weights of one shape: y_pair [2, rows, out] = x_0 · W_0ᵀ, x_1 · W_1ᵀ
// for x_pair [2, rows, in], w_pair [2, out, in], as one strided-batched GEMM with fp32
// results: a memory layer's o_proj and output gate over a prompt chunk (at 512 x 2048 x 2048
// the pair took 15.0 µs on an H200, each GEMM alone 10.2).
Status LinearTwo(cublasHandle_t handle, const __nv_bfloat16* x_pair, int64_t rows, int64_t in,
                 const __nv_bfloat16* w_pair, int64_t out, float* y_pair, cudaStream_t stream);

// The same from fp32 activations: x is rounded to bf16 into `x_bf16` (scratch of rows*in,
// caller-owned), then multiplied as above.
Status LinearF32(cublasHandle_t handle, const float* x, int64_t rows, int64_t in, const __nv_bfloat16* w,
                 int64_t out, float* y, bool accumulate, __nv_bfloat16* x_bf16, cudaStream_t stream);

// ---- Small-batch linear layers (gemv.cu) ---------------------------------------------------

// Decode steps multiply a few rows by each weight matrix: one pass over W at the memory
// bandwidth, with the op before it and the op after it fused in. cuBLAS serves larger batches.
inline constexpr int64_t kGemvMaxRows = 8;
// x' is staged whole in shared memory: rows * in <= this (32 KiB of bf16).
inline constexpr int64_t kGemvStageElements = 16384;

// How x' (the bf16 rows multiplied by W) is made from x.
enum class GemvInput {
  kBf16,     // x is bf16 [rows, in]
  kF32,      // x fp32 [rows, in], rounded to bf16 (as LinearF32)
  kRmsNorm,  // bf16(RMSNorm(x; norm_weight, eps)) of fp32 x [rows, in] (as RmsNormBf16)
};
// What becomes of r = x' · Wᵀ [rows, out].
enum class GemvOutput {
  kStore,          // y = r
  kAccumulate,     // y += r
  kGatedResidual,  // y += residual + sigmoid(r + bias) ⊙ gated (the memory output gate)
  kStoreArgmax,    // y = r, and each row's greedy pick into argmax_keys (ArgmaxRows' keys)
  kSwiGluBf16,     // y_bf16[:, i] = bf16(silu(r[:, i]) * r[:, out/2 + i]): the stacked gate | up
                   // layer's SwiGLU, as SwiGluBf16 gives it from r (out even)
};

struct GemvArgs {
  GemvInput input = GemvInput::kF32;
  const void* x = nullptr;           // device rows, x_ld elements apart (>= in), 16-byte aligned
                                     // with x_ld a multiple of 8
  int64_t x_ld = 0;
  const float* norm_weight = nullptr;  // kRmsNorm: [in], 16-byte aligned
  float eps = 0.0f;                    // kRmsNorm
  const __nv_bfloat16* w = nullptr;  // [out, in] row-major, 16-byte aligned
  int64_t rows = 0, in = 0, out = 0;  // rows <= kGemvMaxRows, in a multiple of 8, rows * in <= kGemvStageElements
  GemvOutput output = GemvOutput::kStore;
  float* y = nullptr;                 // [rows, out]
  const float* bias = nullptr;        // kGatedResidual: [out]
  const float* residual = nullptr;    // kGatedResidual: [rows, out]
  const float* gated = nullptr;       // kGatedResidual: [rows, out]
  uint64_t* argmax_keys = nullptr;    // kStoreArgmax: [rows], zero on entry (atomicMax)
  __nv_bfloat16* y_bf16 = nullptr;    // kSwiGluBf16: [rows, out/2] (y unused)
};

// Whether Gemv takes this shape (else use Linear).
bool GemvSupports(int64_t rows, int64_t in);
// The most rows, up to max_rows, that GemvSupports at every one of the input widths (0: none):
// the decode steps a model runs on the GEMV path.
int64_t GemvRowsFor(int64_t max_rows, std::initializer_list<int64_t> widths);

// The fused linear layer above. A row's result does not depend on how many rows are passed
// with it (bit-identical alone or batched). x' and W in bf16, fp32 products and sums.
Status Gemv(const GemvArgs& args, cudaStream_t stream);

// ---- Elementwise (elementwise.cu) --------------------------------------------------------

// dst[n] = bf16(src[n]), round to nearest even: weight upload and GEMM inputs.
Status ConvertF32ToBf16(const float* src, int64_t n, __nv_bfloat16* dst, cudaStream_t stream);
// dst[r, c] = bf16(src[r * src_ld + c]) for c < cols: rows of a wider matrix, packed.
Status ConvertRowsF32ToBf16(const float* src, int64_t rows, int64_t cols, int64_t src_ld, __nv_bfloat16* dst,
                            cudaStream_t stream);
// dst[n] = float(src[n]) (exact).
Status ConvertBf16ToF32(const __nv_bfloat16* src, int64_t n, float* dst, cudaStream_t stream);

// y[rows, out] += bias[out] broadcast over rows.
Status AddBias(float* y, int64_t rows, int64_t out, const float* bias, cudaStream_t stream);

// h += a + sigmoid(gate_pre + gate_bias) ⊙ e over [rows, width] (the memory output gate,
// its bias broadcast over the rows, and both residual adds).
Status GatedResidual(float* h, const float* a, const float* gate_pre, const float* gate_bias, int64_t rows,
                     int64_t width, const float* e, cudaStream_t stream);

// out[n] = silu(gate[n]) * up[n]. out may alias gate.
Status SwiGlu(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream);

// out[t, :] = float(table[ids[t], :]) for t < T: the token embedding. table bf16 [V, d],
// ids device int32 [T] in [0, V) (validated by the caller; an id outside gives a NaN row).
Status EmbeddingLookup(const __nv_bfloat16* table, int64_t V, int64_t d, const int32_t* ids, int64_t T, float* out,
                       cudaStream_t stream);

// The fused FFN activation: gate_up[rows, 2F] holds [gate | up] per row (one GEMM over the
// stacked gate and up projections); out[rows, F] = bf16(silu(gate) * up), the down
// projection's input.
Status SwiGluBf16(const float* gate_up, int64_t rows, int64_t F, __nv_bfloat16* out, cudaStream_t stream);
// The same from bf16 [gate | up] rows (the gate|up GEMM's output rounded to bf16: half the
// bytes to store and read again of the fp32 form).
Status SwiGluBf16(const __nv_bfloat16* gate_up, int64_t rows, int64_t F, __nv_bfloat16* out, cudaStream_t stream);

// The gate|up projection and its SwiGLU as one GEMM (gemm_sm90.cu, Hopper's wgmma):
// y[rows, F] = bf16(silu(g) * u), g and u the bf16-rounded products of x [rows, d] with the
// stacked [W_gate; W_up] ([2F, d] bf16): LinearToBf16 and SwiGluBf16's result to the sums'
// order. Supported (LinearSwiGluSupported) on compute capability 9.0 in a build with the
// sm_90a code, for d a multiple of 64, F of 128 and the row counts whose tiles fill their
// rounds over the multiprocessors (gemm_sm90.cu; the others run faster unfused), unless
// LM2_CUDA_FUSED_SWIGLU=0; else Unavailable. Null or misaligned pointers (x and the weights
// 16-byte aligned, y 4-byte): InvalidArgument. Launched with LaunchPdl's overlap. Rows a
// multiple of 64 run fastest (a copy of x never stops partway into a 64-row box).
bool LinearSwiGluSupported(int64_t rows, int64_t d, int64_t F);
Status LinearSwiGlu(const __nv_bfloat16* x, int64_t rows, int64_t d, const __nv_bfloat16* w_gate_up, int64_t F,
                    __nv_bfloat16* y, cudaStream_t stream);

// x[n] += y[n].
Status AddInPlace(float* x, const float* y, int64_t n, cudaStream_t stream);

// Greedy picks (argmax.cu, and fused into the LM head's GEMV): the index of the largest
// entry of a row, the first of equal maxima, NaNs skipped, 0 when the row's first entry is
// NaN (what std::max_element and the host greedy sampler pick). Computed as 64-bit keys so
// that blocks combine their candidates with one atomicMax: a larger value has a larger key,
// of equal values the smaller index; 0 means no candidate (all NaN), and a first entry that
// is NaN gets the largest key. ArgmaxKeyToken reads a key back.
inline int32_t ArgmaxKeyToken(uint64_t key) {
  return key == 0 ? 0 : static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}
// keys[r] = the key of row r of x[rows, cols], rows <= 65535 (keys are zeroed first, on the
// stream).
Status ArgmaxRows(const float* x, int64_t rows, int64_t cols, uint64_t* keys, cudaStream_t stream);

// ---- Sampling (sample.cu) -------------------------------------------------------------------

// One row's TokenRule (sampler.h) as the device reads it. The row's repetition-penalty ids
// are history[history_begin, history_end) of SampleRows' id list, distinct (an empty range
// when the penalty is off).
struct DeviceTokenRule {
  double draw = 0.0;
  float temperature = 0.0f;
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  int32_t top_k = 0;
  int32_t history_begin = 0;
  int32_t history_end = 0;
};

// What SampleRows' planning found for a row with a temperature (device scratch).
struct SampleRowPlan {
  double total;        // the weight of the whole row
  float max_key;       // its largest (penalised) logit
  int32_t candidates;  // rows that sort: the leading candidates compacted for the pick's own
                       // sort; -1: the whole row sorted (SortSegmentsDescending)
  int32_t chosen_bin;  // with candidates >= 0: they are the keys of bins <= chosen_bin
};

// SampleRows' working buffers for rows x cols, caller-owned: keys, ids, sorted_keys and
// sorted_ids [rows * cols]; segment_begin, segment_end and plans [rows]; temp of temp_bytes
// >= SampleRowsTempBytes(rows, cols) (the row slices' partial results, then the whole-row
// sort's second keys and ids, rows * cols each).
struct SampleRowsScratch {
  float* keys = nullptr;
  int32_t* ids = nullptr;
  float* sorted_keys = nullptr;
  int32_t* sorted_ids = nullptr;
  int32_t* segment_begin = nullptr;
  int32_t* segment_end = nullptr;
  SampleRowPlan* plans = nullptr;
  void* temp = nullptr;
  std::size_t temp_bytes = 0;
};

// The bytes of SampleRowsScratch::temp for rows x cols (rows <= 65535, rows * cols < 2^31).
Result<std::size_t> SampleRowsTempBytes(int64_t rows, int64_t cols);

// What SampleRows' rows ask for, so that it skips the launches none needs (true is always
// correct, false only where no row asks).
struct SampleRowKinds {
  bool temperature = true;  // some rule samples (a temperature other than 0)
  bool sorts = true;        // some rule sorts (TokenRule::sorts)
  bool penalty = true;      // some rule has penalty ids
};

// Sorts each of `segments` ranges [segment_begin[s], segment_end[s]) of keys / ids (indices
// into arrays of n, the ranges disjoint) into the same places of sorted_keys / sorted_ids:
// descending by key, equal keys in their input order (CUB's SortPairsDescending's order).
// Keys hold no NaN; -0 sorts as +0 and comes out as +0. An empty range (end <= begin) is
// left alone, its outputs unwritten. alt_keys / alt_ids (n each) hold the passes between.
// A block per range (a stable radix sort, ~4 passes over the range); a block of an empty
// range returns at once. SampleRows' whole-row sort, segment_begin / segment_end device
// memory.
Status SortSegmentsDescending(const float* keys, const int32_t* ids, int64_t n, int64_t segments,
                              const int32_t* segment_begin, const int32_t* segment_end, float* sorted_keys,
                              int32_t* sorted_ids, float* alt_keys, int32_t* alt_ids, cudaStream_t stream);

// out[r] = the token rules[r] picks from row r of logits [rows, cols]: PickToken's rule
// (sampler.h), computed on the device: the same choice except where rounding of the
// weights' sums (double, in another order) moves a running total across its target, and
// NaN logits count as -inf. `rules` and `history` are device memory.
Status SampleRows(const float* logits, int64_t rows, int64_t cols, const DeviceTokenRule* rules, const int32_t* history,
                  SampleRowKinds kinds, const SampleRowsScratch& scratch, int32_t* out, cudaStream_t stream);

// ---- Normalisation and rotary embedding (rms_norm.cu, rope.cu) ----------------------------

// out[rows, d] = x * rsqrt(mean(x²) + eps) * weight. out may alias x. fp32 throughout.
Status RmsNorm(const float* x, const float* weight, int64_t rows, int64_t d, float eps, float* out,
               cudaStream_t stream);

// RmsNorm with a bf16 output (the next GEMM's input), the same fp32 math.
Status RmsNormBf16(const float* x, const float* weight, int64_t rows, int64_t d, float eps, __nv_bfloat16* out,
                   cudaStream_t stream);

// GatedResidual(h, a, gate_pre, gate_bias, rows, d, e) then RmsNormBf16(h, norm_weight,
// rows, d, eps, out), the same bits, as one kernel where d is a multiple of 8 up to 4096 and
// every pointer 16-byte aligned (else the two): the memory output gate's residual and the
// FFN's input norm of a prefill chunk.
Status GatedResidualRmsNormBf16(float* h, const float* a, const float* gate_pre, const float* gate_bias,
                                int64_t rows, int64_t d, const float* e, const float* norm_weight, float eps,
                                __nv_bfloat16* out, cudaStream_t stream);

// The fused attention input: proj[rows, proj_ld] holds [q (heads*D) | k (kv_heads*D) |
// v (kv_heads*D) | anything] per row (one GEMM over the stacked projections). q and k are
// rotated as Rope does into q_out[rows, heads*D] and k_out[rows, kv_heads*D] (the KV cache
// rows), v copied to v_out[rows, kv_heads*D]. factors[rows, D/2]: the rows' rotary factors
// from RopeFactorsBatch (computed once per forward and shared by its layers). With
// k_bf16 and v_bf16 (both or neither), the k and v rows also go there rounded to bf16, the
// bits ConvertF32ToBf16 of k_out / v_out gives (the tiled attention's operands: a chunk's
// new cache rows then need no conversion pass of their own).
Status SplitQkvRope(const float* proj, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, const float2* factors, float* q_out, float* k_out, float* v_out,
                    cudaStream_t stream, __nv_bfloat16* k_bf16 = nullptr, __nv_bfloat16* v_bf16 = nullptr);

// SplitQkvRope for one token of each of `rows` sessions: row t's k and v go to
// k_caches[t] / v_caches[t] (device arrays of device pointers, one KV cache per session) at
// row positions[t], the position its factors are for.
Status SplitQkvRopeBatch(const float* proj, int64_t rows, int64_t proj_ld, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, const int64_t* positions, const float2* factors, float* q_out,
                         float* const* k_caches, float* const* v_caches, cudaStream_t stream);

// The rotary factors of a forward's rows, shared by its layers: factors[t, i] = (cos, sin)
// of pair i (of head_dim / 2) at positions[t], the values Rope computes.
Status RopeFactorsBatch(const int64_t* positions, int64_t rows, int64_t head_dim, double theta, float2* factors,
                        cudaStream_t stream);

// Rotary embedding in place, rotate-half: x[t, h, :], pairs (i, i + head_dim/2) rotated by
// positions[t] * theta^(-2i/head_dim); angles, cos and sin in double, rounded to fp32 as
// the CPU backend does. positions is a device array of `rows`.
Status Rope(float* x, int64_t rows, int64_t heads, int64_t head_dim, const int64_t* positions, double theta,
            cudaStream_t stream);

// ---- Self-attention (attention.cu) -------------------------------------------------------

// Causal grouped-query attention of T new queries over S cached keys (the last T of which
// are the new tokens): q[T, H*D], k/v cache[S, Hkv*D] (rows = positions), out[T, H*D].
// Query t sits at cache position S - T + t and sees positions <= that. Dispatches to the
// decode kernel for T == 1 and the tiled prefill kernel otherwise.
Status CausalAttention(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream);

// The two kernels behind CausalAttention, callable directly (tests run both on every
// shape). Decode (head_dim <= kMaxDecodeHeadDim): one block per (query, head), warps stream
// over the keys 8 at a time with an online softmax each. Prefill: a block per (16-query
// tile, head), 32-key tiles through shared memory, online softmax per query row.
inline constexpr int64_t kMaxDecodeHeadDim = 256;  // the decode kernel keeps a head's row in registers
Status CausalAttentionDecode(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                             int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream);
Status CausalAttentionPrefill(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                              int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream);
// CausalAttentionDecode for T <= kGemvMaxRows rows at the cache's end, split over key ranges
// as CausalAttentionDecodeBatch splits a row (split_scratch as there; the same bits as that
// op gives a row of the same keys): a prompt's last layer attends for its last row alone,
// and unsplit, 32 blocks over 2,048 keys took 71 µs (H200, the paper's 32 heads).
Status CausalAttentionDecodeSplit(const float* q, const float* k_cache, const float* v_cache, int64_t T, int64_t S,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, float* split_scratch,
                                  cudaStream_t stream);

// Decode attention for one token of each of B sessions: query row b over its own cache
// k_caches[b] / v_caches[b] ([positions[b] + 1, Hkv*D] rows visible; device arrays of
// device pointers). The decode kernel's math, a block per (session, head); with
// split_scratch (AttentionDecodeSplitScratch(heads, head_dim) floats, zero before its first
// call: every call leaves its counters zero; calls sharing it run one after another) and
// B <= kGemvMaxRows, a row of more than 128 keys is split into up to 16 key ranges, whose
// partial results are merged by the last block to finish (flash-decoding): a long context's
// keys are read by many multiprocessors at once instead of by one block a head (for one row
// a block a range; for more, a block walks several of a row's ranges; past two rows a block
// serves the 4 query heads of a KV head where AttentionDecodePacksHeads, each key loaded once
// for them). The ranges and the merge order depend on the row's length only, and the packing
// leaves each head's arithmetic as it is, so a row's result does not depend on B; rows of up
// to 128 keys give the unsplit kernel's bits. max_keys (the most keys a row sees,
// positions[b] + 1) sizes the grid, so that short rows launch no idle blocks; rows past it
// are still right, with fewer blocks at a time.
Status CausalAttentionDecodeBatch(const float* q, const float* const* k_caches, const float* const* v_caches,
                                  const int64_t* positions, int64_t B, int64_t heads, int64_t kv_heads,
                                  int64_t head_dim, float* out, float* split_scratch, int64_t max_keys,
                                  cudaStream_t stream);
// Floats of CausalAttentionDecodeBatch's and RopeAttentionDecodeBatch's split_scratch, for any
// B up to kGemvMaxRows (larger batches are not split): 1.1 MB at 32 heads of 64.
int64_t AttentionDecodeSplitScratch(int64_t heads, int64_t head_dim);
// What a split call's grid is sized by for rows of up to max_keys keys: the rows' key ranges
// (one per 128 keys, at most 16) rounded up to a power of two, so that a captured decode
// step's launch changes only at 129, 257, 513 and 1,025 keys.
int64_t AttentionDecodeSplitGrid(int64_t max_keys);
// Whether a split call of more than two rows gives each block the 4 query heads of a KV head
// (the group a multiple of 4), loading each key once for them (the same bits as a block a
// head): what makes the split pay beyond the GEMV path (the paper's model, H200: 4 sessions
// after 2,048 tokens +14%; unpacked, +9%, and 8 sessions lost 7-14%).
bool AttentionDecodePacksHeads(int64_t heads, int64_t kv_heads);
// The model's rule for which decode steps split their attention (with the option on): steps
// on the GEMV path (up to gemv_rows rows), where a state's bits must equal its bits alone, and
// up to 4 rows where AttentionDecodePacksHeads (at 8 the packed split attention was slower
// alone and the step even).
bool SplitsDecodeAttention(int64_t rows, int64_t gemv_rows, int64_t heads, int64_t kv_heads);

// SplitQkvRopeBatch then CausalAttentionDecodeBatch as one kernel (the decode step's): each
// block rotates its query head (or heads) and its KV head's new key from proj by `factors`
// (RopeFactorsBatch of the positions and the model's theta), writes the new k and v rows
// into the caches at positions[b] (every block of a KV group the same values: a benign race),
// and the attention takes the new row from shared memory. Bit-identical to the two ops (with the
// same split_scratch or none).
Status RopeAttentionDecodeBatch(const float* proj, int64_t proj_ld, const int64_t* positions, const float2* factors,
                                float* const* k_caches, float* const* v_caches, int64_t B, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, float* out, float* split_scratch,
                                int64_t max_keys, cudaStream_t stream);

// Prefill attention on tensor cores, flash style (attention_tiled.cu; sm_80 and later):
// same semantics as CausalAttention over k and v, a bf16 copy of the KV cache [S, Hkv*D]
// (ConvertF32ToBf16 of its first S rows); q rounded to bf16, the probabilities too before
// they multiply v, fp32 scores, softmax and accumulation; no scratch. Head widths up to 128
// (CausalAttentionTiledSupported); q, k, v and out 16-byte aligned. The bf16 form rounds the
// output as ConvertF32ToBf16 of the fp32 form's would (the next GEMM's input).
bool CausalAttentionTiledSupported(int64_t head_dim);
Status CausalAttentionTiled(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t T, int64_t S,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream);
Status CausalAttentionTiled(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t T, int64_t S,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, __nv_bfloat16* out,
                            cudaStream_t stream);

// Prefill attention through cuBLAS (same semantics as CausalAttention): scores [H, T, S]
// (caller's scratch, fp32) = q·kᵀ/sqrt(D) by strided-batched TF32 GEMMs, a causal softmax,
// out = p·v the same way. Tensor cores make it the fast form for long prefills; it costs
// H*T*S floats of scratch.
Status CausalAttentionGemm(cublasHandle_t handle, const float* q, const float* k_cache, const float* v_cache,
                           int64_t T, int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim, float* scores,
                           float* out, cudaStream_t stream);

// ---- Building blocks of the GEMM-based ops (linear.cu, softmax.cu) -------------------------

// cublasGemmStridedBatchedEx on fp32 column-major operands with TF32 tensor cores and fp32
// accumulation: C_i = alpha op(A_i) op(B_i) + beta C_i, X_i = X + i * stride_x.
Status GemmStridedBatchedF32(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m,
                             int64_t n, int64_t k, float alpha, const float* a, int64_t lda, int64_t stride_a,
                             const float* b, int64_t ldb, int64_t stride_b, float beta, float* c, int64_t ldc,
                             int64_t stride_c, int64_t batch, cudaStream_t stream);

// The same on bf16 operands (A and B), fp32 accumulation and fp32 C.
Status GemmStridedBatchedBf16(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m,
                              int64_t n, int64_t k, float alpha, const __nv_bfloat16* a, int64_t lda,
                              int64_t stride_a, const __nv_bfloat16* b, int64_t ldb, int64_t stride_b, float beta,
                              float* c, int64_t ldc, int64_t stride_c, int64_t batch, cudaStream_t stream);

// Softmax of each row of x[rows, cols] in place. causal_T > 0: row r keeps its first
// causal_offset + r % causal_T + 1 entries (the keys query r % causal_T sees) and the rest
// become 0; causal_T = 0: every entry counts.
Status SoftmaxRows(float* x, int64_t rows, int64_t cols, int64_t causal_T, int64_t causal_offset, cudaStream_t stream);

// ---- Memory (memory_read.cu, memory_write.cu, memory_tiled.cu) --------------------------

// Memory read, per memory head j of width dh = d / heads, over the segment's memory K and V
// (bf16, [N, d], as BeginSegment leaves them):
//   A_j = softmax_N(q_j · mem_k_jᵀ / sqrt(dh))   -> attn[j, T, N] (fp32)
//   e[:, j*dh:(j+1)*dh] = A_j · mem_v_j           -> e[T, d] (fp32)
// q[T, d] fp32 with rows q_ld >= d apart. The two products are strided-batched cuBLAS bf16
// GEMMs over the heads (q and A rounded to bf16 into `scratch`, MemoryReadScratch(T, N, d,
// heads) elements; fp32 accumulation), the softmax an fp32 kernel. Sets `handle`'s stream.
int64_t MemoryReadScratch(int64_t T, int64_t N, int64_t d, int64_t heads);
Status MemoryRead(cublasHandle_t handle, const float* q, int64_t q_ld, const __nv_bfloat16* mem_k,
                  const __nv_bfloat16* mem_v, int64_t T, int64_t N, int64_t d, int64_t heads, float* attn, float* e,
                  __nv_bfloat16* scratch, cudaStream_t stream);

// Streaming write sums: mass[j, n] += Σ_t A_j[t, n], acc[n, j*dh + c] += Σ_t A_j[t, n] ·
// offer[t, j*dh + c]. attn[j, T, N], offer[T, d] with rows offer_ld >= d apart, mass[heads, N], acc[N, d]. The masses by
// an fp32 kernel, acc by a strided-batched TF32 GEMM with fp32 accumulation.
Status AccumulateWrite(cublasHandle_t handle, const float* attn, const float* offer, int64_t offer_ld, int64_t T, int64_t N, int64_t d,
                       int64_t heads, float* mass, float* acc, cudaStream_t stream);

// The read and the write sums of a multi-token chunk together, tile by tile on tensor cores
// (memory_tiled.cu; sm_80 and later), never storing the probabilities: e as MemoryRead
// gives it, and mass / acc += as AccumulateWrite of those probabilities adds. Scores from
// bf16(q) and the bf16 memory K, probabilities fp32 for the softmax statistics and the
// masses, rounded to bf16 (like the offer) for the two products, fp32 accumulation.
// q[T, d] and offer[T, d] with rows q_ld / offer_ld >= d apart; scratch holds
// MemoryReadWriteScratch(T, d, heads) floats. accumulate = false stores the sums instead of
// adding them (the first chunk of a segment: mass and acc need no zeroing; the bits adding
// to zeros gives). Head widths up to 128 (MemoryReadWriteSupported).
bool MemoryReadWriteSupported(int64_t d, int64_t heads);
int64_t MemoryReadWriteScratch(int64_t T, int64_t d, int64_t heads);
// `parts`: both kernels, or the read alone then (a later call, same arguments and scratch,
// on the same stream) the write alone, whose sums e does not need. With e_bf16 [T, d], the
// read also leaves e there rounded to bf16 (ConvertF32ToBf16's bits; the output gate's GEMM
// input): from the wgmma read's own stores where e_bf16 is 16-byte aligned, else by a
// conversion after the read (its alignment never changes which read kernel runs).
enum class MemoryReadWriteParts { kBoth, kRead, kWrite };
Status MemoryReadWrite(const float* q, int64_t q_ld, const float* offer, int64_t offer_ld,
                       const __nv_bfloat16* mem_k, const __nv_bfloat16* mem_v, int64_t T, int64_t N, int64_t d,
                       int64_t heads, float* e, bool accumulate, float* mass, float* acc, float* scratch,
                       cudaStream_t stream, MemoryReadWriteParts parts = MemoryReadWriteParts::kBoth,
                       __nv_bfloat16* e_bf16 = nullptr);

// One token per session (decode), as bandwidth-bound kernels (memory_decode.cu): the same
// results as MemoryRead / AccumulateWrite with T = 1, with q, the scores and the
// probabilities kept in fp32. (Batched decode steps stage their write terms instead:
// StageWriteBatch below.) Session b's query and write offer are rows b of q / offer (q_ld,
// offer_ld apart); its memory K, V, masses and sums are the arrays' b-th pointers (device
// arrays of device pointers); attn is [B, heads, N], e [B, d]; scratch holds
// MemoryReadDecodeScratch(B, N, d, heads) floats (partial sums, added in a fixed order:
// results do not vary from run to run). Head widths that are a multiple of 8 with dh / 8 a
// power of two take one pass over K and V (flash-decoding, 16 slots a block); others a
// scores / softmax / values sequence.
int64_t MemoryReadDecodeScratch(int64_t B, int64_t N, int64_t d, int64_t heads);
// Where MemoryReadBatch stages each session's write terms, when given: session b's token goes
// to staging slot slots[b] (a device array), in one of two forms.
// - Its probabilities and offer (pending_attn, pending_offer; as StageWriteBatch below, with
//   the same arguments), its masses added now; attn is then only the read's scratch.
// - Where DecodeStagesTokens: its query and offer in bf16 and its softmax shift (staged[b],
//   StagedTokensFloats(capacity, d, heads) floats: the tiled write's scratch carved for
//   `capacity` tokens: 4 bytes a column of d and 4 a head, where probabilities take 4 a head
//   and slot); mass and acc get the staged tokens' terms when FlushStagedTokens recomputes
//   their probabilities on tensor cores. attn is not used (nor written), nor is mass.
struct MemoryStage {
  const float* offer = nullptr;  // [B, offer_ld]
  int64_t offer_ld = 0;
  const int64_t* slots = nullptr;
  float* const* pending_attn = nullptr;
  float* const* pending_offer = nullptr;
  float* const* mass = nullptr;
  float* const* staged = nullptr;
  int64_t capacity = 0;
};
// Whether MemoryReadBatch can stage tokens in the second form (one-pass read shapes that the
// tiled write kernels take).
bool DecodeStagesTokens(int64_t d, int64_t heads);
Status MemoryReadOneToken(const float* q, int64_t q_ld, const __nv_bfloat16* mem_k, const __nv_bfloat16* mem_v,
                          int64_t N, int64_t d, int64_t heads, float* attn, float* e, float* scratch,
                          cudaStream_t stream);
Status MemoryReadBatch(const float* q, int64_t q_ld, const __nv_bfloat16* const* mem_k,
                       const __nv_bfloat16* const* mem_v, int64_t B, int64_t N, int64_t d, int64_t heads, float* attn,
                       float* e, float* scratch, const MemoryStage* stage, cudaStream_t stream);
Status AccumulateWriteOneToken(const float* attn, const float* offer, int64_t N, int64_t d, int64_t heads, float* mass,
                               float* acc, cudaStream_t stream);

// Deferred write sums for decode: a token's probabilities and offer are staged (and its
// masses added at once), and the sums take a whole run of staged tokens in one GEMM.
// StageWriteBatch: session b's attn row [heads, N] and offer row go to staging slot
// slots[b] (device array) of pending_attn[b] [slots, heads, N] and pending_offer[b]
// [slots, d]; mass[b] += attn row. FlushStagedWrites: acc [N, d] += Σ over the first
// `tokens` staged rows of attnᵀ · offer per head (strided-batched TF32 GEMM).
Status StageWriteBatch(const float* attn, const float* offer, int64_t offer_ld, int64_t B, int64_t N, int64_t d,
                       int64_t heads, const int64_t* slots, float* const* pending_attn, float* const* pending_offer,
                       float* const* mass, cudaStream_t stream);
Status FlushStagedWrites(cublasHandle_t handle, const float* pending_attn, const float* pending_offer, int64_t tokens,
                         int64_t N, int64_t d, int64_t heads, float* acc, cudaStream_t stream);

// Tokens staged as bf16 queries, offers and softmax shifts (MemoryStage::staged; the tiled
// write's scratch carved for `capacity` tokens: memory_tiled.cu). ClearStagedTokens readies
// `buffers` new ones, one after another (every slot empty: shift past any score, rows zero).
// FlushStagedTokens adds the first `tokens` slots' write terms to mass [heads, N] and acc
// [N, d] with the tiled write kernel (probabilities 2^(s' - shift) from bf16(q) and the
// memory K, as a prefill chunk's write sums), then empties the slots again. On `stream`.
int64_t StagedTokensFloats(int64_t capacity, int64_t d, int64_t heads);
Status ClearStagedTokens(float* staged, int64_t buffers, int64_t capacity, int64_t d, int64_t heads,
                         cudaStream_t stream);
Status FlushStagedTokens(const __nv_bfloat16* mem_k, float* staged, int64_t tokens, int64_t capacity, int64_t N,
                         int64_t d, int64_t heads, float* mass, float* acc, cudaStream_t stream);

// u[n, j*dh + c] = acc[n, j*dh + c] / (mass[j, n] + 1), and u rounded to bf16 into u_b (the
// gate GEMMs' input).
Status WriteUpdate(const float* mass, const float* acc, int64_t N, int64_t d, int64_t heads, float* u,
                   __nv_bfloat16* u_b, cudaStream_t stream);

// bank = sigmoid(in_pre + in_bias) ⊙ tanh(u) + sigmoid(forget_pre + forget_bias) ⊙ bank over
// [rows, width], the biases [width] broadcast over the rows (the gates' biases added here:
// the bits AddBias then the update give), fp32.
Status GatedMemoryUpdate(const float* u, const float* in_pre, const float* in_bias, const float* forget_pre,
                         const float* forget_bias, int64_t rows, int64_t width, float* bank, cudaStream_t stream);

}  // namespace lm2::runtime::cuda
