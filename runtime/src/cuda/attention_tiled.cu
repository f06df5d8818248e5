// Prefill self-attention on tensor cores, flash style: causal, GQA, over a bf16 copy of the
// KV cache, with the scores and probabilities in registers (the GEMM form in attention.cu
// writes [heads, T, S] fp32 scores and passes over them three times; Nsight Compute put it
// at ~1.5 ms of a 512-token prefill of the paper's model, ~25 ms of a 4096-token one).
//
// A block per (128 queries, head), each warp 32 queries (16 past head width 64: RowGroups);
// at head width 64, chunks whose 64-query blocks all fit in two waves (up to 8 x 64 queries
// at 32 heads on an H200) take blocks of 64 queries, 16 a warp: twice the blocks, and a
// chunk shorter than a block (a chat's next prompt) keeps all four warps busy, where half of
// a 128-query block's warps would have no rows.
// Over the key tiles of 64 up to the block's last visible key: the K and V rows of the
// head's KV group come by cp.async into bf16 tiles (a ring of kTileStages: the next two
// tiles' copies in flight while the current one is used), s = q · kᵀ (mma.sync, fp32
// accumulation), the online softmax rescales the running output rows by exp(m_old - m_new)
// (FA2) when a maximum has grown by more than kRescaleSlack, and out += p · v with p rounded
// to bf16; a warp skips the tiles past all its rows. The output is divided by the row sums
// at the end. The caller rounds the fp32 cache to bf16 once per call (ConvertF32ToBf16): every
// block used to stage fp32 tiles and round them itself, each tile once per head of its
// group and per query block after it, which took a third of the kernel's time.
#include <cuda_bf16.h>

#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/kernel_modules.h"
#include "cuda/mma.cuh"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;               // keys per tile
constexpr int kRows = kTileBlockRows;   // queries per block, RowGroups(DHP) groups of 16 a warp

// Rows [0, Rows) x columns [0, DHP) of fp32 `src` (rows `ld` apart) into a bf16 tile: rows
// below rows_valid and columns below cols, zeros elsewhere. `vec`: ld, cols and src
// 4-float aligned (float4 loads).
template <int DHP, int Threads, int Rows>
__device__ __forceinline__ void LoadRoundedRows(const float* __restrict__ src, int64_t ld, int64_t rows_valid,
                                                int cols, bool vec, bf16* tile) {
  constexpr int kLd = TileLd<DHP>;
  if (vec) {
    for (int i = threadIdx.x; i < Rows * DHP / 4; i += Threads) {
      const int r = i / (DHP / 4), c = (i % (DHP / 4)) * 4;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (r < rows_valid && c < cols) v = *reinterpret_cast<const float4*>(src + r * ld + c);
      auto* dst = reinterpret_cast<uint32_t*>(tile + r * kLd + c);  // 8-byte aligned: c is a multiple of 4
      dst[0] = PackBf16x2(v.x, v.y);
      dst[1] = PackBf16x2(v.z, v.w);
    }
  } else {
    for (int i = threadIdx.x; i < Rows * DHP; i += Threads) {
      const int r = i / DHP, c = i % DHP;
      tile[r * kLd + c] = __float2bfloat16(r < rows_valid && c < cols ? src[r * ld + c] : 0.0f);
    }
  }
}

__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// A block of R queries, a warp M groups of 16 of them.
template <int R, int M>
__host__ __device__ constexpr int AttentionThreads() { return 32 * R / (16 * M); }
template <int DHP, int R>
__host__ __device__ constexpr int AttentionSharedBytes() {
  return (R + 2 * kTileStages * kTile) * TileLd<DHP> * 2;  // bf16 q, the K and V tiles
}

// Out: float, or bf16 (the o_proj GEMM's input, rounded as ConvertF32ToBf16 would).
template <int DHP, int R, int M, typename Out>
__global__ void __launch_bounds__(AttentionThreads<R, M>(), DHP <= 64 ? 2 : 1) AttentionTiledKernel(
    const float* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, int64_t T, int64_t S,
    int heads, int kv_heads, int head_dim, float scale_log2, bool q_vec, bool kv_vec, bool paired,
    Out* __restrict__ out) {
  constexpr int kThreads = AttentionThreads<R, M>();
  constexpr int kLd = TileLd<DHP>, kTileElems = kTile * kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + R * kLd;                  // kTileStages buffers
  bf16* vs = ks + kTileStages * kTileElems;  // kTileStages buffers
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const int h = static_cast<int>(blockIdx.y), hk = h / (heads / kv_heads);
  const int64_t qdim = static_cast<int64_t>(heads) * head_dim, kvdim = static_cast<int64_t>(kv_heads) * head_dim;
  const int64_t offset = S - T;  // query i sees keys [0, offset + i]
  const bf16* k_head = k + static_cast<int64_t>(hk) * head_dim;
  const bf16* v_head = v + static_cast<int64_t>(hk) * head_dim;
  const auto load_keys = [&](int64_t k0, int buf) {
    bf16* k_tile = ks + buf * kTileElems;
    bf16* v_tile = vs + buf * kTileElems;
    LoadBf16Tile<DHP, kTile, kThreads>(k_head + k0 * kvdim, kvdim, S - k0, head_dim, kv_vec, k_tile);
    LoadBf16Tile<DHP, kTile, kThreads>(v_head + k0 * kvdim, kvdim, S - k0, head_dim, kv_vec, v_tile);
    CopyAsyncCommit();
  };

  // Paired (see LaunchAttentionTiled): query blocks x and the x-th from the end, the later
  // (more keys) first; else query block x.
  const int64_t row_blocks = (T + R - 1) / R, x = blockIdx.x, last = row_blocks - 1 - x;
  const int passes = paired && last != x ? 2 : 1;
#pragma unroll 1
  for (int pass = 0; pass < passes; ++pass) {
    const int64_t q0 = (paired && pass == 0 ? last : x) * R;
    if (pass > 0) __syncthreads();  // every warp is done with the q tile and the K/V ring
    const int64_t keys = min(S, offset + q0 + R);  // the block's last row sees keys [0, keys)
    const int tiles = static_cast<int>((keys + kTile - 1) / kTile);
    load_keys(0, 0);
    if (tiles > 1) load_keys(kTile, 1);
    LoadRoundedRows<DHP, kThreads, R>(q + q0 * qdim + static_cast<int64_t>(h) * head_dim, qdim, T - q0, head_dim,
                                      q_vec, qs);
    __syncthreads();
    // The warp's rows: groups (warp * M + mg) * 16 of the block's; this lane's rows g and g + 8
    // of each.
    const int64_t warp_row0 = q0 + warp * M * 16;
    uint32_t qa[M][DHP / 16][4];
#pragma unroll
    for (int mg = 0; mg < M; ++mg)
#pragma unroll
      for (int kc = 0; kc < DHP / 16; ++kc) LoadA(qa[mg][kc], qs, kLd, (warp * M + mg) * 16, kc * 16);

    float m[M][2], l[M][2], acc[M][DHP / 8][4];
    OnlineSoftmaxStart<DHP, M>(m, l, acc);
    for (int it = 0, stage = 0; it < tiles; ++it, stage = NextStage(stage)) {
      const int64_t k0 = static_cast<int64_t>(it) * kTile;
      if (it + 1 < tiles) {
        CopyAsyncWait<1>();
      } else {
        CopyAsyncWait<0>();
      }
      __syncthreads();  // the tile is in; every warp is done with the one before (kTileStages)
      if (it + 2 < tiles) load_keys(k0 + 2 * kTile, NextStage(NextStage(stage)));
      // A tile past every row of this warp (the block's diagonal) adds nothing to them.
      if (k0 <= offset + warp_row0 + M * 16 - 1) {
        float s[M][8][4];
        TileScoresM<DHP, M>(qa, ks + stage * kTileElems, s);
        // Masked: keys past a row's position (and past S, the tile's padding rows).
        const bool edge = k0 + kTile - 1 > offset + warp_row0 || k0 + kTile > S;
#pragma unroll
        for (int mg = 0; mg < M; ++mg) {
          if (edge) {
            const int64_t row0 = warp_row0 + mg * 16 + g;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                const int64_t key = k0 + nt * 8 + 2 * t + (c & 1);
                if (key > offset + row0 + 8 * (c >> 1) || key >= S) s[mg][nt][c] = -INFINITY;
              }
          }
          OnlineSoftmaxTile<DHP>(s[mg], scale_log2, m[mg], l[mg], acc[mg]);  // every row sees key 0 in the first tile
        }
        TileProductsM<DHP, M>(s, vs + stage * kTileElems, acc);
      }
    }

#pragma unroll
    for (int mg = 0; mg < M; ++mg)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float inv_l = 1.0f / QuadSum(l[mg][r]);
        const int64_t row = warp_row0 + mg * 16 + g + 8 * r;
        if (row >= T) continue;
        Out* o = out + row * qdim + static_cast<int64_t>(h) * head_dim;
        ForEachOwnedElement(acc[mg], r, t, head_dim, [&](int col, float v) { Store(o + col, v * inv_l); });
      }
  }
}

// The kernel of R-query blocks, M row groups a warp: a block per query block (or pair of
// them) and head.
template <int DHP, int R, int M, typename Out>
Status LaunchAttentionBlocks(const float* q, const bf16* k, const bf16* v, int64_t T, int64_t S, int64_t heads,
                             int64_t kv_heads, int64_t head_dim, float scale_log2, bool q_vec, bool kv_vec, bool paired,
                             Out* out, cudaStream_t stream) {
  constexpr int kBytes = AttentionSharedBytes<DHP, R>();
  const auto kernel = &AttentionTiledKernel<DHP, R, M, Out>;
  LM2_RETURN_IF_ERROR(EnsureSharedMemory(reinterpret_cast<const void*>(kernel), kBytes, "CausalAttentionTiled"));
  const int64_t row_blocks = (T + R - 1) / R;
  const dim3 grid(static_cast<unsigned int>(paired ? (row_blocks + 1) / 2 : row_blocks),
                  static_cast<unsigned int>(heads));
  kernel<<<grid, AttentionThreads<R, M>(), kBytes, stream>>>(
      q, k, v, T, S, static_cast<int>(heads), static_cast<int>(kv_heads), static_cast<int>(head_dim), scale_log2, q_vec,
      kv_vec, paired, out);
  return CheckLaunch("AttentionTiledKernel");
}

template <int DHP, typename Out>
Status LaunchAttentionTiled(const float* q, const bf16* k, const bf16* v, int64_t T, int64_t S, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, Out* out, cudaStream_t stream) {
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  const bool q_vec = head_dim % 4 == 0;   // q rows and head offsets float4-aligned
  const bool kv_vec = head_dim % 8 == 0;  // K/V rows and head offsets 16-byte aligned
  LM2_ASSIGN_OR_RETURN(const int sms, Multiprocessors());
  // At head width 64, blocks of 64 queries where those blocks fit in two waves (two an SM):
  // on the H200 at 32 heads, against 128-query blocks, the kernel took 5.7 / 6.7 / 8.8 / 16.5
  // µs for 64 / 128 / 256 / 512 tokens against 6.5 / 8.8 / 11.7 / 16.9, and 64 queries
  // after 4,032 cached keys ran 12% faster (docs/benchmarks.md).
  if constexpr (DHP == 64) {
    if ((T + 63) / 64 * heads <= 2 * static_cast<int64_t>(sms)) {
      return LaunchAttentionBlocks<DHP, 64, 1>(q, k, v, T, S, heads, kv_heads, head_dim, scale_log2, q_vec, kv_vec,
                                               false, out, stream);
    }
  }
  // Causal blocks' work grows with their position (block x of the chunk sees offset + 128 (x
  // + 1) keys). Where the blocks fill more than one wave (two an SM at head width 64), each
  // block takes a query block from each end instead, so that all do the same work in one
  // wave, not a first wave of mixed lengths and a tail of idle SMs.
  const int64_t row_blocks = (T + kRows - 1) / kRows;
  const bool paired = row_blocks >= 2 && row_blocks * heads > static_cast<int64_t>(DHP <= 64 ? 2 : 1) * sms;
  return LaunchAttentionBlocks<DHP, kRows, RowGroups(DHP)>(q, k, v, T, S, heads, kv_heads, head_dim, scale_log2, q_vec,
                                                           kv_vec, paired, out, stream);
}

template <typename Out>
Status AttentionTiled(const float* q, const bf16* k, const bf16* v, int64_t T, int64_t S, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, Out* out, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckCausalAttention(T, S, heads, kv_heads, head_dim));
  if (!CausalAttentionTiledSupported(head_dim)) {
    return Status::InvalidArgument("CausalAttentionTiled: head_dim " + std::to_string(head_dim) + " > " +
                                   std::to_string(kMaxTileWidth));
  }
  if (T == 0) return Status::Ok();
  LM2_RETURN_IF_ERROR(RequireNonNull("CausalAttentionTiled", {q, k, v, out}));
  return WithPaddedTileWidth(head_dim, [&](auto dhp) {
    return LaunchAttentionTiled<decltype(dhp)::value>(q, k, v, T, S, heads, kv_heads, head_dim, out, stream);
  });
}

LM2_CUDA_KERNEL_MODULE(AttentionTiledKernel<64, kRows, 2, float>);

}  // namespace

bool CausalAttentionTiledSupported(int64_t head_dim) { return head_dim >= 1 && head_dim <= kMaxTileWidth; }

Status CausalAttentionTiled(const float* q, const bf16* k, const bf16* v, int64_t T, int64_t S, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, float* out, cudaStream_t stream) {
  return AttentionTiled(q, k, v, T, S, heads, kv_heads, head_dim, out, stream);
}

Status CausalAttentionTiled(const float* q, const bf16* k, const bf16* v, int64_t T, int64_t S, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, bf16* out, cudaStream_t stream) {
  return AttentionTiled(q, k, v, T, S, heads, kv_heads, head_dim, out, stream);
}

}  // namespace lm2::runtime::cuda
