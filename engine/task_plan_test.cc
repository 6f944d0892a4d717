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
    const AttentionSpec spec = Spec({{64, 1}, {300, 3}, {2000, 8}}, mode, true);
    const auto work = AssignHeadPatterns(shape.heads, spec);
    // (batch, head, pattern, position) -> times computed.
    std::map<std::tuple<int64_t, int64_t, int, int64_t>, int> covered;
    for (int threads : {1, 2, 3}) {
      covered.clear();
      for (const std::vector<Task>& loop : PlanTasks(shape, spec, work, threads)) {
        for (const Task& t : loop) {
          for (int64_t i = t.row_begin; i < t.row_end; ++i) {
            ++covered[{t.batch, t.head, t.work->pattern_index, t.kept.first + i * t.kept.stride}];
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
