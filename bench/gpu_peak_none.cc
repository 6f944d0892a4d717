// gpu_peak.h in a build without CUDA.
#include "absl/status/status.h"
#include "bench/gpu_peak.h"

namespace da::bench {

absl::StatusOr<GemmRate> GpuGemmRate(int, GemmType, int, int) {
  return absl::UnimplementedError("da-bench was built without CUDA: no GPU GEMM rate");
}

}  // namespace da::bench
