// LoadCudaModel for builds without the CUDA backend.
#include "lm2/runtime/cuda_backend.h"

namespace lm2::runtime {

Result<std::unique_ptr<Model>> LoadCudaModel(std::shared_ptr<const ModelFiles> files, const CudaOptions& options) {
  (void)files;
  (void)options;
  return Status::Unavailable("this build of lm2 has no CUDA backend (configured with LM2_CUDA=OFF or without nvcc)");
}

}  // namespace lm2::runtime
