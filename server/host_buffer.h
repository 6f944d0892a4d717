// Large host buffers for tensors passing through the server.
//
// Uninitialised on purpose: every byte is overwritten by arriving blocks or by the engine.
// Buffers of 2 MiB or more are 2 MiB aligned and advised onto transparent huge pages: first touch
// of 4 KiB pages costs about 13 us each here (MACHINE-NOTES), seconds per GiB.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

namespace da::server {

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using HostBuffer = std::unique_ptr<char, FreeDeleter>;

// Null when the memory is not there (the caller turns that into RESOURCE_EXHAUSTED) or bytes < 0.
HostBuffer AllocateHostBuffer(int64_t bytes);

class HostBufferPool;

// A buffer that goes back to its pool (or is freed, without one) when destroyed.
class PooledBuffer {
 public:
  PooledBuffer() = default;
  PooledBuffer(HostBuffer buffer, int64_t bytes, HostBufferPool* pool)
      : buffer_(std::move(buffer)), bytes_(bytes), pool_(pool) {}
  PooledBuffer(PooledBuffer&& other) noexcept { *this = std::move(other); }
  PooledBuffer& operator=(PooledBuffer&& other) noexcept;
  ~PooledBuffer() { Reset(); }

  char* get() const { return buffer_.get(); }
  explicit operator bool() const { return buffer_ != nullptr; }
  int64_t bytes() const { return bytes_; }
  void Reset();

 private:
  HostBuffer buffer_;
  int64_t bytes_ = 0;
  HostBufferPool* pool_ = nullptr;
};

// Idle stream buffers kept for the next stream of the same size, up to capacity_bytes: a fresh
// buffer costs its first touch (huge pages zeroed by the kernel, about 4% of a streamed
// request's server CPU here), a reused one nothing. Idle buffers are resident memory outside
// the admission budget, like the plan cache. Thread safe; must outlive the buffers it hands out.
class HostBufferPool {
 public:
  explicit HostBufferPool(int64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}

  // An idle buffer of exactly bytes, else a fresh one; empty when the memory is not there.
  PooledBuffer Take(int64_t bytes);

  int64_t idle_bytes() const;
  int64_t capacity_bytes() const { return capacity_bytes_; }

 private:
  friend class PooledBuffer;
  void Give(HostBuffer buffer, int64_t bytes);

  const int64_t capacity_bytes_;
  mutable std::mutex mutex_;
  std::multimap<int64_t, HostBuffer> idle_;  // By size; the oldest of a size first.
  std::deque<int64_t> order_;                // Sizes in the order they became idle.
  int64_t idle_bytes_ = 0;
};

}  // namespace da::server
