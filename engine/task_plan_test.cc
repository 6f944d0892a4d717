// The CPU backend's task decomposition: every kept row covered exactly once, and balanced work
// under the pool's dynamic hand-out, causal (triangular) segments included.
#include "engine/cpu/task_plan.h"

#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <tuple>

namespace da::engine::cpu {
namespace {

AttentionSpec Spec(std::vector<Pattern> patterns, CombineMode mode, bool causal) {
  AttentionSpec spec;
  spec.patterns = std::move(patterns);
  spec.mode = mode;
  spec.causal = causal;
  return spec;
}

double TotalCost(const std::vector<Task>& tasks) {
  return std::accumulate(tasks.begin(), tasks.end(), 0.0,
                         [](double sum, const Task& t) { return sum + t.cost; });
}

TEST(TaskPlanTest, EveryKeptRowIsCoveredOnce) {
  const Shape4 shape{2, 1000, 5, 16};
  for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
    // (1, 1) and (5, 2): runs of small segments, cut by kRunRows and by the partial last one.
    const AttentionSpec spec = Spec({{64, 1}, {300, 3}, {2000, 8}, {1, 1}, {5, 2}}, mode, true);
    const auto work = AssignHeadPatterns(shape.heads, spec);
    // (batch, head, pattern, position) -> times computed.
    std::map<std::tuple<int64_t, int64_t, int, int64_t>, int> covered;
    for (int threads : {1, 2, 3}) {
      covered.clear();
      for (const std::vector<Task>& loop : PlanTasks(shape, spec, work, threads)) {
        for (const Task& run : loop) {
          for (int64_t s = 0; s < run.segments; ++s) {
            const Task t = SegmentOf(run, s);
            for (int64_t i = t.row_begin; i < t.row_end; ++i) {
              ++covered[{t.batch, t.head, t.work->pattern_index, t.kept.first + i * t.kept.stride}];
            }
          }
        }
      }
      size_t expected = 0;
      for (int64_t h = 0; h < shape.heads; ++h) {
        for (const HeadWork& hw : work[h]) {
          for (int64_t t = 0; t < NumSegments(shape.seq_len, hw.pattern.segment_len); ++t) {
            expected += KeptPositions(hw.pattern, hw.offset, shape.seq_len, t).count;
          }
        }
      }
      EXPECT_EQ(covered.size(), expected * shape.batch);
      for (const auto& [key, count] : covered) ASSERT_EQ(count, 1);
    }
  }
}

// Small segments share tasks: one task per segment made the table B * H * P * N / w tasks of 80
// bytes (167 MB for this shape's first case; 40 GB for w = 1 at N = 512K, H = 16, P = 64). Every
// share's table stays within TaskTableBytes, which admission counts.
TEST(TaskPlanTest, SmallSegmentsShareTasksAndTheTableStaysWithinItsBound) {
  const ProblemShape shape{2, 65536, 4, 4, 8};
  const std::vector<std::vector<Pattern>> pattern_sets = {
      {{1, 1}, {2, 1}, {4, 1}, {8, 1}, {16, 1}, {32, 1}, {64, 1}, {128, 1}},
      {{16, 4}, {2048, 2}, {5000, 1}},
      {{3, 3}, {1000, 7}, {100000, 1}}};
  const auto share = [](int64_t token_begin, int64_t token_end, int64_t head_begin,
                        int64_t head_end) {
    return Share{.token_begin = token_begin,
                 .token_end = token_end,
                 .head_begin = head_begin,
                 .head_end = head_end,
                 .kv_head_begin = head_begin,
                 .kv_head_end = head_end};
  };
  const std::vector<Share> shares = {WholeShare(shape), share(0, 65536, 1, 3),
                                     share(1000, 33333, 0, 4), share(65535, 65536, 0, 4)};
  for (const std::vector<Pattern>& patterns : pattern_sets) {
    for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
      for (bool causal : {false, true}) {
        const AttentionSpec spec = Spec(patterns, mode, causal);
        const auto work = AssignHeadPatterns(shape.heads, spec);
        for (const Share& part : shares) {
          for (int threads : {1, 2, 16}) {
            const ShareTasks plan = PlanShareTasks(shape, spec, part, work, threads);
            int64_t tasks = 0, rows = 0;
            for (const std::vector<Task>& loop : plan.loops) {
              tasks += std::ssize(loop);
              for (const Task& t : loop) {
                EXPECT_LE((t.row_end - t.row_begin) * t.segments, std::max(kRunRows, t.kept.count));
                if (t.segments > 1) {
                  EXPECT_EQ(t.spanning, -1);
                }
                rows += (t.row_end - t.row_begin) * t.segments;
              }
            }
            const int64_t table =
                tasks * static_cast<int64_t>(sizeof(Task)) +
                std::ssize(plan.spanning) * static_cast<int64_t>(sizeof(SpanningId));
            EXPECT_LE(table, TaskTableBytes(shape, spec, part, threads))
                << spec.PatternsToString() << " " << part.ToString() << " " << threads;
            if (patterns.size() == 8 && part.tokens() == 65536) {
              // About rows / (kRunRows / 2) tasks where one per segment made rows / 2 of them.
              EXPECT_LE(tasks, rows / (kRunRows / 4)) << spec.PatternsToString();
            }
          }
        }
      }
    }
  }
}

// TaskTableBytes counts per pattern in closed form (a request's estimate must not cost per-head
// tables); it equals the sum over the share's heads of what each head's patterns need.
TEST(TaskPlanTest, TheTableBoundInClosedFormIsThePerHeadSum) {
  for (const int64_t heads : {1, 3, 4, 7, 16}) {
    const ProblemShape shape{2, 5000, heads, 1, 8};
    for (const std::vector<Pattern>& patterns :
         std::vector<std::vector<Pattern>>{{{1, 1}, {2, 1}, {4, 2}, {8, 1}, {16, 4}},
                                           {{16, 4}, {2048, 2}, {7000, 1}},
                                           {{3, 3}}}) {
      for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
        const AttentionSpec spec = Spec(patterns, mode, false);
        const auto work = AssignHeadPatterns(heads, spec);
        for (const Share& part : {WholeShare(shape), Share{.token_begin = 100,
                                                     .token_end = 4000,
                                                     .head_begin = heads / 2,
                                                     .head_end = heads,
                                                     .kv_head_begin = 0,
                                                     .kv_head_end = 1}}) {
          int64_t tasks = 0;
          for (int64_t head = part.head_begin; head < part.head_end; ++head) {
            for (const HeadWork& hw : work[head]) {
              const int64_t w = hw.pattern.segment_len;
              const int64_t kept =
                  (std::min(w, shape.seq_len) + hw.pattern.dilation - 1) / hw.pattern.dilation;
              const int64_t per_run = std::max<int64_t>(1, kRunRows / std::max<int64_t>(1, kept));
              const int64_t segments = part.tokens() / w + 2;
              tasks += shape.batch * ((segments + per_run - 1) / per_run + 3);
            }
          }
          const int threads = 3;
          const int64_t loops =
              mode == CombineMode::kLongNet ? static_cast<int64_t>(patterns.size()) : 1;
          const int64_t expected =
              (tasks + loops * 4 * threads) * static_cast<int64_t>(sizeof(Task)) +
              tasks * static_cast<int64_t>(sizeof(SpanningId));
          EXPECT_EQ(TaskTableBytes(shape, spec, part, threads), expected)
              << heads << " heads " << spec.PatternsToString() << " " << part.ToString();
        }
      }
    }
  }
}

TEST(TaskPlanTest, OneCausalSegmentIsBalancedAcrossThreads) {
  // A single triangular segment: without chunking one thread would do all of it.
  const Shape4 shape{1, 65536, 1, 64};
  const AttentionSpec spec = Spec({{65536, 1}}, CombineMode::kLongNet, true);
  const auto work = AssignHeadPatterns(1, spec);
  for (int threads : {2, 3, 4}) {
    const std::vector<Task> tasks = PlanTasks(shape, spec, work, threads)[0];
    const double ideal = TotalCost(tasks) / threads;
    EXPECT_LE(SimulatedMakespan(tasks, threads), 1.10 * ideal) << threads << " threads";
  }
}

TEST(TaskPlanTest, BenchmarkShapesAreBalanced) {
  const Shape4 shape{1, 65536, 8, 64};
  for (bool causal : {false, true}) {
    for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
      const AttentionSpec spec = Spec({{2048, 1}, {4096, 2}, {8192, 4}}, mode, causal);
      const auto work = AssignHeadPatterns(shape.heads, spec);
      for (const std::vector<Task>& loop : PlanTasks(shape, spec, work, 2)) {
        EXPECT_LE(SimulatedMakespan(loop, 2), 1.05 * TotalCost(loop) / 2);
      }
    }
  }
}

TEST(TaskPlanTest, LargestTasksComeFirst) {
  const Shape4 shape{1, 5000, 2, 16};
  const AttentionSpec spec = Spec({{4000, 1}}, CombineMode::kGrouped, true);
  const auto work = AssignHeadPatterns(2, spec);
  const std::vector<Task> tasks = PlanTasks(shape, spec, work, 2)[0];
  for (size_t i = 1; i < tasks.size(); ++i) EXPECT_GE(tasks[i - 1].cost, tasks[i].cost);
}

}  // namespace
}  // namespace da::engine::cpu
