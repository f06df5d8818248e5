// lm2::Status and lm2::Result<T>, re-exported for SDK users: every SDK call that can fail
// returns one of these (see lm2/core/status.h for the codes; they are stable and cross the
// C ABI and the Python exceptions unchanged).
#pragma once

#include "lm2/core/status.h"  // IWYU pragma: export
