#include "server/proc_stats.h"

#include <gtest/gtest.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace da::server {
namespace {

// This thread's CPU time so far.
double ThreadCpuSeconds() {
  timespec used{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &used);
  return static_cast<double>(used.tv_sec) + 1e-9 * static_cast<double>(used.tv_nsec);
}

// Keeps this thread busy until it has run `seconds` more of CPU time (at most a minute of wall
// time): on a loaded machine, or one whose host steals time, a wall-clock spin may get far less.
void Spin(double seconds) {
  const double until = ThreadCpuSeconds() + seconds;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::minutes(1);
  std::atomic<uint64_t> sink{0};
  while (ThreadCpuSeconds() < until) {
    if (std::chrono::steady_clock::now() > give_up) {
      ADD_FAILURE() << "the thread did not get " << seconds << " s of CPU within a minute";
      return;
    }
    for (int i = 0; i < 100000; ++i) sink.fetch_add(1, std::memory_order_relaxed);
  }
}

TEST(ProcStatsTest, ThisProcessHasAPeakAndCountsItsSpinning) {
  EXPECT_GT(ProcStatusBytes(getpid(), "VmHWM"), 0);
  EXPECT_EQ(ProcStatusBytes(getpid(), "NoSuchField"), -1);
  const double before = ProcessCpuSeconds(getpid());
  ASSERT_GE(before, 0);
  Spin(0.3);
  // 0.3 s more of CPU for this thread: the process's count, in 10 ms ticks, grew by as much, less
  // a tick or two.
  EXPECT_GE(ProcessCpuSeconds(getpid()) - before, 0.2);
  EXPECT_EQ(ProcessCpuSeconds(-1), -1);
}

TEST(ProcStatsTest, TheMachineCountsBusyTimeAndItsParts) {
  const MachineCpu before = ReadMachineCpu();
  ASSERT_TRUE(before.ok);
  EXPECT_GE(before.idle_s, 0);
  EXPECT_GE(before.softirq_s, 0);
  EXPECT_GE(before.total_s, before.idle_s + before.softirq_s);
  Spin(0.3);
  const MachineCpu after = ReadMachineCpu();
  ASSERT_TRUE(after.ok);
  const double total = after.total_s - before.total_s;
  const double idle = after.idle_s - before.idle_s;
  // This thread ran 0.3 s of CPU in between: the machine counted at least that much busy time
  // (less a tick or two).
  EXPECT_GE(total, 0.25);
  EXPECT_GE(total - idle, 0.25);
  EXPECT_GE(after.softirq_s, before.softirq_s);
}

}  // namespace
}  // namespace da::server
