// The CUDA backend: the same model as the CPU backend on one NVIDIA GPU (docs/cuda.md).
//
// Weights live on the device in bf16 (norm weights, biases and a learned memory init in
// fp32); linear layers run through cuBLAS with fp32 accumulation (prompt chunks) or fused
// GEMV kernels (decode steps); activations and the memory bank are fp32; prompt chunks read
// memory, add the write sums and run self-attention in tensor-core tile kernels on bf16
// operands with fp32 accumulation (docs/cuda.md). Each SequenceState owns its own CUDA
// streams, cuBLAS handle, KV cache, memory banks and pinned staging buffers, so states on
// one model run concurrently from different threads. Accuracy against the float64
// reference is that of bf16 weights: logits within a relative error of 2e-2 (tested). A
// call that finds too little device memory answers ResourceExhausted before it changes
// the state.
#pragma once

#include <cstdint>
#include <memory>

#include "lm2/core/status.h"
#include "lm2/runtime/model.h"
#include "lm2/runtime/model_files.h"

namespace lm2::runtime {

struct CudaOptions {
  int device = 0;  // the CUDA device ordinal (ListCudaDevices)
  // Longest run of tokens one kernel sequence handles; longer Forward calls are split
  // (results agree to rounding). Bounds the per-state scratch, which grows to the longest
  // chunk a state has run: ~170 KB per token for the paper's model (350 MB at 2048; without
  // tiled_memory the memory read's probabilities add memory_heads x chunk x memory_slots
  // floats). Longer chunks give the prefill kernels more blocks and the GEMMs more rows:
  // a 4096-token prefill of that model ran at 63k / 73-77k / 83-84k tokens/s with chunks of
  // 512 / 1024 / 2048 on an H200 (docs/benchmarks.md).
  int64_t max_chunk_tokens = 2048;
  // Chunks of more than one token read memory and add their write sums tile by tile on
  // tensor cores (bf16 probabilities, never stored) where the memory head width is at most
  // 128 and the device has compute capability 8.0 or later; false, or elsewhere: cuBLAS
  // GEMMs around the [memory_heads, chunk, memory_slots] fp32 probabilities.
  bool tiled_memory = true;
  // Chunks of at least this many tokens run self-attention on tensor cores: flash style
  // with bf16 operands (CausalAttentionTiled) where the head width is at most 128 and the
  // device has compute capability 8.0 or later and tiled_attention is on, else as cuBLAS
  // GEMMs (TF32, scores materialised: heads x chunk x context floats of scratch). Shorter
  // chunks, decode included, use the fp32 online-softmax kernels.
  int64_t attention_gemm_min_tokens = 32;
  bool tiled_attention = true;
  // Decode steps (one token per state, Forward or ForwardBatch) replay a CUDA graph of the
  // whole step, captured on first use and again whenever a buffer it uses moved: one launch
  // instead of ~250. Results are bit-identical either way (tested).
  bool cuda_graphs = true;
  // Decode steps stage each token's memory-write terms and add this many at a time to the
  // write sums (instead of a read-modify-write of the N x d sums per token); the rest at the
  // end of the segment. Each flush reads and writes every memory layer's N x d fp32 sums (32
  // MiB a layer at the paper's shape), so fewer flushes pay: on an H200 at the paper's shape
  // 64 against 16 made batch-1 decode 1.8% faster and 64 sessions 7%, 128 against 64 0.2%
  // and 0.6% (docs/benchmarks.md). Where the tiled memory kernels run (tiled_memory, head
  // width <= 128 and the one-pass decode read's shapes), a token is staged as its bf16
  // memory query and write offer and its softmax shift, and a flush recomputes its
  // probabilities with the tiled write kernel: 2 x memory_heads x (this, rounded up to 128) x
  // (head width rounded up to 16) bytes plus 4 per head and token, per memory layer and state
  // (1 MiB a layer up to 128 tokens at the paper's shape). Elsewhere its probabilities are
  // staged and added by a TF32 GEMM: this many x memory_heads x memory_slots floats per
  // layer (16 MiB at 64). Default: 64
  int64_t write_flush_tokens = 64;
  // Chunks of at most this many rows (decode steps of up to this many states, short
  // prompts) run their linear layers as fused GEMV kernels: one pass over the weights with
  // the RMSNorm, SwiGLU, bias and gated residual folded in. Longer chunks use cuBLAS. 0..8;
  // 0 turns the kernels off; the model lowers it where its widest layer input would not fit
  // on chip (rows x width <= 16384: 2 rows at FFN 8192). A state's results are bit-identical
  // whether it decodes alone or in a ForwardBatch within that limit; beyond it they agree to
  // fp32 rounding (cuBLAS sums in another order, and the memory read merges each block's
  // chunks before the combine).
  int64_t gemv_max_rows = 8;
  // Each memory layer's read runs on a second stream of the state, beside the layer's
  // self-attention and output projection (they are independent), where the read uses no
  // cuBLAS (decode steps, and tiled_memory chunks). Same results either way; off: one stream.
  // Decode 790 -> 839 tokens/s, prefill of 4096 tokens 86.5k -> 94.2k on an H200.
  bool concurrent_memory_read = true;
  // With concurrent_memory_read, one-session decode steps (a one-token Forward, or a
  // ForwardBatch* of one state) on the GEMV path (gemv_max_rows > 0: the second stream runs
  // no cuBLAS) keep the read on the main stream right after the projection,
  // where programmatic dependent launch lets it start while the projection ends, and run
  // self-attention and o_proj on the second stream instead. Same results either way.
  // Measured on an H200: batch-1 decode 884-892 -> 904-909 tokens/s; 2 sessions lost ~3%
  // this way, so steps of several sessions keep the read on the second stream.
  bool memory_read_leads = true;
  // Decode steps on the GEMV path (see gemv_max_rows), and steps of up to 4 sessions where
  // a KV head has a multiple of 4 query heads, split a row's self-attention over its keys
  // once it has more than 128 (up to 16 ranges, merged by the last block to finish:
  // flash-decoding), so that a long context is read by many multiprocessors at once instead
  // of by one block a head; steps of 3-4 sessions give a block a KV head's 4 query heads. The
  // ranges follow from the row's length alone: a state's results stay bit-identical alone or
  // batched. false: a block per (row, head) over all its keys. Measured on an H200 (paper's
  // shape): batch-1 decode after a 1,024-token prompt 647 -> 848 tokens/s (after 2,048: 476
  // -> 731), 2 sessions 1,061 -> 1,228, 4 sessions after 2,048 tokens 1,424 -> 1,628, after a
  // 32-token prompt unchanged (933 / 933); at 8 sessions the split gained nothing, so larger
  // steps do not split.
  bool split_decode_attention = true;
  // With concurrent_memory_read, a tiled chunk's memory write sums (which nothing in the
  // forward reads) run on the second stream after the read, past the output gate's join,
  // beside the main stream's output gate and FFN; the forward joins the second stream at its
  // end. Same results either way (tested). Measured on an H200: prompts of 37-450 tokens
  // ~3% faster, 512 and 2048 tokens within noise.
  bool defer_memory_write = true;
  // LoadCudaModel computes the memory K/V of the model's initial bank once (memory_slots x
  // hidden_size x 2 bf16 per memory layer: 256 MiB for the paper's model) and every state's
  // segments read those until its bank changes (EndSegment after tokens, ImportMemory),
  // instead of computing the same products at each new state's first segment (~0.7 ms of
  // GEMMs for the paper's model, and 256 MiB per new state). Same results either way
  // (tested). false: each state computes its own.
  bool share_initial_memory_kv = true;
  // EndSegment starts the next segment's memory K/V (2 N d² a layer, twice: ~0.7 ms of GEMMs
  // for the paper's model) on the state's second stream right after the write and returns
  // without waiting for them, so that the next prompt does not compute them first (a chat's
  // next turn: its prompt arrives long after). false: the next segment's first forward makes
  // them (beside its first chunk where it can). Same results either way (tested).
  bool memory_kv_at_segment_end = true;
  // Bank export and import move the banks through two pieces of page-locked host memory of
  // this many bytes per state (allocated at its first export or import): while the device
  // copies one piece, the host copies the other between page-locked and the caller's
  // memory. At least 16 (whole floats are taken: the bytes / 4 rounded down).
  int64_t bank_transfer_piece_bytes = int64_t{4} << 20;
  // Host threads that copy each piece between the page-locked staging and the caller's
  // memory, in slices: the calling thread and up to this many - 1 started per export or
  // import (one copies ~7-8 GB/s). In [1, 64].
  int bank_transfer_threads = 4;
  // LoadCudaModel runs one short conversation turn on a throwaway state before it returns
  // (a prompt through the tensor-core and cuBLAS paths, greedy and sampled decode steps
  // across a memory-write flush, the segment's end, a second segment, then a prompt of each
  // GEMM row count up to 512: a chunk's GEMMs run over its rows rounded up to 64), so that
  // the first-use costs of cuBLAS's calls of each shape are paid at load, not by the first
  // session's reply or a prompt of a length not seen before (lm2's own kernels are loaded
  // at load with or without it). Costs the load that turn (docs/cuda.md).
  bool warm_up = true;
};

// Uploads the weights of `files` to the device and returns a model on it. Unavailable when
// this build has no CUDA backend or the device cannot be used, ResourceExhausted when the
// weights do not fit, InvalidArgument for bad options. Cost: one pass over the weights
// (conversion to bf16 on the host, one copy to the device), and the warm-up turn.
Result<std::unique_ptr<Model>> LoadCudaModel(std::shared_ptr<const ModelFiles> files,
                                             const CudaOptions& options = {});

}  // namespace lm2::runtime
