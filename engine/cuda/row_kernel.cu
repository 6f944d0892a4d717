// The correctness path of the CUDA backend: ComputeRow (row_attention.cuh, tested on the CPU)
// for one output row per thread.
#include "engine/cuda/row_kernel.cuh"

namespace da::engine::cuda {
namespace {

constexpr int kThreadsPerBlock = 128;

__global__ void RowKernel(RowShare share, int64_t first, int64_t count, int* failed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  if (!ComputeRow(share, first + i)) atomicExch(failed, 1);
}

}  // namespace

cudaError_t LaunchRows(const RowShare& share, int64_t first, int64_t count, int* failed,
                       cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int64_t blocks = (count + kThreadsPerBlock - 1) / kThreadsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  RowKernel<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(share, first, count,
                                                                            failed);
  return cudaGetLastError();
}

}  // namespace da::engine::cuda
