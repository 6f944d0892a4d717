// The CUDA backend through the engine, on a real GPU (label gpu; every test skips, saying so, on
// a machine without one): requests placed on cuda:0 equal the reference over patterns, causal,
// both combine modes, GQA and the three dtypes (fp32 arithmetic: the fp32 tolerance of the
// output dtype); a run is stopped within 100 ms of its cancellation; a request over the GPU's
// budget is refused naming both numbers; two logical devices on the one GPU shard (HEADS,
// SEQUENCE) as one device computes. (The backend against the reference directly, shares
// included, is backend_conformance_test's CUDA instance; the arithmetic on the CPU is
// row_attention_test.)
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <future>
#include <iostream>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/backend_registry.h"
#include "engine/engine.h"
#include "engine/test_tensors.h"
#include "engine/testing/reference_output.h"
#include "engine/testing/share_testing.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

bool HaveGpu() {
  for (const DeviceInfo& device : DiscoverDevices(1)) {
    if (device.kind == "cuda") return true;
  }
  return false;
}

// The first GPU's compute capability as major * 10 + minor ("sm_90" -> 90); 0 without one.
int FirstGpuSm() {
  for (const DeviceInfo& device : DiscoverDevices(1)) {
    if (device.kind == "cuda" && device.capability.rfind("sm_", 0) == 0) {
      return std::atoi(device.capability.c_str() + 3);
    }
  }
  return 0;
}

EngineOptions OnGpu() {
  EngineOptions options;
  options.threads = 2;
  options.devices = {"cuda:0"};
  return options;
}

// A request of fresh random inputs in `dtype` through an engine on cuda:0, and the reference's
// output of the same inputs, both in out_dtype.
struct GpuRun {
  absl::StatusOr<ExecutionInfo> info;
  OwnedTensor actual, expected;
};

GpuRun RunOnGpu(const AttentionSpec& spec, DType dtype, DType out_dtype, uint32_t seed,
                int64_t head_dim = 64) {
  const ProblemShape shape{2, 1999, 8, 2, head_dim};
  std::mt19937 rng(seed);
  const OwnedTensor q = testing::RandomTensor(dtype, shape.QueryShape(), rng);
  const OwnedTensor k = testing::RandomTensor(dtype, shape.KeyShape(), rng);
  const OwnedTensor v = testing::RandomTensor(dtype, shape.KeyShape(), rng);
  GpuRun run{absl::UnknownError("not run"), testing::PoisonedTensor(out_dtype, shape.QueryShape()),
             testing::ReferenceOutput(q, k, v, spec, out_dtype)};
  auto engine = Engine::Create(OnGpu());
  if (!engine.ok()) {
    run.info = engine.status();
    return run;
  }
  RunRequest request;
  request.q = q.view();
  request.k = k.view();
  request.v = v.view();
  request.spec = spec;
  request.out = run.actual.mutable_view();
  run.info = (*engine)->Run(request);
  return run;
}

using Param = std::tuple<int /*set*/, bool /*causal*/, CombineMode, DType>;
// The row kernel (DA_CUDA_FUSED=0: fp32 arithmetic whatever the input dtype).
class CudaEngineTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine: the GPU tests skip";
    setenv("DA_CUDA_FUSED", "0", 1);
  }
  void TearDown() override { unsetenv("DA_CUDA_FUSED"); }
};

TEST_P(CudaEngineTest, RequestsOnTheGpuMatchTheReference) {
  const auto& [set, causal, mode, dtype] = GetParam();
  const std::vector<std::vector<Pattern>> sets = {
      {{256, 1}, {512, 2}, {1024, 4}}, {{10, 3}, {100, 7}}, {{64, 1}, {5000, 40}}};
  AttentionSpec spec;
  spec.patterns = sets[set];
  spec.causal = causal;
  spec.mode = mode;
  const GpuRun run = RunOnGpu(spec, dtype, dtype, static_cast<uint32_t>(set * 13 + causal));
  ASSERT_TRUE(run.info.ok()) << run.info.status();
  EXPECT_EQ(run.info->backend, "cuda");
  EXPECT_EQ(run.info->devices, std::vector<std::string>{"cuda:0"});
  EXPECT_EQ(testing::Compare(run.actual, run.expected, testing::ToleranceFor(dtype)), "");
}

std::string Name(const ::testing::TestParamInfo<Param>& info) {
  const auto& [set, causal, mode, dtype] = info.param;
  return absl::StrCat("set", set, causal ? "_causal_" : "_full_", CombineModeName(mode), "_",
                      DTypeName(dtype));
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, CudaEngineTest,
    ::testing::Combine(::testing::Values(0, 1, 2), ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16)),
    Name);

// The fused path (the default; DA_CUDA_FUSED=1 says so: cuDNN per pattern, then the fold): bf16
// compute on sm_80 and later, fp32 and bf16 inputs, against the reference within the bf16 bound
// (relative L2 2e-2); fp8 (E4M3, per-tensor scales from the data) on sm_90 and later within #15's
// fp8 bound (8e-2).
class CudaFusedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine: the GPU tests skip";
    setenv("DA_CUDA_FUSED", "1", 1);
  }
  void TearDown() override { unsetenv("DA_CUDA_FUSED"); }
};

using FusedParam = std::tuple<int /*set*/, bool /*causal*/, CombineMode, DType, Precision>;
class CudaFusedEngineTest : public CudaFusedTest,
                            public ::testing::WithParamInterface<FusedParam> {};

TEST_P(CudaFusedEngineTest, RequestsMatchTheReferenceWithinTheirPrecisionsBound) {
  const auto& [set, causal, mode, dtype, precision] = GetParam();
  if (precision == Precision::kFloat8 && FirstGpuSm() < 90) {
    GTEST_SKIP() << "fp8 attention needs sm_90 or later; this GPU is sm_" << FirstGpuSm();
  }
  const std::vector<std::vector<Pattern>> sets = {
      {{256, 1}, {512, 2}, {1024, 4}}, {{100, 3}, {48, 5}}, {{64, 1}, {5000, 8}}};
  AttentionSpec spec;
  spec.patterns = sets[set];
  spec.causal = causal;
  spec.mode = mode;
  spec.precision = precision;
  const GpuRun run =
      RunOnGpu(spec, dtype, DType::kFloat32, static_cast<uint32_t>(set * 17 + causal));
  ASSERT_TRUE(run.info.ok()) << run.info.status();
  EXPECT_EQ(run.info->precision_used, precision) << run.info->precision_reason;
  EXPECT_EQ(testing::Compare(run.actual, run.expected, {1.0, 0.0}), "");  // Finite and sane.
  const double error = testing::RelativeL2(run.actual, run.expected);
  EXPECT_LE(error, precision == Precision::kFloat8 ? 8e-2 : 2e-2);
  if (precision == Precision::kFloat8) {  // Scales from the data: inputs uniform in [-1, 1).
    ASSERT_EQ(run.info->fp8_scales.size(), 1u);
    EXPECT_EQ(run.info->fp8_scales[0].device, "cuda:0");
    for (int i = 0; i < 3; ++i) {
      EXPECT_GT(run.info->fp8_scales[0].amax[i], 0.9f);
      EXPECT_LE(run.info->fp8_scales[0].amax[i], 1.0f);
      EXPECT_FLOAT_EQ(run.info->fp8_scales[0].scale[i], 448.0f / run.info->fp8_scales[0].amax[i]);
    }
  } else {
    EXPECT_TRUE(run.info->fp8_scales.empty());
  }
  std::cout << PrecisionName(precision) << " relative L2 " << error << "\n";
}

std::string FusedName(const ::testing::TestParamInfo<FusedParam>& info) {
  const auto& [set, causal, mode, dtype, precision] = info.param;
  return absl::StrCat("set", set, causal ? "_causal_" : "_full_", CombineModeName(mode), "_",
                      DTypeName(dtype), "_in_", PrecisionName(precision));
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, CudaFusedEngineTest,
    ::testing::Combine(::testing::Values(0, 1, 2), ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat32, DType::kBFloat16),
                       ::testing::Values(Precision::kBFloat16, Precision::kFloat8)),
    FusedName);

// Beyond the sweep: fp8 at D = 128 (where cuDNN's fp8 attention is most used; a refusal at D = 64
// alone then tells a support limit from a bug) and at D = 32, and GROUPED with five patterns
// (the one-pass combine for any P: one shared block, written in place for a bf16 output).
TEST_F(CudaFusedTest, HeadDimsAndManyGroupedPatternsMatchTheReference) {
  struct Case {
    int64_t head_dim;
    CombineMode mode;
    std::vector<Pattern> patterns;
    DType out;
    Precision precision;
  };
  const std::vector<Pattern> three = {{256, 1}, {512, 2}, {1024, 4}};
  const std::vector<Pattern> five = {{64, 1}, {128, 2}, {256, 4}, {512, 8}, {100, 3}};
  const Case cases[] = {
      {128, CombineMode::kLongNet, three, DType::kFloat32, Precision::kFloat8},
      {128, CombineMode::kGrouped, three, DType::kFloat32, Precision::kFloat8},
      {32, CombineMode::kLongNet, three, DType::kFloat32, Precision::kFloat8},
      {128, CombineMode::kLongNet, three, DType::kBFloat16, Precision::kBFloat16},
      {64, CombineMode::kGrouped, five, DType::kFloat32, Precision::kBFloat16},
      {64, CombineMode::kGrouped, five, DType::kBFloat16, Precision::kBFloat16},
      {32, CombineMode::kLongNet, five, DType::kFloat32, Precision::kBFloat16},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat("D=", c.head_dim, " ", CombineModeName(c.mode),
                              " P=", c.patterns.size(), " out ", DTypeName(c.out), " in ",
                              PrecisionName(c.precision)));
    if (c.precision == Precision::kFloat8 && FirstGpuSm() < 90) continue;
    AttentionSpec spec;
    spec.patterns = c.patterns;
    spec.mode = c.mode;
    spec.precision = c.precision;
    const GpuRun run = RunOnGpu(spec, DType::kBFloat16, c.out, 31, c.head_dim);
    ASSERT_TRUE(run.info.ok()) << run.info.status();
    EXPECT_EQ(run.info->precision_used, c.precision) << run.info->precision_reason;
    EXPECT_EQ(testing::Compare(run.actual, run.expected, {1.0, 0.0}), "");
    const double error = testing::RelativeL2(run.actual, run.expected);
    EXPECT_LE(error, c.precision == Precision::kFloat8 ? 8e-2 : 2e-2);
    std::cout << "D=" << c.head_dim << " P=" << c.patterns.size() << " "
              << PrecisionName(c.precision) << " relative L2 " << error << "\n";
  }
}

// cuda:0 and a cuda:1 mapped to the same GPU (each backend with its own stream).
EngineOptions TwinDevicesOnOneGpu() {
  EngineOptions options = OnGpu();
  DeviceInfo twin;
  for (const DeviceInfo& device : DiscoverDevices(1)) {
    if (device.id == "cuda:0") twin = device;
  }
  twin.id = "cuda:1";
  twin.ordinal = 0;
  options.added_devices = {twin};
  options.devices = {"cuda:0", "cuda:1"};
  return options;
}

// A SEQUENCE share with segments spanning the devices is not on the fused path yet: it computes
// on the row kernel in fp32, and the execution info says so, naming both devices, instead of
// claiming bf16; the result is one device's fp32 result.
TEST_F(CudaFusedTest, SpanningSharesFallBackToFp32AndSaySo) {
  const ProblemShape shape{1, 1999, 8, 2, 64};
  testing::OwnedProblem one = testing::RandomProblem(shape, 22);
  one.spec.patterns = {{128, 1}, {2048, 4}};  // 2048 > N: every share's segment spans.
  one.spec.precision = Precision::kFloat32;
  auto single = Engine::Create(OnGpu());
  ASSERT_TRUE(single.ok()) << single.status();
  ASSERT_TRUE((*single)->Run(one.Request()).ok());

  testing::OwnedProblem many = testing::RandomProblem(shape, 22);
  many.spec = one.spec;
  many.spec.precision = Precision::kBFloat16;
  many.spec.shard_policy = ShardPolicy::kSequence;
  auto engine = Engine::Create(TwinDevicesOnOneGpu());
  ASSERT_TRUE(engine.ok()) << engine.status();
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(many.Request());
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->devices.size(), 2u);
  EXPECT_EQ(info->precision_used, Precision::kFloat32) << info->precision_reason;
  EXPECT_NE(info->precision_reason.find("fallback: computed fp32, not bf16"), std::string::npos)
      << info->precision_reason;
  EXPECT_NE(info->precision_reason.find("cuda:1 ("), std::string::npos) << info->precision_reason;
  EXPECT_NE(info->precision_reason.find("span devices"), std::string::npos)
      << info->precision_reason;
  EXPECT_LE(testing::MaxRelativeError(many.out, one.out), 1e-5);
}

// A stream's window on the GPU (RunRequest::share_of: a share of the whole problem, with the
// crossing segments' rows gathered on the host and copied in): the whole problem's rows, within
// fp32's bound. The fused path cannot take a share whose segments cross its ends, so a bf16
// request's window computes in fp32 on the row kernel and says so.
TEST_F(CudaFusedTest, AWindowsShareEqualsThoseRowsOfTheWholeProblem) {
  const ProblemShape shape{2, 1999, 8, 2, 64};
  auto engine = Engine::Create(OnGpu());
  ASSERT_TRUE(engine.ok()) << engine.status();
  for (Precision precision : {Precision::kFloat32, Precision::kBFloat16}) {
    SCOPED_TRACE(PrecisionName(precision));
    testing::OwnedProblem whole = testing::RandomProblem(shape, 31);
    whole.spec.patterns = {{300, 1}, {409, 2}};  // lcm 122,700: a stream computes windows.
    whole.spec.precision = Precision::kFloat32;
    ASSERT_TRUE((*engine)->Run(whole.Request()).ok());
    whole.spec.precision = precision;
    std::unique_ptr<testing::ShareRequest> share =
        testing::MakeShareRequest(whole, shape, 700, 1300);
    const absl::StatusOr<ExecutionInfo> info = (*engine)->Run(share->Request(whole.spec));
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->devices, std::vector<std::string>{"cuda:0"});
    EXPECT_EQ(info->precision_used, Precision::kFloat32) << info->precision_reason;
    if (precision == Precision::kBFloat16) {
      EXPECT_NE(info->precision_reason.find("fallback: computed fp32, not bf16"), std::string::npos)
          << info->precision_reason;
    }
    double worst = 0;
    for (int64_t b = 0; b < shape.batch; ++b) {
      for (int64_t t = 700; t < 1300; ++t) {
        for (int64_t i = 0; i < shape.heads * shape.head_dim; ++i) {
          const double want = share->Whole(whole.out, b, t, i);
          worst = std::max(worst, std::abs(share->Mine(b, t, i) - want) / (std::abs(want) + 1e-3));
        }
      }
    }
    EXPECT_LE(worst, 1e-4);
  }
}

// On the row kernel (DA_CUDA_FUSED=0), whose launches the stop is polled between.
class CudaEngineLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine: the GPU tests skip";
    setenv("DA_CUDA_FUSED", "0", 1);
  }
  void TearDown() override {
    unsetenv("DA_CUDA_FUSED");
    unsetenv("DA_CUDA_STAGING");
    unsetenv("DA_CUDA_CACHE");
  }
};

// Submits `p` to an engine on cuda:0 (after one uncancelled run of it when `warm`: its plan,
// whose cuDNN graphs are built without polling the stop, is then cached), cancels it `delay_ms`
// later, and returns how long after the cancellation the run ended, with its status in *status.
double StopMsAfterCancelling(testing::OwnedProblem& p, int delay_ms, bool warm,
                             absl::Status* status) {
  auto engine = Engine::Create(OnGpu());
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return 0;
  if (warm) {
    const absl::StatusOr<ExecutionInfo> first = (*engine)->Run(p.Request());
    EXPECT_TRUE(first.ok()) << first.status();
  }
  std::atomic<bool> cancelled{false};
  RunRequest request = p.Request();
  request.cancelled = &cancelled;
  std::promise<absl::StatusOr<ExecutionInfo>> done;
  (*engine)->Submit(request, [&](absl::StatusOr<ExecutionInfo> r) { done.set_value(r); });
  std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
  const auto flagged = std::chrono::steady_clock::now();
  cancelled = true;
  *status = done.get_future().get().status();
  const double stop_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - flagged).count();
  std::cout << "cancelled " << delay_ms << " ms after submission; stopped " << stop_ms
            << " ms later: " << *status << "\n";
  return stop_ms;
}

TEST_F(CudaEngineLimitsTest, ARunStopsWithin100MsOfItsCancellation) {
  testing::OwnedProblem p = testing::RandomProblem({1, 65536, 16, 16, 64}, 5);
  p.spec.patterns = {{16384, 1}};  // Seconds of the row kernel.
  absl::Status status;
  EXPECT_LE(StopMsAfterCancelling(p, 500, /*warm=*/false, &status), 100.0);
  EXPECT_TRUE(absl::IsCancelled(status)) << status;
}

// The fused path (bf16, cuDNN): one segment as long as the sequence, about 140 TFLOP (a few
// hundred ms on an H200), cut into calls of kMaxSdpaCallFlops by queries, with the stop polled
// between them; the copies before it poll the stop between pieces. With its plan warm (a first
// run), cancelled 350 ms in (the copies take about 250), it stops within 100 ms.
TEST_F(CudaEngineLimitsTest, AFusedRunStopsWithin100MsOfItsCancellation) {
  unsetenv("DA_CUDA_FUSED");  // The fixture runs the row kernel; this is the fused path.
  testing::OwnedProblem p = testing::RandomProblem({1, 262144, 8, 8, 64}, 15);
  p.spec.patterns = {{262144, 1}};
  p.spec.precision = Precision::kBFloat16;
  absl::Status status;
  EXPECT_LE(StopMsAfterCancelling(p, 350, /*warm=*/true, &status), 100.0);
  EXPECT_TRUE(absl::IsCancelled(status)) << status;
}

// A CUDA backend of the first GPU, made as the engine makes it (the environment read now).
absl::StatusOr<std::unique_ptr<Backend>> FirstGpuBackend() {
  for (const DeviceInfo& device : DiscoverDevices(1)) {
    if (device.kind == "cuda") return MakeBackend("cuda", device);
  }
  return absl::NotFoundError("no CUDA device");
}

// The relative L2 between two outputs of the shape and dtype of `like` (for a failure's message:
// tiny where runs differ by rounding, large or NaN where bytes went astray).
double DifferenceOf(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                    const OwnedTensor& like) {
  OwnedTensor x = like, y = like;
  x.bytes = a;
  y.bytes = b;
  return testing::RelativeL2(x, y);
}

// The output bytes of `p` through an engine on cuda:0 made while `variable` is `value` (unset
// after): the output is poisoned first, so the bytes are all this run's.
std::vector<uint8_t> RunWith(const char* variable, const char* value, testing::OwnedProblem& p) {
  if (value != nullptr) setenv(variable, value, 1);
  auto engine = Engine::Create(OnGpu());
  unsetenv(variable);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  std::fill(p.out.bytes.begin(), p.out.bytes.end(), 0xff);
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  EXPECT_TRUE(info.ok()) << info.status();
  return p.out.bytes;
}

// DA_CUDA_STAGING=1: copies of 16 MiB or more through pinned buffers (staged_copy.h). 100 MiB and
// a few bytes of fresh random data to the GPU and back, to a poisoned host buffer, byte for byte;
// then a whole request through an engine whose copies are staged gives exactly the bytes of one
// whose copies are not (the plain path is checked against the reference by the sweeps above;
// the fp64 reference of a staged size takes minutes on one core).
TEST_F(CudaEngineLimitsTest, StagedCopiesCarryEveryByteBothWays) {
  setenv("DA_CUDA_STAGING", "1", 1);
  absl::StatusOr<std::unique_ptr<Backend>> backend = FirstGpuBackend();
  unsetenv("DA_CUDA_STAGING");
  ASSERT_TRUE(backend.ok()) << backend.status();
  const int64_t bytes = (int64_t{100} << 20) + 12345;
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> src(bytes), back(bytes, 0xA5);
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  absl::StatusOr<DeviceBuffer> device = (*backend)->Allocate(bytes);
  ASSERT_TRUE(device.ok()) << device.status();
  const RunContext context{};
  ASSERT_TRUE((*backend)->CopyToDevice(device->data(), src.data(), bytes, context).ok());
  ASSERT_TRUE((*backend)->Synchronize(context).ok());
  ASSERT_TRUE((*backend)->CopyToHost(back.data(), device->data(), bytes, context).ok());
  ASSERT_TRUE((*backend)->Synchronize(context).ok());
  EXPECT_TRUE(back == src);

  const ProblemShape shape{1, 16384, 8, 8, 64};  // 32 MiB per tensor: staged.
  testing::OwnedProblem p = testing::RandomProblem(shape, std::random_device{}());
  p.spec.patterns = {{2048, 1}, {4096, 2}};
  p.spec.precision = Precision::kFloat32;
  const std::vector<uint8_t> plain = RunWith("DA_CUDA_STAGING", nullptr, p);
  const std::vector<uint8_t> staged = RunWith("DA_CUDA_STAGING", "1", p);
  ASSERT_EQ(plain.size(), staged.size());
  EXPECT_TRUE(plain == staged) << "relative L2 " << DifferenceOf(plain, staged, p.out);
  for (int64_t i = 0; i < p.out.elements(); ++i) {
    ASSERT_TRUE(std::isfinite(p.out.at(i))) << "element " << i << " unwritten";
  }
}

// DA_CUDA_CACHE=1: a freed buffer of a size asked for again comes back, and requests through an
// engine whose buffers and fused scratch are reused from run to run (stale bytes in them) give
// exactly the bytes of an engine that allocates afresh, fp32 and bf16, three shapes in turn.
TEST_F(CudaEngineLimitsTest, CachedBlocksAreReusedAndRequestsStillMatch) {
  setenv("DA_CUDA_CACHE", "1", 1);
  absl::StatusOr<std::unique_ptr<Backend>> backend = FirstGpuBackend();
  ASSERT_TRUE(backend.ok()) << backend.status();
  void* first = nullptr;
  {
    absl::StatusOr<DeviceBuffer> a = (*backend)->Allocate(int64_t{64} << 20);
    ASSERT_TRUE(a.ok()) << a.status();
    first = a->data();
  }
  absl::StatusOr<DeviceBuffer> b = (*backend)->Allocate(int64_t{64} << 20);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->data(), first);

  unsetenv("DA_CUDA_FUSED");  // The fused path too (the fixture turns it off): its scratch.
  auto cached = Engine::Create(OnGpu());
  unsetenv("DA_CUDA_CACHE");
  ASSERT_TRUE(cached.ok()) << cached.status();
  auto plain = Engine::Create(OnGpu());
  ASSERT_TRUE(plain.ok()) << plain.status();
  const ProblemShape shapes[] = {{1, 8192, 8, 4, 64}, {2, 3000, 8, 8, 64}, {1, 8192, 8, 4, 64}};
  for (int run = 0; run < 6; ++run) {
    testing::OwnedProblem p = testing::RandomProblem(shapes[run % 3], 20 + run);
    p.spec.patterns = {{1024, 1}, {2048, 2}};
    p.spec.precision = run % 2 == 0 ? Precision::kFloat32 : Precision::kBFloat16;
    std::fill(p.out.bytes.begin(), p.out.bytes.end(), 0xff);
    const absl::StatusOr<ExecutionInfo> uncached = (*plain)->Run(p.Request());
    ASSERT_TRUE(uncached.ok()) << uncached.status();
    const std::vector<uint8_t> fresh = p.out.bytes;
    std::fill(p.out.bytes.begin(), p.out.bytes.end(), 0xff);
    absl::StatusOr<ExecutionInfo> info = (*cached)->Run(p.Request());
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_TRUE(p.out.bytes == fresh)
        << "run " << run << ": relative L2 " << DifferenceOf(fresh, p.out.bytes, p.out);
  }
}

// A cudaMalloc the GPU refuses also leaves its error in the thread's last-error slot, where the
// next kernel launch's check would find it. The backend forgets an error it has reported
// (ForgetHandledError), so the same thread's next run (the row kernel, whose launches check the
// slot) still computes, and right.
TEST_F(CudaEngineLimitsTest, AnAllocationTheGpuRefusedDoesNotFailTheThreadsNextRun) {
  absl::StatusOr<std::unique_ptr<Backend>> made = FirstGpuBackend();
  ASSERT_TRUE(made.ok()) << made.status();
  Backend& backend = **made;
  const absl::StatusOr<DeviceBuffer> huge = backend.Allocate(int64_t{1} << 50);  // A pebibyte.
  ASSERT_TRUE(absl::IsResourceExhausted(huge.status())) << huge.status();

  testing::OwnedProblem p = testing::RandomProblem({1, 1000, 4, 2, 64}, 41);
  p.spec.patterns = {{256, 1}, {512, 2}};
  p.spec.precision = Precision::kFloat32;
  const RunContext context{};
  std::vector<DeviceBuffer> buffers;
  for (const OwnedTensor* t : {&p.q, &p.k, &p.v, &p.out}) {
    absl::StatusOr<DeviceBuffer> buffer = backend.Allocate(t->bytes.size());
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE(
        backend.CopyToDevice(buffer->data(), t->bytes.data(), t->bytes.size(), context).ok());
    buffers.push_back(*std::move(buffer));
  }
  const auto view = [&](const OwnedTensor& t, const DeviceBuffer& b) {
    return TensorView{t.dtype, t.shape, b.data(), static_cast<int64_t>(t.bytes.size()), b.space()};
  };
  const MutableTensorView out{p.out.dtype, p.out.shape, buffers[3].data(),
                              static_cast<int64_t>(p.out.bytes.size()), buffers[3].space()};
  const absl::Status ran = backend.Run(view(p.q, buffers[0]), view(p.k, buffers[1]),
                                       view(p.v, buffers[2]), p.spec, out, context);
  ASSERT_TRUE(ran.ok()) << ran;
  OwnedTensor actual = testing::PoisonedTensor(p.out.dtype, p.out.shape);
  ASSERT_TRUE(
      backend.CopyToHost(actual.bytes.data(), buffers[3].data(), actual.bytes.size(), context)
          .ok());
  ASSERT_TRUE(backend.Synchronize(context).ok());
  const OwnedTensor expected = testing::ReferenceOutput(p.q, p.k, p.v, p.spec, p.out.dtype);
  EXPECT_EQ(testing::Compare(actual, expected, testing::ToleranceFor(p.out.dtype)), "");
}

// Backends on one GPU share its block cache: a block one gave back is handed to the other, so
// that a failed cudaMalloc of either can release what both keep.
TEST_F(CudaEngineLimitsTest, BackendsOnOneGpuShareItsBlockCache) {
  setenv("DA_CUDA_CACHE", "1", 1);
  absl::StatusOr<std::unique_ptr<Backend>> a = FirstGpuBackend();
  absl::StatusOr<std::unique_ptr<Backend>> b = FirstGpuBackend();
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  void* given_back = nullptr;
  {
    absl::StatusOr<DeviceBuffer> block = (*a)->Allocate(int64_t{48} << 20);
    ASSERT_TRUE(block.ok()) << block.status();
    given_back = block->data();
  }
  absl::StatusOr<DeviceBuffer> taken = (*b)->Allocate(int64_t{48} << 20);
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_EQ(taken->data(), given_back);
}

TEST_F(CudaEngineLimitsTest, ARequestOverTheGpuBudgetIsRefusedNamingBothNumbers) {
  EngineOptions options = OnGpu();
  options.device_memory_budget_bytes = 1 << 20;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const ProblemShape shape{1, 8192, 8, 8, 64};  // 8 MiB of fp32 q alone.
  testing::OwnedProblem p = testing::RandomProblem(shape, 6);
  p.spec.patterns = {{1024, 1}};
  p.spec.shard_policy = ShardPolicy::kNone;
  absl::StatusOr<ExecutionInfo> info = (*engine)->Run(p.Request());
  ASSERT_TRUE(absl::IsResourceExhausted(info.status())) << info.status();
  EXPECT_NE(info.status().message().find("1048576"), std::string::npos) << info.status();
}

// Two logical devices on one GPU (cuda:0 and a cuda:1 mapped to the same GPU, each backend with
// its own stream) run the multi-GPU paths on a one-GPU machine: HEADS, and SEQUENCE with spanning
// segments (rows exchanged device to device), equal to one device up to reassociation.
TEST_F(CudaEngineLimitsTest, TwoLogicalDevicesOnOneGpuShardAsOneDeviceComputes) {
  // N = 1999 is cut by neither device count; w = 512 spans the cut; GQA 8 -> 2; r = 3.
  const ProblemShape shape{2, 1999, 8, 2, 64};
  const AttentionSpec base = [] {
    AttentionSpec spec;
    spec.patterns = {{128, 1}, {512, 3}, {4096, 8}};
    spec.precision = Precision::kFloat32;
    return spec;
  }();
  for (const ShardPolicy policy : {ShardPolicy::kHeads, ShardPolicy::kSequence}) {
    for (const CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
      SCOPED_TRACE(absl::StrCat(ShardPolicyName(policy), " ", CombineModeName(mode)));
      testing::OwnedProblem one = testing::RandomProblem(shape, 21);
      one.spec = base;
      one.spec.mode = mode;
      one.spec.causal = true;
      one.spec.shard_policy = ShardPolicy::kNone;
      auto single = Engine::Create(OnGpu());
      ASSERT_TRUE(single.ok()) << single.status();
      ASSERT_TRUE((*single)->Run(one.Request()).ok());

      testing::OwnedProblem many = testing::RandomProblem(shape, 21);
      many.spec = one.spec;
      many.spec.shard_policy = policy;
      auto engine = Engine::Create(TwinDevicesOnOneGpu());
      ASSERT_TRUE(engine.ok()) << engine.status();
      absl::StatusOr<ExecutionInfo> info = (*engine)->Run(many.Request());
      ASSERT_TRUE(info.ok()) << info.status();
      EXPECT_EQ(info->shard_strategy, policy);
      ASSERT_EQ(info->devices.size(), 2u);
      EXPECT_EQ(info->devices[0], "cuda:0");
      EXPECT_EQ(info->devices[1], "cuda:1");
      EXPECT_LE(testing::MaxRelativeError(many.out, one.out), 1e-5);
    }
  }
}

}  // namespace
}  // namespace da::engine
