// Sets the calling thread's current CUDA device for a scope and puts the previous one back, so
// that a backend's calls on one GPU leave a thread (a gRPC handler, the plan cache's evictor)
// where it was.
//
//   DeviceScope scope(ordinal);
//   cudaMemcpyAsync(...);  // On `ordinal`.
#pragma once

#include <cuda_runtime_api.h>

namespace da::engine::cuda {

class DeviceScope {
 public:
  explicit DeviceScope(int ordinal) {
    cudaGetDevice(&previous_);
    cudaSetDevice(ordinal);
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace da::engine::cuda
