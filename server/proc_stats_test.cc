#include "server/proc_stats.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace da::server {
namespace {

// Keeps one CPU busy for `seconds` of wall time.
void Spin(double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::atomic<uint64_t> sink{0};
  while (std::chrono::steady_clock::now() < end) sink.fetch_add(1, std::memory_order_relaxed);
}

TEST(ProcStatsTest, ThisProcessHasAPeakAndCountsItsSpinning) {
  EXPECT_GT(ProcStatusBytes(getpid(), "VmHWM"), 0);
  EXPECT_EQ(ProcStatusBytes(getpid(), "NoSuchField"), -1);
  const double before = ProcessCpuSeconds(getpid());
  ASSERT_GE(before, 0);
  Spin(0.3);
  // 0.3 s of one busy thread, in 10 ms ticks; a loaded machine may take some of it away.
  EXPECT_GE(ProcessCpuSeconds(getpid()) - before, 0.15);
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
  // At least this thread's 0.3 s passed on one CPU, and at least half of it was not idle.
  EXPECT_GE(total, 0.25);
  EXPECT_GE(total - idle, 0.15);
  EXPECT_GE(after.softirq_s, before.softirq_s);
}

}  // namespace
}  // namespace da::server
