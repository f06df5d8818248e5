// The runtime's one retry loop for calls a backend refused for want of memory
// (ResourceExhausted): such a call leaves the state as it was, so once something has been
// released it can simply run again. Used by Generate (GenerateOptions::on_out_of_memory) and
// the DecodeBatcher (DecodeBatcherOptions::on_out_of_memory).
#pragma once

#include <functional>

#include "lm2/core/status.h"

namespace lm2::runtime::internal {

// `call` again while it answers ResourceExhausted and `release` (empty: no retry) says it
// released memory; `on_retry`, where given, before each new attempt.
inline Status RetryOutOfMemory(const std::function<bool()>& release, const std::function<Status()>& call,
                               const std::function<void()>& on_retry = {}) {
  Status st = call();
  while (st.code() == StatusCode::kResourceExhausted && release && release()) {
    if (on_retry) on_retry();
    st = call();
  }
  return st;
}

}  // namespace lm2::runtime::internal
