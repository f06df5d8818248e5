// Private: host banks kept between exports. A chat turn exports the session's whole bank
// (Session::Chat), which for the paper's model is 256 MiB: into fresh host memory that
// costs its first touch, page faults that took longer than the device copy itself
// (docs/cuda.md), into a kept bank only the copy. An engine keeps a few such banks for all
// its sessions: a turn takes one to export into and gives back the bank its new head
// replaced, so the host memory kept is bounded per engine, not per session.
#pragma once

#include <cstddef>
#include <mutex>
#include <utility>
#include <vector>

#include "lm2/core/memory_state.h"

namespace lm2::internal {

// Thread-safe.
class BankPool {
 public:
  explicit BankPool(std::size_t capacity) : capacity_(capacity) {}

  // A kept bank (its contents are to be overwritten), or an empty one when none is kept.
  MemoryState Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_.empty()) return MemoryState();
    MemoryState bank = std::move(kept_.back());
    kept_.pop_back();
    return bank;
  }

  // Keeps `bank` for a later Take when fewer than the capacity are kept and it holds data;
  // else frees it.
  void Give(MemoryState bank) {
    if (bank.TotalValues() == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_.size() < capacity_) kept_.push_back(std::move(bank));
  }

  std::size_t kept() const {
    std::lock_guard<std::mutex> lock(mu_);
    return kept_.size();
  }

 private:
  mutable std::mutex mu_;
  const std::size_t capacity_;
  std::vector<MemoryState> kept_;
};

}  // namespace lm2::internal
