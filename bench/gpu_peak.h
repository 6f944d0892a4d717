// The in-run matrix-multiply rate of a GPU, for da-bench's ratios when the engine computes on a
// CUDA device: the best of `repeat` square cuBLAS GEMMs (cublasGemmEx) on random data, timed with
// CUDA events. Built from gpu_peak_cuda.cc with CUDA, else from gpu_peak_none.cc, which answers
// UNIMPLEMENTED.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace da::bench {

enum class GemmType { kBFloat16, kFloat16, kFloat32 };

struct GemmRate {
  double flops_per_second = 0;
  std::string device_name;  // As CUDA names the device, e.g. "NVIDIA H200".
};

// size x size times size x size on CUDA device `device`, inputs and output of `type`, fp32
// accumulation (fp32: plain fp32, no TF32).
absl::StatusOr<GemmRate> GpuGemmRate(int device, GemmType type, int size = 8192, int repeat = 10);

inline const char* GemmTypeName(GemmType type) {
  return type == GemmType::kBFloat16 ? "bf16" : type == GemmType::kFloat16 ? "fp16" : "fp32";
}

}  // namespace da::bench
