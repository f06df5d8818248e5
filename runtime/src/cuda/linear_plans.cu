// AccumulatePlans: cuBLASLt algorithms for y += x · Wᵀ chosen per row count by running
// cuBLASLt's candidates on the caller's data (cuda_ops.h). Host code only (a .cu beside
// linear.cu, whose GEMMs it stands in for).
#include <cublasLt.h>

#include <algorithm>
#include <limits>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "ops/op_shapes.h"

namespace lm2::runtime::cuda {

namespace {

using bf16 = __nv_bfloat16;

Status LtStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return Status::Internal(std::string(what) + " failed: cuBLAS status " + std::to_string(static_cast<int>(s)));
}

// Owners of cuBLASLt's descriptor objects.
template <typename T, cublasStatus_t (*Destroy)(T)>
struct LtOwned {
  T handle = nullptr;
  LtOwned() = default;
  LtOwned(const LtOwned&) = delete;
  LtOwned& operator=(const LtOwned&) = delete;
  LtOwned(LtOwned&& o) noexcept : handle(o.handle) { o.handle = nullptr; }
  LtOwned& operator=(LtOwned&& o) noexcept {
    std::swap(handle, o.handle);
    return *this;
  }
  ~LtOwned() {
    if (handle != nullptr) Destroy(handle);
  }
};
using LtHandle = LtOwned<cublasLtHandle_t, &cublasLtDestroy>;
using LtDesc = LtOwned<cublasLtMatmulDesc_t, &cublasLtMatmulDescDestroy>;
using LtLayout = LtOwned<cublasLtMatrixLayout_t, &cublasLtMatrixLayoutDestroy>;
using LtPreference = LtOwned<cublasLtMatmulPreference_t, &cublasLtMatmulPreferenceDestroy>;

// A timing event pair's owner.
struct TimingEvent {
  cudaEvent_t event = nullptr;
  TimingEvent() = default;
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
  ~TimingEvent() {
    if (event != nullptr) cudaEventDestroy(event);
  }
};

}  // namespace

// One shape's call as cuBLASLt takes it (Linear's column-major reading: yᵀ[out, rows] =
// W_cm[in, out]ᵀ · x_cm[in, rows]) and the algorithm chosen for it.
struct AccumulatePlans::Plan {
  int64_t rows = 0, in = 0, out = 0;
  LtDesc op;
  LtLayout a, b, c;
  cublasLtMatmulAlgo_t algo{};
  std::size_t workspace = 0;
};

struct AccumulatePlans::Impl {
  LtHandle lt;
  std::vector<Plan> plans;
};

AccumulatePlans::AccumulatePlans() = default;
AccumulatePlans::AccumulatePlans(AccumulatePlans&&) noexcept = default;
AccumulatePlans& AccumulatePlans::operator=(AccumulatePlans&&) noexcept = default;
AccumulatePlans::~AccumulatePlans() = default;

Result<AccumulatePlans> AccumulatePlans::Create() {
  AccumulatePlans p;
  p.impl_ = std::make_unique<Impl>();
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtCreate(&p.impl_->lt.handle), "cublasLtCreate"));
  return Result<AccumulatePlans>(std::move(p));
}

namespace {

// The descriptors of y[rows, out] (+)= x[rows, in] · Wᵀ with bf16 operands, fp32 y and
// fp32 accumulation (LinearInto's call).
Status Describe(int64_t rows, int64_t in, int64_t out, LtDesc& op, LtLayout& a, LtLayout& b, LtLayout& c) {
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtMatmulDescCreate(&op.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc"));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LM2_RETURN_IF_ERROR(
      LtStatus(cublasLtMatmulDescSetAttribute(op.handle, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "transa"));
  LM2_RETURN_IF_ERROR(
      LtStatus(cublasLtMatmulDescSetAttribute(op.handle, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "transb"));
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtMatrixLayoutCreate(&a.handle, CUDA_R_16BF, in, out, in), "layout"));
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtMatrixLayoutCreate(&b.handle, CUDA_R_16BF, in, rows, in), "layout"));
  return LtStatus(cublasLtMatrixLayoutCreate(&c.handle, CUDA_R_32F, out, rows, out), "layout");
}

Status RunPlan(cublasLtHandle_t lt, const AccumulatePlans::Plan& p, const bf16* x, const bf16* w, float* y,
               void* workspace, cudaStream_t stream) {
  const float alpha = 1.0f, beta = 1.0f;
  return LtStatus(cublasLtMatmul(lt, p.op.handle, &alpha, w, p.a.handle, x, p.b.handle, &beta, y, p.c.handle, y,
                                 p.c.handle, &p.algo, workspace, p.workspace, stream),
                  "cublasLtMatmul");
}

}  // namespace

Status AccumulatePlans::Choose(cublasHandle_t blas, void* workspace, std::size_t workspace_bytes, const bf16* x,
                               int64_t rows, int64_t in, const std::vector<const bf16*>& weights, int64_t out,
                               const float* y_start, float* y_a, float* y_b, cudaStream_t stream) {
  LM2_RETURN_IF_ERROR(ops::CheckLinear(rows, in, out));
  if (impl_ == nullptr) return Status::FailedPrecondition("AccumulatePlans::Choose: not created");
  if (rows == 0 || weights.empty()) return Status::InvalidArgument("AccumulatePlans::Choose: no rows or weights");
  if (Find(rows, in, out) != nullptr) return Status::Ok();
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (rows > kMax || in > kMax || out > kMax) return Status::InvalidArgument("AccumulatePlans::Choose: too large");
  LM2_RETURN_IF_ERROR(RequireNonNull("AccumulatePlans::Choose", {blas, x, y_start, y_a, y_b}));
  for (const bf16* w : weights) LM2_RETURN_IF_ERROR(RequireNonNull("AccumulatePlans::Choose", {w}));
  const auto y_bytes = static_cast<std::size_t>(rows * out) * sizeof(float);
  cublasLtHandle_t lt = impl_->lt.handle;

  // y_a: the default's result from y_start, what every candidate's must equal bit for bit.
  LM2_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(y_a, y_start, y_bytes, cudaMemcpyDeviceToDevice, stream), "copy"));
  LM2_RETURN_IF_ERROR(Linear(blas, x, rows, in, weights[0], out, y_a, true, stream));
  std::vector<float> want(static_cast<std::size_t>(rows * out)), got(want.size());
  LM2_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(want.data(), y_a, y_bytes, cudaMemcpyDeviceToHost, stream), "copy"));
  LM2_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize"));

  // Mean time of kReps calls, each on the next weight (the layers' copies: not one kept in L2).
  constexpr int kReps = 4;
  TimingEvent start, stop;
  LM2_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&start.event), "cudaEventCreate"));
  LM2_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&stop.event), "cudaEventCreate"));
  const auto time = [&](auto&& call) -> Result<float> {
    LM2_RETURN_IF_ERROR(call(weights[0]));  // (its first call: loads the kernel)
    LM2_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(start.event, stream), "cudaEventRecord"));
    for (int r = 0; r < kReps; ++r) LM2_RETURN_IF_ERROR(call(weights[static_cast<std::size_t>(r) % weights.size()]));
    LM2_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(stop.event, stream), "cudaEventRecord"));
    LM2_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(stop.event), "cudaEventSynchronize"));
    float ms = 0.0f;
    LM2_RETURN_IF_ERROR(CudaStatus(cudaEventElapsedTime(&ms, start.event, stop.event), "cudaEventElapsedTime"));
    return ms / kReps;
  };
  LM2_ASSIGN_OR_RETURN(
      const float default_ms,
      time([&](const bf16* w) { return Linear(blas, x, rows, in, w, out, y_b, true, stream); }));

  Plan plan;
  plan.rows = rows;
  plan.in = in;
  plan.out = out;
  LM2_RETURN_IF_ERROR(Describe(rows, in, out, plan.op, plan.a, plan.b, plan.c));
  LtPreference pref;
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtMatmulPreferenceCreate(&pref.handle), "preference"));
  const uint64_t ws = workspace_bytes;
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtMatmulPreferenceSetAttribute(
                                   pref.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
                               "preference"));
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t found[kCandidates] = {};
  int count = 0;
  LM2_RETURN_IF_ERROR(LtStatus(cublasLtMatmulAlgoGetHeuristic(lt, plan.op.handle, plan.a.handle, plan.b.handle,
                                                              plan.c.handle, plan.c.handle, pref.handle, kCandidates,
                                                              found, &count),
                               "cublasLtMatmulAlgoGetHeuristic"));
  // The fastest candidate with the default's bits, kept where it beats the default by 3%
  // (timing noise must not swap equal kernels).
  float best_ms = default_ms * 0.97f;
  bool chosen = false;
  cublasLtMatmulAlgo_t best_algo{};
  std::size_t best_workspace = 0;
  for (int i = 0; i < count; ++i) {
    if (found[i].state != CUBLAS_STATUS_SUCCESS || found[i].workspaceSize > workspace_bytes) continue;
    int split = 1;
    std::size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&found[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split),
                                         &written);
    if (split > 1) continue;  // sums split over k: not the default's order
    plan.algo = found[i].algo;
    plan.workspace = found[i].workspaceSize;
    LM2_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(y_b, y_start, y_bytes, cudaMemcpyDeviceToDevice, stream), "copy"));
    if (!RunPlan(lt, plan, x, weights[0], y_b, workspace, stream).ok()) continue;  // (refused at run time)
    LM2_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(got.data(), y_b, y_bytes, cudaMemcpyDeviceToHost, stream), "copy"));
    LM2_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize"));
    if (got != want) continue;
    LM2_ASSIGN_OR_RETURN(const float ms,
                         time([&](const bf16* w) { return RunPlan(lt, plan, x, w, y_b, workspace, stream); }));
    if (ms < best_ms) {
      best_ms = ms;
      chosen = true;
      best_algo = found[i].algo;
      best_workspace = found[i].workspaceSize;
    }
  }
  if (!chosen) return Status::Ok();  // the default stays
  plan.algo = best_algo;
  plan.workspace = best_workspace;
  impl_->plans.push_back(std::move(plan));
  return Status::Ok();
}

const AccumulatePlans::Plan* AccumulatePlans::Find(int64_t rows, int64_t in, int64_t out) const {
  if (impl_ == nullptr) return nullptr;
  for (const Plan& p : impl_->plans) {
    if (p.rows == rows && p.in == in && p.out == out) return &p;
  }
  return nullptr;
}

int AccumulatePlans::size() const { return impl_ == nullptr ? 0 : static_cast<int>(impl_->plans.size()); }

Status AccumulatePlans::Run(cublasHandle_t blas, void* workspace, const bf16* x, int64_t rows, int64_t in,
                            const bf16* w, int64_t out, float* y, cudaStream_t stream) const {
  const Plan* p = Find(rows, in, out);
  if (p == nullptr) return Linear(blas, x, rows, in, w, out, y, true, stream);
  LM2_RETURN_IF_ERROR(RequireNonNull("AccumulatePlans::Run", {x, w, y}));
  if (p->workspace > 0 && workspace == nullptr) return Status::InvalidArgument("AccumulatePlans::Run: no workspace");
  return RunPlan(impl_->lt.handle, *p, x, w, y, workspace, stream);
}

}  // namespace lm2::runtime::cuda
