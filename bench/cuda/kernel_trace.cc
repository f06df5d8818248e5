// A timeline of what a process ran on the GPU, for finding where a forward's wall time goes
// between and beside its kernels (Nsight Compute runs kernels one at a time, and the GPU
// machine has no Nsight Systems). A CUPTI injection library: the CUDA driver loads it into
// any CUDA program named by
//
//   CUDA_INJECTION64_PATH=/path/liblm2_kernel_trace.so LM2_TRACE_OUT=trace.csv PROGRAM ...
//
// and it records, with the GPU's timestamps (ns), every kernel, memcpy and memset and every
// runtime and driver API call of the host between cudaProfilerStart and cudaProfilerStop
// (lm2_cuda_bench --profile-prefill T / --profile-decode N call them; LM2_TRACE_ALL=1 keeps
// the whole run's instead; LM2_TRACE_API=0 leaves the API calls out: recording them slows the
// host by several µs a call). At exit, one CSV row per record into LM2_TRACE_OUT (default
// lm2_trace.csv), after a row "window" giving the window's start and end:
//
//   kind,stream,start_ns,end_ns,correlation,name
//
// kind: kernel, memcpy, memset, runtime or driver (an API call: stream -1, the host thread's
// time, name the function); times on CUPTI's clock, the host's and the GPU's alike. A kernel's correlation id is that of the API call that launched
// it. bench/cuda/trace_summary.py reads the file: idle gaps, overlap, host-bound launches.
#include <cupti.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Row {
  const char* kind;
  int64_t stream;
  uint64_t start, end;
  uint32_t correlation;
  std::string name;
};

std::mutex mu;
std::vector<Row> rows;

void Fail(CUptiResult r, const char* what) {
  const char* text = nullptr;
  cuptiGetResultString(r, &text);
  std::fprintf(stderr, "lm2_kernel_trace: %s: %s\n", what, text != nullptr ? text : "unknown CUPTI error");
}

#define TRACE_CHECK(call)                     \
  do {                                        \
    const CUptiResult r_ = (call);            \
    if (r_ != CUPTI_SUCCESS) Fail(r_, #call); \
  } while (0)

// The GPU's work, then the host's API calls (recording those slows each call several µs, so
// LM2_TRACE_API=0 leaves them out where the host's own pace matters).
constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                         CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_RUNTIME,
                                         CUPTI_ACTIVITY_KIND_DRIVER};
constexpr int kGpuKinds = 3;

bool TraceApi() {
  const char* v = std::getenv("LM2_TRACE_API");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The window kept: from cudaProfilerStart's return to cudaProfilerStop's entry (CUPTI's
// clock, the records' own; guarded by mu). Recording runs from the start: the first records
// after it is turned on cost the host some milliseconds, which would otherwise fall inside
// the window.
uint64_t window_start = 0, window_end = UINT64_MAX;

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  constexpr size_t kBytes = 8 << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBytes));
  *size = kBytes;
  *max_records = 0;  // as many as fit
}

std::string ApiName(CUpti_CallbackDomain domain, uint32_t cbid) {
  const char* name = nullptr;
  if (cuptiGetCallbackName(domain, cbid, &name) == CUPTI_SUCCESS && name != nullptr) return name;
  return "cbid " + std::to_string(cbid);
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<Row> got;
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
        got.push_back({"kernel", k->streamId, k->start, k->end, k->correlationId, k->name != nullptr ? k->name : "?"});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
        got.push_back({"memcpy", m->streamId, m->start, m->end, m->correlationId,
                       "memcpy kind " + std::to_string(m->copyKind) + " " + std::to_string(m->bytes) + " B"});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
        got.push_back({"memset", m->streamId, m->start, m->end, m->correlationId,
                       "memset " + std::to_string(m->bytes) + " B"});
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME:
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(record);
        const bool runtime = record->kind == CUPTI_ACTIVITY_KIND_RUNTIME;
        got.push_back({runtime ? "runtime" : "driver", -1, a->start, a->end, a->correlationId,
                       ApiName(runtime ? CUPTI_CB_DOMAIN_RUNTIME_API : CUPTI_CB_DOMAIN_DRIVER_API, a->cbid)});
        break;
      }
      default:
        break;
    }
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
  if (dropped > 0) std::fprintf(stderr, "lm2_kernel_trace: %zu records dropped\n", dropped);
  std::free(buffer);
  std::lock_guard<std::mutex> lock(mu);
  rows.insert(rows.end(), std::make_move_iterator(got.begin()), std::make_move_iterator(got.end()));
}

// cudaProfilerStart opens the window as it returns, cudaProfilerStop closes it as it is
// entered.
void CUPTIAPI OnApi(void*, CUpti_CallbackDomain domain, CUpti_CallbackId cbid, const void* data) {
  if (domain != CUPTI_CB_DOMAIN_RUNTIME_API) return;
  const auto* info = static_cast<const CUpti_CallbackData*>(data);
  uint64_t now = 0;
  if (cbid == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000 && info->callbackSite == CUPTI_API_EXIT) {
    TRACE_CHECK(cuptiGetTimestamp(&now));
    std::lock_guard<std::mutex> lock(mu);
    window_start = now;
  } else if (cbid == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000 && info->callbackSite == CUPTI_API_ENTER) {
    TRACE_CHECK(cuptiGetTimestamp(&now));
    std::lock_guard<std::mutex> lock(mu);
    window_end = now;
  }
}

std::string CsvField(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

void WriteRows() {
  TRACE_CHECK(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED));
  const char* path = std::getenv("LM2_TRACE_OUT");
  if (path == nullptr || *path == '\0') path = "lm2_trace.csv";
  std::FILE* f = std::fopen(path, "w");
  if (f == nullptr) {
    std::fprintf(stderr, "lm2_kernel_trace: cannot write %s\n", path);
    return;
  }
  std::lock_guard<std::mutex> lock(mu);
  const char* all = std::getenv("LM2_TRACE_ALL");
  const bool everything = all != nullptr && std::strcmp(all, "1") == 0;
  std::fprintf(f, "kind,stream,start_ns,end_ns,correlation,name\n");
  // The window itself, as a row of its own: where the traced call began and ended.
  if (!everything) std::fprintf(f, "window,-1,%llu,%llu,0,\"cudaProfilerStart..Stop\"\n",
                                static_cast<unsigned long long>(window_start),
                                static_cast<unsigned long long>(window_end));
  size_t kept = 0;
  for (const Row& r : rows) {
    if (!everything && (r.end < window_start || r.start > window_end)) continue;
    ++kept;
    std::fprintf(f, "%s,%lld,%llu,%llu,%u,%s\n", r.kind, static_cast<long long>(r.stream),
                 static_cast<unsigned long long>(r.start), static_cast<unsigned long long>(r.end), r.correlation,
                 CsvField(r.name).c_str());
  }
  std::fclose(f);
  std::fprintf(stderr, "lm2_kernel_trace: %zu of %zu records into %s\n", kept, rows.size(), path);
}

}  // namespace

// Called by the CUDA driver when it loads this library (CUDA_INJECTION64_PATH).
extern "C" __attribute__((visibility("default"))) int InitializeInjection() {
  TRACE_CHECK(cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted));
  CUpti_SubscriberHandle subscriber;
  TRACE_CHECK(cuptiSubscribe(&subscriber, OnApi, nullptr));
  TRACE_CHECK(cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                                  CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000));
  TRACE_CHECK(cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                                  CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000));
  const size_t kinds = TraceApi() ? std::size(kKinds) : kGpuKinds;
  for (size_t i = 0; i < kinds; ++i) TRACE_CHECK(cuptiActivityEnable(kKinds[i]));
  std::atexit(WriteRows);
  return 1;
}
