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

}  // namespace da::engine::cuda
