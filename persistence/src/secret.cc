#include "lm2/persistence/secret.h"

#include <openssl/crypto.h>

#include <cstring>
#include <utility>

namespace lm2::persistence {

SecretBytes::SecretBytes(std::size_t size)
    : data_(std::make_unique_for_overwrite<uint8_t[]>(size)), size_(size), capacity_(size) {}

SecretBytes::SecretBytes(const uint8_t* data, std::size_t size) : SecretBytes(size) {
  if (size > 0) std::memcpy(data_.get(), data, size);
}

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::move(other.data_)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)) {}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

void SecretBytes::Reset() {
  if (data_ && capacity_ > 0) OPENSSL_cleanse(data_.get(), capacity_);
  data_.reset();
  size_ = 0;
  capacity_ = 0;
}

}  // namespace lm2::persistence
