#include "lm2/runtime/backend.h"

#include "lm2/runtime/cuda_devices.h"

namespace lm2::runtime {

std::optional<BackendKind> ParseBackendKind(std::string_view name) {
  if (name == "auto") return BackendKind::kAuto;
  if (name == "cpu") return BackendKind::kCpu;
  if (name == "cuda") return BackendKind::kCuda;
  return std::nullopt;
}

BackendKind ResolveBackend(BackendKind requested) {
  if (requested != BackendKind::kAuto) return requested;
  auto devices = ListCudaDevices();
  return devices.ok() && !devices->empty() && devices->front().supported ? BackendKind::kCuda : BackendKind::kCpu;
}

Result<std::unique_ptr<Model>> LoadModel(std::shared_ptr<const ModelFiles> files, const BackendOptions& options) {
  if (ResolveBackend(options.kind) == BackendKind::kCuda) return LoadCudaModel(std::move(files), options.cuda);
  return LoadCpuModel(std::move(files), options.cpu);
}

}  // namespace lm2::runtime
