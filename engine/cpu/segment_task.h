// One segment task of the CPU backend, shared by the whole-problem backend (cpu_backend.cc) and
// a rank's share of a sharded problem (slice_run.cc): pack the task's query rows and the keys
// and values they see into padded fp32 tiles, run the fused kernel, and fold its rows into the
// output.
//
//   SegmentTaskIo io{.q = TensorRows(q, b, head, kept), .k = ..., .v = ..., ...};
//   if (!RunSegmentTask(isa, bf16, io, thread_space, cancelled)) return;  // stopped
//   for (i ...) FoldLongNetRow(ts.out + i * dim_pad, ts.lse[i], head_dim, acc, max_lse, weight);
//
// Rows are addressed through RowSource (row i at element base + i * stride of a buffer), so the
// same code packs kept rows straight out of a [B, N, H, D] tensor or out of a packed
// [count, head_dim] buffer of rows gathered from other ranks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "engine/cpu/attention_kernel.h"
#include "engine/cpu/cpu_plan.h"
#include "engine/dilation.h"
#include "engine/tensor.h"

namespace da::engine::cpu {

// Rows of head_dim elements: row i starts at element base + i * stride of data.
struct RowSource {
  DType dtype = DType::kFloat32;
  const void* data = nullptr;
  int64_t base = 0;
  int64_t stride = 0;
};

// Row i = position kept.first + i * kept.stride of (batch b, head) of a [B, N, H, D] tensor whose
// position 0 is global position `position0` (a rank's share starts at its first token).
inline RowSource TensorRows(const TensorView& t, int64_t b, int64_t head, const KeptRange& kept,
                            int64_t position0 = 0) {
  const Shape4& s = t.shape;
  return {t.dtype, t.data, ((b * s.seq_len + kept.first - position0) * s.heads + head) * s.head_dim,
          kept.stride * s.heads * s.head_dim};
}

// One task: query rows [row_begin, row_end) of a kept set against its first `keys` keys.
struct SegmentTaskIo {
  RowSource q, k, v;
  int64_t keys = 0;  // Causal: row_end; otherwise every kept key.
  int64_t row_begin = 0;
  int64_t row_end = 0;
  int64_t head_dim = 0;
  int64_t dim_pad = 0;
  float q_factor = 1.0f;  // Softmax scale times log2(e).
  bool causal = false;
};

// Packs and runs the kernel; on return ts.out holds row_end - row_begin rows of dim_pad floats
// and ts.lse their LSEs. False when `cancelled` turned true (the rows are then not valid).
bool RunSegmentTask(Isa isa, bool bf16, const SegmentTaskIo& io, ThreadSpace& ts,
                    const std::atomic<bool>* cancelled);

// LONGNET: folds one pattern's normalised row `src` with log-sum-exp `lse` into the running
// state of its position (acc[head_dim], max_lse, weight); the output is acc / weight at the end.
inline void FoldLongNetRow(const float* src, float lse, int64_t head_dim, float* acc,
                           float* max_lse, float* weight) {
  const float new_max = std::max(*max_lse, lse);
  const float old_factor = std::exp(*max_lse - new_max);
  const float new_factor = std::exp(lse - new_max);
  for (int64_t d = 0; d < head_dim; ++d) acc[d] = acc[d] * old_factor + src[d] * new_factor;
  *weight = *weight * old_factor + new_factor;
  *max_lse = new_max;
}

}  // namespace da::engine::cpu
