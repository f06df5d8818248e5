#include "residency.h"

#include <string>
#include <utility>

#include "engine_core.h"

namespace lm2::internal {

using StateList = std::vector<std::unique_ptr<runtime::SequenceState>>;

Residency::Pin::~Pin() {
  if (owner_ != nullptr) owner_->Release(*session_);
}

Residency::Pin Residency::Enter(SessionCore& s) {
  StateList evicted;  // destroyed on return, after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = sessions_[&s];
  e.busy = true;
  e.last_use = ++clock_;
  if (!e.resident) {
    if (max_resident_ != 0) EvictDownTo(max_resident_ - 1, &evicted);
    SetResident(e, true);
  }
  return Pin(this, &s);
}

void Residency::Release(SessionCore& s) {
  StateList evicted;  // destroyed on return, after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = sessions_[&s];
  e.busy = false;
  e.last_use = ++clock_;
  // Only this session's thread changes its state while it is busy, so reading it is safe.
  SetResident(e, s.state != nullptr);
  if (max_resident_ != 0) EvictDownTo(max_resident_, &evicted);
}

Status Residency::Reclaiming(const std::function<Status()>& attempt) {
  for (std::size_t freed = 0;; ++freed) {
    Status st = attempt();
    if (st.code() != StatusCode::kResourceExhausted) return st;
    // (ReleaseIdle returns once the state is destroyed: the memory is back before the next attempt.)
    if (freed >= Registered() || !ReleaseIdle()) {
      return Status::ResourceExhausted(std::string(st.message()) +
                                       " (and no idle session's state could be released to make room)");
    }
  }
}

bool Residency::ReleaseIdle() {
  StateList evicted;  // destroyed on return, after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  return EvictOne(&evicted);
}

std::size_t Residency::Registered() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_.size();
}

void Residency::Drop(SessionCore& s, bool prefill) {
  std::unique_ptr<runtime::SequenceState> dropped;  // destroyed on return, after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  dropped = std::move(s.state);
  s.prefill_on_build = prefill;
  auto it = sessions_.find(&s);
  // Inside a call the pin's release settles it.
  if (it != sessions_.end() && !it->second.busy) SetResident(it->second, false);
}

void Residency::Remove(SessionCore& s) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(&s);
  if (it == sessions_.end()) return;
  SetResident(it->second, false);
  sessions_.erase(it);
}

EngineStats Residency::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineStats s;
  s.resident_sessions = resident_;
  s.evictions = evictions_;
  return s;
}

void Residency::SetResident(Entry& e, bool resident) {
  if (e.resident == resident) return;
  e.resident = resident;
  if (resident) {
    ++resident_;
  } else {
    --resident_;
  }
}

void Residency::EvictDownTo(std::size_t most, StateList* out) {
  while (resident_ > most && EvictOne(out)) {
  }
}

bool Residency::EvictOne(StateList* out) {
  SessionCore* victim = nullptr;
  Entry* entry = nullptr;
  for (auto& [session, e] : sessions_) {
    if (!e.resident || e.busy) continue;
    if (entry == nullptr || e.last_use < entry->last_use) {
      victim = session;
      entry = &e;
    }
  }
  if (victim == nullptr) return false;
  // Outside a call nobody else touches the victim's state; its next call (Enter, under this
  // mutex) finds it gone and rebuilds, as a resumed session would.
  out->push_back(std::move(victim->state));
  victim->prefill_on_build = true;
  SetResident(*entry, false);
  ++evictions_;
  return true;
}

}  // namespace lm2::internal
