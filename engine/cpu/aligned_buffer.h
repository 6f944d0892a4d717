// A growable, 64-byte aligned float buffer whose memory is kept between uses.
//
// First touch of fresh pages costs about 13 us per 4 KiB page on our machines (MACHINE-NOTES), so
// workspaces are reused across requests rather than freed; buffers of 2 MiB and more are asked to
// use transparent huge pages (madvise mode), which cuts the fault count by 512.
#pragma once

#include <cstddef>
#include <cstdint>

namespace da::engine::cpu {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;

  // At least `floats` floats; contents are unspecified. Grows, never shrinks. Returns null when
  // the memory cannot be had (the previous buffer is kept).
  float* Reserve(int64_t floats);
  float* data() const { return data_; }
  // The capacity_bytes() a fresh buffer gets from Reserve(floats), without allocating.
  static int64_t CapacityFor(int64_t floats);
  int64_t capacity_bytes() const { return static_cast<int64_t>(capacity_bytes_); }

 private:
  float* data_ = nullptr;
  size_t capacity_bytes_ = 0;
};

}  // namespace da::engine::cpu
