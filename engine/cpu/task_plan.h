// How the CPU backend cuts a problem into parallel tasks.
//
//   auto work = AssignHeadPatterns(heads, spec);
//   for (const std::vector<Task>& loop : PlanTasks(q_shape, spec, work, threads)) {
//     pool.ParallelFor(loop.size(), ...);  // tasks of one loop write disjoint output rows
//   }
//
// A task is the queries [row_begin, row_end) of one segment of one pattern for one (batch, head),
// or of a run of consecutive whole segments where segments are small (Task::segments).
// When a loop has fewer than four tasks per thread, segments are cut into query chunks (at least
// kMinChunkRows rows); tasks are ordered biggest first, so the pool's dynamic hand-out balances
// them, causal (triangular) work included.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/dilation.h"
#include "engine/share.h"

namespace da::engine::cpu {

// A chunk's packing costs O(keys * D) and its attention O(rows * keys * D): below this many rows
// packing would dominate.
constexpr int64_t kMinChunkRows = 128;

// Consecutive whole segments of one (batch, head, pattern) with fewer kept rows than this share one
// task, up to this many rows in all. One task per segment made the table B * H * P * N / w tasks
// of 80 bytes: 40 GB for w = 1 at N = 512K, H = 16, P = 64 (a 48 MiB request), and a plan's
// table outweighed its inputs from w = 16 on.
constexpr int64_t kRunRows = 1024;

struct Task {
  int64_t batch = 0;
  int64_t head = 0;
  const HeadWork* work = nullptr;  // Points into the AssignHeadPatterns result given to PlanTasks.
  KeptRange kept;
  int64_t row_begin = 0;
  int64_t row_end = 0;
  // The task runs `segments` segments: kept, then kept.first w tokens later each time, with the
  // same rows (whole segments of one kept count whose keys are in the share; 1 otherwise).
  int64_t segments = 1;
  double cost = 0.0;  // Score entries computed: rows x visible keys x segments.
  // A share's task whose segment reads keys outside the share: its index in the plan's
  // spanning sets (ShareTasks::spanning), whose gathered rows it reads; -1: the keys are in the
  // share's own k and v.
  int spanning = -1;
};

// A spanning set as a share's plan names it (engine/share.h SpanningKeys, without the geometry).
struct SpanningId {
  int pattern_index = 0;
  int64_t segment = 0;
  int64_t kv_head = 0;
  int64_t offset = 0;
  auto operator<=>(const SpanningId&) const = default;
};

struct ShareTasks {
  std::vector<std::vector<Task>> loops;
  std::vector<SpanningId> spanning;  // Tasks' `spanning` index into it.
};

// The tasks of a share: the query rows of each kept set that lie in the share's tokens, for its
// heads, one loop per LONGNET pattern or one loop for GROUPED, each balanced (BalanceLoop). A
// set whose kept positions are not all inside the share reads gathered rows (Task::spanning).
// `work` (AssignHeadPatterns over the whole problem's heads) must outlive the result.
ShareTasks PlanShareTasks(const ProblemShape& shape, const AttentionSpec& spec, const Share& share,
                          const std::vector<std::vector<HeadWork>>& work, int threads);

// The whole problem's loops (PlanShareTasks for the share that covers it): one per pattern in
// LONGNET (patterns fold into shared state one after another), one in GROUPED (each head runs one
// pattern). `work` must outlive the result.
std::vector<std::vector<Task>> PlanTasks(const Shape4& q_shape, const AttentionSpec& spec,
                                         const std::vector<std::vector<HeadWork>>& work,
                                         int threads);

// Makes one loop ready for the pool: when it has fewer than four tasks per thread, cuts each
// task's rows [row_begin, row_end) into chunks of at least kMinChunkRows; then sets the costs and
// orders the tasks biggest first. PlanTasks does this to every loop it makes.
void BalanceLoop(std::vector<Task>& tasks, bool causal, int threads);

// Segment s (< task.segments) of a task on its own: kept.first moved s segments on, segments 1.
Task SegmentOf(const Task& task, int64_t s);

// At most the bytes PlanShareTasks' table takes for `share` (tasks and spanning ids; admission
// counts it with the workspace).
int64_t TaskTableBytes(const ProblemShape& shape, const AttentionSpec& spec, const Share& share,
                       int threads);

// The finishing time of `threads` threads that each take the next task in order when free, as
// ThreadPool::ParallelFor does, in units of Task::cost.
double SimulatedMakespan(const std::vector<Task>& tasks, int threads);

}  // namespace da::engine::cpu
