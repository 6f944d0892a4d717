// Large host buffers for tensors passing through the server.
//
// Uninitialised on purpose: every byte is overwritten by arriving blocks or by the engine.
// Buffers of 2 MiB or more are 2 MiB aligned and advised onto transparent huge pages: first touch
// of 4 KiB pages costs about 13 us each here (MACHINE-NOTES), seconds per GiB.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace da::server {

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using HostBuffer = std::unique_ptr<char, FreeDeleter>;

// Null when the memory is not there (the caller turns that into RESOURCE_EXHAUSTED) or bytes < 0.
HostBuffer AllocateHostBuffer(int64_t bytes);

}  // namespace da::server
