// BufferPool: bank-sized buffers kept across the commits of one store, so that encoding
// (and encrypting in place) a large bank writes into memory that is already mapped. On
// the VMs measured, the first touch of fresh memory (page faults) costs far more than
// the copy itself: 566-751 ms for 128 MiB against 11 ms into the same buffer again.
//
// Ownership: the pool owns the buffers it caches (at most `max_cached`; the smallest is
// freed first). A PooledAllocator borrows buffers for one FlatBuffers encoding and hands
// them back when that encoding is destroyed. Buffers only come back holding wiped bytes
// or ciphertext: EncodedBuffer wipes its plaintext when destroyed, and a buffer the
// builder grows out of is wiped by PooledAllocator before it goes back.
// Thread-safety: BufferPool is thread-safe; a PooledAllocator serves one builder/thread.
// Cost: up to `max_cached` bank-sized buffers stay allocated while the store is open.
#pragma once

#include <flatbuffers/allocator.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace lm2::persistence {

class BufferPool {
 public:
  struct Buffer {
    std::unique_ptr<uint8_t[]> data;
    std::size_t size = 0;
  };

  explicit BufferPool(std::size_t max_cached) : max_cached_(max_cached) {}

  // The smallest cached buffer of at least `min_size` bytes, or a new one (uninitialised).
  Buffer Take(std::size_t min_size);
  // Caches `b` (its contents must not be plaintext), or frees it when the pool is full.
  void Give(Buffer b);

 private:
  std::mutex mu_;
  std::vector<Buffer> cached_;
  const std::size_t max_cached_;
};

class PooledAllocator final : public flatbuffers::Allocator {
 public:
  explicit PooledAllocator(BufferPool* pool) : pool_(pool) {}
  PooledAllocator(const PooledAllocator&) = delete;
  PooledAllocator& operator=(const PooledAllocator&) = delete;
  ~PooledAllocator() override;

  uint8_t* allocate(std::size_t size) override;
  void deallocate(uint8_t* p, std::size_t size) override;
  // Grows as FlatBuffers does, then wipes the in-use bytes of the old buffer.
  uint8_t* reallocate_downward(uint8_t* old_p, std::size_t old_size, std::size_t new_size,
                               std::size_t in_use_back, std::size_t in_use_front) override;

 private:
  BufferPool* pool_;
  std::vector<BufferPool::Buffer> lent_;  // buffers the builder holds
};

}  // namespace lm2::persistence
