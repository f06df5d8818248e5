// Private: which KeyProvider an Engine uses (EngineOptions: key_provider, key_file, key_env).
#pragma once

#include <memory>

#include "lm2/core/status.h"
#include "lm2/options.h"
#include "lm2/persistence/key_provider.h"

namespace lm2::internal {

Result<std::shared_ptr<persistence::KeyProvider>> ResolveKeyProvider(const EngineOptions& options);

}  // namespace lm2::internal
