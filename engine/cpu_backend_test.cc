// The CPU backend against the fp64 reference over the sweep of issue #2: N, pattern sets (w > N,
// r not dividing w, partial last segments), heads with GQA, causal, both combine modes and all
// three dtypes. Fresh random inputs per case; outputs poisoned with NaN before each run.
//
// Tolerances (testing::ToleranceFor): the CPU output stored in the input dtype is compared with the
// reference rendered in fp32 — fp32: 1e-5 + 1e-4|ref|; fp16: 1e-4 + 1e-3|ref| (half an ulp is
// 4.9e-4 relative); bf16: 1e-3 + 8e-3|ref| (half an ulp is 3.9e-3 relative).
#include "engine/cpu/cpu_backend.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/reference/reference_backend.h"
#include "engine/test_tensors.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

struct HeadConfig {
  int64_t heads;
  int64_t kv_heads;
};

const std::vector<std::vector<Pattern>>& PatternSets() {
  static const auto* sets = new std::vector<std::vector<Pattern>>{
      {{8, 1}},                     // Dense segments, partial last segment for most N.
      {{16, 1}, {32, 2}, {64, 4}},  // LongNet-style geometric set.
      {{10, 3}, {100, 7}},          // r does not divide w.
      {{64, 1}, {5000, 40}},        // w > N for every N in the sweep.
  };
  return *sets;
}

using SweepParam = std::tuple<int64_t /*seq_len*/, int /*pattern set*/, HeadConfig, bool /*causal*/,
                              CombineMode, DType>;

class CpuBackendSweepTest : public ::testing::TestWithParam<SweepParam> {
 protected:
  void SetUp() override {
    const std::string missing = testing::MissingRequestedIsa();
    if (!missing.empty()) GTEST_SKIP() << missing;
  }
};

TEST_P(CpuBackendSweepTest, MatchesReference) {
  const auto& [seq_len, set_index, heads, causal, mode, dtype] = GetParam();
  AttentionSpec spec;
  spec.patterns = PatternSets()[set_index];
  spec.causal = causal;
  spec.mode = mode;
  spec.precision = Precision::kFloat32;
  const int64_t head_dim = 16;
  const Shape4 q_shape{2, seq_len, heads.heads, head_dim};
  const Shape4 kv_shape{2, seq_len, heads.kv_heads, head_dim};
  std::mt19937 rng(static_cast<uint32_t>(seq_len * 131 + set_index * 17 + heads.heads));
  const OwnedTensor q = testing::RandomTensor(dtype, q_shape, rng);
  const OwnedTensor k = testing::RandomTensor(dtype, kv_shape, rng);
  const OwnedTensor v = testing::RandomTensor(dtype, kv_shape, rng);

  static ThreadPool pool(3);  // More threads than this machine's cores: exercises the hand-out.
  OwnedTensor expected = testing::PoisonedTensor(DType::kFloat32, q_shape);
  ReferenceBackend reference;
  ASSERT_TRUE(
      reference.Run(q.view(), k.view(), v.view(), spec, expected.mutable_view(), {&pool}).ok());
  OwnedTensor actual = testing::PoisonedTensor(dtype, q_shape);
  CpuBackend cpu;
  ASSERT_TRUE(cpu.Run(q.view(), k.view(), v.view(), spec, actual.mutable_view(), {&pool}).ok());
  EXPECT_EQ(testing::Compare(actual, expected, testing::ToleranceFor(dtype)), "");
}

std::string SweepName(const ::testing::TestParamInfo<SweepParam>& info) {
  const auto& [n, set, h, causal, mode, dtype] = info.param;
  return absl::StrCat("N", n, "_set", set, "_H", h.heads, "kv", h.kv_heads,
                      causal ? "_causal_" : "_full_", CombineModeName(mode), "_", DTypeName(dtype));
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, CpuBackendSweepTest,
    ::testing::Combine(::testing::Values(1, 5, 64, 1000, 4097), ::testing::Values(0, 1, 2, 3),
                       ::testing::Values(HeadConfig{1, 1}, HeadConfig{3, 1}, HeadConfig{8, 2},
                                         HeadConfig{8, 8}),
                       ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16)),
    SweepName);

TEST(CpuBackendTest, SegmentsLargerThanTheTilesMatchReference) {
  // Kept counts above the 32 x 128 tiles, with a custom scale and fp32 output of fp16 input.
  std::mt19937 rng(7);
  const Shape4 shape{1, 700, 2, 64};
  const OwnedTensor q = testing::RandomTensor(DType::kFloat16, shape, rng);
  const OwnedTensor k = testing::RandomTensor(DType::kFloat16, shape, rng);
  const OwnedTensor v = testing::RandomTensor(DType::kFloat16, shape, rng);
  for (bool causal : {false, true}) {
    AttentionSpec spec;
    spec.patterns = {{300, 1}, {700, 2}};
    spec.causal = causal;
    spec.softmax_scale = 0.3;
    spec.precision = Precision::kFloat32;
    OwnedTensor expected = testing::PoisonedTensor(DType::kFloat32, shape);
    OwnedTensor actual = testing::PoisonedTensor(DType::kFloat32, shape);
    ASSERT_TRUE(ReferenceBackend()
                    .Run(q.view(), k.view(), v.view(), spec, expected.mutable_view(), {})
                    .ok());
    ASSERT_TRUE(
        CpuBackend().Run(q.view(), k.view(), v.view(), spec, actual.mutable_view(), {}).ok());
    EXPECT_EQ(testing::Compare(actual, expected, testing::ToleranceFor(DType::kFloat32)), "");
  }
}

// The flag must be noticed by the run itself, not by the plan build: the plan is built first
// (no stop flag), then RunPlan meets a flag already raised, and a flag raised from another thread
// in the middle of a run of a second or more.
TEST(CpuBackendTest, CancelledRunStopsWithCancelled) {
  const std::string missing = testing::MissingRequestedIsa();
  if (!missing.empty()) GTEST_SKIP() << missing;
  std::mt19937 rng(8);
  CpuBackend backend;
  AttentionSpec spec;
  spec.precision = Precision::kFloat32;
  {
    const Shape4 shape{1, 256, 2, 16};
    const OwnedTensor q = testing::RandomTensor(DType::kFloat32, shape, rng);
    OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, shape);
    spec.patterns = {{64, 1}};
    const PlanKey key =
        MakePlanKey(q.view(), q.view(), DType::kFloat32, spec, Precision::kFloat32, "cpu:0", 1);
    absl::StatusOr<std::shared_ptr<Plan>> plan = backend.BuildPlan(key, /*stop=*/nullptr);
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::atomic<bool> cancelled{true};
    const absl::Status status = backend.RunPlan(**plan, q.view(), q.view(), q.view(), spec,
                                                out.mutable_view(), {nullptr, &cancelled});
    EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
    // The same plan without the flag computes: the refusal was the flag's.
    cancelled = false;
    EXPECT_TRUE(backend
                    .RunPlan(**plan, q.view(), q.view(), q.view(), spec, out.mutable_view(),
                             {nullptr, &cancelled})
                    .ok());
  }
  // One dense segment of 8192 tokens, 4 heads of 64 (69 GFLOP): a second or more on one thread.
  const Shape4 shape{1, 8192, 4, 64};
  const OwnedTensor q = testing::RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, shape);
  spec.patterns = {{8192, 1}};
  const PlanKey key =
      MakePlanKey(q.view(), q.view(), DType::kFloat32, spec, Precision::kFloat32, "cpu:0", 1);
  absl::StatusOr<std::shared_ptr<Plan>> plan = backend.BuildPlan(key, /*stop=*/nullptr);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::atomic<bool> cancelled{false};
  std::chrono::steady_clock::time_point raised;
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    raised = std::chrono::steady_clock::now();
    cancelled = true;
  });
  const auto started = std::chrono::steady_clock::now();
  const absl::Status status = backend.RunPlan(**plan, q.view(), q.view(), q.view(), spec,
                                              out.mutable_view(), {nullptr, &cancelled});
  const auto returned = std::chrono::steady_clock::now();
  canceller.join();
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  ASSERT_TRUE(cancelled.load());
  const double stop_ms = std::chrono::duration<double, std::milli>(returned - raised).count();
  std::printf("stopped %.1f ms after the flag, %.1f ms into the run\n", stop_ms,
              std::chrono::duration<double, std::milli>(raised - started).count());
  EXPECT_LT(stop_ms, 500) << "the run did not stop within half a second of the flag";
  // It stopped part way rather than finishing and then reporting the flag, however fast this
  // machine: of a sample of output rows (every 512th position of every head), some do not hold
  // their attention output.
  int computed = 0;
  int sampled = 0;
  for (int64_t n = 0; n < shape.seq_len; n += 512) {
    for (int64_t h = 0; h < shape.heads; ++h) {
      const std::vector<double> expected =
          ReferenceRow(q.view(), q.view(), q.view(), spec, 0, n, h);
      bool row_computed = true;
      for (int64_t d = 0; d < shape.head_dim; ++d) {
        const double got = out.at((n * shape.heads + h) * shape.head_dim + d);
        row_computed =
            row_computed && std::fabs(got - expected[d]) <= 1e-4 + 1e-3 * std::fabs(expected[d]);
      }
      computed += row_computed;
      ++sampled;
    }
  }
  EXPECT_LT(computed, sampled) << "every sampled row holds its output: the run was not stopped";
}

TEST(CpuBackendTest, RejectsPrecisionItCannotCompute) {
  AttentionSpec spec;
  spec.patterns = {{8, 1}};
  for (Precision precision : {Precision::kFloat16, Precision::kFloat8}) {
    spec.precision = precision;
    const absl::Status status = CpuBackend().Supports({1, 8, 1, 1, 8}, DType::kFloat32, spec);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(status.message().find("spec.precision " + PrecisionName(precision)),
              std::string::npos);
    EXPECT_NE(status.message().find("supported:"), std::string::npos) << status.message();
    EXPECT_NE(status.message().find("fp32"), std::string::npos) << status.message();
  }
}

// AUTO picks bf16 where the CPU has a bf16 kernel that beats fp32: AMX tiles, or vdpbf16ps on
// AMD; fp32 where its bf16 kernel is vdpbf16ps on another vendor (slower than fp32, measured).
TEST(CpuBackendTest, AutoPicksBf16ExactlyWhenTheCpuHasAFasterBf16Kernel) {
  AttentionSpec spec;
  spec.patterns = {{8, 1}};
  const CpuBackend backend;
  absl::StatusOr<PrecisionChoice> choice = backend.ChoosePrecision(spec);
  ASSERT_TRUE(choice.ok());
  const bool bf16 = backend.isa() == cpu::Isa::kAvx512 && cpu::HasBf16DotProducts();
  const bool faster =
      backend.bf16_kernel() == cpu::Bf16Kernel::kAmx || (bf16 && DetectCpuFeatures().amd);
  EXPECT_EQ(choice->precision, faster ? Precision::kBFloat16 : Precision::kFloat32)
      << choice->reason;
  if (bf16 && !faster) {
    EXPECT_NE(choice->reason.find("slower than fp32"), std::string::npos) << choice->reason;
  }
  EXPECT_FALSE(choice->reason.empty());
  spec.precision = Precision::kBFloat16;
  EXPECT_EQ(backend.ChoosePrecision(spec).ok(), bf16);
  spec.precision = Precision::kFloat32;
  EXPECT_EQ(backend.ChoosePrecision(spec)->precision, Precision::kFloat32);
}

// Each bf16 kernel named: AUTO takes bf16 on AMX (anywhere) and on vdpbf16ps from AMD, fp32 on
// vdpbf16ps from any other vendor, saying why; bf16 asked for is bf16 either way.
TEST(CpuBackendTest, AutoFollowsTheBf16KernelItRuns) {
  if (!(cpu::SelectedIsa() == cpu::Isa::kAvx512 && cpu::HasBf16DotProducts())) {
    GTEST_SKIP() << "no AVX512-BF16 on this path";
  }
  AttentionSpec spec;
  spec.patterns = {{8, 1}};
  for (cpu::Bf16Kernel kernel : {cpu::Bf16Kernel::kDotProducts, cpu::Bf16Kernel::kAmx}) {
    if (kernel == cpu::Bf16Kernel::kAmx && !cpu::HasAmxBf16()) continue;
    const CpuBackend backend(cpu::SelectedIsa(), {}, kernel);
    ASSERT_EQ(backend.bf16_kernel(), kernel);
    spec.precision = Precision::kAuto;
    absl::StatusOr<PrecisionChoice> choice = backend.ChoosePrecision(spec);
    ASSERT_TRUE(choice.ok());
    const bool faster = kernel == cpu::Bf16Kernel::kAmx || DetectCpuFeatures().amd;
    EXPECT_EQ(choice->precision, faster ? Precision::kBFloat16 : Precision::kFloat32)
        << cpu::Bf16KernelName(kernel) << ": " << choice->reason;
    EXPECT_EQ(choice->reason.find("slower than fp32") != std::string::npos, !faster)
        << choice->reason;
    spec.precision = Precision::kBFloat16;
    EXPECT_EQ(backend.ChoosePrecision(spec)->precision, Precision::kBFloat16);
  }
}

}  // namespace
}  // namespace da::engine
