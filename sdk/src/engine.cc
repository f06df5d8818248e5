#include "lm2/engine.h"

#include <utility>

#include "engine_core.h"
#include "ids.h"
#include "keys.h"
#include "lm2/runtime/backend.h"
#include "lm2/runtime/model_files.h"

namespace lm2 {

namespace internal {
namespace {
ModelWrapper& Wrapper() {
  static ModelWrapper wrap;
  return wrap;
}
}  // namespace
void SetModelWrapperForTesting(ModelWrapper wrap) { Wrapper() = std::move(wrap); }
}  // namespace internal

namespace {

void Progress(const EngineOptions& o, std::string_view stage, double fraction) {
  if (o.on_progress) o.on_progress(stage, fraction);
}

Status LoadModel(const EngineOptions& options, internal::EngineCore& core) {
  runtime::BackendOptions backend;
  switch (options.backend) {
    case Backend::kAuto: backend.kind = runtime::BackendKind::kAuto; break;
    case Backend::kCpu: backend.kind = runtime::BackendKind::kCpu; break;
    case Backend::kCuda: backend.kind = runtime::BackendKind::kCuda; break;
  }
  Progress(options, "model files", 0.0);
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<runtime::ModelFiles> files, runtime::ModelFiles::Open(options.model_dir));
  std::shared_ptr<const runtime::ModelFiles> shared(std::move(files));
  Progress(options, "fingerprint", 0.2);
  if (shared->Fingerprint().empty()) return Status::Internal("model fingerprint could not be computed");
  Progress(options, "weights", 0.5);
  LM2_ASSIGN_OR_RETURN(core.model, runtime::LoadModel(shared, backend));
  if (const internal::ModelWrapper& wrap = internal::Wrapper(); wrap) core.model = wrap(std::move(core.model));
  if (!core.model->config().has_memory()) {
    return Status::InvalidArgument("model in " + options.model_dir + " has no memory layers (a vanilla model): "
                                   "sessions need an LM2 model");
  }
  Progress(options, "tokenizer", 0.8);
  LM2_ASSIGN_OR_RETURN(core.tokenizer, runtime::Tokenizer::Open(options.model_dir));
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<runtime::SequenceState> fresh, core.model->NewState());
  LM2_ASSIGN_OR_RETURN(core.initial_memory, core.model->ExportMemory(*fresh));
  core.spare_banks = std::make_unique<internal::BankPool>(internal::kKeptBanks);

  const runtime::ModelConfig& cfg = core.model->config();
  ModelInfo& info = core.info;
  info.model_dir = options.model_dir;
  info.fingerprint = core.model->fingerprint();
  info.backend = core.model->backend_name();
  if (options.batch_decode && core.model->BatchesSteps()) {
    runtime::DecodeBatcherOptions batching;
    // A batched step out of device memory: idle sessions' states make room (a batch holds
    // only sessions inside calls, never evicted).
    batching.on_out_of_memory = [residency = core.residency.get()] { return residency->ReleaseIdle(); };
    core.batcher = std::make_unique<runtime::DecodeBatcher>(*core.model, batching);
  }
  info.num_layers = static_cast<int32_t>(cfg.num_layers);
  for (int64_t l : cfg.memory_layers) info.memory_layers.push_back(static_cast<int32_t>(l));
  info.memory_slots = cfg.memory_slots;
  info.hidden_size = cfg.hidden_size;
  info.max_context = cfg.max_position_embeddings;
  return Status::Ok();
}

}  // namespace

Engine::Engine(std::shared_ptr<internal::EngineCore> core) : core_(std::move(core)) {}
Engine::~Engine() = default;

Result<std::unique_ptr<Engine>> Engine::Open(const EngineOptions& options) {
  if (options.model_dir.empty()) return Status::InvalidArgument("EngineOptions.model_dir is required");
  if (options.store_path.empty()) return Status::InvalidArgument("EngineOptions.store_path is required");
  if (options.max_message_bytes == 0) return Status::InvalidArgument("EngineOptions.max_message_bytes must be > 0");
  if (options.max_reply_tokens < 1) return Status::InvalidArgument("EngineOptions.max_reply_tokens must be >= 1");
  auto core = std::make_shared<internal::EngineCore>();
  core->options = options;
  core->residency = std::make_unique<internal::Residency>(options.max_resident_sessions);
  LM2_RETURN_IF_ERROR(LoadModel(options, *core).WithContext("loading model " + options.model_dir));

  Progress(options, "store", 0.9);
  LM2_ASSIGN_OR_RETURN(std::shared_ptr<persistence::KeyProvider> keys, internal::ResolveKeyProvider(options));
  persistence::RocksDbStoreOptions so;
  so.path = options.store_path;
  so.keys = std::move(keys);
  so.sync = options.sync_commits;
  so.sharing = options.share_store_between_processes ? persistence::ProcessSharing::kPerOperation
                                                     : persistence::ProcessSharing::kExclusive;
  auto store = persistence::OpenRocksDbSessionStore(so);
  if (!store.ok()) return store.status().WithContext("opening store " + options.store_path);
  core->store = std::move(store).value();
  Progress(options, "ready", 1.0);
  return std::unique_ptr<Engine>(new Engine(std::move(core)));
}

const ModelInfo& Engine::model_info() const { return core_->info; }

std::size_t Engine::ResidentSessions() const { return core_->residency->stats().resident_sessions; }

EngineStats Engine::Stats() const {
  EngineStats s = core_->residency->stats();
  if (core_->batcher != nullptr) {
    const runtime::DecodeBatcher::Stats b = core_->batcher->stats();
    s.decode_batches = static_cast<uint64_t>(b.batches);
    s.decode_steps = static_cast<uint64_t>(b.steps);
    s.largest_decode_batch = static_cast<uint64_t>(b.largest);
  }
  return s;
}

Result<std::vector<std::string>> Engine::ListSessions(std::string_view tenant) const {
  LM2_RETURN_IF_ERROR(internal::ValidateId("tenant", tenant));
  return core_->store->ListSessions(tenant);
}

Status Engine::EraseSession(std::string_view tenant, std::string_view session_id) const {
  LM2_RETURN_IF_ERROR(internal::ValidateId("tenant", tenant));
  LM2_RETURN_IF_ERROR(internal::ValidateId("session id", session_id));
  return core_->store->EraseSession({std::string(tenant), std::string(session_id)});
}

Status Engine::EraseTenant(std::string_view tenant) const {
  LM2_RETURN_IF_ERROR(internal::ValidateId("tenant", tenant));
  return core_->store->EraseTenant(tenant);
}

Result<std::unique_ptr<Session>> Engine::OpenSession(std::string_view tenant, std::string_view session_id,
                                                     const SessionOptions& options) const {
  LM2_RETURN_IF_ERROR(internal::ValidateId("tenant", tenant));
  LM2_RETURN_IF_ERROR(internal::ValidateId("session id", session_id));
  if (options.resume_prefill_turns < 0) return Status::InvalidArgument("resume_prefill_turns must be >= 0");
  LM2_ASSIGN_OR_RETURN(std::unique_ptr<internal::SessionCore> core,
                       internal::OpenSessionCore(core_, {std::string(tenant), std::string(session_id)}, options));
  return std::unique_ptr<Session>(new Session(std::move(core)));
}

}  // namespace lm2
