// One segment task of the CPU backend (cpu_backend.cc, RunShare: a whole problem or one device's
// share of it): pack the task's query rows and the keys
// and values they see into padded fp32 tiles, run the fused kernel, and fold its rows into the
// output.
//
//   RowFold fold(sizes, workspace, out, plan_key.patterns.size());
//   DA_RETURN_IF_ERROR(fold.Reset(pool, cancelled));  // zeroes out / resets LONGNET's state
//   DA_RETURN_IF_ERROR(RunLoops(loops, pool, cancelled, "cpu run", [&](const Task& t, int th) {
//     SegmentTaskIo io{.q = TensorRows(q, b, head, kept), .k = ..., .v = ..., ...};
//     if (RunSegmentTask(isa, bf16_kernel, io, workspace.threads[th], cancelled))
//       fold.AddTask(t, workspace.threads[th], head);
//   }));
//   DA_RETURN_IF_ERROR(fold.Finish(pool, cancelled));  // LONGNET of 2+: out = acc / weight
//
// Rows are addressed through RowSource (row i at element base + i * stride of a buffer), so the
// same code packs kept rows straight out of a [B, N, H, D] tensor or out of a packed
// [count, head_dim] buffer of rows gathered from other ranks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "engine/cpu/attention_kernel.h"
#include "engine/cpu/cpu_plan.h"
#include "engine/cpu/task_plan.h"
#include "engine/dilation.h"
#include "engine/tensor.h"

namespace da::engine {
class ThreadPool;
}

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
// and ts.lse their LSEs, computed by the fp32 kernel of `isa`, or in bf16 by `bf16` unless it is
// kNone. False when `cancelled` turned true (the rows are then not valid).
bool RunSegmentTask(Isa isa, Bf16Kernel bf16, const SegmentTaskIo& io, ThreadSpace& ts,
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

// Where a run's tasks leave their rows. LONGNET: a running state per output row (accumulator,
// max LSE, weight; the accumulator is the output itself when that is fp32) that each pattern's
// rows fold into, written out as acc / weight by Finish. GROUPED: each head's rows, times
// 1 / patterns, stored straight into the zeroed output. LONGNET with one pattern is stored the
// same way, times 1: each row has at most one contribution, whose fold would be exactly itself
// (weight exp(0) = 1), and the accumulator's reset, read-modify-write and write-out were three
// passes over the output for nothing. Output rows are (b, n, h) of `out`.
class RowFold {
 public:
  // LONGNET of several patterns (z.fold) takes acc, max_lse and weight from `ws` (prepared for
  // `z`); `patterns` is the count of the plan key `z` was sized for.
  // Touches nothing: Reset does.
  RowFold(const WorkspaceSizes& z, Workspace& ws, const MutableTensorView& out, size_t patterns);

  // Zeroes out (GROUPED, LONGNET of one pattern) or resets acc, max_lse and weight (LONGNET of
  // several), in parallel on the pool,
  // in slices of kFoldSliceBytes with a look at `cancelled` before each: a request's output is
  // up to gigabytes, and its first touch (fresh pages) can take longer than a stop may. CANCELLED
  // ("cpu run cancelled") once `cancelled` turns true.
  absl::Status Reset(ThreadPool* pool, const std::atomic<bool>* cancelled) const;

  // The rows `task` left in ts.out and ts.lse: position n of (batch, head) goes to row
  // (batch, n - position0, head) of out (a rank's share starts at global position position0).
  void AddTask(const Task& task, const ThreadSpace& ts, int64_t head, int64_t position0 = 0) const;

  // LONGNET of several patterns: out = acc / weight, in parallel on the pool, with the same stop
  // checks as Reset. Otherwise nothing is left to do.
  absl::Status Finish(ThreadPool* pool, const std::atomic<bool>* cancelled) const;

 private:
  const WorkspaceSizes z_;
  const MutableTensorView out_;
  const bool direct_;  // Rows stored straight into out: GROUPED, or LONGNET with one pattern.
  const float group_factor_;
  float* acc_ = nullptr;
  float* max_lse_ = nullptr;
  float* weight_ = nullptr;
};

// Runs the loops one after another, each loop's tasks in parallel on the pool (null: on the
// calling thread). Stops between tasks once `cancelled` turns true: then CANCELLED ("<what>
// cancelled"), else OK.
absl::Status RunLoops(const std::vector<std::vector<Task>>& loops, ThreadPool* pool,
                      const std::atomic<bool>* cancelled, const char* what,
                      const std::function<void(const Task&, int thread)>& run_task);

}  // namespace da::engine::cpu
