// Private: validation of tenant and session ids.
#pragma once

#include <string>
#include <string_view>

#include "lm2/core/status.h"

namespace lm2::internal {

// 1..128 bytes of [A-Za-z0-9._@-]: ids are RocksDB keys in plaintext and appear in paths
// and messages, so nothing that could be confused with a separator or be unprintable.
inline Status ValidateId(std::string_view what, std::string_view id) {
  if (id.empty() || id.size() > 128) {
    return Status::InvalidArgument(std::string(what) + " must be 1..128 bytes, got " + std::to_string(id.size()));
  }
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '@' || c == '-';
    if (!ok) return Status::InvalidArgument(std::string(what) + " '" + std::string(id) + "' has a character outside [A-Za-z0-9._@-]");
  }
  return Status::Ok();
}

}  // namespace lm2::internal
