// The CUDA row kernel's launch (engine/cuda/row_attention.cuh): one thread per output row of a
// share, rows [first, first + count). Plain structs in, cudaError_t out; no Abseil here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/row_attention.cuh"

namespace da::engine::cuda {

// Queues the rows on `stream`. *failed (device memory) is set to 1 by a row whose share lacks
// the gathered rows of a spanning segment (ComputeRow returned false); it is never cleared here.
cudaError_t LaunchRows(const RowShare& share, int64_t first, int64_t count, int* failed,
                       cudaStream_t stream);

// The fused path's combine (row_attention.cuh FoldRow / FinishRow) over every row of the share.
cudaError_t LaunchFold(const RowShare& share, int pattern_index, const void* pattern_out,
                       ElemType type, const float* lse, float* acc, float* max_lse, float* weight,
                       cudaStream_t stream);
cudaError_t LaunchFinish(const RowShare& share, const float* acc, const float* weight,
                         cudaStream_t stream);

// The one-pass combine (row_attention.cuh CombineElements) of every pattern's kept output (outs:
// P blocks of RowCount rows x head_dim in `type`; lses: P blocks of fp32, LseBlockStride apart)
// into the share's output, a warp per row.
cudaError_t LaunchCombine(const RowShare& share, const void* outs, ElemType type, const float* lses,
                          cudaStream_t stream);

// fp8 (the fused path): *amax (device fp32, cleared to 0 by the caller) becomes the largest |x|
// of src[0, count) (NaN if any is NaN); dst[i] = FloatToFp8E4M3(src[i] * scale).
cudaError_t LaunchAmax(const void* src, ElemType type, int64_t count, float* amax,
                       cudaStream_t stream);
cudaError_t LaunchQuantize(const void* src, ElemType type, int64_t count, float scale, uint8_t* dst,
                           cudaStream_t stream);

// dst[i] = src[i] converted, for i < count (fp32/fp16/bf16 either way).
cudaError_t LaunchConvert(const void* src, ElemType from, void* dst, ElemType to, int64_t count,
                          cudaStream_t stream);

}  // namespace da::engine::cuda
