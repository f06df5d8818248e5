// The CPU backend: fp32 math, OpenBLAS for the GEMMs (threads: OPENBLAS_NUM_THREADS).
// The reference backend: tested against the float64 golden files (rel. error <= 1e-4).
#pragma once

#include <memory>

#include "lm2/core/status.h"
#include "lm2/runtime/model.h"
#include "lm2/runtime/model_files.h"

namespace lm2::runtime {

struct CpuOptions {
  // Nothing to tune yet; threads are OpenBLAS's (OPENBLAS_NUM_THREADS, default: all cores).
};

// Builds a CPU model over opened files. F32 tensors are used in place (zero copy) when
// suitably aligned; F16/BF16 tensors are widened to fp32 once, here. The model keeps
// `files` alive. Cost: one pass over the weights for the conversion.
Result<std::unique_ptr<Model>> LoadCpuModel(std::shared_ptr<const ModelFiles> files,
                                            const CpuOptions& options = {});

}  // namespace lm2::runtime
