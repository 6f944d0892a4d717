// gpu_peak.h with CUDA: cuBLAS GEMMs timed with CUDA events.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bench/gpu_peak.h"
#include "engine/status_macros.h"

namespace da::bench {
namespace {

absl::Status Cuda(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(error)));
}

absl::Status Cublas(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(status)));
}

// Owns what one measurement allocates, released on every path out.
struct Resources {
  void* matrices[3] = {nullptr, nullptr, nullptr};
  cublasHandle_t handle = nullptr;
  cudaEvent_t events[2] = {nullptr, nullptr};
  ~Resources() {
    for (void* m : matrices) cudaFree(m);
    if (handle != nullptr) cublasDestroy(handle);
    for (cudaEvent_t e : events) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
};

// `elements` pseudo-random values in [-1, 1) as `type`, on the host (a 32-bit LCG: fast, and
// any values that are not all equal do for a GEMM's timing).
std::vector<uint8_t> RandomMatrix(GemmType type, int64_t elements, uint32_t seed) {
  const size_t width = type == GemmType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> bytes(elements * width);
  uint32_t state = seed;
  for (int64_t i = 0; i < elements; ++i) {
    state = state * 1664525u + 1013904223u;
    const float x = static_cast<float>(state >> 8) * (2.0f / 16777216.0f) - 1.0f;
    if (type == GemmType::kFloat32) {
      reinterpret_cast<float*>(bytes.data())[i] = x;
    } else if (type == GemmType::kFloat16) {
      reinterpret_cast<__half*>(bytes.data())[i] = __float2half_rn(x);
    } else {
      reinterpret_cast<__nv_bfloat16*>(bytes.data())[i] = __float2bfloat16_rn(x);
    }
  }
  return bytes;
}

}  // namespace

absl::StatusOr<GemmRate> GpuGemmRate(int device, GemmType type, int size, int repeat) {
  GemmRate rate;
  cudaDeviceProp properties{};
  DA_RETURN_IF_ERROR(Cuda(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties"));
  rate.device_name = properties.name;
  DA_RETURN_IF_ERROR(Cuda(cudaSetDevice(device), "cudaSetDevice"));
  const int64_t elements = int64_t{size} * size;
  const cudaDataType data_type = type == GemmType::kBFloat16  ? CUDA_R_16BF
                                 : type == GemmType::kFloat16 ? CUDA_R_16F
                                                              : CUDA_R_32F;
  Resources r;
  for (int i = 0; i < 3; ++i) {
    const std::vector<uint8_t> host = RandomMatrix(type, elements, 17 + i);
    DA_RETURN_IF_ERROR(Cuda(cudaMalloc(&r.matrices[i], host.size()), "cudaMalloc"));
    DA_RETURN_IF_ERROR(Cuda(
        cudaMemcpy(r.matrices[i], host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy"));
  }
  DA_RETURN_IF_ERROR(Cublas(cublasCreate(&r.handle), "cublasCreate"));
  for (cudaEvent_t& e : r.events) DA_RETURN_IF_ERROR(Cuda(cudaEventCreate(&e), "cudaEventCreate"));
  const float alpha = 1.0f, beta = 0.0f;
  // Accumulation in fp32; fp32 inputs stay fp32 (TF32 only where the math mode allows it, and
  // the default mode does not).
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  const auto gemm = [&] {
    return Cublas(cublasGemmEx(r.handle, CUBLAS_OP_N, CUBLAS_OP_N, size, size, size, &alpha,
                               r.matrices[0], data_type, size, r.matrices[1], data_type, size,
                               &beta, r.matrices[2], data_type, size, compute, CUBLAS_GEMM_DEFAULT),
                  "cublasGemmEx");
  };
  DA_RETURN_IF_ERROR(gemm());  // Warm-up: cuBLAS picks and loads its kernel.
  float best_ms = 0;
  for (int i = 0; i < std::max(1, repeat); ++i) {
    DA_RETURN_IF_ERROR(Cuda(cudaEventRecord(r.events[0]), "cudaEventRecord"));
    DA_RETURN_IF_ERROR(gemm());
    DA_RETURN_IF_ERROR(Cuda(cudaEventRecord(r.events[1]), "cudaEventRecord"));
    DA_RETURN_IF_ERROR(Cuda(cudaEventSynchronize(r.events[1]), "cudaEventSynchronize"));
    float ms = 0;
    DA_RETURN_IF_ERROR(
        Cuda(cudaEventElapsedTime(&ms, r.events[0], r.events[1]), "cudaEventElapsedTime"));
    if (i == 0 || ms < best_ms) best_ms = ms;
  }
  rate.flops_per_second = 2.0 * size * static_cast<double>(size) * size / (best_ms * 1e-3);
  return rate;
}

}  // namespace da::bench
