// Test support: where the source tree and its test data are.
#pragma once

#include <cstdlib>
#include <string>

namespace lm2::testing {

// LM2_SOURCE_DIR (ctest sets it), else the current directory.
inline std::string SourceDir() {
  const char* dir = std::getenv("LM2_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

// tests/data/models/<name>: the committed test models (tiny-lm2, tiny-partial, tiny-vanilla).
inline std::string TestModel(const std::string& name) { return SourceDir() + "/tests/data/models/" + name; }

}  // namespace lm2::testing
