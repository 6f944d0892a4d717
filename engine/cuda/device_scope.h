// Sets the calling thread's current CUDA device for a scope. Nested scopes put the outer one's
// device back; the outermost leaves the device set, rather than "restoring" a device the thread
// never chose: cudaGetDevice says 0 on such a thread, and setting device 0 (since CUDA 12, that
// creates its primary context, hundreds of MiB) on every thread that touched cuda:3 would cost a
// process that uses only cuda:3 a context on GPU 0. Every CUDA call of da sets its device first
// (a DeviceScope, or the NCCL code's own cudaSetDevice), so none relies on a thread's device.
//
//   DeviceScope scope(ordinal);
//   cudaMemcpyAsync(...);  // On `ordinal`.
#pragma once

#include <cuda_runtime_api.h>

namespace da::engine::cuda {

class DeviceScope {
 public:
  explicit DeviceScope(int ordinal) : outer_(Innermost()), ordinal_(ordinal) {
    cudaSetDevice(ordinal_);  // Always: code between scopes may have set another device.
    Innermost() = ordinal_;
  }
  ~DeviceScope() {
    Innermost() = outer_;
    if (outer_ >= 0 && outer_ != ordinal_) cudaSetDevice(outer_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  // The device of the innermost DeviceScope open on this thread; -1: none.
  static int& Innermost() {
    thread_local int device = -1;
    return device;
  }

  const int outer_;
  const int ordinal_;
};

}  // namespace da::engine::cuda
