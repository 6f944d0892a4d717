#include "server/host_buffer.h"

#include <sys/mman.h>

#include <algorithm>

namespace da::server {
namespace {
constexpr size_t kHugePageBytes = size_t{2} << 20;
}  // namespace

HostBuffer AllocateHostBuffer(int64_t bytes) {
  if (bytes < 0) return nullptr;
  const size_t size = static_cast<size_t>(bytes);
  if (size < kHugePageBytes)
    return HostBuffer(static_cast<char*>(std::malloc(size == 0 ? 1 : size)));
  const size_t rounded = (size + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  HostBuffer buffer(static_cast<char*>(std::aligned_alloc(kHugePageBytes, rounded)));
  if (buffer) madvise(buffer.get(), rounded, MADV_HUGEPAGE);  // Advice only: failure is harmless.
  return buffer;
}

PooledBuffer& PooledBuffer::operator=(PooledBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    buffer_ = std::move(other.buffer_);
    bytes_ = other.bytes_;
    pool_ = other.pool_;
    other.bytes_ = 0;
    other.pool_ = nullptr;
  }
  return *this;
}

void PooledBuffer::Reset() {
  if (buffer_ != nullptr && pool_ != nullptr) pool_->Give(std::move(buffer_), bytes_);
  buffer_.reset();
  bytes_ = 0;
  pool_ = nullptr;
}

PooledBuffer HostBufferPool::Take(int64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = idle_.find(bytes);
    if (it != idle_.end()) {
      HostBuffer buffer = std::move(it->second);
      idle_.erase(it);
      order_.erase(std::find(order_.begin(), order_.end(), bytes));
      idle_bytes_ -= bytes;
      return PooledBuffer(std::move(buffer), bytes, this);
    }
  }
  HostBuffer fresh = AllocateHostBuffer(bytes);
  if (!fresh) return PooledBuffer();
  return PooledBuffer(std::move(fresh), bytes, this);
}

void HostBufferPool::Give(HostBuffer buffer, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (bytes > capacity_bytes_) return;  // Freed as buffer goes out of scope.
  while (idle_bytes_ + bytes > capacity_bytes_ && !order_.empty()) {  // Oldest idle first.
    const int64_t oldest = order_.front();
    order_.pop_front();
    idle_.erase(idle_.find(oldest));
    idle_bytes_ -= oldest;
  }
  idle_.emplace(bytes, std::move(buffer));
  order_.push_back(bytes);
  idle_bytes_ += bytes;
}

int64_t HostBufferPool::idle_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return idle_bytes_;
}

}  // namespace da::server
