#include "server/host_buffer.h"

#include <sys/mman.h>

namespace da::server {
namespace {
constexpr size_t kHugePageBytes = size_t{2} << 20;
}  // namespace

HostBuffer AllocateHostBuffer(int64_t bytes) {
  if (bytes < 0) return nullptr;
  const size_t size = static_cast<size_t>(bytes);
  if (size < kHugePageBytes) return HostBuffer(static_cast<char*>(std::malloc(size == 0 ? 1 : size)));
  const size_t rounded = (size + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  HostBuffer buffer(static_cast<char*>(std::aligned_alloc(kHugePageBytes, rounded)));
  if (buffer) madvise(buffer.get(), rounded, MADV_HUGEPAGE);  // Advice only: failure is harmless.
  return buffer;
}

}  // namespace da::server
