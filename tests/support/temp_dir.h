// Test support: a fresh directory under $TMPDIR, removed with everything in it when the
// object goes away. Shared by every C++ test suite.
#pragma once

#include <stdlib.h>  // mkdtemp

#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace lm2::testing {

class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "lm2-test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + tmpl);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  const std::string& str() const { return path_; }
  // The path of `name` inside the directory.
  std::string sub(const std::string& name) const { return path_ + "/" + name; }
  std::string operator/(const std::string& name) const { return sub(name); }

 private:
  std::string path_;
};

}  // namespace lm2::testing
