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

// The fold and the finish: a warp per row, its lanes over the head dimension, so that a warp's
// loads and stores of the row are contiguous (a thread per row strode a row apart: uncoalesced,
// and on the H200 the fused path ran at 11% of the GEMM rate with it).
constexpr int kLanes = 32;

__global__ void FoldKernel(RowShare share, int pattern_index, const void* pattern_out,
                           ElemType type, const float* lse, float* acc, float* max_lse,
                           float* weight, int64_t rows) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = static_cast<int>(threadIdx.x % kLanes);
  if (row >= rows) return;  // The whole warp: its lanes share the row.
  const FoldStep step = FoldStepFor(share, pattern_index, lse, max_lse, weight, row);
  if (!step.kept) return;
  __syncwarp();  // Every lane has read the row's state before lane 0 writes it.
  FoldElements(step, pattern_out, type, acc, row, share.head_dim, lane, kLanes);
  if (lane == 0) {
    weight[row] = step.new_weight;
    max_lse[row] = step.new_max;
  }
}

__global__ void FinishKernel(RowShare share, const float* acc, const float* weight, int64_t rows) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  if (row < rows) FinishElements(share, acc, weight, row, threadIdx.x % kLanes, kLanes);
}

__global__ void CombineKernel(RowShare share, const void* outs, ElemType type, const float* lses,
                              int64_t rows) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  if (row < rows) {
    CombineElements<kMaxRowHeadDim / kLanes>(share, outs, type, lses, row, threadIdx.x % kLanes,
                                             kLanes);
  }
}

__global__ void ConvertKernel(const void* src, ElemType from, void* dst, ElemType to,
                              int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) StoreElem(dst, to, i, LoadElem(src, from, i));
}

unsigned Blocks(int64_t threads) {
  return static_cast<unsigned>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

}  // namespace

cudaError_t LaunchFold(const RowShare& share, int pattern_index, const void* pattern_out,
                       ElemType type, const float* lse, float* acc, float* max_lse, float* weight,
                       cudaStream_t stream) {
  const int64_t rows = RowCount(share);
  FoldKernel<<<Blocks(rows * kLanes), kThreadsPerBlock, 0, stream>>>(
      share, pattern_index, pattern_out, type, lse, acc, max_lse, weight, rows);
  return cudaGetLastError();
}

cudaError_t LaunchFinish(const RowShare& share, const float* acc, const float* weight,
                         cudaStream_t stream) {
  const int64_t rows = RowCount(share);
  FinishKernel<<<Blocks(rows * kLanes), kThreadsPerBlock, 0, stream>>>(share, acc, weight, rows);
  return cudaGetLastError();
}

cudaError_t LaunchCombine(const RowShare& share, const void* outs, ElemType type, const float* lses,
                          cudaStream_t stream) {
  const int64_t rows = RowCount(share);
  CombineKernel<<<Blocks(rows * kLanes), kThreadsPerBlock, 0, stream>>>(share, outs, type, lses,
                                                                        rows);
  return cudaGetLastError();
}

cudaError_t LaunchConvert(const void* src, ElemType from, void* dst, ElemType to, int64_t count,
                          cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  ConvertKernel<<<Blocks(count), kThreadsPerBlock, 0, stream>>>(src, from, dst, to, count);
  return cudaGetLastError();
}

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
