// Process-wide malloc settings for a server that moves large messages.
//
//   int main(int argc, char** argv) {
//     da::server::KeepFreedMessageMemory();  // First, before any thread starts.
//
// gRPC allocates a fresh buffer for every message it receives and the server one for every
// output message it sends (megabytes each, many per second in a stream). With glibc's defaults,
// freed memory beyond a few MiB at the top of a heap goes back to the kernel, and the next
// message faults its pages in again, zeroed: about 13 us per 4 KiB page here (MACHINE-NOTES),
// tens of thousands of faults per 512 MiB stream. KeepFreedMessageMemory keeps allocations of
// up to 32 MiB in malloc's heaps and keeps up to kKeptFreeBytes free at the top of each heap
// instead of returning it, so message buffers are reused. The cost: up to that much resident
// memory per heap that an idle process does not give back (like the stream buffer pool).
#pragma once

#include <cstdint>

namespace da::server {

inline constexpr int64_t kKeptFreeBytes = int64_t{64} << 20;

// Sets glibc's M_MMAP_THRESHOLD (32 MiB, its maximum) and M_TRIM_THRESHOLD (kKeptFreeBytes).
// Returns false when the C library refused (the defaults then stay; nothing else changes).
bool KeepFreedMessageMemory();

}  // namespace da::server
