// SecretBytes: a heap buffer for key material and decrypted plaintext that is wiped
// (OPENSSL_cleanse) when destroyed or reset. Never printed or logged by lm2.
//
// Ownership: owns its bytes; move-only, copies are explicit (Clone()). Not thread-safe
// for concurrent mutation. Cost: allocation without zero-fill; wiping is one pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace lm2::persistence {

class SecretBytes {
 public:
  SecretBytes() = default;
  explicit SecretBytes(std::size_t size);  // uninitialised contents
  SecretBytes(const uint8_t* data, std::size_t size);
  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;
  ~SecretBytes() { Reset(); }

  SecretBytes Clone() const { return SecretBytes(data_.get(), size_); }
  void Reset();  // wipes and frees

  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // Shrinks the visible size (the wiped tail stays allocated until Reset()).
  void Truncate(std::size_t n) { if (n < size_) size_ = n; }

 private:
  std::unique_ptr<uint8_t[]> data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace lm2::persistence
