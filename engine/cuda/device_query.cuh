// CUDA device query for DiscoverDevices: plain structs in, cudaError_t out; no Abseil here.
#pragma once

#include <cuda_runtime_api.h>

namespace da::engine::cuda {

struct CudaDeviceProperties {
  char name[256];
  int major = 0;  // Compute capability.
  int minor = 0;
  int multiprocessors = 0;
  long long global_memory_bytes = 0;
};

// Fills up to max_devices entries and sets *count to the devices found. With no driver or no
// GPU this returns the CUDA error (cudaErrorNoDevice, cudaErrorInsufficientDriver, ...).
cudaError_t QueryCudaDevices(CudaDeviceProperties* devices, int max_devices, int* count);

}  // namespace da::engine::cuda
