#include "engine/cpu/task_plan.h"

#include <algorithm>
#include <functional>
#include <queue>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu {
namespace {

// Cuts every task's rows into query chunks so that the loop has about `wanted` tasks.
std::vector<Task> Chunk(const std::vector<Task>& tasks, int64_t wanted) {
  const int64_t count = static_cast<int64_t>(tasks.size());
  const int64_t pieces = (wanted + count - 1) / std::max<int64_t>(1, count);
  std::vector<Task> chunked;
  for (const Task& task : tasks) {
    const int64_t rows = task.row_end - task.row_begin;
    const int64_t chunk = std::max(kMinChunkRows, RoundUp((rows + pieces - 1) / pieces, kRowAlign));
    for (int64_t r = task.row_begin; r < task.row_end; r += chunk) {
      Task piece = task;
      piece.row_begin = r;
      piece.row_end = std::min(task.row_end, r + chunk);
      chunked.push_back(piece);
    }
  }
  return chunked;
}

}  // namespace

std::vector<std::vector<Task>> PlanTasks(const Shape4& q_shape, const AttentionSpec& spec,
                                         const std::vector<std::vector<HeadWork>>& work,
                                         int threads) {
  const bool longnet = spec.mode == CombineMode::kLongNet;
  const size_t loops = longnet ? spec.patterns.size() : 1;
  std::vector<std::vector<Task>> plan(loops);
  for (size_t loop = 0; loop < loops; ++loop) {
    std::vector<Task>& tasks = plan[loop];
    for (int64_t b = 0; b < q_shape.batch; ++b) {
      for (int64_t h = 0; h < q_shape.heads; ++h) {
        for (const HeadWork& hw : work[h]) {
          if (longnet && hw.pattern_index != static_cast<int>(loop)) continue;
          for (int64_t t = 0; t < NumSegments(q_shape.seq_len, hw.pattern.segment_len); ++t) {
            const KeptRange kept = KeptPositions(hw.pattern, hw.offset, q_shape.seq_len, t);
            if (kept.count > 0) tasks.push_back({b, h, &hw, kept, 0, kept.count, 0.0});
          }
        }
      }
    }
    BalanceLoop(tasks, spec.causal, threads);
  }
  return plan;
}

void BalanceLoop(std::vector<Task>& tasks, bool causal, int threads) {
  const int64_t wanted = 4 * static_cast<int64_t>(std::max(threads, 1));
  if (static_cast<int64_t>(tasks.size()) < wanted) tasks = Chunk(tasks, wanted);
  for (Task& task : tasks) {
    // Causal: a chunk sees keys up to its last row, so its cost grows with row_end.
    const double keys = causal ? task.row_end : task.kept.count;
    task.cost = static_cast<double>(task.row_end - task.row_begin) * keys;
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

double SimulatedMakespan(const std::vector<Task>& tasks, int threads) {
  std::priority_queue<double, std::vector<double>, std::greater<double>> free_at;
  for (int t = 0; t < std::max(threads, 1); ++t) free_at.push(0.0);
  double makespan = 0.0;
  for (const Task& task : tasks) {
    const double start = free_at.top();
    free_at.pop();
    free_at.push(start + task.cost);
    makespan = std::max(makespan, start + task.cost);
  }
  return makespan;
}

}  // namespace da::engine::cpu
