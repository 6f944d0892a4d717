#include "engine/cpu/aligned_buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <utility>

namespace da::engine::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t WantedBytes(int64_t floats) {
  return static_cast<size_t>(floats > 0 ? floats : 1) * sizeof(float);
}

// Huge-page buffers are rounded up to whole huge pages, the others to cache lines.
size_t RoundedBytes(size_t wanted) {
  const size_t alignment = wanted >= kHugePage ? kHugePage : 64;
  return (wanted + alignment - 1) / alignment * alignment;
}

}  // namespace

AlignedBuffer::~AlignedBuffer() { std::free(data_); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      capacity_bytes_(std::exchange(other.capacity_bytes_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  std::swap(data_, other.data_);
  std::swap(capacity_bytes_, other.capacity_bytes_);
  return *this;
}

int64_t AlignedBuffer::CapacityFor(int64_t floats) {
  return static_cast<int64_t>(RoundedBytes(WantedBytes(floats)));
}

float* AlignedBuffer::Reserve(int64_t floats) {
  const size_t wanted = WantedBytes(floats);
  if (wanted <= capacity_bytes_) return data_;
  const bool huge = wanted >= kHugePage;
  const size_t alignment = huge ? kHugePage : 64;
  const size_t bytes = RoundedBytes(wanted);
  void* memory = std::aligned_alloc(alignment, bytes);
  if (memory == nullptr) return nullptr;            // The old buffer stays valid.
  if (huge) madvise(memory, bytes, MADV_HUGEPAGE);  // Advice only; failure is harmless.
  std::free(data_);
  data_ = static_cast<float*>(memory);
  capacity_bytes_ = bytes;
  return data_;
}

}  // namespace da::engine::cpu
