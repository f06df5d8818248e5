// Private: which sessions hold a backend state (runtime::SequenceState: KV cache, memory
// bank, memory K/V, scratch; ~0.8-1 GB on the GPU for the paper's model), and the taking back
// of idle sessions' states, under EngineOptions::max_resident_sessions or when the backend
// runs out of memory.
//
// A session can give its state up between calls because it keeps its committed bank on the
// host (SessionCore::memory): the next call that needs a state builds one from it
// (SessionCore::UseState). The registry keeps, per session that has made a call, when it was
// last used, whether it is inside a call and whether it holds a state; only a session
// outside every call is evicted, so a session's own thread never sees its state change
// under it.
//
// Ownership: sessions own their states; the registry holds plain pointers to SessionCores
// (an entry is made by a session's first call and removed by its destructor) and moves an
// evicted state out of its session, to be destroyed by the evicting thread. Thread-safe:
// one mutex, never held while a model runs or a state is destroyed (destroying a CUDA
// state synchronises its streams), so it cannot take part in a deadlock. Cost: a map lookup
// per call; choosing a victim scans the entries (O(sessions) under the mutex, small next to
// the state it frees).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/model.h"
#include "lm2/types.h"

namespace lm2::internal {

struct SessionCore;

class Residency {
 public:
  // max_resident: most sessions holding a state at once; 0 = no cap.
  explicit Residency(std::size_t max_resident) : max_resident_(max_resident) {}
  Residency(const Residency&) = delete;
  Residency& operator=(const Residency&) = delete;

  // A session inside a call (Enter): its state is not evicted while the pin lives.
  // Releasing it marks the session most recently used and settles whether it holds a
  // state; if more sessions then hold one than the cap allows (calls that found every
  // holder busy), idle ones give theirs up. Move-only.
  class [[nodiscard]] Pin {
   public:
    Pin(Pin&& other) noexcept : owner_(other.owner_), session_(other.session_) { other.owner_ = nullptr; }
    Pin& operator=(Pin&&) = delete;
    ~Pin();

   private:
    friend class Residency;
    Pin(Residency* owner, SessionCore* session) : owner_(owner), session_(session) {}
    Residency* owner_;
    SessionCore* session_;
  };

  // From `s`'s own thread, at the start of a call that needs a state (its own, or a
  // temporary one as NextTokenLogits and ForgetTurn build): marks it inside a call and most
  // recently used. If it holds no state, it counts as holding one from here (the caller
  // builds it) and the least recently used idle holders give theirs up until at most the
  // cap hold one, `s` included; when every holder is inside a call, `s` goes over the cap
  // rather than wait. (A session that holds its state and builds a temporary one uses two
  // for the call, counted as one.)
  Pin Enter(SessionCore& s);

  // Runs `attempt`; while it fails with ResourceExhausted, the least recently used session
  // outside a call gives its state up and `attempt` runs again, at most once per session
  // registered. When none is left: that ResourceExhausted, saying so. `attempt` must leave
  // things as they were when it fails that way (the backends' calls do: cuda_backend.h).
  // Called by a pinned session (which is therefore never the victim).
  Status Reclaiming(const std::function<Status()>& attempt);

  // The least recently used session outside a call gives its state up; false when none
  // holds one. For calls that run out of memory elsewhere than in a session's own call
  // (the engine's DecodeBatcher, whose batch holds only sessions inside calls).
  bool ReleaseIdle();

  // From `s`'s own thread: destroys its state; the next call builds a new one, running
  // PrefillOnResume first when `prefill` (SessionCore::prefill_on_build).
  void Drop(SessionCore& s, bool prefill);

  // From `s`'s destructor.
  void Remove(SessionCore& s);

  // Sessions holding a state now (or building one inside a call), and the states taken
  // back from idle sessions so far.
  EngineStats stats() const;

 private:
  struct Entry {
    uint64_t last_use = 0;  // clock_ at the session's last Enter or release
    bool busy = false;      // inside a call
    bool resident = false;  // holds a state (or, busy, is building one)
  };

  void Release(SessionCore& s);
  std::size_t Registered() const;  // sessions with an entry
  void SetResident(Entry& e, bool resident);
  // Moves the state of the least recently used idle holder into *out (it is then
  // destroyed outside the lock). False when every holder is inside a call.
  bool EvictOne(std::vector<std::unique_ptr<runtime::SequenceState>>* out);
  // EvictOne while more than `most` sessions hold a state and an idle one does.
  void EvictDownTo(std::size_t most, std::vector<std::unique_ptr<runtime::SequenceState>>* out);

  const std::size_t max_resident_;
  mutable std::mutex mu_;
  std::unordered_map<SessionCore*, Entry> sessions_;
  uint64_t clock_ = 0;
  std::size_t resident_ = 0;
  uint64_t evictions_ = 0;
};

}  // namespace lm2::internal
