#include "buffer_pool.h"

#include <openssl/crypto.h>

#include <algorithm>

namespace lm2::persistence {

BufferPool::Buffer BufferPool::Take(std::size_t min_size) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = cached_.end();
    for (auto it = cached_.begin(); it != cached_.end(); ++it) {
      if (it->size >= min_size && (best == cached_.end() || it->size < best->size)) best = it;
    }
    if (best != cached_.end()) {
      Buffer b = std::move(*best);
      cached_.erase(best);
      return b;
    }
  }
  Buffer b;
  b.data = std::make_unique_for_overwrite<uint8_t[]>(min_size);
  b.size = min_size;
  return b;
}

void BufferPool::Give(Buffer b) {
  if (!b.data) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (max_cached_ == 0) return;  // freed on return
  cached_.push_back(std::move(b));
  if (cached_.size() > max_cached_) {
    auto smallest = std::min_element(cached_.begin(), cached_.end(),
                                     [](const Buffer& x, const Buffer& y) { return x.size < y.size; });
    cached_.erase(smallest);
  }
}

PooledAllocator::~PooledAllocator() {
  // Only reached with buffers still lent when a builder was abandoned mid-encoding.
  for (auto& b : lent_) OPENSSL_cleanse(b.data.get(), b.size);
}

uint8_t* PooledAllocator::allocate(std::size_t size) {
  lent_.push_back(pool_->Take(size));
  return lent_.back().data.get();
}

void PooledAllocator::deallocate(uint8_t* p, std::size_t /*size*/) {
  auto it = std::find_if(lent_.begin(), lent_.end(), [p](const BufferPool::Buffer& b) { return b.data.get() == p; });
  if (it == lent_.end()) return;
  BufferPool::Buffer b = std::move(*it);
  lent_.erase(it);
  pool_->Give(std::move(b));
}

uint8_t* PooledAllocator::reallocate_downward(uint8_t* old_p, std::size_t old_size, std::size_t new_size,
                                              std::size_t in_use_back, std::size_t in_use_front) {
  uint8_t* new_p = allocate(new_size);
  memcpy_downward(old_p, old_size, new_p, new_size, in_use_back, in_use_front);
  OPENSSL_cleanse(old_p + old_size - in_use_back, in_use_back);
  OPENSSL_cleanse(old_p, in_use_front);
  deallocate(old_p, old_size);
  return new_p;
}

}  // namespace lm2::persistence
