// CpuWeights: every tensor of a model as fp32 pointers, built once from ModelFiles.
//
// Ownership: F32 tensors point into the ModelFiles mapping (kept alive by `files`);
// converted F16/BF16 tensors live in `owned`. Read-only after Load; shared by all states.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/model_files.h"

namespace lm2::runtime::cpu {

struct MemoryWeights {
  const float* read_q = nullptr;       // [d, d]
  const float* read_k = nullptr;       // [d, d]
  const float* read_v = nullptr;       // [d, d]
  const float* write_v = nullptr;      // [d, d]
  const float* out_gate_w = nullptr;   // [d, d]
  const float* out_gate_b = nullptr;   // [d]
  const float* in_gate_w = nullptr;    // [d, d]
  const float* in_gate_b = nullptr;    // [d]
  const float* forget_gate_w = nullptr;  // [d, d]
  const float* forget_gate_b = nullptr;  // [d]
  const float* init = nullptr;         // [N, d] or null (identity init)
};

struct LayerWeights {
  const float* q_proj = nullptr;       // [H*Dh, d]
  const float* k_proj = nullptr;       // [Hkv*Dh, d]
  const float* v_proj = nullptr;       // [Hkv*Dh, d]
  const float* o_proj = nullptr;       // [d, H*Dh]
  const float* gate_proj = nullptr;    // [F, d]
  const float* up_proj = nullptr;      // [F, d]
  const float* down_proj = nullptr;    // [d, F]
  const float* input_norm = nullptr;   // [d]
  const float* post_norm = nullptr;    // [d]
  bool has_memory = false;
  MemoryWeights memory;
};

struct CpuWeights {
  std::shared_ptr<const ModelFiles> files;
  std::vector<std::vector<float>> owned;  // widened copies
  const float* embed = nullptr;          // [V, d]
  const float* final_norm = nullptr;     // [d]
  const float* lm_head = nullptr;        // [V, d] (the embedding when tied)
  std::vector<LayerWeights> layers;

  static Result<std::unique_ptr<CpuWeights>> Load(std::shared_ptr<const ModelFiles> files);
};

}  // namespace lm2::runtime::cpu
