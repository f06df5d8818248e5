// The C ABI over the C++ SDK. No exception or C++ type crosses it: every entry point
// catches, converts Status to an lm2_code, and keeps the message in a thread-local.
#include "lm2.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "lm2/engine.h"

struct lm2_engine {
  std::shared_ptr<lm2::Engine> engine;
};
struct lm2_session {
  std::unique_ptr<lm2::Session> session;
};

namespace {

thread_local std::string g_last_error;

int Fail(const lm2::Status& s) {
  g_last_error = s.ToString();
  return static_cast<int>(s.code());
}
int Ok() {
  g_last_error.clear();
  return LM2_OK;
}
int Invalid(const char* what) { return Fail(lm2::Status::InvalidArgument(what)); }

char* Dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// Runs `f` (returning an lm2_code), turning any escaping exception into LM2_INTERNAL.
template <typename F>
int Guard(F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return Fail(lm2::Status::ResourceExhausted("out of memory"));
  } catch (const std::exception& e) {
    return Fail(lm2::Status::Internal(e.what()));
  } catch (...) {
    return Fail(lm2::Status::Internal("unknown exception"));
  }
}

}  // namespace

extern "C" {

const char* lm2_code_name(int code) {
  static thread_local std::string name;
  name = std::string(lm2::StatusCodeName(static_cast<lm2::StatusCode>(code)));
  return name.c_str();
}

const char* lm2_last_error(void) { return g_last_error.c_str(); }

void lm2_engine_options_init(lm2_engine_options* o) {
  if (o == nullptr) return;
  std::memset(o, 0, sizeof *o);
  o->key_env = "LM2_KEK";
  o->backend = LM2_BACKEND_AUTO;
  o->sync_commits = 1;
  o->max_message_bytes = 64 * 1024;
}

int lm2_create_key_file(const char* path) {
  if (path == nullptr) return Invalid("path is NULL");
  return Guard([&] {
    lm2::Status s = lm2::CreateKeyFile(path);
    return s.ok() ? Ok() : Fail(s);
  });
}

int lm2_engine_open(const lm2_engine_options* o, lm2_engine** out) {
  if (o == nullptr || out == nullptr) return Invalid("options or out is NULL");
  *out = nullptr;
  return Guard([&] {
    lm2::EngineOptions eo;
    eo.model_dir = o->model_dir != nullptr ? o->model_dir : "";
    eo.store_path = o->store_path != nullptr ? o->store_path : "";
    eo.key_file = o->key_file != nullptr ? o->key_file : "";
    eo.key_env = o->key_env != nullptr ? o->key_env : "";
    switch (o->backend) {
      case LM2_BACKEND_AUTO: eo.backend = lm2::Backend::kAuto; break;
      case LM2_BACKEND_CPU: eo.backend = lm2::Backend::kCpu; break;
      case LM2_BACKEND_CUDA: eo.backend = lm2::Backend::kCuda; break;
      default: return Invalid("unknown backend");
    }
    eo.share_store_between_processes = o->share_store != 0;
    eo.sync_commits = o->sync_commits != 0;
    eo.max_message_bytes = o->max_message_bytes;
    eo.max_resident_sessions = o->max_resident_sessions;
    auto e = lm2::Engine::Open(eo);
    if (!e.ok()) return Fail(e.status());
    *out = new lm2_engine{std::shared_ptr<lm2::Engine>(std::move(e).value())};
    return Ok();
  });
}

void lm2_engine_close(lm2_engine* engine) { delete engine; }

void lm2_engine_memory_shape(const lm2_engine* engine, size_t* layers, size_t* slots) {
  if (engine == nullptr) return;
  const lm2::ModelInfo& info = engine->engine->model_info();
  if (layers != nullptr) *layers = info.memory_layers.size();
  if (slots != nullptr) *slots = static_cast<size_t>(info.memory_slots);
}

void lm2_engine_get_stats(const lm2_engine* engine, lm2_engine_stats* out) {
  if (engine == nullptr || out == nullptr) return;
  const lm2::EngineStats s = engine->engine->Stats();
  out->resident_sessions = s.resident_sessions;
  out->evictions = s.evictions;
  out->decode_batches = s.decode_batches;
  out->decode_steps = s.decode_steps;
  out->largest_decode_batch = s.largest_decode_batch;
}

int lm2_engine_erase_session(lm2_engine* engine, const char* tenant, const char* session_id) {
  if (engine == nullptr || tenant == nullptr || session_id == nullptr) return Invalid("NULL argument");
  return Guard([&] {
    lm2::Status s = engine->engine->EraseSession(tenant, session_id);
    return s.ok() ? Ok() : Fail(s);
  });
}

int lm2_engine_erase_tenant(lm2_engine* engine, const char* tenant) {
  if (engine == nullptr || tenant == nullptr) return Invalid("NULL argument");
  return Guard([&] {
    lm2::Status s = engine->engine->EraseTenant(tenant);
    return s.ok() ? Ok() : Fail(s);
  });
}

int lm2_session_open(lm2_engine* engine, const char* tenant, const char* session_id, int create_if_missing,
                     lm2_session** out) {
  if (engine == nullptr || tenant == nullptr || session_id == nullptr || out == nullptr) return Invalid("NULL argument");
  *out = nullptr;
  return Guard([&] {
    lm2::SessionOptions so;
    so.create_if_missing = create_if_missing != 0;
    auto s = engine->engine->OpenSession(tenant, session_id, so);
    if (!s.ok()) return Fail(s.status());
    *out = new lm2_session{std::move(s).value()};
    return Ok();
  });
}

void lm2_session_close(lm2_session* session) { delete session; }
uint64_t lm2_session_head(const lm2_session* s) { return s != nullptr ? s->session->head_version() : 0; }
uint64_t lm2_session_turns(const lm2_session* s) { return s != nullptr ? s->session->turn_count() : 0; }

void lm2_chat_options_init(lm2_chat_options* o) {
  if (o == nullptr) return;
  const lm2::ChatOptions d;
  o->max_tokens = d.max_tokens;
  o->temperature = d.temperature;
  o->top_k = d.top_k;
  o->top_p = d.top_p;
  o->repetition_penalty = d.repetition_penalty;
  o->seed = d.seed;
}

int lm2_session_chat(lm2_session* session, const char* message, const lm2_chat_options* options,
                     lm2_token_callback callback, void* user_data, lm2_chat_result* result) {
  if (result != nullptr) std::memset(result, 0, sizeof *result);
  if (session == nullptr || message == nullptr) return Invalid("NULL argument");
  return Guard([&] {
    lm2::ChatOptions co;
    if (options != nullptr) {
      co.max_tokens = options->max_tokens;
      co.temperature = options->temperature;
      co.top_k = options->top_k;
      co.top_p = options->top_p;
      co.repetition_penalty = options->repetition_penalty;
      co.seed = options->seed;
    }
    std::atomic<bool> cancel{false};
    co.cancel = &cancel;
    lm2::TokenCallback cb;
    if (callback != nullptr) {
      cb = [&](std::string_view t) {
        if (callback(t.data(), t.size(), user_data) != 0) cancel = true;
      };
    }
    auto r = session->session->Chat(message, co, cb);
    if (!r.ok()) return Fail(r.status());
    if (result != nullptr) {
      result->text = Dup(r->text);
      result->version = r->version;
      result->prompt_tokens = r->prompt_tokens;
      result->reply_tokens = r->reply_tokens;
    }
    return Ok();
  });
}

void lm2_chat_result_free(lm2_chat_result* result) {
  if (result == nullptr) return;
  std::free(result->text);
  result->text = nullptr;
}

#define LM2_SESSION_CALL(expr)                                  \
  if (session == nullptr) return Invalid("session is NULL");    \
  return Guard([&] {                                            \
    lm2::Status s = (expr);                                     \
    return s.ok() ? Ok() : Fail(s);                             \
  })

int lm2_session_reload(lm2_session* session) { LM2_SESSION_CALL(session->session->Reload()); }
int lm2_session_rollback(lm2_session* session, uint64_t version) { LM2_SESSION_CALL(session->session->Rollback(version)); }
int lm2_session_forget_turn(lm2_session* session, uint64_t version) {
  LM2_SESSION_CALL(session->session->ForgetTurn(version));
}
int lm2_session_erase(lm2_session* session) { LM2_SESSION_CALL(session->session->Erase()); }

int lm2_session_clear(lm2_session* session, const int32_t* layers, size_t n_layers, const int64_t* slots,
                      size_t n_slots) {
  lm2::ClearSpec spec;
  if (layers != nullptr) spec.layers.assign(layers, layers + n_layers);
  if (slots != nullptr) spec.slots.assign(slots, slots + n_slots);
  LM2_SESSION_CALL(session->session->ClearMemory(spec));
}

int lm2_session_fork(lm2_session* session, uint64_t version, const char* new_session_id, const char* new_tenant,
                     lm2_session** out) {
  if (session == nullptr || new_session_id == nullptr || out == nullptr) return Invalid("NULL argument");
  *out = nullptr;
  return Guard([&] {
    auto f = session->session->Fork(version, new_session_id, new_tenant != nullptr ? new_tenant : "");
    if (!f.ok()) return Fail(f.status());
    *out = new lm2_session{std::move(f).value()};
    return Ok();
  });
}

int lm2_session_history(lm2_session* session, lm2_version** versions, size_t* count) {
  if (session == nullptr || versions == nullptr || count == nullptr) return Invalid("NULL argument");
  *versions = nullptr;
  *count = 0;
  return Guard([&] {
    auto h = session->session->History();
    if (!h.ok()) return Fail(h.status());
    auto* arr = static_cast<lm2_version*>(std::calloc(h->size() == 0 ? 1 : h->size(), sizeof(lm2_version)));
    if (arr == nullptr) return Fail(lm2::Status::ResourceExhausted("out of memory"));
    for (std::size_t i = 0; i < h->size(); ++i) {
      const lm2::VersionEntry& e = (*h)[i];
      arr[i].version = e.version;
      arr[i].parent_version = e.parent_version;
      arr[i].created_unix_ms = e.created_unix_ms;
      arr[i].kind = Dup(e.kind);
      arr[i].preview = Dup(e.preview);
      arr[i].turn_count = e.turn_count;
      arr[i].is_head = e.is_head ? 1 : 0;
    }
    *versions = arr;
    *count = h->size();
    return Ok();
  });
}

void lm2_history_free(lm2_version* versions, size_t count) {
  if (versions == nullptr) return;
  for (size_t i = 0; i < count; ++i) {
    std::free(versions[i].kind);
    std::free(versions[i].preview);
  }
  std::free(versions);
}

int lm2_session_slot_norms(lm2_session* session, float* out, size_t capacity) {
  if (session == nullptr || out == nullptr) return Invalid("NULL argument");
  return Guard([&] {
    auto n = session->session->SlotNorms();
    if (!n.ok()) return Fail(n.status());
    size_t need = 0;
    for (const auto& l : *n) need += l.values.size();
    if (capacity < need) {
      return Fail(lm2::Status::OutOfRange("slot norms need " + std::to_string(need) + " floats, capacity " +
                                          std::to_string(capacity)));
    }
    size_t at = 0;
    for (const auto& l : *n) {
      std::memcpy(out + at, l.values.data(), l.values.size() * sizeof(float));
      at += l.values.size();
    }
    return Ok();
  });
}

}  // extern "C"
