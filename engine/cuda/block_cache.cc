#include "engine/cuda/block_cache.h"

#include <utility>
#include <vector>

namespace da::engine::cuda {

BlockCache::BlockCache(Allocator allocator, int64_t max_cached_bytes)
    : allocator_(std::move(allocator)), max_cached_bytes_(max_cached_bytes) {}

BlockCache::~BlockCache() { ReleaseAll(); }

absl::StatusOr<void*> BlockCache::Take(int64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = free_.find(bytes); it != free_.end()) {
      void* block = it->second;
      free_.erase(it);
      cached_bytes_ -= bytes;
      ++hits_;
      return block;
    }
  }
  absl::StatusOr<void*> block = allocator_.allocate(bytes);
  if (block.ok()) return block;
  // Cached blocks of other sizes may be what the device lacks, and so may blocks on their way
  // back (Give, quiescing): wait for those, release them all and try again. The wait is as long
  // as their quiesce (cudaDeviceSynchronize): only on this failure path.
  {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t failed_at = next_ticket_;
    given_.wait(lock, [&] { return giving_.empty() || *giving_.begin() >= failed_at; });
  }
  if (ReleaseAll() == 0) return block;
  return allocator_.allocate(bytes);
}

void BlockCache::Give(void* block, int64_t bytes) {
  if (block == nullptr) return;
  bool keep = false;
  int64_t ticket = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    keep = cached_bytes_ + bytes <= max_cached_bytes_;
    if (keep) {
      cached_bytes_ += bytes;  // Its place, held while the device quiesces.
      ticket = next_ticket_++;
      giving_.insert(ticket);
    }
  }
  if (!keep) {  // Released at once: cudaFree waits for the device itself.
    allocator_.release(block);
    return;
  }
  allocator_.quiesce();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.emplace(bytes, block);
    giving_.erase(ticket);
  }
  given_.notify_all();
}

int64_t BlockCache::ReleaseAll() {
  std::vector<void*> blocks;
  int64_t released = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, block] : free_) {
      blocks.push_back(block);
      released += bytes;
    }
    free_.clear();
    // Only what was in free_: a block being given back (Give, quiescing) keeps its place.
    cached_bytes_ -= released;
  }
  for (void* block : blocks) allocator_.release(block);
  return released;
}

int64_t BlockCache::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_bytes_;
}

int64_t BlockCache::hits() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return hits_;
}

}  // namespace da::engine::cuda
