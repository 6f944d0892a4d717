// SelfCheck: the start-up check passes on every backend and instruction set, reports the error it
// measured, and holds the output to a tolerance that a wrong result cannot meet.
//
// The engines here compute through a tap backend (registered below as "self-check-tap"): it runs a
// registered backend unchanged, and on its first run (the self-check's problem) keeps a copy of
// the inputs and of the output SelfCheck is about to compare, after corrupting one element of it
// when the test asks. The test then knows what SelfCheck saw and recomputes the comparison itself.
#include "engine/self_check.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>

#include "engine/backend_registry.h"
#include "engine/reference/reference_backend.h"
#include "engine/status_macros.h"
#include "engine/test_tensors.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

// One output element the tap changes before SelfCheck compares it: delta added, or NaN.
struct Fault {
  int64_t element = 0;
  float delta = 0;
  bool nan = false;
};

// The tap's first run: its inputs and the output as SelfCheck saw it (after any fault).
struct Recording {
  std::mutex mutex;
  bool done = false;
  OwnedTensor q, k, v, out;
  AttentionSpec spec;
};

OwnedTensor Copy(DType dtype, const Shape4& shape, const void* data) {
  OwnedTensor t{dtype, shape, std::vector<uint8_t>(shape.elements() * DTypeSize(dtype))};
  std::memcpy(t.bytes.data(), data, t.bytes.size());
  return t;
}

class TapBackend final : public Backend {
 public:
  TapBackend(std::unique_ptr<Backend> inner, std::optional<Fault> fault,
             std::shared_ptr<Recording> recording)
      : inner_(std::move(inner)), fault_(fault), recording_(std::move(recording)) {}

  std::string Name() const override { return inner_->Name(); }
  std::vector<Precision> Precisions() const override { return inner_->Precisions(); }
  absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const override {
    return inner_->ChoosePrecision(spec);
  }
  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override {
    return inner_->Supports(shape, dtype, spec);
  }
  absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                  const std::atomic<bool>* stop) override {
    return inner_->BuildPlan(key, stop);
  }
  int64_t PlanWorkspaceBytes(const PlanKey& key) const override {
    return inner_->PlanWorkspaceBytes(key);
  }
  bool ComputesShares() const override { return inner_->ComputesShares(); }

  absl::Status RunShare(Plan& plan, const ShareProblem& p, const RunContext& context) override {
    DA_RETURN_IF_ERROR(inner_->RunShare(plan, p, context));
    std::lock_guard<std::mutex> lock(recording_->mutex);
    if (recording_->done) return absl::OkStatus();  // Only the first run: the checked problem.
    if (fault_.has_value()) {
      const float was = LoadAsFloat(p.out.dtype, p.out.data, fault_->element);
      StoreFromFloat(p.out.dtype, p.out.data, fault_->element,
                     fault_->nan ? std::numeric_limits<float>::quiet_NaN() : was + fault_->delta);
    }
    recording_->q = Copy(p.q.dtype, p.q.shape, p.q.data);
    recording_->k = Copy(p.k.dtype, p.k.shape, p.k.data);
    recording_->v = Copy(p.v.dtype, p.v.shape, p.v.data);
    recording_->out = Copy(p.out.dtype, p.out.shape, p.out.data);
    recording_->spec = p.spec;
    recording_->done = true;
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Backend> inner_;
  const std::optional<Fault> fault_;
  const std::shared_ptr<Recording> recording_;
};

// What the next "self-check-tap" backend wraps and does (read when an engine is created).
struct TapSetup {
  std::string inner = "cpu";
  std::optional<Fault> fault;
  std::shared_ptr<Recording> recording = std::make_shared<Recording>();
};

std::mutex& TapMutex() {
  static std::mutex* mutex = new std::mutex();
  return *mutex;
}
TapSetup& NextTap() {
  static TapSetup* setup = new TapSetup();
  return *setup;
}

const bool kTapRegistered = RegisterBackend(
    {.name = "self-check-tap",
     .device_kind = "cpu",
     .default_for_kind = false,
     .make = [](const DeviceInfo& device,
                const BackendOptions& options) -> absl::StatusOr<std::unique_ptr<Backend>> {
       TapSetup setup;
       {
         std::lock_guard<std::mutex> lock(TapMutex());
         setup = NextTap();
       }
       DA_ASSIGN_OR_RETURN(std::unique_ptr<Backend> inner,
                           MakeBackend(setup.inner, device, options));
       return std::make_unique<TapBackend>(std::move(inner), setup.fault, setup.recording);
     }});

// An engine computing with `inner` through a tap that applies `fault`; *recording receives the
// tap's record.
absl::StatusOr<std::unique_ptr<Engine>> TappedEngine(const std::string& inner, int threads,
                                                     std::optional<Fault> fault,
                                                     std::shared_ptr<Recording>* recording) {
  TapSetup setup{inner, fault, std::make_shared<Recording>()};
  *recording = setup.recording;
  {
    std::lock_guard<std::mutex> lock(TapMutex());
    NextTap() = setup;
  }
  EngineOptions options;
  options.threads = threads;
  options.backend = "self-check-tap";
  return Engine::Create(options);
}

// The bounds self_check.h documents: fp32 1e-4 + 1e-3 |reference|; bf16, fp16 3e-2 + 3e-2 |ref|.
testing::Tolerance DocumentedBound(Precision precision) {
  return precision == Precision::kFloat32 ? testing::Tolerance{1e-4, 1e-3}
                                          : testing::Tolerance{3e-2, 3e-2};
}

// The element index of output[0, position, head, d] of the check's [1, 80, 4, 32] output.
int64_t CheckElement(int64_t position, int64_t head, int64_t d) {
  return (position * 4 + head) * 32 + d;
}

TEST(SelfCheckTest, PassesOnTheCpuBackendAndReportsTheErrorItMeasured) {
  std::shared_ptr<Recording> recording;
  absl::StatusOr<std::unique_ptr<Engine>> engine = TappedEngine("cpu", 2, std::nullopt, &recording);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->device, "cpu:0");

  // The comparison, recomputed here from what the CPU backend wrote: the reference backend's
  // output (fp64 rounded to fp32 once, within 6e-8 of SelfCheck's fp64 rows for outputs in
  // [-1, 1]) against the recorded output, under the bound self_check.h documents.
  ASSERT_TRUE(recording->done);
  ASSERT_EQ(recording->out.dtype, DType::kFloat32);
  OwnedTensor expected = testing::PoisonedTensor(DType::kFloat32, recording->out.shape);
  ASSERT_TRUE(ReferenceBackend()
                  .Run(recording->q.view(), recording->k.view(), recording->v.view(),
                       recording->spec, expected.mutable_view(), {})
                  .ok());
  const testing::Tolerance bound = DocumentedBound(result->precision);
  double max_error = 0;
  double tolerance = 0;
  for (int64_t i = 0; i < expected.elements(); ++i) {
    ASSERT_TRUE(std::isfinite(recording->out.at(i))) << "element " << i;
    max_error = std::max(max_error, std::fabs(double{recording->out.at(i)} - expected.at(i)));
    tolerance = std::max(tolerance, bound.atol + bound.rtol * std::fabs(expected.at(i)));
  }
  EXPECT_NEAR(result->max_abs_error, max_error, 1e-7);
  EXPECT_NEAR(result->tolerance, tolerance, 1e-8);
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
  EngineOptions options;
  options.threads = 1;
  options.backend = "reference";
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(result.ok()) << result.status();
  // The reference against itself: fp64 rounded to fp32 once.
  EXPECT_LT(result->max_abs_error, 1e-6);
}

TEST(SelfCheckTest, ReportsTheErrorOfTheWorstElementEvenTheLastOne) {
  // The reference backend is exact to 1e-6 (above); 5e-5 added to the last element, under the
  // 1e-4 floor of the fp32 tolerance, is then the largest error, and it passes.
  std::shared_ptr<Recording> recording;
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      TappedEngine("reference", 1, Fault{CheckElement(79, 3, 31), 5e-5f}, &recording);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(recording->done);
  EXPECT_EQ(result->precision, Precision::kFloat32);
  EXPECT_NEAR(result->max_abs_error, 5e-5, 1e-6);
  // Outputs are convex combinations of values in [-1, 1]: the bound is 1e-4 + 1e-3 |ref| <= 1.1e-3.
  EXPECT_GE(result->tolerance, 1e-4);
  EXPECT_LE(result->tolerance, 1.1e-3);
}

TEST(SelfCheckTest, AWrongElementFailsAndIsNamed) {
  // 2e-3 is beyond 1e-4 + 1e-3 |ref| for any output in [-1, 1]: a wrong result of that size, on
  // one element in the middle of the output, must fail the check.
  std::shared_ptr<Recording> recording;
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      TappedEngine("reference", 1, Fault{CheckElement(41, 2, 7), 2e-3f}, &recording);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(recording->done);
  ASSERT_FALSE(result.ok()) << "max error " << result->max_abs_error << ", tolerance "
                            << result->tolerance;
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(result.status().message().find("output[0, 41, 2, 7]"), std::string::npos)
      << result.status();
  EXPECT_NE(result.status().message().find("cpu:0"), std::string::npos) << result.status();
}

TEST(SelfCheckTest, ANanElementFails) {
  // As an element the backend forgot to write would read (SelfCheck poisons the output with NaN).
  std::shared_ptr<Recording> recording;
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      TappedEngine("reference", 1, Fault{CheckElement(0, 0, 0), 0, /*nan=*/true}, &recording);
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<SelfCheckResult> result = SelfCheck(**engine);
  ASSERT_TRUE(recording->done);
  ASSERT_FALSE(result.ok()) << "max error " << result->max_abs_error;
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(result.status().message().find("output[0, 0, 0, 0]"), std::string::npos)
      << result.status();
}

TEST(SelfCheckTest, AFailedRunIsInternalAndSaysWhy) {
  // A request limit below the check's problem makes the run fail before compute.
  EngineOptions options;
  options.threads = 1;
  options.backend = "cpu";
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
