// Device memory blocks kept for reuse (issue #15): on an H200 each fused run spent 3-10 ms in
// cudaMalloc and cudaFree of its gigabytes of scratch, and every streamed chunk allocates its
// inputs and output anew. A freed block of a size asked for again is handed out again; a failed
// allocation releases every cached block (after the blocks being given back at that moment have
// arrived) and tries once more, so that cached memory never makes an allocation fail that would
// have succeeded without the cache.
//
//   BlockCache cache({.allocate = ..., .release = ..., .quiesce = ...}, max_cached_bytes);
//   absl::StatusOr<void*> p = cache.Take(bytes);   // reused or newly allocated
//   cache.Give(*p, bytes);                          // back into the cache (or released)
//
// No CUDA here: the allocator is three callbacks, so that the CPU tests drive it with a fake.
// Thread-safe.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <set>

#include "absl/status/statusor.h"

namespace da::engine::cuda {

class BlockCache {
 public:
  struct Allocator {
    std::function<absl::StatusOr<void*>(int64_t bytes)> allocate;
    std::function<void(void* block)> release;
    // Waits until no queued device work may still use a block kept for reuse (cudaFree's
    // implicit synchronisation, which a cached block would otherwise skip).
    std::function<void()> quiesce;
  };

  // Blocks given back are kept while the cached bytes stay within max_cached_bytes (0: none is
  // kept, every block is released when given back).
  BlockCache(Allocator allocator, int64_t max_cached_bytes);
  ~BlockCache();  // Releases every cached block.
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  absl::StatusOr<void*> Take(int64_t bytes);
  void Give(void* block, int64_t bytes);
  // Releases every cached block; returns their bytes.
  int64_t ReleaseAll();

  int64_t cached_bytes() const;
  int64_t hits() const;

 private:
  Allocator allocator_;
  const int64_t max_cached_bytes_;
  mutable std::mutex mutex_;
  std::condition_variable given_;
  std::multimap<int64_t, void*> free_;  // By size.
  // Gives that hold a place in the cache while the device quiesces, by ticket (in the order they
  // began): a failed Take waits for those that began before it failed, not for later ones.
  std::set<int64_t> giving_;
  int64_t next_ticket_ = 0;
  int64_t cached_bytes_ = 0;
  int64_t hits_ = 0;
};

}  // namespace da::engine::cuda
