// The Python module `lm2`: Engine, Session (chat as a string or a token stream, history,
// rollback, fork, clear, forget, erase, inspection) and lm2.Error carrying the status code.
//
// The GIL is released while the model runs or the store is touched; a Python token
// callback re-acquires it. A Session is one conversation: use it from one thread at a
// time (a second concurrent call raises lm2.Error FailedPrecondition).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/eval.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "lm2/engine.h"

namespace py = pybind11;

namespace {

py::object& ErrorType() {
  static py::object* type = nullptr;
  if (type == nullptr) type = new py::object();  // leaked: lives as long as the interpreter
  return *type;
}

[[noreturn]] void Raise(const lm2::Status& s) {
  py::object exc = ErrorType()(s.ToString(), static_cast<int>(s.code()), std::string(lm2::StatusCodeName(s.code())));
  PyErr_SetObject(ErrorType().ptr(), exc.ptr());
  throw py::error_already_set();
}

void Check(const lm2::Status& s) {
  if (!s.ok()) Raise(s);
}

template <typename T>
T Take(lm2::Result<T> r) {
  if (!r.ok()) Raise(r.status());
  return std::move(r).value();
}

py::dict Slots(const std::vector<lm2::LayerSlots>& v) {
  py::dict d;
  for (const auto& l : v) d[py::int_(l.layer)] = l.values;
  return d;
}

py::dict ResultDict(const lm2::ChatResult& r) {
  py::dict d;
  d["text"] = r.text;
  d["stop_reason"] = r.stop_reason;
  d["version"] = r.version;
  d["prompt_tokens"] = r.prompt_tokens;
  d["reply_tokens"] = r.reply_tokens;
  d["prefill_seconds"] = r.prefill_seconds;
  d["decode_seconds"] = r.decode_seconds;
  d["commit_seconds"] = r.commit_seconds;
  d["slot_writes"] = Slots(r.slot_writes);
  d["slot_reads"] = Slots(r.slot_reads);
  return d;
}

struct PySession;

// Marks a session busy for the duration of a call (one thread at a time).
struct PySession {
  std::unique_ptr<lm2::Session> s;
  std::atomic<bool> busy{false};
  std::optional<lm2::ChatResult> last;

  struct Busy {
    PySession* p;
    explicit Busy(PySession* ps) : p(ps) {
      bool expected = false;
      if (!p->busy.compare_exchange_strong(expected, true)) {
        Raise(lm2::Status::FailedPrecondition("session is in use by another call (a stream not yet finished, "
                                              "or another thread): a Session is used by one caller at a time"));
      }
    }
    ~Busy() { p->busy = false; }
  };
};

lm2::ChatOptions MakeChatOptions(int max_tokens, float temperature, int top_k, float top_p, float repetition_penalty,
                                 uint64_t seed, std::vector<std::string> stop) {
  lm2::ChatOptions o;
  o.max_tokens = max_tokens;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  o.repetition_penalty = repetition_penalty;
  o.seed = seed;
  o.stop_strings = std::move(stop);
  return o;
}

// Iterator over reply text pieces; the turn runs on a worker thread. Closing it early
// (or dropping it) cancels the turn: nothing is committed.
class ChatStream {
 public:
  ChatStream(py::object owner, PySession* session, std::string message, lm2::ChatOptions options)
      : owner_(std::move(owner)), session_(session) {
    bool expected = false;
    if (!session_->busy.compare_exchange_strong(expected, true)) {
      Raise(lm2::Status::FailedPrecondition("session is in use by another call"));
    }
    options_ = std::move(options);
    options_.cancel = &cancel_;
    worker_ = std::thread([this, message = std::move(message)] {
      auto r = session_->s->Chat(message, options_, [this](std::string_view t) {
        // One piece in flight: the turn waits until the reader takes it or closes, so a
        // close after any piece is seen before the turn can commit.
        std::unique_lock<std::mutex> lock(mu_);
        pieces_.emplace_back(t);
        cv_.notify_all();
        cv_.wait(lock, [this] { return pieces_.empty() || cancel_.load(); });
      });
      std::lock_guard<std::mutex> lock(mu_);
      if (r.ok()) session_->last = std::move(r).value();
      else status_ = r.status();
      done_ = true;
      cv_.notify_all();
    });
  }
  ~ChatStream() { Close(); }

  std::string Next() {
    std::unique_lock<std::mutex> lock(mu_);
    {
      py::gil_scoped_release release;
      cv_.wait(lock, [this] { return !pieces_.empty() || done_; });
    }
    if (!pieces_.empty()) {
      std::string p = std::move(pieces_.front());
      pieces_.pop_front();
      cv_.notify_all();  // the turn may go on
      return p;
    }
    lock.unlock();
    Join();
    if (!status_.ok()) Raise(status_);
    throw py::stop_iteration();
  }

  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancel_ = true;
    }
    cv_.notify_all();  // wake a turn waiting for its piece to be taken
    Join();
  }

 private:
  void Join() {
    if (worker_.joinable()) {
      py::gil_scoped_release release;
      worker_.join();
    }
    if (!released_) {
      released_ = true;
      session_->busy = false;
    }
  }

  py::object owner_;  // keeps the Python Session alive
  PySession* session_;
  lm2::ChatOptions options_;
  std::atomic<bool> cancel_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> pieces_;
  bool done_ = false;
  bool released_ = false;
  lm2::Status status_;
  std::thread worker_;
};

struct PyEngine {
  std::shared_ptr<lm2::Engine> e;
};

py::dict VersionDict(const lm2::VersionEntry& v) {
  py::dict d;
  d["version"] = v.version;
  d["parent_version"] = v.parent_version;
  d["created_unix_ms"] = v.created_unix_ms;
  d["kind"] = v.kind;
  d["preview"] = v.preview;
  d["turn_count"] = v.turn_count;
  d["token_count"] = v.token_count;
  d["prompt_tokens"] = v.prompt_tokens;
  d["reply_tokens"] = v.reply_tokens;
  d["is_head"] = v.is_head;
  return d;
}

}  // namespace

PYBIND11_MODULE(lm2, m) {
  m.doc() = "lm2: LM2 language models whose memory persists, encrypted, per session";
  py::exec(R"(
class Error(Exception):
    """An lm2 status: .code (int, lm2::StatusCode), .name ("Conflict", ...), str() the message."""
    def __init__(self, message, code, name):
        super().__init__(message)
        self.code = code
        self.name = name
)", m.attr("__dict__"));
  ErrorType() = m.attr("Error");
  const char* names[] = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "CORRUPTION", "CONFLICT",
                         "PERMISSION_DENIED", "FAILED_PRECONDITION", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED",
                         "UNAVAILABLE", "CANCELLED", "UNIMPLEMENTED", "IO_ERROR", "INTERNAL"};
  for (int i = 0; i < 15; ++i) m.attr(names[i]) = i;

  m.def("create_key_file", [](const std::string& path) { Check(lm2::CreateKeyFile(path)); }, py::arg("path"),
        "Writes a keyring file with a random master key (mode 0600) unless it exists.");

  py::class_<PySession>(m, "Session", "One conversation whose memory persists. Use from one thread at a time.")
      .def_property_readonly("tenant", [](PySession& s) { return s.s->tenant(); })
      .def_property_readonly("id", [](PySession& s) { return s.s->id(); })
      .def_property_readonly("head_version", [](PySession& s) { return s.s->head_version(); })
      .def_property_readonly("turn_count", [](PySession& s) { return s.s->turn_count(); })
      .def_property_readonly("last_result", [](PySession& s) -> py::object {
        if (!s.last) return py::none();
        return ResultDict(*s.last);
      }, "Details of the last committed turn (version, token counts, timings, slot writes/reads).")
      .def("chat", [](py::object self, const std::string& message, bool stream, std::optional<py::function> on_token,
                      int max_tokens, float temperature, int top_k, float top_p, float repetition_penalty,
                      uint64_t seed, std::vector<std::string> stop) -> py::object {
        PySession& s = self.cast<PySession&>();
        lm2::ChatOptions o = MakeChatOptions(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, std::move(stop));
        if (stream) return py::cast(new ChatStream(self, &s, message, std::move(o)), py::return_value_policy::take_ownership);
        PySession::Busy busy(&s);
        std::atomic<bool> cancel{false};
        o.cancel = &cancel;
        std::optional<py::error_already_set> callback_error;
        lm2::TokenCallback cb;
        if (on_token) {
          cb = [&](std::string_view t) {
            py::gil_scoped_acquire acquire;
            if (callback_error) return;
            try {
              (*on_token)(py::str(t.data(), t.size()));
            } catch (py::error_already_set& e) {
              callback_error = std::move(e);
              cancel = true;
            }
          };
        }
        lm2::Result<lm2::ChatResult> r = lm2::Status::Internal("not run");
        {
          py::gil_scoped_release release;
          r = s.s->Chat(message, o, cb);
        }
        if (callback_error) throw *callback_error;
        if (!r.ok()) Raise(r.status());
        s.last = std::move(r).value();
        return py::str(s.last->text);
      }, py::arg("message"), py::kw_only(), py::arg("stream") = false, py::arg("on_token") = py::none(),
         py::arg("max_tokens") = 256, py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
         py::arg("repetition_penalty") = 1.0f, py::arg("seed") = 0, py::arg("stop") = std::vector<std::string>{},
         "One turn, committed when it ends. Returns the reply text; with stream=True an iterator of text "
         "pieces (closing it early cancels the turn); on_token(text) is called as text streams.")
      .def("next_token_logits", [](PySession& s, const std::string& message) {
        PySession::Busy busy(&s);
        std::vector<float> v;
        {
          py::gil_scoped_release release;
          auto r = s.s->NextTokenLogits(message);
          if (!r.ok()) {
            py::gil_scoped_acquire acquire;
            Raise(r.status());
          }
          v = std::move(r).value();
        }
        return py::array_t<float>(static_cast<py::ssize_t>(v.size()), v.data());
      }, py::arg("message"))
      .def("reload", [](PySession& s) { PySession::Busy b(&s); Check(s.s->Reload()); })
      .def("history", [](PySession& s) {
        PySession::Busy b(&s);
        py::list out;
        for (const auto& v : Take(s.s->History())) out.append(VersionDict(v));
        return out;
      })
      .def("turn", [](PySession& s, uint64_t v) {
        PySession::Busy b(&s);
        lm2::TurnRecord t = Take(s.s->Turn(v));
        py::dict d;
        d["version"] = t.version;
        d["user_text"] = t.user_text;
        d["reply_text"] = t.reply_text;
        d["prompt_ids"] = t.prompt_ids;
        d["reply_ids"] = t.reply_ids;
        return d;
      }, py::arg("version"))
      .def("rollback", [](PySession& s, uint64_t v) {
        PySession::Busy b(&s);
        py::gil_scoped_release r;
        lm2::Status st = s.s->Rollback(v);
        py::gil_scoped_acquire a;
        Check(st);
      }, py::arg("version"))
      .def("fork", [](PySession& s, uint64_t v, const std::string& id, const std::string& tenant) {
        PySession::Busy b(&s);
        auto p = std::make_unique<PySession>();
        p->s = Take(s.s->Fork(v, id, tenant));
        return p;
      }, py::arg("version"), py::arg("new_session_id"), py::arg("tenant") = "")
      .def("clear", [](PySession& s, std::vector<int32_t> layers, std::vector<int64_t> slots) {
        PySession::Busy b(&s);
        lm2::ClearSpec spec{std::move(layers), std::move(slots)};
        Check(s.s->ClearMemory(spec));
      }, py::arg("layers") = std::vector<int32_t>{}, py::arg("slots") = std::vector<int64_t>{},
         "Resets the chosen layers/slots (empty = all) to their initial values; commits a version.")
      .def("forget", [](PySession& s, uint64_t v) {
        PySession::Busy b(&s);
        py::gil_scoped_release r;
        lm2::Status st = s.s->ForgetTurn(v);
        py::gil_scoped_acquire a;
        Check(st);
      }, py::arg("version"), "Forgets turn `version` exactly (later turns replayed without it).")
      .def("erase", [](PySession& s) { PySession::Busy b(&s); Check(s.s->Erase()); })
      .def("slot_norms", [](PySession& s) { PySession::Busy b(&s); return Slots(Take(s.s->SlotNorms())); })
      .def("slot_writes", [](PySession& s, uint64_t v) { PySession::Busy b(&s); return Slots(Take(s.s->SlotWrites(v))); },
           py::arg("version"))
      .def("memory", [](PySession& s) {
        PySession::Busy b(&s);
        lm2::MemoryState mem = Take(s.s->Memory());
        py::dict d;
        for (const auto& l : mem.layers) {
          py::array_t<float> a({static_cast<py::ssize_t>(l.slots), static_cast<py::ssize_t>(l.dim)});
          std::copy(l.data.begin(), l.data.end(), a.mutable_data());
          d[py::int_(l.layer)] = a;
        }
        return d;
      }, "The head memory: {layer: float32 array [slots, dim]}.");

  py::class_<ChatStream>(m, "ChatStream")
      .def("__iter__", [](py::object self) { return self; })
      .def("__next__", &ChatStream::Next)
      .def("close", &ChatStream::Close, "Cancels the turn if it is still running (nothing is committed).");

  py::class_<PyEngine>(m, "Engine", "A loaded model and the encrypted session store. Thread-safe.")
      .def(py::init([](const std::string& model_dir, const std::string& store_path, std::optional<std::string> key_file,
                       std::string key_env, bool share_store, bool sync_commits, std::size_t max_message_bytes,
                       const std::string& backend, std::size_t max_resident_sessions) {
             lm2::EngineOptions o;
             o.model_dir = model_dir;
             o.store_path = store_path;
             o.key_file = key_file.value_or("");
             o.key_env = std::move(key_env);
             o.share_store_between_processes = share_store;
             o.sync_commits = sync_commits;
             o.max_message_bytes = max_message_bytes;
             o.max_resident_sessions = max_resident_sessions;
             if (backend == "auto") o.backend = lm2::Backend::kAuto;
             else if (backend == "cpu") o.backend = lm2::Backend::kCpu;
             else if (backend == "cuda") o.backend = lm2::Backend::kCuda;
             else Raise(lm2::Status::InvalidArgument("backend must be 'auto', 'cpu' or 'cuda'"));
             lm2::Result<std::unique_ptr<lm2::Engine>> e = lm2::Status::Internal("not run");
             {
               py::gil_scoped_release release;
               e = lm2::Engine::Open(o);
             }
             return PyEngine{std::shared_ptr<lm2::Engine>(Take(std::move(e)))};
           }),
           py::arg("model_dir"), py::arg("store_path"), py::kw_only(), py::arg("key_file") = py::none(),
           py::arg("key_env") = "LM2_KEK", py::arg("share_store") = false, py::arg("sync_commits") = true,
           py::arg("max_message_bytes") = 64 * 1024, py::arg("backend") = "auto",
           py::arg("max_resident_sessions") = 0)
      .def("session", [](PyEngine& e, const std::string& tenant, const std::string& id, bool create) {
        lm2::SessionOptions so;
        so.create_if_missing = create;
        auto p = std::make_unique<PySession>();
        p->s = Take(e.e->OpenSession(tenant, id, so));
        return p;
      }, py::arg("tenant"), py::arg("session_id"), py::arg("create") = true,
         "Opens (resumes, or creates when create=True) session (tenant, session_id).")
      .def("list_sessions", [](PyEngine& e, const std::string& t) { return Take(e.e->ListSessions(t)); }, py::arg("tenant"))
      .def("erase_session", [](PyEngine& e, const std::string& t, const std::string& id) { Check(e.e->EraseSession(t, id)); },
           py::arg("tenant"), py::arg("session_id"))
      .def("erase_tenant", [](PyEngine& e, const std::string& t) { Check(e.e->EraseTenant(t)); }, py::arg("tenant"))
      .def("stats", [](PyEngine& e) {
        const lm2::EngineStats s = e.e->Stats();
        py::dict d;
        d["resident_sessions"] = s.resident_sessions;
        d["evictions"] = s.evictions;
        d["decode_batches"] = s.decode_batches;
        d["decode_steps"] = s.decode_steps;
        d["largest_decode_batch"] = s.largest_decode_batch;
        return d;
      }, "{'resident_sessions': sessions holding a backend state now, 'evictions': states taken back "
         "from idle sessions so far, 'decode_batches' / 'decode_steps' / 'largest_decode_batch': "
         "concurrent chats' decode steps run as one batched call on the GPU (zero on the CPU)} "
         "(max_resident_sessions caps the first; 0 = no cap).")
      .def_property_readonly("model_info", [](PyEngine& e) {
        const lm2::ModelInfo& i = e.e->model_info();
        py::dict d;
        d["model_dir"] = i.model_dir;
        d["fingerprint"] = i.fingerprint;
        d["backend"] = i.backend;
        d["num_layers"] = i.num_layers;
        d["memory_layers"] = i.memory_layers;
        d["memory_slots"] = i.memory_slots;
        d["hidden_size"] = i.hidden_size;
        d["max_context"] = i.max_context;
        return d;
      });
}
