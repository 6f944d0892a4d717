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
        int64_t run = -1;  // The loop's open run of small whole segments, which the next may join.
        for (int64_t t = share.token_begin / w; t * w < share.token_end; ++t) {
          Task task;
          task.batch = b;
          task.head = head;
          task.work = &hw;
          task.kept = KeptPositions(hw.pattern, hw.offset, s.seq_len, t);
          std::tie(task.row_begin, task.row_end) =
              KeptRowsIn(task.kept, share.token_begin, share.token_end);
          if (task.row_begin == task.row_end) continue;
          const bool whole = task.row_begin == 0 && task.row_end == task.kept.count;
          std::vector<Task>& loop = plan.loops[longnet ? hw.pattern_index : 0];
          if (whole && run >= 0 && loop[run].kept.count == task.kept.count &&
              loop[run].kept.first + loop[run].segments * w == task.kept.first &&
              (loop[run].segments + 1) * task.kept.count <= kRunRows) {
            ++loop[run].segments;  // The next segment of the run: same rows, w tokens on.
            continue;
          }
          run = -1;
          if (!whole) {
            const SpanningId id{hw.pattern_index, t, kv_head, hw.offset};
            const auto [found, added] =
                spanning.emplace(id, static_cast<int>(plan.spanning.size()));
            if (added) plan.spanning.push_back(id);
            task.spanning = found->second;
          }
          loop.push_back(task);
          if (whole && 2 * task.kept.count <= kRunRows) run = std::ssize(loop) - 1;
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
    task.cost = static_cast<double>(task.row_end - task.row_begin) * keys *
                static_cast<double>(task.segments);
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

Task SegmentOf(const Task& task, int64_t s) {
  Task one = task;
  one.kept.first += s * task.work->pattern.segment_len;
  one.segments = 1;
  return one;
}

int64_t TaskTableBytes(const ProblemShape& s, const AttentionSpec& spec, const Share& share,
                       int threads) {
  // Per (batch, head, pattern): the runs of whole segments in the share (each at least
  // kRunRows / 2 rows, or one segment), plus the share's two ends (partial or spanning), plus the
  // last segment's run cut short. BalanceLoop's chunks: at most 4 * threads + the tasks in all.
  // Counted per pattern, times the share's heads that run it (AssignHeadPatterns' assignment in
  // closed form): an estimate must not itself cost memory or time in the number of heads.
  const int64_t num_patterns = static_cast<int64_t>(spec.patterns.size());
  int64_t tasks = 0;
  int64_t group_begin = 0;  // GROUPED: the first head of pattern i's group.
  for (int64_t i = 0; i < num_patterns; ++i) {
    const Pattern& p = spec.patterns[i];
    int64_t heads = share.head_end - share.head_begin;  // LONGNET: every head runs every pattern.
    if (spec.mode != CombineMode::kLongNet) {
      const int64_t group = s.heads / num_patterns + (i < s.heads % num_patterns ? 1 : 0);
      heads = std::max<int64_t>(0, std::min(group_begin + group, share.head_end) -
                                       std::max(group_begin, share.head_begin));
      group_begin += group;
    }
    const int64_t w = p.segment_len;
    const int64_t kept = (std::min(w, s.seq_len) + p.dilation - 1) / p.dilation;
    const int64_t per_run = std::max<int64_t>(1, kRunRows / std::max<int64_t>(1, kept));
    const int64_t segments = share.tokens() / w + 2;
    tasks += heads * s.batch * ((segments + per_run - 1) / per_run + 3);
  }
  const int64_t loops =
      spec.mode == CombineMode::kLongNet ? static_cast<int64_t>(spec.patterns.size()) : 1;
  const int64_t chunked = tasks + loops * 4 * static_cast<int64_t>(std::max(threads, 1));
  // Spanning ids: at most one per task.
  return chunked * static_cast<int64_t>(sizeof(Task)) +
         tasks * static_cast<int64_t>(sizeof(SpanningId));
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
