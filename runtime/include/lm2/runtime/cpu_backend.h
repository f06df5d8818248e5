// The CPU backend: fp32 math, OpenBLAS for the GEMMs.
// The reference backend: tested against the float64 golden files (rel. error <= 1e-4).
#pragma once

#include <memory>

#include "lm2/core/status.h"
#include "lm2/runtime/model.h"
#include "lm2/runtime/model_files.h"

namespace lm2::runtime {

struct CpuOptions {
  // OpenBLAS threads per GEMM. Default 1: each session's forward runs on the caller's
  // thread, so concurrent sessions scale across cores, and small GEMMs never wait on
  // sleeping BLAS workers (with 2 threads on a busy 2-core machine, a 5 M-parameter
  // model's turn took 1.1 s instead of 19 ms). 0 keeps OpenBLAS's own setting
  // (OPENBLAS_NUM_THREADS, else every core): faster prefill of large models on an idle
  // machine. OpenBLAS's thread count is process-wide: the last model loaded sets it.
  int threads = 1;
};

// Builds a CPU model over opened files. F32 tensors are used in place (zero copy) when
// suitably aligned; F16/BF16 tensors are widened to fp32 once, here. The model keeps
// `files` alive. Cost: one pass over the weights for the conversion.
Result<std::unique_ptr<Model>> LoadCpuModel(std::shared_ptr<const ModelFiles> files,
                                            const CpuOptions& options = {});

}  // namespace lm2::runtime
