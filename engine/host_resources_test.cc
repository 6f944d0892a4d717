// The CPUs and memory a container gives the process, read from mocked /proc and /sys trees:
// cgroup v2 in a namespace of its own and nested under a pod, cgroup v1, no cgroup at all, and
// files that say "no limit" or nothing sensible.
#include "engine/host_resources.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace da::engine {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kGiB = int64_t{1} << 30;

class HostResourcesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::path(::testing::TempDir()) /
            ("host_resources_test." + std::to_string(getpid()) + "." +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  void Write(const std::string& relative, const std::string& text) {
    const std::filesystem::path path = root_ / relative;
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << text << "\n";
  }
  HostResources Read(int affinity = 64, int64_t physical = 256 * kGiB) {
    return ReadHostResources(root_.string(), affinity, physical);
  }

  std::filesystem::path root_;
};

TEST_F(HostResourcesTest, CgroupV2OfItsOwnNamespace) {
  Write("proc/self/cgroup", "0::/");
  Write("sys/fs/cgroup/cpu.max", "400000 100000");
  Write("sys/fs/cgroup/memory.max", "8589934592");
  const HostResources host = Read();
  EXPECT_EQ(host.cpus, 4);
  EXPECT_THAT(host.cpus_from, HasSubstr("cgroup CPU quota of 4 CPUs"));
  EXPECT_THAT(host.cpus_from, HasSubstr("cpu.max 400000 100000"));
  EXPECT_EQ(host.memory_bytes, 8 * kGiB);
  EXPECT_THAT(host.memory_from, HasSubstr("cgroup memory limit"));
  EXPECT_THAT(host.memory_from, HasSubstr("memory.max: 8589934592 bytes"));
}

// A container under a pod: the pod's limits are tighter than the container's "max"; a fractional
// quota rounds up.
TEST_F(HostResourcesTest, CgroupV2TakesTheTightestAncestor) {
  Write("proc/self/cgroup", "0::/kubepods/pod1/ctr");
  Write("sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000");
  Write("sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max");
  Write("sys/fs/cgroup/kubepods/pod1/cpu.max", "250000 100000");
  Write("sys/fs/cgroup/kubepods/pod1/memory.max", "1073741824");
  Write("sys/fs/cgroup/kubepods/memory.max", "4294967296");
  const HostResources host = Read();
  EXPECT_EQ(host.cpus, 3);
  EXPECT_EQ(host.memory_bytes, kGiB);
  EXPECT_THAT(host.memory_from, HasSubstr("kubepods/pod1/memory.max"));
}

// Docker on cgroup v1: /proc/self/cgroup names the host's path, the mounts are the container's
// own; v1's "no limit" is a huge number.
TEST_F(HostResourcesTest, CgroupV1) {
  Write("proc/self/cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/");
  Write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000");
  Write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000");
  Write("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712");
  const HostResources host = Read(8, 16 * kGiB);
  EXPECT_EQ(host.cpus, 2);
  EXPECT_THAT(host.cpus_from, HasSubstr("cpu.cfs_quota_us 150000 / 100000"));
  EXPECT_EQ(host.memory_bytes, 16 * kGiB);
  EXPECT_THAT(host.memory_from, HasSubstr("physical memory"));
}

TEST_F(HostResourcesTest, NoCgroupLimitsLeaveTheAffinityMaskAndPhysicalMemory) {
  Write("proc/self/cgroup", "0::/user.slice");
  Write("sys/fs/cgroup/user.slice/cpu.max", "max 100000");
  Write("sys/fs/cgroup/user.slice/memory.max", "max");
  HostResources host = Read(6, 32 * kGiB);
  EXPECT_EQ(host.cpus, 6);
  EXPECT_EQ(host.cpus_from, "the affinity mask's 6 CPUs");
  EXPECT_EQ(host.memory_bytes, 32 * kGiB);
  // Nothing at all under the root (no /proc/self/cgroup): the same.
  std::filesystem::remove_all(root_);
  host = Read(6, 32 * kGiB);
  EXPECT_EQ(host.cpus, 6);
  EXPECT_EQ(host.memory_bytes, 32 * kGiB);
}

// A quota above the affinity mask (taskset to 2 CPUs in an 8-CPU pod) leaves the mask; a memory
// limit above physical memory leaves physical memory; garbage is ignored.
TEST_F(HostResourcesTest, TheTighterOfMaskAndQuotaAndNothingFromGarbage) {
  Write("proc/self/cgroup", "0::/");
  Write("sys/fs/cgroup/cpu.max", "800000 100000");
  Write("sys/fs/cgroup/memory.max", "1099511627776");
  HostResources host = Read(2, 64 * kGiB);
  EXPECT_EQ(host.cpus, 2);
  EXPECT_EQ(host.memory_bytes, 64 * kGiB);
  Write("sys/fs/cgroup/cpu.max", "lots 100000");
  Write("sys/fs/cgroup/memory.max", "-1");
  host = Read(2, 64 * kGiB);
  EXPECT_EQ(host.cpus, 2);
  EXPECT_EQ(host.memory_bytes, 64 * kGiB);
  // A quota under one CPU still runs one thread.
  Write("sys/fs/cgroup/cpu.max", "50000 100000");
  EXPECT_EQ(Read(2, 64 * kGiB).cpus, 1);
}

// Memory used elsewhere under the same limit (a memory-backed /dev/shm) comes off M and is said;
// all of it or more leaves nothing, for the caller to refuse.
TEST(LessMemoryElsewhereTest, TakesTheBytesOffAndSaysSo) {
  HostResources host;
  host.memory_bytes = 8 * kGiB;
  host.memory_from = "the cgroup memory limit";
  EXPECT_EQ(LessMemoryElsewhere(host, 0).memory_bytes, 8 * kGiB);
  EXPECT_EQ(LessMemoryElsewhere(host, 0).memory_from, "the cgroup memory limit");
  const HostResources less = LessMemoryElsewhere(host, kGiB);
  EXPECT_EQ(less.memory_bytes, 7 * kGiB);
  EXPECT_EQ(less.memory_from, "the cgroup memory limit, less 1073741824 bytes used elsewhere");
  EXPECT_EQ(LessMemoryElsewhere(host, 8 * kGiB).memory_bytes, 0);
  EXPECT_EQ(LessMemoryElsewhere(host, 9 * kGiB).memory_bytes, 0);
  EXPECT_NE(LessMemoryElsewhere(host, 9 * kGiB).memory_from.find("all of it used elsewhere"),
            std::string::npos);
}

}  // namespace
}  // namespace da::engine
