// Several devices in one engine (issue #14): the CPU cut into 2-4 devices of their own pools.
// A request sharded across them (HEADS or SEQUENCE, spanning segments, causal, GQA) equals the
// single-device output within 1e-6 of its largest value; concurrent small requests take
// different devices at once; a request over one device's budget is sharded under AUTO and
// refused under NONE naming both numbers; the CPU-device plan and the NUMA topology reader.
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/device.h"
#include "engine/engine.h"
#include "engine/host_resources.h"
#include "engine/local_shard.h"
#include "engine/placement.h"
#include "engine/test_tensors.h"

namespace da::engine {
namespace {

using testing::MaxRelativeError;
using testing::OwnedTensor;

using Inputs = testing::OwnedProblem;

Inputs MakeInputs(const ProblemShape& shape, uint32_t seed) {
  return testing::RandomProblem(shape, seed);
}

// The tests that need a run long enough to be seen from another thread (queueing, reservations)
// take a sequence a quarter as long under a sanitizer, which computes about 40 times slower: a
// sixteenth of the work, still a longer run than the full length without one.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int64_t kLongRunScale = 4;
#else
constexpr int64_t kLongRunScale = 1;
#endif

EngineOptions Devices(int devices, int threads) {
  EngineOptions options;
  options.threads = threads;
  options.cpu_devices = devices;
  return options;
}

using ShardParam = std::tuple<int /*devices*/, ShardPolicy, bool /*causal*/, CombineMode>;
class MultiDeviceShardTest : public ::testing::TestWithParam<ShardParam> {};

TEST_P(MultiDeviceShardTest, ShardedAcrossDevicesEqualsOneDevice) {
  const auto& [devices, policy, causal, mode] = GetParam();
  // N = 301 is not divisible by 2, 3 or 4; w = 128 and 512 > N span every cut; GQA 6 -> 3;
  // r = 3 does not divide 128.
  const ProblemShape shape{2, 301, 6, 3, 16};
  Inputs one = MakeInputs(shape, 11);
  one.spec.patterns = {{64, 1}, {128, 3}, {512, 8}};
  one.spec.causal = causal;
  one.spec.mode = mode;
  one.spec.shard_policy = ShardPolicy::kNone;
  auto single = Engine::Create(Devices(1, 1));
  ASSERT_TRUE(single.ok()) << single.status();
  absl::StatusOr<ExecutionInfo> alone = (*single)->Run(one.Request());
  ASSERT_TRUE(alone.ok()) << alone.status();

  Inputs many = MakeInputs(shape, 11);
  many.spec = one.spec;
  many.spec.shard_policy = policy;
  auto engine = Engine::Create(Devices(devices, devices));
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_EQ((*engine)->devices().size(), static_cast<size_t>(devices));
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(many.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->shard_strategy, policy);
  ASSERT_EQ(info->devices.size(), static_cast<size_t>(devices));
  for (int d = 0; d < devices; ++d) EXPECT_EQ(info->devices[d], absl::StrCat("cpu:", d));
  EXPECT_EQ(info->backend, "cpu");
  EXPECT_LE(MaxRelativeError(many.out, one.out), 1e-6);
  // Each device computed: every one of them has a run and busy time.
  const EngineStats stats = (*engine)->stats();
  for (int d = 0; d < devices; ++d) {
    const std::string id = absl::StrCat("cpu:", d);
    EXPECT_EQ(stats.device_runs.at(id), 1) << id;
    EXPECT_GT(stats.device_busy_seconds.at(id), 0) << id;
  }
  // Each device holds its own share's plan in the one cache, counted against it.
  const PlanCacheStats plans = (*engine)->plan_cache_stats();
  for (int d = 0; d < devices; ++d) {
    const std::string id = absl::StrCat("cpu:", d);
    EXPECT_GT(plans.bytes_by_device.count(id) ? plans.bytes_by_device.at(id) : 0, 0) << id;
  }
  // A second run finds every share's plan warm.
  absl::StatusOr<ExecutionInfo> again = (*engine)->Run(many.Request());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->plan_cache_hit);
  EXPECT_LE(MaxRelativeError(many.out, one.out), 1e-6);
}

std::string ShardName(const ::testing::TestParamInfo<ShardParam>& info) {
  const auto& [devices, policy, causal, mode] = info.param;
  return absl::StrCat(devices, "devices_", ShardPolicyName(policy), causal ? "_causal" : "", "_",
                      CombineModeName(mode));
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, MultiDeviceShardTest,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(ShardPolicy::kHeads, ShardPolicy::kSequence),
                       ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped)),
    ShardName);

TEST(MultiDeviceTest, SmallAutoRequestsTakeOneDeviceEach) {
  auto engine = Engine::Create(Devices(2, 2));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Inputs in = MakeInputs({1, 128, 4, 4, 16}, 3);
  in.spec.patterns = {{32, 1}};
  in.spec.shard_policy = ShardPolicy::kAuto;
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->shard_strategy, ShardPolicy::kNone);
  EXPECT_EQ(info->devices.size(), 1u);
}

// WarmUp builds the plans a request of the shape will use: each device's share plan when
// placement shards it (so the first request finds every share warm), the whole plan otherwise.
TEST(MultiDeviceTest, WarmUpBuildsTheSharePlansOfAShardedShape) {
  auto engine = Engine::Create(Devices(2, 2));
  ASSERT_TRUE(engine.ok()) << engine.status();
  const ProblemShape large{1, 4096, 4, 4, 32};  // 4 * 512^2 * 32 * 8 * 4 = 1.07 GFLOP: AUTO shards.
  Inputs in = MakeInputs(large, 21);
  in.spec.patterns = {{512, 1}};
  in.spec.shard_policy = ShardPolicy::kAuto;
  absl::StatusOr<WarmUpResult> warmed =
      (*engine)->WarmUp(large, DType::kFloat32, DType::kFloat32, in.spec);
  ASSERT_TRUE(warmed.ok()) << warmed.status();
  EXPECT_EQ(warmed->shares, 2);
  EXPECT_FALSE(warmed->already_warm);
  EXPECT_EQ((*engine)->plan_cache_stats().entries, 2);
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->devices.size(), 2u);
  EXPECT_TRUE(info->plan_cache_hit);

  Inputs small = MakeInputs({1, 128, 4, 4, 16}, 22);
  small.spec.patterns = {{32, 1}};
  small.spec.shard_policy = ShardPolicy::kAuto;
  warmed = (*engine)->WarmUp({1, 128, 4, 4, 16}, DType::kFloat32, DType::kFloat32, small.spec);
  ASSERT_TRUE(warmed.ok()) << warmed.status();
  EXPECT_EQ(warmed->shares, 0);  // Whole plans, one per device.
  EXPECT_EQ((*engine)->plan_cache_stats().entries, 4);
  info = (*engine)->Run(small.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->plan_cache_hit);
}

// Two requests of about 300 ms each, submitted together: on one device the second waits for the
// first; on two devices both compute at once, each on its own device.
TEST(MultiDeviceTest, ConcurrentRequestsRunAtOnceOnDifferentDevices) {
  const int64_t n = 4096 / kLongRunScale;
  const ProblemShape shape{1, n, 2, 2, 64};
  for (const int devices : {1, 2}) {
    auto engine = Engine::Create(Devices(devices, 2));
    ASSERT_TRUE(engine.ok()) << engine.status();
    Inputs a = MakeInputs(shape, 5), b = MakeInputs(shape, 6);
    for (Inputs* in : {&a, &b}) {
      in->spec.patterns = {{n, 1}};
      in->spec.shard_policy = ShardPolicy::kNone;
    }
    std::promise<absl::StatusOr<ExecutionInfo>> pa, pb;
    (*engine)->Submit(a.Request(), [&](absl::StatusOr<ExecutionInfo> r) { pa.set_value(r); });
    (*engine)->Submit(b.Request(), [&](absl::StatusOr<ExecutionInfo> r) { pb.set_value(r); });
    absl::StatusOr<ExecutionInfo> ra = pa.get_future().get(), rb = pb.get_future().get();
    ASSERT_TRUE(ra.ok() && rb.ok()) << ra.status() << " " << rb.status();
    ASSERT_EQ(ra->devices.size(), 1u);
    ASSERT_EQ(rb->devices.size(), 1u);
    const ExecutionInfo& first = ra->queue_time_us <= rb->queue_time_us ? *ra : *rb;
    const ExecutionInfo& second = ra->queue_time_us <= rb->queue_time_us ? *rb : *ra;
    std::printf("%d device(s): compute %lld and %lld us, the later one queued %lld us\n", devices,
                static_cast<long long>(first.compute_time_us),
                static_cast<long long>(second.compute_time_us),
                static_cast<long long>(second.queue_time_us));
    if (devices == 1) {
      // It waited for the whole of the first run.
      EXPECT_GE(second.queue_time_us, first.compute_time_us / 2);
    } else {
      EXPECT_NE(ra->devices[0], rb->devices[0]);
      // It did not wait for the first: it started while the first computed.
      EXPECT_LT(second.queue_time_us, first.compute_time_us / 2);
    }
  }
}

TEST(MultiDeviceTest, OverOneDeviceBudgetIsShardedUnderAutoAndRefusedUnderNone) {
  const ProblemShape shape{1, 2048, 4, 4, 32};
  EngineOptions options = Devices(2, 2);
  Inputs in = MakeInputs(shape, 9);
  in.spec.patterns = {{512, 1}, {2048, 4}};
  auto probe = Engine::Create(Devices(1, 1));
  ASSERT_TRUE(probe.ok());
  absl::StatusOr<MemoryEstimate> estimate =
      (*probe)->EstimateMemory(shape, DType::kFloat32, DType::kFloat32, in.spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  // One byte short of two wholes: the whole does not fit one device's half, while the shares'
  // copies of the inputs and the output and the two devices' plans (each about the whole's
  // workspace: a thread's buffers hold whole segments) fit the budget.
  ASSERT_GT(estimate->workspace, 0);
  options.memory_budget_bytes = 2 * estimate->total - 1;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();

  in.spec.shard_policy = ShardPolicy::kNone;
  absl::StatusOr<ExecutionInfo> refused = (*engine)->Run(in.Request());
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  const std::string message(refused.status().message());
  EXPECT_NE(message.find(absl::StrCat(estimate->total, " bytes")), std::string::npos) << message;
  EXPECT_NE(message.find(absl::StrCat(options.memory_budget_bytes / 2, " bytes")),
            std::string::npos)
      << message;
  EXPECT_EQ((*engine)->stats().rejected_memory, 1);

  // AUTO: across both devices. One batch, not causal: SEQUENCE, computed in place in the
  // request's memory (only the spanning rows are copied); causal: HEADS (even shares), copied.
  in.spec.shard_policy = ShardPolicy::kAuto;
  absl::StatusOr<ExecutionInfo> sharded = (*engine)->Run(in.Request());
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ(sharded->shard_strategy, ShardPolicy::kSequence);
  EXPECT_EQ(sharded->devices.size(), 2u);
  in.spec.causal = true;
  sharded = (*engine)->Run(in.Request());
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ(sharded->shard_strategy, ShardPolicy::kHeads);
  EXPECT_EQ(sharded->devices.size(), 2u);
}

// A run split over the local devices reserves every device's plan for its share: each device's
// threads hold whole segments, so the shares' plans add up to more than the whole problem's plan
// on one device, which was all it reserved (8.8 MB against 17.3 MB built, here). A caller that
// reserved for the whole request (a stream's chunk) gets the rest reserved by the engine.
TEST(MultiDeviceTest, ASplitRunReservesEveryDevicesPlan) {
  const int64_t n = 8192 / kLongRunScale;
  const ProblemShape shape{1, n, 4, 4, 64};
  EngineOptions options = Devices(2, 2);
  options.plan_cache_bytes = int64_t{1} << 30;  // Both share plans stay, to be counted.
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Inputs in = MakeInputs(shape, 21);
  in.spec.patterns = {{n, 1}};
  in.spec.causal = true;  // HEADS, copied shares.
  // Runs the request, with the caller's reservation if any; the most bytes reserved meanwhile.
  const auto run = [&](const MemoryReservation* reservation, ExecutionInfo* info) {
    std::atomic<bool> ran{false};
    int64_t most_reserved = 0;
    std::thread watcher([&] {
      while (!ran.load()) {
        most_reserved = std::max(most_reserved, (*engine)->stats().memory_reserved_bytes);
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
    RunRequest request = in.Request();
    request.reservation = reservation;
    const absl::StatusOr<ExecutionInfo> ran_info = (*engine)->Run(request);
    ran = true;
    watcher.join();
    EXPECT_TRUE(ran_info.ok()) << ran_info.status();
    if (ran_info.ok()) *info = *ran_info;
    return most_reserved;
  };
  ExecutionInfo first;
  const int64_t most_reserved = run(nullptr, &first);
  ASSERT_EQ(first.devices.size(), 2u);
  const absl::StatusOr<ShardLayout> layout =
      MakeShardLayout(shape, in.spec, first.shard_strategy, 2);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const int64_t tensors = (2 * shape.QueryShape().elements() + 2 * shape.KeyShape().elements()) *
                          DTypeSize(DType::kFloat32);
  const int64_t copies =
      LocalShardCopyBytes(shape, DType::kFloat32, DType::kFloat32, in.spec, *layout, true);
  const PlanCacheStats plans = (*engine)->plan_cache_stats();
  ASSERT_EQ(plans.entries, 2);
  EXPECT_GE(most_reserved - tensors - copies, plans.bytes)
      << "reserved " << most_reserved << ", tensors " << tensors << ", copies " << copies;

  const absl::StatusOr<MemoryEstimate> whole =
      (*engine)->EstimateMemory(shape, DType::kFloat32, DType::kFloat32, in.spec);
  ASSERT_TRUE(whole.ok()) << whole.status();
  absl::StatusOr<MemoryReservation> callers = (*engine)->ReserveMemory(whole->total, "a chunk");
  ASSERT_TRUE(callers.ok()) << callers.status();
  ExecutionInfo second;
  const int64_t with_callers = run(&*callers, &second);
  EXPECT_EQ(second.devices.size(), 2u);
  EXPECT_GE(with_callers - tensors - copies, plans.bytes)
      << "reserved " << with_callers << " with the caller's " << whole->total;
}

TEST(MultiDeviceTest, BadDeviceOptionsNameTheValue) {
  EngineOptions too_many = Devices(3, 2);
  absl::Status status = Engine::Create(too_many).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find(
                "cpu devices (--cpu-devices) is 3; must be in [1, 2], the compute threads"),
            std::string::npos)
      << status;
  EngineOptions unknown = Devices(1, 1);
  unknown.devices = {"cuda:7"};
  status = Engine::Create(unknown).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("device 'cuda:7' is not among"), std::string::npos) << status;
  EngineOptions second = Devices(2, 2);
  second.devices = {"cpu:1"};
  auto engine = Engine::Create(second);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_EQ((*engine)->devices().size(), 1u);
  EXPECT_EQ((*engine)->devices()[0].id, "cpu:1");
  EXPECT_FALSE((*engine)->devices()[0].precisions.empty());
}

TEST(CpuDevicesTest, ThreadsAreSplitEvenly) {
  absl::StatusOr<std::vector<CpuDevicePlan>> plans = PlanCpuDevices(7, 3, nullptr);
  ASSERT_TRUE(plans.ok()) << plans.status();
  ASSERT_EQ(plans->size(), 3u);
  EXPECT_EQ((*plans)[0].threads, 3);
  EXPECT_EQ((*plans)[1].threads, 2);
  EXPECT_EQ((*plans)[2].threads, 2);
  EXPECT_EQ((*plans)[2].info.id, "cpu:2");
  EXPECT_TRUE((*plans)[0].cpus.empty());
}

TEST(CpuDevicesTest, OneDevicePerNumaNodeFromSysfs) {
  const std::filesystem::path root =
      std::filesystem::temp_directory_path() / absl::StrCat("da_numa_", getpid());
  std::filesystem::create_directories(root / "node0");
  std::filesystem::create_directories(root / "node2");  // node1 offline: a gap.
  std::ofstream(root / "node0" / "cpulist") << "0-3,8-9\n";
  std::ofstream(root / "node2" / "cpulist") << "4-7\n";
  const std::vector<std::vector<int>> nodes = NumaNodeCpus(root.string());
  std::filesystem::remove_all(root);
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes[0], (std::vector<int>{0, 1, 2, 3, 8, 9}));
  EXPECT_EQ(nodes[1], (std::vector<int>{4, 5, 6, 7}));
  absl::StatusOr<std::vector<CpuDevicePlan>> plans = PlanCpuDevices(10, 1, &nodes);
  ASSERT_TRUE(plans.ok()) << plans.status();
  ASSERT_EQ(plans->size(), 2u);
  EXPECT_EQ((*plans)[0].threads, 6);
  EXPECT_EQ((*plans)[1].threads, 4);
  EXPECT_EQ((*plans)[1].cpus, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ((*plans)[1].info.id, "cpu:1");
  const std::vector<std::vector<int>> none;
  EXPECT_EQ(PlanCpuDevices(0, 1, &none).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCpuList("3-1").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCpuList("x").status().code(), absl::StatusCode::kInvalidArgument);
}

// Before, "numa" gave each node all its CPUs' threads whatever this process may use: in a
// container limited to 3 CPUs of a 2 x 32-CPU machine, 64 threads, half pinned where they could
// not run. Now the nodes are cut to the affinity mask, and --threads (by default the CPUs that
// remain, at most the CPU quota) is split over them.
TEST(CpuDevicesTest, NumaDevicesKeepToTheAffinityMaskAndTheThreads) {
  const std::vector<std::vector<int>> nodes = {{0, 1, 2, 3, 8, 9}, {4, 5, 6, 7}};
  // Threads split in proportion, one at least each: 7 over 6 and 4 CPUs.
  absl::StatusOr<std::vector<CpuDevicePlan>> plans = PlanCpuDevices(7, 1, &nodes);
  ASSERT_TRUE(plans.ok()) << plans.status();
  ASSERT_EQ(plans->size(), 2u);
  EXPECT_EQ((*plans)[0].threads, 4);
  EXPECT_EQ((*plans)[1].threads, 3);
  // Only the allowed CPUs, and by default one thread per allowed CPU, at most the quota's.
  const std::vector<int> allowed = {0, 1, 4};
  plans = PlanCpuDevices(3, 1, &nodes, &allowed);
  ASSERT_TRUE(plans.ok()) << plans.status();
  ASSERT_EQ(plans->size(), 2u);
  EXPECT_EQ((*plans)[0].cpus, (std::vector<int>{0, 1}));
  EXPECT_EQ((*plans)[0].threads, 2);
  EXPECT_EQ((*plans)[1].cpus, (std::vector<int>{4}));
  EXPECT_EQ((*plans)[1].threads, 1);
  plans = PlanCpuDevices(0, 1, &nodes, &allowed);
  ASSERT_TRUE(plans.ok()) << plans.status();
  int threads = 0;
  for (const CpuDevicePlan& plan : *plans) threads += plan.threads;
  EXPECT_EQ(threads, std::min(3, HostResourcesOfThisProcess().cpus));
  // A node with no allowed CPU is left out; the devices are numbered from 0.
  const std::vector<int> second_only = {5, 7};
  plans = PlanCpuDevices(0, 1, &nodes, &second_only);
  ASSERT_TRUE(plans.ok()) << plans.status();
  ASSERT_EQ(plans->size(), 1u);
  EXPECT_EQ((*plans)[0].cpus, (std::vector<int>{5, 7}));
  EXPECT_EQ((*plans)[0].info.id, "cpu:0");
  // Fewer threads than nodes: the largest node takes the one.
  plans = PlanCpuDevices(1, 1, &nodes);
  ASSERT_TRUE(plans.ok()) << plans.status();
  ASSERT_EQ(plans->size(), 1u);
  EXPECT_EQ((*plans)[0].cpus, nodes[0]);
  EXPECT_EQ((*plans)[0].threads, 1);
  // No node has an allowed CPU: refused, naming the mask.
  const std::vector<int> elsewhere = {20, 21};
  const absl::Status refused = PlanCpuDevices(0, 1, &nodes, &elsewhere).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("affinity mask (20,21)"), std::string::npos) << refused;
}

// This process's affinity mask, as the kernel reports it, is what HostResources counts.
TEST(CpuDevicesTest, AffinityCpusListsThisProcesssMask) {
  const std::vector<int> cpus = AffinityCpus();
  ASSERT_FALSE(cpus.empty());
  EXPECT_TRUE(std::is_sorted(cpus.begin(), cpus.end()));
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  EXPECT_EQ(static_cast<int>(cpus.size()), CPU_COUNT(&set));
}

// On this machine the real topology reads (at least one node on Linux with sysfs), and an engine
// with one device per node computes correctly with pinned threads.
TEST(CpuDevicesTest, NumaDevicesOnThisMachine) {
  if (NumaNodeCpus().empty()) GTEST_SKIP() << "no /sys/devices/system/node here";
  EngineOptions options;
  options.cpu_devices_numa = true;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  // One device per node with CPUs this process may use (all of them, unless a mask says not).
  const std::vector<std::vector<int>> nodes = NumaNodeCpus();
  const std::vector<int> allowed = AffinityCpus();
  absl::StatusOr<std::vector<CpuDevicePlan>> planned = PlanCpuDevices(0, 1, &nodes, &allowed);
  ASSERT_TRUE(planned.ok()) << planned.status();
  EXPECT_EQ((*engine)->devices().size(), planned->size());
  Inputs in = MakeInputs({1, 200, 2, 2, 16}, 4);
  in.spec.patterns = {{64, 2}};
  Inputs ref = MakeInputs({1, 200, 2, 2, 16}, 4);
  ref.spec = in.spec;
  ASSERT_TRUE((*engine)->Run(in.Request()).ok());
  auto single = Engine::Create(Devices(1, 1));
  ASSERT_TRUE(single.ok());
  ASSERT_TRUE((*single)->Run(ref.Request()).ok());
  EXPECT_LE(MaxRelativeError(in.out, ref.out), 1e-6);
}

}  // namespace
}  // namespace da::engine
