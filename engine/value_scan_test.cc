// The inputs' value check (engine/value_scan.h): the scan finds the first NaN or infinity and the
// largest magnitude in every dtype, wherever they lie, and the engine refuses such requests (and
// ones whose scores overflow fp32) with INVALID_ARGUMENT naming the tensor and the element,
// before computing anything.
#include "engine/value_scan.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "engine/engine.h"
#include "engine/test_tensors.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

constexpr DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

float MaxMagnitude(const OwnedTensor& t, int64_t begin, int64_t end) {
  float most = 0;
  for (int64_t i = begin; i < end; ++i) most = std::max(most, std::abs(t.at(i)));
  return most;
}

TEST(ValueScanTest, FindsTheLargestMagnitudeAndTheFirstNonFiniteInEveryDtype) {
  std::mt19937 rng(3);
  for (const DType dtype : kDTypes) {
    SCOPED_TRACE(DTypeName(dtype));
    OwnedTensor t = testing::RandomTensor(dtype, {2, 37, 3, 16}, rng);
    const int64_t n = t.elements();
    StoreFromFloat(dtype, t.bytes.data(), 1000, -7.5f);  // The largest, negative.
    ValueScan scan = ScanValues(t.view(), 0, n);
    EXPECT_EQ(scan.first_non_finite, -1);
    EXPECT_EQ(scan.amax, 7.5f);
    scan = ScanValues(t.view(), 1001, n);  // A range: without it.
    EXPECT_EQ(scan.amax, MaxMagnitude(t, 1001, n));
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
    for (const float special : specials) {
      for (const int64_t at : {int64_t{0}, int64_t{17}, int64_t{1000}, n - 1}) {
        OwnedTensor spoiled = t;
        StoreFromFloat(dtype, spoiled.bytes.data(), at, special);
        StoreFromFloat(dtype, spoiled.bytes.data(), n - 1 == at ? at : n - 1, special);  // Later.
        scan = ScanValues(spoiled.view(), 0, n);
        EXPECT_EQ(scan.first_non_finite, at) << special;
        EXPECT_EQ(scan.amax, MaxMagnitude(spoiled, 0, at)) << special << " at " << at;
      }
    }
  }
}

struct Inputs {
  OwnedTensor q, k, v;
};

Inputs RandomInputs(DType dtype, std::mt19937& rng) {
  const Shape4 shape{2, 64, 4, 16};
  return {testing::RandomTensor(dtype, shape, rng), testing::RandomTensor(dtype, shape, rng),
          testing::RandomTensor(dtype, shape, rng)};
}

absl::Status Check(const Inputs& in, int64_t first_token = 0,
                   const std::atomic<bool>* stop = nullptr, double scale = 0) {
  AttentionSpec spec;
  spec.patterns = {{32, 1}};
  if (scale != 0) spec.softmax_scale = scale;
  return CheckInputValues(in.q.view(), in.k.view(), in.v.view(), spec, first_token, stop);
}

TEST(CheckInputValuesTest, NamesTheTensorTheKindAndThePosition) {
  std::mt19937 rng(5);
  for (const DType dtype : kDTypes) {
    SCOPED_TRACE(DTypeName(dtype));
    Inputs in = RandomInputs(dtype, rng);
    EXPECT_TRUE(Check(in).ok());
    // v[1, 5, 2, 3]: ((1 * 64 + 5) * 4 + 2) * 16 + 3.
    StoreFromFloat(dtype, in.v.bytes.data(), ((1 * 64 + 5) * 4 + 2) * 16 + 3,
                   -std::numeric_limits<float>::infinity());
    absl::Status status = Check(in, /*first_token=*/4096);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(status.message(),
              "v holds -inf at batch 1, token 4101, head 2, dim 3; q, k and v must be finite");
    StoreFromFloat(dtype, in.k.bytes.data(), 7, std::numeric_limits<float>::quiet_NaN());
    status = Check(in);
    EXPECT_EQ(status.message(),
              "k holds NaN at batch 0, token 0, head 0, dim 7; q, k and v must be finite");
  }
}

TEST(CheckInputValuesTest, ScoresPastFp32AreRefusedAndStopIsHeard) {
  std::mt19937 rng(9);
  Inputs in = RandomInputs(DType::kFloat32, rng);
  // max|q| * max|k| * 16 * 0.25 * log2(e) about 5.8e38.
  StoreFromFloat(DType::kFloat32, in.q.bytes.data(), 3, 1e19f);
  StoreFromFloat(DType::kFloat32, in.k.bytes.data(), 9, -1e19f);
  absl::Status status = Check(in);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("q and k are too large for fp32 scores: max|q| 1e+19 * max|k| "
                                  "1e+19 * head_dim 16"),
            std::string::npos)
      << status;
  StoreFromFloat(DType::kFloat32, in.k.bytes.data(), 9, -1e17f);  // 5.8e36: within.
  EXPECT_TRUE(Check(in).ok());
  EXPECT_FALSE(Check(in, 0, nullptr, /*scale=*/1e3).ok());  // 5.8e39 again.
  // bf16 reaches past fp32's scores as fp32 does; fp16 never does (docs/MATH.md).
  Inputs bf16 = RandomInputs(DType::kBFloat16, rng);
  StoreFromFloat(DType::kBFloat16, bf16.q.bytes.data(), 0, 1e30f);
  StoreFromFloat(DType::kBFloat16, bf16.k.bytes.data(), 0, 1e30f);
  EXPECT_EQ(Check(bf16).code(), absl::StatusCode::kInvalidArgument);
  Inputs fp16 = RandomInputs(DType::kFloat16, rng);
  StoreFromFloat(DType::kFloat16, fp16.q.bytes.data(), 0, 65504.0f);
  StoreFromFloat(DType::kFloat16, fp16.k.bytes.data(), 0, -65504.0f);
  EXPECT_TRUE(Check(fp16, 0, nullptr, /*scale=*/1e6).ok());

  // v: max|v| * 32 keys (the pattern's segment) past 1e38 is refused, naming v.
  Inputs large_v = RandomInputs(DType::kFloat32, rng);
  StoreFromFloat(DType::kFloat32, large_v.v.bytes.data(), 5, 1e37f);
  EXPECT_EQ(Check(large_v).message(),
            "v is too large for fp32 sums: max|v| 1e+37 * 32 keys a row may attend to is 3.2e+38, "
            "over 1e+38; scale v down");
  StoreFromFloat(DType::kFloat32, large_v.v.bytes.data(), 5, 1e36f);  // 3.2e37: within.
  EXPECT_TRUE(Check(large_v).ok());

  const std::atomic<bool> stopped{true};
  EXPECT_EQ(Check(fp16, 0, &stopped).code(), absl::StatusCode::kCancelled);
}

// A device computing in fp16 converts fp32 or bf16 inputs to it: magnitudes past 65504 would
// become infinities (and the output NaN), so they are refused, naming the tensor and the bound.
TEST(CheckInputValuesTest, InputsPastFp16AreRefusedWhereTheComputeIsFp16) {
  std::mt19937 rng(11);
  AttentionSpec spec;
  spec.patterns = {{32, 1}};
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    Inputs in = RandomInputs(dtype, rng);
    StoreFromFloat(dtype, in.v.bytes.data(), 40, -1e5f);
    const auto check = [&](Precision compute) {
      return CheckInputValues(in.q.view(), in.k.view(), in.v.view(), spec, 0, nullptr, nullptr,
                              compute);
    };
    for (const Precision fine : {Precision::kFloat32, Precision::kBFloat16}) {
      EXPECT_TRUE(check(fine).ok()) << PrecisionName(fine);
    }
    const absl::Status refused = check(Precision::kFloat16);
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(refused.message().find("v holds a value of magnitude "), std::string::npos)
        << refused;
    EXPECT_NE(refused.message().find("computes in fp16, which holds at most 65504: ask for "
                                     "spec.precision bf16 or fp32"),
              std::string::npos)
        << refused;
    StoreFromFloat(dtype, in.v.bytes.data(), 40, -6e4f);  // Within fp16's range.
    EXPECT_TRUE(check(Precision::kFloat16).ok());
  }
}

// Tensors of several pieces, scanned on a pool's threads or on the caller's: the first
// non-finite element in order, whichever piece finishes first.
TEST(CheckInputValuesTest, PiecesOnAPoolReportTheFirstElementInOrder) {
  std::mt19937 rng(21);
  const Shape4 shape{1, 144 * 1024, 1, 64};  // 9M elements: three pieces.
  const OwnedTensor q = testing::RandomTensor(DType::kFloat16, shape, rng);
  OwnedTensor k = q;
  const int64_t second = (int64_t{5} << 20) + 3, third = (int64_t{8} << 20) + 1;
  StoreFromFloat(DType::kFloat16, k.bytes.data(), third, std::numeric_limits<float>::quiet_NaN());
  StoreFromFloat(DType::kFloat16, k.bytes.data(), second, std::numeric_limits<float>::infinity());
  AttentionSpec spec;
  spec.patterns = {{1024, 1}};
  ThreadPool pool(2);
  for (ThreadPool* on : {static_cast<ThreadPool*>(nullptr), &pool}) {
    const absl::Status status =
        CheckInputValues(q.view(), k.view(), q.view(), spec, 0, nullptr, on);
    EXPECT_EQ(status.message(), absl::StrCat("k holds +inf at batch 0, token ", second / 64,
                                             ", head 0, dim 3; q, k and v must be finite"))
        << (on == nullptr ? "caller" : "pool");
    EXPECT_TRUE(CheckInputValues(q.view(), q.view(), q.view(), spec, 0, nullptr, on).ok());
  }
}

// Through the engine: refused before compute, the output untouched.
TEST(CheckInputValuesTest, TheEngineRefusesBeforeComputing) {
  std::mt19937 rng(13);
  Inputs in = RandomInputs(DType::kFloat32, rng);
  StoreFromFloat(DType::kFloat32, in.v.bytes.data(), in.v.elements() - 1,
                 std::numeric_limits<float>::infinity());
  OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, in.q.shape);
  EngineOptions options;
  options.threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  RunRequest request;
  request.q = in.q.view();
  request.k = in.k.view();
  request.v = in.v.view();
  request.spec.patterns = {{32, 1}};
  request.spec.causal = true;  // The last token's v reaches no other row: still refused.
  request.out = out.mutable_view();
  const absl::StatusOr<ExecutionInfo> info = (*engine)->Run(request);
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument) << info.status();
  EXPECT_NE(info.status().message().find("v holds +inf at batch 1, token 63, head 3, dim 15"),
            std::string::npos)
      << info.status();
  EXPECT_EQ(out.bytes, testing::PoisonedTensor(DType::kFloat32, in.q.shape).bytes);
}

}  // namespace
}  // namespace da::engine
