// SelfCheck: the start-up check passes on every backend and instruction set, and holds the output
// to a tolerance that a wrong result cannot meet.
#include "engine/self_check.h"

#include <gtest/gtest.h>

namespace da::engine {
namespace {

EngineOptions Options(int threads, const std::string& backend) {
  EngineOptions options;
  options.threads = threads;
  options.backend = backend;
  return options;
}

TEST(SelfCheckTest, PassesOnTheCpuBackendWithinTheFp32Tolerance) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(Options(2, "cpu"));
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->device, "cpu:0");
  EXPECT_LE(result->max_abs_error, result->tolerance);
  EXPECT_GT(result->max_abs_error, 0);  // fp32 kernels do not reproduce fp64 bit for bit.
  if (result->precision == Precision::kFloat32) {
    EXPECT_LT(result->tolerance, 3e-3);
  }
  // The check and the two timed runs went through the engine: its stats and the plan cache saw
  // them, and the throughput it reports is the engine's measured one.
  EXPECT_EQ((*engine)->stats().runs_completed, 3);
  EXPECT_EQ((*engine)->plan_cache_stats().entries, 2);
  EXPECT_GT(result->flops_per_second, 0);
  EXPECT_EQ(result->flops_per_second, (*engine)->stats().measured_flops_per_second);
}

TEST(SelfCheckTest, PassesOnTheReferenceBackend) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(Options(1, "reference"));
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(result.ok()) << result.status();
  // The reference against itself: fp64 rounded to fp32 once.
  EXPECT_LT(result->max_abs_error, 1e-6);
}

TEST(SelfCheckTest, AFailedRunIsInternalAndSaysWhy) {
  // A request limit below the check's problem makes the run fail before compute.
  EngineOptions options = Options(1, "cpu");
  options.limits.max_tokens = 10;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(result.status().message().find("self-check run failed"), std::string::npos)
      << result.status();
  EXPECT_NE(result.status().message().find("--max-tokens"), std::string::npos) << result.status();
}

}  // namespace
}  // namespace da::engine
