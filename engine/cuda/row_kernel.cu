// The correctness path of the CUDA backend: ComputeRow (row_attention.cuh, tested on the CPU)
// for one output row per thread.
#include <algorithm>

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

// The largest |x| of src[0, count) into *amax (fp32 bits, starting at 0): a grid-stride loop,
// a warp's maximum by shuffles, one atomicMax per warp (non-negative floats order as their bits;
// a NaN's bits exceed every number's, so a NaN anywhere shows in the result).
__global__ void AmaxKernel(const void* src, ElemType type, int64_t count, unsigned* amax) {
  float most = 0.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    const float x = fabsf(LoadElem(src, type, i));
    most = x > most || x != x ? x : most;
  }
  unsigned bits = __float_as_uint(most);
  for (int offset = 16; offset > 0; offset /= 2) {
    bits = max(bits, __shfl_down_sync(0xffffffffu, bits, offset));
  }
  if (threadIdx.x % 32 == 0) atomicMax(amax, bits);
}

__global__ void QuantizeKernel(const void* src, ElemType type, int64_t count, float scale,
                               uint8_t* dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) dst[i] = FloatToFp8E4M3(LoadElem(src, type, i) * scale);
}

unsigned Blocks(int64_t threads) {
  return static_cast<unsigned>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

}  // namespace

cudaError_t LaunchFold(const RowShare& share, int pattern_index, const void* pattern_out,
                       ElemType type, const float* lse, float* acc, float* max_lse, float* weight,
                       cudaStream_t stream) {
  const int64_t rows = RowCount(share);
  if (rows <= 0) return cudaSuccess;
  FoldKernel<<<Blocks(rows * kLanes), kThreadsPerBlock, 0, stream>>>(
      share, pattern_index, pattern_out, type, lse, acc, max_lse, weight, rows);
  return cudaGetLastError();
}

cudaError_t LaunchFinish(const RowShare& share, const float* acc, const float* weight,
                         cudaStream_t stream) {
  const int64_t rows = RowCount(share);
  if (rows <= 0) return cudaSuccess;
  FinishKernel<<<Blocks(rows * kLanes), kThreadsPerBlock, 0, stream>>>(share, acc, weight, rows);
  return cudaGetLastError();
}

cudaError_t LaunchCombine(const RowShare& share, const void* outs, ElemType type, const float* lses,
                          cudaStream_t stream) {
  const int64_t rows = RowCount(share);
  if (rows <= 0) return cudaSuccess;
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

cudaError_t LaunchAmax(const void* src, ElemType type, int64_t count, float* amax,
                       cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((count + kThreadsPerBlock - 1) / kThreadsPerBlock, 4096));
  AmaxKernel<<<blocks, kThreadsPerBlock, 0, stream>>>(src, type, count,
                                                      reinterpret_cast<unsigned*>(amax));
  return cudaGetLastError();
}

cudaError_t LaunchQuantize(const void* src, ElemType type, int64_t count, float scale, uint8_t* dst,
                           cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  QuantizeKernel<<<Blocks(count), kThreadsPerBlock, 0, stream>>>(src, type, count, scale, dst);
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
