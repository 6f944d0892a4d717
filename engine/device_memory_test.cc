// Devices with memory of their own (issue #14), walked on CPU through the staged test backend
// (engine/testing/staged_backend.h: host compute, device-tagged and counted memory): each such
// device has its own memory account beside the host's; admission places a request on the device
// with room and reserves its bytes there; copies go in and out through the backend and a run
// never allocates past the device's memory; a request over one device's budget is sharded under
// AUTO and refused under NONE naming both numbers; the host account holds only host bytes.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <future>
#include <limits>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/engine.h"
#include "engine/test_tensors.h"
#include "engine/testing/staged_backend.h"

namespace da::engine {
namespace {

using testing::MaxRelativeError;
using testing::OwnedProblem;
using testing::StagedCountersOf;
using testing::StagedDevice;

// One CPU device of one thread and `count` staged devices of `memory` bytes each.
EngineOptions Staged(int count, int64_t memory) {
  testing::RegisterStagedBackend();
  testing::ResetStagedCounters();
  EngineOptions options;
  options.threads = 1;
  options.device_memory_fraction = 1.0;  // The budget is the device's memory: easy to reason.
  for (int i = 0; i < count; ++i) options.added_devices.push_back(StagedDevice(i, memory));
  return options;
}

// What an engine of `devices` staged devices (no budgets) estimates for fp32 in and out.
absl::StatusOr<MemoryEstimate> StagedEstimate(int devices, const ProblemShape& shape,
                                              const AttentionSpec& spec) {
  auto probe = Engine::Create(Staged(devices, 0));
  if (!probe.ok()) return probe.status();
  return (*probe)->EstimateMemory(shape, DType::kFloat32, DType::kFloat32, spec);
}

// `p` run as a stream's chunk runs: with a reservation of `reserved` host bytes of its caller's.
absl::StatusOr<ExecutionInfo> RunAsAStreamChunk(Engine& engine, OwnedProblem& p, int64_t reserved) {
  absl::StatusOr<MemoryReservation> host = engine.ReserveMemory(reserved, "stream");
  if (!host.ok()) return host.status();
  RunRequest request = p.Request();
  request.reservation = &*host;
  return engine.Run(request);
}

OwnedProblem Problem(const ProblemShape& shape, uint32_t seed, ShardPolicy policy) {
  OwnedProblem p = testing::RandomProblem(shape, seed);
  p.spec.patterns = {{64, 1}, {128, 2}, {512, 4}};
  p.spec.shard_policy = policy;
  return p;
}

// The same problem computed on the CPU alone.
OwnedProblem OnCpu(const OwnedProblem& problem) {
  OwnedProblem p = problem;
  p.out = testing::PoisonedTensor(p.out.dtype, p.out.shape);
  p.spec.shard_policy = ShardPolicy::kNone;
  EngineOptions options;
  options.threads = 1;
  auto engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  EXPECT_TRUE(info.ok()) << info.status();
  return p;
}

int64_t Bytes(const testing::OwnedTensor& t) { return static_cast<int64_t>(t.bytes.size()); }

TEST(DeviceMemoryTest, StagedDevicesTakeRequestsAndTheCpuOnlyThoseThatNameIt) {
  auto engine = Engine::Create(Staged(1, 0));
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_EQ((*engine)->devices().size(), 2u);
  EXPECT_EQ((*engine)->devices()[0].id, "cpu:0");
  EXPECT_EQ((*engine)->devices()[1].id, "staged:0");

  const ProblemShape shape{2, 300, 4, 2, 16};
  OwnedProblem p = Problem(shape, 3, ShardPolicy::kAuto);
  const OwnedProblem expected = OnCpu(p);
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend, "staged");
  ASSERT_EQ(info->devices, std::vector<std::string>{"staged:0"});
  EXPECT_EQ(info->shard_strategy, ShardPolicy::kNone);
  // The same kernel on the same rows: the same numbers.
  EXPECT_EQ(MaxRelativeError(p.out, expected.out), 0);
  // Whole tensors in and out through the backend, straight from and into the caller's memory.
  const testing::StagedCounters counters = StagedCountersOf(0);
  EXPECT_EQ(counters.bytes_in, Bytes(p.q) + Bytes(p.k) + Bytes(p.v));
  EXPECT_EQ(counters.bytes_out, Bytes(p.out));
  EXPECT_EQ(counters.shares_run, 1);
  EXPECT_EQ(counters.live_bytes, 0);  // Every device buffer is released.

  // Named, the CPU computes it.
  OwnedProblem named = Problem(shape, 3, ShardPolicy::kAuto);
  RunRequest request = named.Request();
  request.device = "cpu:0";
  info = (*engine)->Run(request);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend, "cpu");
  EXPECT_EQ(info->devices, std::vector<std::string>{"cpu:0"});
  EXPECT_EQ(MaxRelativeError(named.out, expected.out), 0);

  // The second run of the shape finds its plan warm on the device.
  OwnedProblem again = Problem(shape, 4, ShardPolicy::kAuto);
  info = (*engine)->Run(again.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->plan_cache_hit);
}

// A request the value check refuses on a device gives the device back. Before, the device stayed
// counted as running for good, and admission, which ranks devices of equal room by their runs,
// sent every later request elsewhere.
TEST(DeviceMemoryTest, ARequestRefusedOnADeviceGivesItBack) {
  auto engine = Engine::Create(Staged(2, 0));  // No budgets: equal room, ranked by runs.
  ASSERT_TRUE(engine.ok()) << engine.status();
  const ProblemShape shape{1, 256, 2, 2, 16};
  for (int i = 0; i < 3; ++i) {
    OwnedProblem bad = Problem(shape, 20 + i, ShardPolicy::kNone);
    reinterpret_cast<float*>(bad.k.bytes.data())[i] = std::numeric_limits<float>::quiet_NaN();
    RunRequest request = bad.Request();
    request.device = "staged:0";
    const absl::StatusOr<ExecutionInfo> refused = (*engine)->Run(request);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  }
  OwnedProblem good = Problem(shape, 30, ShardPolicy::kNone);
  const absl::StatusOr<ExecutionInfo> info = (*engine)->Run(good.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->devices, std::vector<std::string>{"staged:0"});
}

TEST(DeviceMemoryTest, EachDeviceHasItsOwnAccountAndTheHostHoldsOnlyHostBytes) {
  const ProblemShape shape{1, 512, 4, 4, 32};
  OwnedProblem p = Problem(shape, 5, ShardPolicy::kNone);
  EngineOptions options = Staged(2, 0);
  auto probe = Engine::Create(options);
  ASSERT_TRUE(probe.ok()) << probe.status();
  absl::StatusOr<MemoryEstimate> estimate =
      (*probe)->EstimateMemory(shape, DType::kFloat32, DType::kFloat32, p.spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  EXPECT_FALSE(estimate->workspace_on_host);
  ASSERT_GT(estimate->workspace, 0);
  EXPECT_EQ(estimate->total, Bytes(p.q) + Bytes(p.k) + Bytes(p.v) + Bytes(p.out));
  EXPECT_EQ(estimate->device, estimate->total + estimate->workspace);
  EXPECT_NE(estimate->ToString().find("in the device's"), std::string::npos)
      << estimate->ToString();

  // A host budget of exactly the host bytes admits the request: the workspace is the device's.
  options = Staged(2, estimate->device);
  options.memory_budget_bytes = estimate->total;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const EngineStats idle = (*engine)->stats();
  EXPECT_EQ(idle.device_memory_account.at("cpu:0"), "host");
  EXPECT_EQ(idle.device_memory_account.at("staged:1"), "staged:1");
  EXPECT_EQ(idle.device_memory_budget_bytes.at("staged:0"), estimate->device);
  EXPECT_EQ(idle.device_memory_budget_bytes.at("cpu:0"), estimate->total);
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  // The run's device buffers (q, k, v and the output) fit what was reserved on it.
  EXPECT_LE(StagedCountersOf(0).peak_bytes, estimate->device);
  EXPECT_EQ(StagedCountersOf(0).refused_allocations, 0);
  const EngineStats after = (*engine)->stats();
  for (const auto& [id, reserved] : after.device_memory_reserved_bytes) {
    EXPECT_EQ(reserved, 0) << id << " keeps bytes after the run";
  }
}

// Long requests at once spread over the devices (each to the one with the most room, where its
// bytes are reserved); when no device has room, the next is refused naming its device bytes and
// the budget.
TEST(DeviceMemoryTest, AdmissionPlacesRequestsOnTheDeviceWithRoom) {
  const ProblemShape shape{1, 16384, 4, 4, 64};
  OwnedProblem a = Problem(shape, 7, ShardPolicy::kNone);
  a.spec.patterns = {{4096, 1}};  // About 70 GFLOP: seconds on one thread.
  EngineOptions options = Staged(2, 0);
  auto probe = Engine::Create(options);
  ASSERT_TRUE(probe.ok()) << probe.status();
  absl::StatusOr<MemoryEstimate> estimate =
      (*probe)->EstimateMemory(shape, DType::kFloat32, DType::kFloat32, a.spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  probe->reset();

  // Room for two such requests per device, not three.
  const int64_t budget = 2 * estimate->device + estimate->device / 2;
  options = Staged(2, budget);
  options.max_concurrent_runs = 2;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::atomic<bool> stop{false};
  std::vector<OwnedProblem> problems(5, a);
  std::vector<std::promise<absl::StatusOr<ExecutionInfo>>> done(4);
  const auto submit = [&](int i) {
    RunRequest request = problems[i].Request();
    request.cancelled = &stop;
    (*engine)->Submit(request, [&, i](absl::StatusOr<ExecutionInfo> r) { done[i].set_value(r); });
  };
  const auto reserved = [&](const char* id) {
    return (*engine)->stats().device_memory_reserved_bytes.at(id);
  };
  submit(0);
  submit(1);
  EXPECT_EQ(reserved("staged:0"), estimate->device);  // Not both on the first device.
  EXPECT_EQ(reserved("staged:1"), estimate->device);
  submit(2);
  submit(3);
  EXPECT_EQ(reserved("staged:0"), 2 * estimate->device);
  EXPECT_EQ(reserved("staged:1"), 2 * estimate->device);
  absl::StatusOr<ExecutionInfo> refused = absl::UnknownError("not called");
  (*engine)->Submit(problems[4].Request(), [&](absl::StatusOr<ExecutionInfo> r) { refused = r; });
  ASSERT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  EXPECT_EQ(RejectReasonOf(refused.status()), RejectReason::kMemory);
  const std::string message(refused.status().message());
  EXPECT_NE(message.find(absl::StrCat(estimate->device, " bytes in device memory")),
            std::string::npos)
      << message;
  EXPECT_NE(message.find(absl::StrCat(budget)), std::string::npos) << message;
  stop = true;
  for (auto& d : done) EXPECT_TRUE(absl::IsCancelled(d.get_future().get().status()));
  EXPECT_EQ((*engine)->stats().rejected_memory, 1);
  EXPECT_EQ(reserved("staged:0"), 0);
  EXPECT_EQ(reserved("staged:1"), 0);
  for (int d = 0; d < 2; ++d) EXPECT_EQ(StagedCountersOf(d).refused_allocations, 0);
}

// Over one device's budget: AUTO shards it across both (equal to one device's result, every
// device within its memory), NONE is refused naming the request's device bytes and the budget.
TEST(DeviceMemoryTest, ARequestOverOneDeviceIsShardedOrRefused) {
  const ProblemShape shape{1, 2048, 4, 2, 32};
  OwnedProblem p = Problem(shape, 9, ShardPolicy::kNone);
  const absl::StatusOr<MemoryEstimate> estimate = StagedEstimate(2, shape, p.spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  const OwnedProblem expected = OnCpu(p);

  const int64_t budget = estimate->device * 3 / 4;
  auto engine = Engine::Create(Staged(2, budget));
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  ASSERT_TRUE(absl::IsResourceExhausted(info.status())) << info.status();
  const std::string message(info.status().message());
  EXPECT_NE(message.find(absl::StrCat(estimate->device)), std::string::npos) << message;
  EXPECT_NE(message.find(absl::StrCat(budget, " bytes")), std::string::npos) << message;

  for (const ShardPolicy policy :
       {ShardPolicy::kAuto, ShardPolicy::kHeads, ShardPolicy::kSequence}) {
    SCOPED_TRACE(ShardPolicyName(policy));
    testing::ResetStagedCounters();
    OwnedProblem sharded = p;
    sharded.out = testing::PoisonedTensor(p.out.dtype, p.out.shape);
    sharded.spec.shard_policy = policy;
    info = (*engine)->Run(sharded.Request());
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->devices, (std::vector<std::string>{"staged:0", "staged:1"}));
    EXPECT_NE(info->shard_strategy, ShardPolicy::kNone);
    EXPECT_LE(MaxRelativeError(sharded.out, expected.out), 1e-6);
    for (int d = 0; d < 2; ++d) {
      const testing::StagedCounters counters = StagedCountersOf(d);
      EXPECT_EQ(counters.shares_run, 1) << d;
      EXPECT_GT(counters.bytes_in, 0) << d;
      EXPECT_LE(counters.peak_bytes, budget) << d;
      EXPECT_EQ(counters.refused_allocations, 0) << d;
    }
  }
}

// What each device's run reports (RunContext::report; the CUDA backend's fp8 scales) reaches
// ExecutionInfo::fp8_scales once per device, named by it: two staged devices share a request by
// heads, each head scaled differently, so each share's amax of q, k and v is its own.
TEST(DeviceMemoryTest, EachDevicesRunReportReachesTheExecutionInfo) {
  const ProblemShape shape{1, 1024, 4, 2, 32};
  OwnedProblem p = Problem(shape, 12, ShardPolicy::kHeads);
  // q's head h times h + 1, k's and v's head g times 2g + 1.
  const auto scale_heads = [](testing::OwnedTensor& t, int64_t heads, int64_t d, int per) {
    for (int64_t i = 0; i < t.elements(); ++i) {
      const int64_t h = (i / d) % heads;
      StoreFromFloat(t.dtype, t.bytes.data(), i, t.at(i) * static_cast<float>(per * h + 1));
    }
  };
  scale_heads(p.q, shape.heads, shape.head_dim, 1);
  scale_heads(p.k, shape.kv_heads, shape.head_dim, 2);
  scale_heads(p.v, shape.kv_heads, shape.head_dim, 2);
  // The largest |x| over heads [h0, h1) of a tensor of `heads` heads.
  const auto amax = [](const testing::OwnedTensor& t, int64_t heads, int64_t d, int64_t h0,
                       int64_t h1) {
    float most = 0.0f;
    for (int64_t i = 0; i < t.elements(); ++i) {
      const int64_t h = (i / d) % heads;
      if (h >= h0 && h < h1) most = std::max(most, std::fabs(t.at(i)));
    }
    return most;
  };
  auto engine = Engine::Create(Staged(2, 0));
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<ExecutionInfo> plain = (*engine)->Run(p.Request());
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_TRUE(plain->fp8_scales.empty()) << "no run reported anything";

  testing::SetStagedReportsAmax(true);
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  testing::SetStagedReportsAmax(false);
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->devices, (std::vector<std::string>{"staged:0", "staged:1"}));
  ASSERT_EQ(info->fp8_scales.size(), 2u);
  for (int s = 0; s < 2; ++s) {  // Share s: query heads 2s, 2s + 1, kv head s.
    const ExecutionInfo::Fp8Scales& got = info->fp8_scales[s];
    EXPECT_EQ(got.device, info->devices[s]);
    EXPECT_EQ(got.amax[0], amax(p.q, shape.heads, shape.head_dim, 2 * s, 2 * s + 2)) << s;
    EXPECT_EQ(got.amax[1], amax(p.k, shape.kv_heads, shape.head_dim, s, s + 1)) << s;
    EXPECT_EQ(got.amax[2], amax(p.v, shape.kv_heads, shape.head_dim, s, s + 1)) << s;
    for (int i = 0; i < 3; ++i) EXPECT_FLOAT_EQ(got.scale[i], 448.0f / got.amax[i]) << s;
  }
  EXPECT_GT(info->fp8_scales[1].amax[0], info->fp8_scales[0].amax[0]);
}

// A device that computed in another precision than the chosen one (RunReport::fallback) is named
// in the reason with what it computed and why; the precision reported is the least precise any
// device computed, as the result is as precise as its least precise share.
TEST(DeviceMemoryTest, FallbacksAreReportedWithTheDevicesThatFellBack) {
  const ProblemShape shape{1, 1024, 4, 2, 32};
  const OwnedProblem p = Problem(shape, 14, ShardPolicy::kHeads);
  auto engine = Engine::Create(Staged(2, 0));
  ASSERT_TRUE(engine.ok()) << engine.status();
  struct Case {
    unsigned devices;
    Precision chosen, fallback, used;
    std::string reason;
  };
  const std::string why = " (staged test fallback)";
  const Case cases[] = {
      // staged:2 is not in the run: nobody fell back.
      {4, Precision::kBFloat16, Precision::kFloat32, Precision::kBFloat16, "staged: bf16"},
      // One device more precise: still bf16, saying which device computed what.
      {2, Precision::kBFloat16, Precision::kFloat32, Precision::kBFloat16,
       "staged: bf16; staged:1 computed fp32" + why},
      {3, Precision::kBFloat16, Precision::kFloat32, Precision::kFloat32,
       "fallback: computed fp32, not bf16 (staged: bf16); staged:0 computed fp32" + why +
           ", staged:1 computed fp32" + why},
      // fp8 refused on one device (bf16 there): the result is still fp8's.
      {1, Precision::kFloat8, Precision::kBFloat16, Precision::kFloat8,
       "staged: fp8; staged:0 computed bf16" + why},
      {3, Precision::kFloat8, Precision::kBFloat16, Precision::kBFloat16,
       "fallback: computed bf16, not fp8 (staged: fp8); staged:0 computed bf16" + why +
           ", staged:1 computed bf16" + why},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.reason);
    testing::SetStagedFallbacks(c.devices, c.chosen, c.fallback);
    OwnedProblem run = p;
    absl::StatusOr<ExecutionInfo> info = (*engine)->Run(run.Request());
    testing::SetStagedFallbacks(0);
    ASSERT_TRUE(info.ok()) << info.status();
    ASSERT_EQ(info->devices, (std::vector<std::string>{"staged:0", "staged:1"}));
    EXPECT_EQ(info->precision_used, c.used);
    EXPECT_EQ(info->precision_reason, c.reason);
  }
}

// A caller that reserved the host bytes itself (a stream) still has the device bytes reserved
// by the engine: a device too small for the chunk refuses it.
TEST(DeviceMemoryTest, ACallersHostReservationDoesNotCoverTheDevice) {
  const ProblemShape shape{1, 1024, 2, 2, 32};
  OwnedProblem p = Problem(shape, 13, ShardPolicy::kNone);
  const absl::StatusOr<MemoryEstimate> estimate = StagedEstimate(1, shape, p.spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();

  auto engine = Engine::Create(Staged(1, estimate->device - 1));
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<ExecutionInfo> info = RunAsAStreamChunk(**engine, p, estimate->total);
  ASSERT_TRUE(absl::IsResourceExhausted(info.status())) << info.status();
  EXPECT_NE(info.status().message().find(absl::StrCat(estimate->device - 1)), std::string::npos)
      << info.status();
  EXPECT_EQ(StagedCountersOf(0).allocations, 0);  // Refused before any device memory was taken.
}

// A caller's reservation (a stream's chunk: the request computed whole) does not cover the host
// copies that a run split over devices stages its shares through: the engine reserves the rest,
// and refuses the run when the host budget cannot hold it. Before, a split over devices with
// memory of their own used those bytes unreserved.
TEST(DeviceMemoryTest, ACallersReservationIsToppedUpForTheCopiesOfASplitRun) {
  const ProblemShape shape{1, 2048, 4, 2, 32};
  OwnedProblem p = Problem(shape, 15, ShardPolicy::kHeads);
  const absl::StatusOr<MemoryEstimate> estimate = StagedEstimate(2, shape, p.spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();

  // Neither device holds the request alone, and the host budget is the caller's reservation.
  EngineOptions options = Staged(2, estimate->device * 3 / 4);
  options.memory_budget_bytes = estimate->total;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<ExecutionInfo> info = RunAsAStreamChunk(**engine, p, estimate->total);
  ASSERT_TRUE(absl::IsResourceExhausted(info.status())) << info.status();
  EXPECT_NE(
      info.status().message().find(absl::StrCat(" bytes beyond the caller's ", estimate->total,
                                                " for a run split over 2 "
                                                "devices")),
      std::string::npos)
      << info.status();
  EXPECT_EQ(StagedCountersOf(0).allocations, 0);

  // With room for the copies on the host, it runs split, and gives the top-up back.
  options.memory_budget_bytes = 0;
  engine->reset();
  engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  info = RunAsAStreamChunk(**engine, p, estimate->total);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->devices, (std::vector<std::string>{"staged:0", "staged:1"}));
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);
}

}  // namespace
}  // namespace da::engine
