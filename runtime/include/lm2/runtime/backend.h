// Choosing a backend: one call that loads a model on the CPU or the GPU.
//
// kAuto takes the first CUDA device when this build has the CUDA backend and the driver
// lists one, and the CPU otherwise; the CLI and the SDK use it, so a machine with a GPU
// runs there without a flag. kCpu and kCuda are explicit (kCuda fails with Unavailable
// where there is no usable GPU, rather than falling back silently).
#pragma once

#include <memory>
#include <optional>
#include <string_view>

#include "lm2/core/status.h"
#include "lm2/runtime/cpu_backend.h"
#include "lm2/runtime/cuda_backend.h"
#include "lm2/runtime/model.h"
#include "lm2/runtime/model_files.h"

namespace lm2::runtime {

enum class BackendKind { kAuto, kCpu, kCuda };

// "auto", "cpu", "cuda"; nullopt for anything else.
std::optional<BackendKind> ParseBackendKind(std::string_view name);

struct BackendOptions {
  BackendKind kind = BackendKind::kAuto;
  CpuOptions cpu;
  CudaOptions cuda;
};

// The backend kAuto resolves to on this machine now (kCpu or kCuda).
BackendKind ResolveBackend(BackendKind requested);

Result<std::unique_ptr<Model>> LoadModel(std::shared_ptr<const ModelFiles> files, const BackendOptions& options = {});

}  // namespace lm2::runtime
