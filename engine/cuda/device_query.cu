// Device query: enumerates GPUs with cudaGetDeviceProperties. Compiled whenever CUDA is enabled,
// so CI proves the CUDA toolchain and runtime link even on machines without a GPU.
#include <cstring>

#include "engine/cuda/device_query.cuh"

namespace da::engine::cuda {

cudaError_t QueryCudaDevices(CudaDeviceProperties* devices, int max_devices, int* count) {
  *count = 0;
  int found = 0;
  cudaError_t status = cudaGetDeviceCount(&found);
  if (status != cudaSuccess) return status;
  for (int i = 0; i < found && i < max_devices; ++i) {
    cudaDeviceProp prop;
    status = cudaGetDeviceProperties(&prop, i);
    if (status != cudaSuccess) return status;
    std::strncpy(devices[i].name, prop.name, sizeof(devices[i].name) - 1);
    devices[i].name[sizeof(devices[i].name) - 1] = '\0';
    devices[i].major = prop.major;
    devices[i].minor = prop.minor;
    devices[i].multiprocessors = prop.multiProcessorCount;
    devices[i].global_memory_bytes = static_cast<long long>(prop.totalGlobalMem);
    *count = i + 1;
  }
  return cudaSuccess;
}

}  // namespace da::engine::cuda
