// Engine: validation before compute, queued runs on a dispatcher thread, cancellation, backends.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <random>
#include <thread>

#include "engine/cpu/cpu_backend.h"
#include "engine/test_tensors.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

using Inputs = testing::OwnedProblem;

EngineOptions Options(int threads, const std::string& backend = "cpu") {
  EngineOptions options;
  options.threads = threads;
  options.backend = backend;
  return options;
}

Inputs MakeInputs(Shape4 shape, uint32_t seed) {
  Inputs in = testing::RandomProblem(
      {shape.batch, shape.seq_len, shape.heads, shape.heads, shape.head_dim}, seed);
  in.spec.patterns = {{16, 1}, {32, 2}};
  return in;
}

TEST(EngineTest, CpuAndReferenceBackendsAgree) {
  auto cpu = Engine::Create(Options(2));
  auto reference = Engine::Create(Options(2, "reference"));
  ASSERT_TRUE(cpu.ok() && reference.ok());
  Inputs a = MakeInputs({1, 100, 4, 8}, 1);
  Inputs b = MakeInputs({1, 100, 4, 8}, 1);
  absl::StatusOr<ExecutionInfo> info = (*cpu)->Run(a.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend, "cpu");
  EXPECT_EQ(info->precision_used, Precision::kFloat32);
  EXPECT_EQ(info->devices, std::vector<std::string>{"cpu:0"});
  ASSERT_TRUE((*reference)->Run(b.Request()).ok());
  EXPECT_EQ(testing::Compare(a.out, b.out, testing::ToleranceFor(DType::kFloat32)), "");
}

// One Submit's outcome, as its callback saw it.
struct Submitted {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  std::thread::id thread;
  std::chrono::steady_clock::time_point called;  // When the callback began.
  absl::StatusOr<ExecutionInfo> result = absl::UnknownError("not run");

  RunCallback Callback() {
    return [this](absl::StatusOr<ExecutionInfo> info) {
      const auto now = std::chrono::steady_clock::now();
      std::lock_guard<std::mutex> lock(mutex);
      called = now;
      thread = std::this_thread::get_id();
      result = std::move(info);
      done = true;
      cv.notify_one();
    };
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mutex);
    return cv.wait_for(lock, std::chrono::seconds(120), [&] { return done; });
  }
};

int64_t Micros(std::chrono::steady_clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

TEST(EngineTest, SubmitRunsOnADispatcherThreadAndReportsTimes) {
  // One dispatcher, one compute thread, first come first served: `busy` starts at once on the
  // idle engine, and `queued`, submitted right after it, waits until busy's callback returned.
  EngineOptions options = Options(1);
  options.max_concurrent_runs = 1;
  options.queue_order = QueueOrder::kArrival;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  // 4096 queries attending to all 4096 keys, 4 heads of 64 dims: 17 GFLOP, a quarter of a second
  // or more on one core.
  Inputs busy_in = MakeInputs({1, 4096, 4, 64}, 2);
  busy_in.spec.patterns = {{4096, 1}};
  Inputs queued_in = MakeInputs({1, 64, 2, 8}, 3);
  Submitted busy, queued;
  const auto before = std::chrono::steady_clock::now();
  (*engine)->Submit(busy_in.Request(), busy.Callback());
  (*engine)->Submit(queued_in.Request(), queued.Callback());
  const auto submitted = std::chrono::steady_clock::now();
  ASSERT_TRUE(busy.Wait());
  ASSERT_TRUE(queued.Wait());
  ASSERT_TRUE(busy.result.ok()) << busy.result.status();
  ASSERT_TRUE(queued.result.ok()) << queued.result.status();
  EXPECT_NE(busy.thread, std::this_thread::get_id());
  EXPECT_NE(queued.thread, std::this_thread::get_id());
  EXPECT_GT(busy.result->compute_time_us, 0);
  EXPECT_GT(queued.result->compute_time_us, 0);
  for (int64_t i = 0; i < busy_in.out.elements(); ++i)
    ASSERT_TRUE(std::isfinite(busy_in.out.at(i)));
  for (int64_t i = 0; i < queued_in.out.elements(); ++i) {
    ASSERT_TRUE(std::isfinite(queued_in.out.at(i)));
  }

  // The queued request entered the queue before Submit returned and left it after the busy one's
  // callback: its queue time covers at least that span, which is about busy's compute time.
  const ExecutionInfo& b = *busy.result;
  const ExecutionInfo& q = *queued.result;
  EXPECT_GE(q.queue_time_us, Micros(busy.called - submitted))
      << "busy computed " << b.compute_time_us << " us";
  EXPECT_GE(q.queue_time_us, b.compute_time_us / 2)
      << "busy computed " << b.compute_time_us << " us";
  // The busy request ran at once: queue, plan build and compute fit in the time from Submit to its
  // callback, and its wait was small next to its compute and to the queued request's wait.
  EXPECT_LE(b.queue_time_us + b.plan_build_time_us + b.compute_time_us,
            Micros(busy.called - before));
  EXPECT_LT(b.queue_time_us, b.compute_time_us / 4)
      << "busy computed " << b.compute_time_us << " us";
  EXPECT_LT(b.queue_time_us, q.queue_time_us / 4);
  EXPECT_LE(q.queue_time_us + q.plan_build_time_us + q.compute_time_us,
            Micros(queued.called - before));
}

TEST(EngineTest, SubmitReportsValidationErrorsWithoutComputing) {
  auto engine = Engine::Create({});
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 8, 2, 4}, 3);
  in.spec.patterns = {{4, 9}};
  absl::Status status;
  (*engine)->Submit(in.Request(),
                    [&](absl::StatusOr<ExecutionInfo> info) { status = info.status(); });
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*engine)->pending(), 0);
}

TEST(EngineTest, OutputMustMatchQueryShape) {
  auto engine = Engine::Create({});
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 8, 2, 4}, 4);
  RunRequest request = in.Request();
  request.out.shape.heads = 1;
  EXPECT_EQ((*engine)->Run(request).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, CancelledRequestReturnsCancelled) {
  auto engine = Engine::Create(Options(1));
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 64, 2, 8}, 5);
  std::atomic<bool> cancelled{true};
  RunRequest request = in.Request();
  request.cancelled = &cancelled;
  EXPECT_EQ((*engine)->Run(request).status().code(), absl::StatusCode::kCancelled);
}

TEST(EngineTest, UnsupportedPrecisionNamesWhatIsSupported) {
  auto engine = Engine::Create({});
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 8, 2, 4}, 6);
  in.spec.precision = Precision::kFloat8;
  const absl::Status status = (*engine)->Run(in.Request()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("fp8"), std::string::npos);
}

TEST(EngineTest, ReportsThePrecisionTheBackendChose) {
  auto engine = Engine::Create(Options(1));
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 32, 2, 16}, 7);
  in.spec.precision = Precision::kAuto;
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  // bf16 where the CPU's bf16 kernel beats fp32 (CpuBackendTest says when).
  const bool bf16 = CpuBackend().Precisions().front() == Precision::kBFloat16;
  EXPECT_EQ(info->precision_used, bf16 ? Precision::kBFloat16 : Precision::kFloat32);
  EXPECT_NE(info->precision_reason.find("auto"), std::string::npos) << info->precision_reason;
}

TEST(EngineTest, SecondRunOfAShapeHitsThePlanCache) {
  auto engine = Engine::Create(Options(2));
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 300, 4, 16}, 8);
  absl::StatusOr<ExecutionInfo> first = (*engine)->Run(in.Request());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->plan_cache_hit);
  EXPECT_GT(first->plan_build_time_us, 0);
  const std::vector<uint8_t> cold = in.out.bytes;
  absl::StatusOr<ExecutionInfo> second = (*engine)->Run(in.Request());
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(second->plan_cache_hit);
  EXPECT_EQ(second->plan_build_time_us, 0);
  EXPECT_EQ(in.out.bytes, cold) << "a warm plan must give the same bytes";
  // A different shape is a different plan.
  Inputs other = MakeInputs({1, 301, 4, 16}, 9);
  EXPECT_FALSE((*engine)->Run(other.Request())->plan_cache_hit);
  const PlanCacheStats stats = (*engine)->plan_cache_stats();
  EXPECT_EQ(stats.hits, 1);
  EXPECT_EQ(stats.misses, 2);
  EXPECT_EQ(stats.entries, 2);
  EXPECT_GT(stats.bytes, 0);
}

TEST(EngineTest, WarmUpMakesTheFirstRequestAHit) {
  auto engine = Engine::Create(Options(2));
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({2, 500, 4, 32}, 10);
  const ProblemShape shape{2, 500, 4, 4, 32};
  absl::StatusOr<WarmUpResult> warm =
      (*engine)->WarmUp(shape, DType::kFloat32, DType::kFloat32, in.spec);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_FALSE(warm->already_warm);
  EXPECT_GT(warm->plan_bytes, 0);
  EXPECT_TRUE((*engine)->WarmUp(shape, DType::kFloat32, DType::kFloat32, in.spec)->already_warm);
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->plan_cache_hit);
  // Warm-up validates like a request does.
  AttentionSpec bad = in.spec;
  bad.patterns = {{4, 9}};
  EXPECT_EQ((*engine)->WarmUp(shape, DType::kFloat32, DType::kFloat32, bad).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, PrecisionFallbackUsesTheNearestSupportedPrecision) {
  EngineOptions options = Options(1);
  options.precision.fallback = true;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 64, 2, 8}, 12);
  in.spec.precision = Precision::kFloat8;  // No CPU computes in fp8.
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_NE(info->precision_used, Precision::kFloat8);
  EXPECT_EQ(info->precision_reason.rfind("fallback", 0), 0u) << info->precision_reason;
}

TEST(EngineTest, ZeroPlanCacheBudgetStillComputes) {
  EngineOptions options = Options(1);
  options.plan_cache_bytes = 0;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 64, 2, 8}, 11);
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
    ASSERT_TRUE(info.ok());
    EXPECT_FALSE(info->plan_cache_hit);
  }
  EXPECT_EQ((*engine)->plan_cache_stats().entries, 0);
  EXPECT_EQ((*engine)->plan_cache_stats().evictions, 2);
  // A warmed plan that does not fit the budget is not kept either.
  ASSERT_TRUE((*engine)->WarmUp({1, 64, 2, 2, 8}, DType::kFloat32, DType::kFloat32, in.spec).ok());
  EXPECT_EQ((*engine)->plan_cache_stats().entries, 0);
}

// A fresh plan larger than the cache stays while its run uses it; a run cancelled mid-compute
// must still give it up, or its memory stays held while admission counts it free.
TEST(EngineTest, ACancelledRunLeavesThePlanCacheWithinItsBudget) {
  EngineOptions options = Options(2);
  options.plan_cache_bytes = 1 << 20;  // The plan's per-thread buffers alone take 16 MiB.
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  Inputs in = MakeInputs({1, 8192, 8, 64}, 13);
  in.spec.patterns = {{8192, 1}};  // About 137 GFLOP: far longer than the cancel takes.
  std::atomic<bool> cancelled{false};
  std::atomic<bool> ran{false};
  std::thread canceller([&] {
    // Cancels once the plan is in the cache, that is while its run computes.
    while (!ran.load() && (*engine)->plan_cache_stats().entries == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    cancelled = true;
  });
  RunRequest request = in.Request();
  request.cancelled = &cancelled;
  const absl::StatusOr<ExecutionInfo> info = (*engine)->Run(request);
  ran = true;
  canceller.join();
  EXPECT_EQ(info.status().code(), absl::StatusCode::kCancelled) << info.status();
  const PlanCacheStats stats = (*engine)->plan_cache_stats();
  EXPECT_EQ(stats.builds, 1);
  EXPECT_EQ(stats.entries, 0);
  EXPECT_LE(stats.bytes, stats.capacity_bytes);
}

TEST(EngineTest, UnknownBackendAndBadOptionsAreRefused) {
  EXPECT_EQ(Engine::Create(Options(0, "tpu")).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(Options(-1)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, DevicesListTheCpuFirst) {
  auto engine = Engine::Create(Options(3));
  ASSERT_TRUE(engine.ok());
  const std::vector<DeviceInfo>& devices = (*engine)->devices();
  ASSERT_FALSE(devices.empty());
  EXPECT_EQ(devices[0].id, "cpu:0");
  EXPECT_EQ(devices[0].compute_units, 3);
  EXPECT_GT(devices[0].memory_bytes, 0);
}

TEST(EngineTest, DeviceBusySecondsSumTheComputeTimeOfRunsOnThatDevice) {
  auto engine = Engine::Create(Options(2));
  ASSERT_TRUE(engine.ok());
  // Every device is listed from the start, at zero.
  const EngineStats before = (*engine)->stats();
  ASSERT_EQ(before.device_busy_seconds.size(), (*engine)->devices().size());
  for (const DeviceInfo& device : (*engine)->devices()) {
    EXPECT_EQ(before.device_busy_seconds.at(device.id), 0) << device.id;
  }

  // Two runs of a few milliseconds each; the busy time lies between their compute times and the
  // wall time around them.
  Inputs in = MakeInputs({1, 2048, 4, 32}, 7);
  in.spec.patterns = {{2048, 1}};
  const auto start = std::chrono::steady_clock::now();
  double compute_seconds = 0;
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<ExecutionInfo> info = (*engine)->Run(in.Request());
    ASSERT_TRUE(info.ok()) << info.status();
    compute_seconds += info->compute_time_us / 1e6;
  }
  const double wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double busy = (*engine)->stats().device_busy_seconds.at("cpu:0");
  EXPECT_GT(compute_seconds, 0);
  EXPECT_GE(busy, compute_seconds);
  EXPECT_LE(busy, wall_seconds);
}

}  // namespace
}  // namespace da::engine
