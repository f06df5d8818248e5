// MappedFile: a whole file mapped read-only into memory (POSIX mmap).
//
// Ownership: owns the mapping; unmapped on destruction. Movable, not copyable. Thread-safe
// for concurrent reads. Cost: mapping is O(1); pages are read from disk on first touch.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "lm2/core/status.h"

namespace lm2::runtime {

class MappedFile {
 public:
  // NotFound when the file does not exist, IOError when it cannot be opened or mapped.
  // An empty file is valid (size() == 0, data() == nullptr).
  static Result<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const unsigned char* data, std::size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace lm2::runtime
