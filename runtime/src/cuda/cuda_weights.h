// CudaWeights: every tensor of a model on one CUDA device, uploaded once.
//
// Matrices (embedding, projections, FFN, memory projections and gates, LM head) are bf16
// [out, in] as stored in safetensors; vectors (norm weights, gate biases) and the memory
// bank's initial value are fp32, as the contract asks (docs/cuda.md). Read-only after
// Upload; shared by every state of the model. Compiled by the host compiler as part of
// lm2_runtime (it reads ModelFiles), over the CUDA runtime API.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/cuda_resources.h"
#include "lm2/core/status.h"
#include "lm2/runtime/model_files.h"

namespace lm2::runtime::cuda {

struct CudaMemoryWeights {
  const __nv_bfloat16* read_q = nullptr;         // [d, d]
  const __nv_bfloat16* read_kv = nullptr;        // [2, d, d]: read_k then read_v (LinearPairToBf16)
  const __nv_bfloat16* read_k = nullptr;         // [d, d]
  const __nv_bfloat16* read_v = nullptr;         // [d, d]
  const __nv_bfloat16* write_v = nullptr;        // [d, d]
  const __nv_bfloat16* out_gate_w = nullptr;     // [d, d]
  const __nv_bfloat16* gates = nullptr;          // [2, d, d]: in_gate_w then forget_gate_w
  const __nv_bfloat16* in_gate_w = nullptr;      // [d, d]
  const __nv_bfloat16* forget_gate_w = nullptr;  // [d, d]
  const float* out_gate_b = nullptr;             // [d]
  const float* in_gate_b = nullptr;              // [d]
  const float* forget_gate_b = nullptr;          // [d]
  const float* init = nullptr;                   // [N, d]: learned init, or the identity rows
};

// The projections that read the same input are stacked row-wise in one buffer, so one GEMM
// computes them all: x_proj = [q_proj; k_proj; v_proj; memory.read_q; memory.write_v]
// ([x_proj_rows, d], the memory rows only in memory layers) and gate_up = [gate_proj;
// up_proj] ([2F, d]); memory.read_kv = [read_k; read_v], the two products of the bank at a
// segment's opening, and memory.gates = [in_gate; forget_gate], the two of the update u at
// its end. In a memory layer whose attention width H*Dh is d, o_out_gate = [o_proj;
// memory.out_gate] ([2, d, d]): a prompt chunk's two GEMMs after the memory read, one
// strided-batched call (LinearTwo). The per-tensor pointers point into them.
struct CudaLayerWeights {
  const __nv_bfloat16* x_proj = nullptr;     // [x_proj_rows, d]
  int64_t x_proj_rows = 0;
  const __nv_bfloat16* gate_up = nullptr;    // [2F, d]
  const __nv_bfloat16* q_proj = nullptr;     // [H*Dh, d]
  const __nv_bfloat16* k_proj = nullptr;     // [Hkv*Dh, d]
  const __nv_bfloat16* v_proj = nullptr;     // [Hkv*Dh, d]
  const __nv_bfloat16* o_proj = nullptr;     // [d, H*Dh]
  const __nv_bfloat16* o_out_gate = nullptr;  // [2, d, d] or null (above)
  const __nv_bfloat16* gate_proj = nullptr;  // [F, d]
  const __nv_bfloat16* up_proj = nullptr;    // [F, d]
  const __nv_bfloat16* down_proj = nullptr;  // [d, F]
  const float* input_norm = nullptr;         // [d]
  const float* post_norm = nullptr;          // [d]
  bool has_memory = false;
  CudaMemoryWeights memory;
};

struct CudaWeights {
  int device = 0;
  std::vector<DeviceBuffer<__nv_bfloat16>> matrices;  // owners of the bf16 tensors
  std::vector<DeviceBuffer<float>> vectors;           // owners of the fp32 tensors
  const __nv_bfloat16* embed = nullptr;               // [V, d]
  const float* final_norm = nullptr;                  // [d]
  const __nv_bfloat16* lm_head = nullptr;             // [V, d] (the embedding when tied)
  std::vector<CudaLayerWeights> layers;
  std::size_t device_bytes = 0;                       // sum of the buffers above

  // Converts and copies every tensor of `files` to `device` (which must be current).
  static Result<std::unique_ptr<CudaWeights>> Upload(const ModelFiles& files, int device);
};

// Round to nearest even, as __float2bfloat16_rn; NaN stays NaN. Host side of the upload.
uint16_t FloatToBf16Bits(float value);

}  // namespace lm2::runtime::cuda
