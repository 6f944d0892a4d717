#include "engine/cpu/task_plan.h"

#include <algorithm>
#include <functional>
#include <map>
#include <queue>
#include <tuple>

#include "engine/cpu/attention_kernel.h"
#include "engine/shard_plan.h"

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

ShareTasks PlanShareTasks(const ProblemShape& s, const AttentionSpec& spec, const Share& share,
                          const std::vector<std::vector<HeadWork>>& work, int threads) {
  const bool longnet = spec.mode == CombineMode::kLongNet;
  ShareTasks plan;
  plan.loops.resize(longnet ? spec.patterns.size() : 1);
  std::map<SpanningId, int> spanning;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t head = share.head_begin; head < share.head_end; ++head) {
      const int64_t kv_head = KvHeadFor(head, s.heads, s.kv_heads);
      for (const HeadWork& hw : work[head]) {
        const int64_t w = hw.pattern.segment_len;
        for (int64_t t = share.token_begin / w; t * w < share.token_end; ++t) {
          Task task;
          task.batch = b;
          task.head = head;
          task.work = &hw;
          task.kept = KeptPositions(hw.pattern, hw.offset, s.seq_len, t);
          std::tie(task.row_begin, task.row_end) =
              KeptRowsIn(task.kept, share.token_begin, share.token_end);
          if (task.row_begin == task.row_end) continue;
          if (task.row_begin != 0 || task.row_end != task.kept.count) {
            const SpanningId id{hw.pattern_index, t, kv_head, hw.offset};
            const auto [found, added] =
                spanning.emplace(id, static_cast<int>(plan.spanning.size()));
            if (added) plan.spanning.push_back(id);
            task.spanning = found->second;
          }
          plan.loops[longnet ? hw.pattern_index : 0].push_back(task);
        }
      }
    }
  }
  for (std::vector<Task>& loop : plan.loops) BalanceLoop(loop, spec.causal, threads);
  return plan;
}

std::vector<std::vector<Task>> PlanTasks(const Shape4& q_shape, const AttentionSpec& spec,
                                         const std::vector<std::vector<HeadWork>>& work,
                                         int threads) {
  const ProblemShape shape{q_shape.batch, q_shape.seq_len, q_shape.heads, q_shape.heads,
                           q_shape.head_dim};
  return PlanShareTasks(shape, spec, WholeShare(shape), work, threads).loops;
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
