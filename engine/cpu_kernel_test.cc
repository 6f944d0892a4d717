// The fused CPU kernel at its tile boundaries, across head dims and thread counts, and on a large
// problem checked on sampled rows. Runs once per instruction set (DA_CPU_ISA, see CMakeLists).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "engine/cpu/attention_kernel.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/widen_rows.h"
#include "engine/device.h"
#include "engine/reference/reference_backend.h"
#include "engine/test_tensors.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

class CpuKernelTest : public ::testing::Test {
 protected:
  std::optional<cpu::Bf16Kernel> bf16_kernel_;  // Unset: the selected one.

  void SetUp() override {
    const std::string missing = testing::MissingRequestedIsa();
    if (!missing.empty()) GTEST_SKIP() << missing;
  }

  // The backend under test: the selected paths, or the bf16 kernel a test names.
  CpuBackend Backend() const { return CpuBackend(cpu::SelectedIsa(), {}, bf16_kernel_); }

  // Runs the CPU backend and the reference on fresh inputs and compares them.
  void ExpectMatchesReference(Shape4 shape, int64_t kv_heads, AttentionSpec spec, int threads,
                              DType dtype = DType::kFloat32) {
    std::mt19937 rng(static_cast<uint32_t>(shape.seq_len * 7 + shape.head_dim));
    const Shape4 kv_shape{shape.batch, shape.seq_len, kv_heads, shape.head_dim};
    const OwnedTensor q = testing::RandomTensor(dtype, shape, rng);
    const OwnedTensor k = testing::RandomTensor(dtype, kv_shape, rng);
    const OwnedTensor v = testing::RandomTensor(dtype, kv_shape, rng);
    OwnedTensor expected = testing::PoisonedTensor(DType::kFloat32, shape);
    OwnedTensor actual = testing::PoisonedTensor(dtype, shape);
    ThreadPool pool(threads);
    ASSERT_TRUE(ReferenceBackend()
                    .Run(q.view(), k.view(), v.view(), spec, expected.mutable_view(), {&pool})
                    .ok());
    CpuBackend backend = Backend();
    ASSERT_TRUE(
        backend.Run(q.view(), k.view(), v.view(), spec, actual.mutable_view(), {&pool}).ok());
    const std::string where =
        "N=" + std::to_string(shape.seq_len) + " D=" + std::to_string(shape.head_dim) +
        " patterns " + spec.PatternsToString() + (spec.causal ? " causal" : "") + " threads " +
        std::to_string(threads) + " bf16 kernel " + cpu::Bf16KernelName(backend.bf16_kernel());
    if (backend.ChoosePrecision(spec)->precision == Precision::kBFloat16) {
      EXPECT_LE(testing::RelativeL2(actual, expected), testing::kBf16RelativeL2) << where;
      EXPECT_EQ(testing::Compare(actual, expected, {5e-2, 5e-2}), "") << where;
    } else {
      EXPECT_EQ(testing::Compare(actual, expected, testing::ToleranceFor(dtype)), "") << where;
    }
  }
};

AttentionSpec OneSegment(int64_t kept, bool causal) {
  AttentionSpec spec;
  spec.patterns = {{kept, 1}};
  spec.causal = causal;
  spec.precision = Precision::kFloat32;
  return spec;
}

TEST_F(CpuKernelTest, KeptCountsAtTileBoundaries) {
  // Around the row alignment, the key alignment, the chunk size and the key block.
  for (int64_t kept :
       {cpu::kRowAlign - 1, cpu::kRowAlign, cpu::kRowAlign + 1, cpu::kKeyAlign - 1, cpu::kKeyAlign,
        cpu::kKeyAlign + 1, int64_t{127}, int64_t{128}, int64_t{129}, cpu::kKeyBlock - 1,
        cpu::kKeyBlock, cpu::kKeyBlock + 1, 2 * cpu::kKeyBlock + 1}) {
    for (bool causal : {false, true}) {
      ExpectMatchesReference({1, kept, 2, 16}, 1, OneSegment(kept, causal), 2);
    }
  }
}

TEST_F(CpuKernelTest, DilatedKeptCountsAtTileBoundaries) {
  // w = 2 * (kKeyBlock + 1) with r = 2 keeps kKeyBlock + 1 positions per segment; N cuts the
  // last segment so that it keeps one fewer than a key block.
  AttentionSpec spec;
  spec.patterns = {{2 * (cpu::kKeyBlock + 1), 2}};
  spec.precision = Precision::kFloat32;
  for (bool causal : {false, true}) {
    spec.causal = causal;
    ExpectMatchesReference({1, 2 * (cpu::kKeyBlock + 1) + 2 * (cpu::kKeyBlock - 1), 2, 32}, 2, spec,
                           3);
  }
}

TEST_F(CpuKernelTest, HeadDimsAroundTheVectorWidths) {
  AttentionSpec spec;
  spec.patterns = {{96, 1}, {192, 3}};
  spec.precision = Precision::kFloat32;
  for (int64_t head_dim : {1, 7, 15, 16, 17, 32, 48, 64, 80, 128, 200}) {
    for (bool causal : {false, true}) {
      spec.causal = causal;
      ExpectMatchesReference({1, 300, 2, head_dim}, 1, spec, 2);
    }
  }
}

TEST_F(CpuKernelTest, ThreadCountsGiveIdenticalBytes) {
  std::mt19937 rng(11);
  const Shape4 shape{1, 3000, 3, 32};
  const OwnedTensor q = testing::RandomTensor(DType::kFloat32, shape, rng);
  const OwnedTensor k = testing::RandomTensor(DType::kFloat32, shape, rng);
  const OwnedTensor v = testing::RandomTensor(DType::kFloat32, shape, rng);
  for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
    AttentionSpec spec;
    spec.patterns = {{1000, 1}, {3000, 2}};
    spec.causal = true;
    spec.precision = Precision::kFloat32;
    spec.mode = mode;
    std::vector<uint8_t> first;
    for (int threads : {1, 2, 3}) {
      ThreadPool pool(threads);
      OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, shape);
      ASSERT_TRUE(
          CpuBackend().Run(q.view(), k.view(), v.view(), spec, out.mutable_view(), {&pool}).ok());
      if (first.empty()) {
        first = out.bytes;
        OwnedTensor expected = testing::PoisonedTensor(DType::kFloat32, shape);
        ASSERT_TRUE(ReferenceBackend()
                        .Run(q.view(), k.view(), v.view(), spec, expected.mutable_view(), {&pool})
                        .ok());
        EXPECT_EQ(testing::Compare(out, expected, testing::ToleranceFor(DType::kFloat32)), "");
      } else {
        // Each row's arithmetic does not depend on how rows are cut into tasks.
        EXPECT_EQ(out.bytes, first) << threads << " threads";
      }
    }
  }
}

TEST_F(CpuKernelTest, OneLongCausalSegmentIsSplitAcrossThreads) {
  for (int threads : {1, 2, 3}) {
    ExpectMatchesReference({1, 1500, 1, 16}, 1, OneSegment(1500, true), threads);
  }
}

TEST_F(CpuKernelTest, HalfPrecisionInputsAtABoundary) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    ExpectMatchesReference({2, cpu::kKeyBlock + 1, 4, 64}, 2, OneSegment(cpu::kKeyBlock + 1, true),
                           2, dtype);
  }
}

TEST_F(CpuKernelTest, WidenedRowsMatchTheScalarConversionForEveryBitPattern) {
  // Every fp16 and bf16 value (F16C on the AVX paths, plain C++ on the portable one), times a
  // factor, with a row length that leaves a tail of 7 elements.
  constexpr int64_t kCount = 65536 + 7;
  std::vector<uint16_t> bits(kCount);
  for (int64_t i = 0; i < kCount; ++i) bits[i] = static_cast<uint16_t>(i);
  std::vector<float> widened(kCount);
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (float factor : {1.0f, 0.18033688f}) {
      std::fill(widened.begin(), widened.end(), -1.0f);
      cpu::WidenRow(dtype, bits.data(), 0, kCount, factor, widened.data());
      for (int64_t i = 0; i < kCount; ++i) {
        const float expected = factor * LoadAsFloat(dtype, bits.data(), i);
        if (std::isnan(expected)) {
          ASSERT_TRUE(std::isnan(widened[i])) << DTypeName(dtype) << " bits " << bits[i];
        } else {
          ASSERT_EQ(widened[i], expected) << DTypeName(dtype) << " bits " << bits[i];
        }
      }
    }
  }
}

TEST_F(CpuKernelTest, LargeProblemOnSampledRows) {
  std::mt19937 rng(12);
  const Shape4 shape{1, 131072, 2, 32};
  const OwnedTensor q = testing::RandomTensor(DType::kFloat32, shape, rng);
  const OwnedTensor k = testing::RandomTensor(DType::kFloat32, shape, rng);
  const OwnedTensor v = testing::RandomTensor(DType::kFloat32, shape, rng);
  AttentionSpec spec;
  spec.patterns = {{1024, 1}, {4096, 4}, {131072, 128}};
  spec.causal = true;
  spec.precision = Precision::kFloat32;
  OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, shape);
  ThreadPool pool(2);
  ASSERT_TRUE(
      CpuBackend().Run(q.view(), k.view(), v.view(), spec, out.mutable_view(), {&pool}).ok());
  std::uniform_int_distribution<int64_t> position(0, shape.seq_len - 1);
  for (int sample = 0; sample < 200; ++sample) {
    const int64_t n = sample < 2 ? sample * (shape.seq_len - 1) : position(rng);
    const int64_t h = sample % 2;
    const std::vector<double> ref = ReferenceRow(q.view(), k.view(), v.view(), spec, 0, n, h);
    for (int64_t d = 0; d < shape.head_dim; ++d) {
      const double got = out.at((n * 2 + h) * 32 + d);
      ASSERT_NEAR(got, ref[d], 1e-5 + 1e-4 * std::fabs(ref[d])) << "row " << n << " head " << h;
    }
  }
}

TEST_F(CpuKernelTest, CancellationStopsInsideOneLongSegment) {
  // One segment of 32768 kept rows is minutes of work on the portable path and seconds on AVX-512;
  // the kernel checks the flag per panel, so a cancel takes effect within milliseconds.
  std::mt19937 rng(13);
  const Shape4 shape{1, 32768, 1, 64};
  const OwnedTensor q = testing::RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, shape);
  const AttentionSpec spec = OneSegment(32768, false);
  std::atomic<bool> cancelled{false};
  ThreadPool pool(2);
  absl::Status status;
  std::atomic<bool> done{false};
  std::thread runner([&] {
    status = CpuBackend().Run(q.view(), q.view(), q.view(), spec, out.mutable_view(),
                              {&pool, &cancelled});
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // Let the run get going.
  ASSERT_FALSE(done.load()) << "the run finished before it could be cancelled";
  const auto cancel_time = std::chrono::steady_clock::now();
  cancelled = true;
  runner.join();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - cancel_time)
          .count();
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(ms, 250.0) << "cancel took " << ms << " ms";
}

TEST_F(CpuKernelTest, ARunCancelledBeforeItStartsWritesNothing) {
  // The output's reset (zeroing, or LONGNET's accumulator) goes in slices with a stop check each:
  // a request's output can be gigabytes of fresh pages. On a built plan, a run flagged before it
  // starts writes not one byte of the output, in either mode.
  std::mt19937 rng(17);
  const Shape4 shape{1, 4096, 2, 64};
  const OwnedTensor q = testing::RandomTensor(DType::kFloat32, shape, rng);
  ThreadPool pool(2);
  std::atomic<bool> cancelled{true};
  CpuBackend backend;
  for (const CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
    AttentionSpec spec = OneSegment(1024, false);
    spec.patterns.push_back({4096, 4});
    spec.mode = mode;
    OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, shape);
    const OwnedTensor poisoned = testing::PoisonedTensor(DType::kFloat32, shape);
    const PlanKey key = MakePlanKey(q.view(), q.view(), DType::kFloat32, spec, Precision::kFloat32,
                                    "cpu:0", pool.size());
    const absl::StatusOr<std::shared_ptr<Plan>> plan = backend.BuildPlan(key, nullptr);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const absl::Status status = backend.RunPlan(**plan, q.view(), q.view(), q.view(), spec,
                                                out.mutable_view(), {&pool, &cancelled});
    EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
    EXPECT_EQ(std::memcmp(out.view().data, poisoned.view().data, out.view().bytes), 0)
        << "a cancelled " << CombineModeName(mode) << " run wrote into the output";
  }
}

// bf16 products: the same boundaries and head dims, held to the bf16 error bound, once per bf16
// kernel (vdpbf16ps and AMX tiles), each skipped where the CPU lacks it.
class CpuKernelBf16Test : public CpuKernelTest,
                          public ::testing::WithParamInterface<cpu::Bf16Kernel> {
 protected:
  void SetUp() override {
    CpuKernelTest::SetUp();
    if (IsSkipped()) return;
    if (!(CpuBackend().isa() == cpu::Isa::kAvx512 && cpu::HasBf16DotProducts())) {
      GTEST_SKIP() << "no AVX512-BF16 on this path";
    }
    if (GetParam() == cpu::Bf16Kernel::kAmx && !cpu::HasAmxBf16()) {
      GTEST_SKIP() << "no AMX-BF16 on this CPU (or the OS did not grant the tile state): "
                   << DetectCpuFeatures().ToString();
    }
    bf16_kernel_ = GetParam();
    ASSERT_EQ(Backend().bf16_kernel(), GetParam());
  }
};

INSTANTIATE_TEST_SUITE_P(Kernels, CpuKernelBf16Test,
                         ::testing::Values(cpu::Bf16Kernel::kDotProducts, cpu::Bf16Kernel::kAmx),
                         [](const ::testing::TestParamInfo<cpu::Bf16Kernel>& info) {
                           return cpu::Bf16KernelName(info.param);
                         });

TEST_P(CpuKernelBf16Test, KeptCountsAtTileBoundaries) {
  for (int64_t kept : {int64_t{1}, cpu::kRowAlign + 1, cpu::kKeyAlign - 1, cpu::kKeyAlign + 1,
                       cpu::kKeyBlock - 1, cpu::kKeyBlock + 1}) {
    for (bool causal : {false, true}) {
      AttentionSpec spec = OneSegment(kept, causal);
      spec.precision = Precision::kBFloat16;
      ExpectMatchesReference({1, kept, 2, 16}, 1, spec, 2);
    }
  }
}

TEST_P(CpuKernelBf16Test, HeadDimsAndModes) {
  for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
    for (int64_t head_dim : {1, 16, 17, 48, 64, 128}) {
      AttentionSpec spec;
      spec.patterns = {{200, 1}, {600, 3}};
      spec.mode = mode;
      spec.causal = head_dim % 2 == 0;
      spec.precision = Precision::kBFloat16;
      ExpectMatchesReference({1, 900, 4, head_dim}, 2, spec, 3);
    }
  }
}

// Segments of several key blocks with sharp scores (scale 0.5 at D = 64: scores of a few units),
// so that later blocks raise the running max and each block's correction of the output matters.
TEST_P(CpuKernelBf16Test, SharpScoresOverSeveralKeyBlocks) {
  for (bool causal : {false, true}) {
    AttentionSpec spec = OneSegment(3 * cpu::kKeyBlock + 5, causal);
    spec.precision = Precision::kBFloat16;
    spec.softmax_scale = 0.5;
    ExpectMatchesReference({1, 3 * cpu::kKeyBlock + 5, 2, 64}, 1, spec, 2);
  }
}

TEST_P(CpuKernelBf16Test, HalfPrecisionInputs) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    AttentionSpec spec = OneSegment(700, true);
    spec.precision = Precision::kAuto;  // AUTO picks bf16 on this path.
    ExpectMatchesReference({1, 700, 2, 64}, 1, spec, 2, dtype);
  }
}

}  // namespace
}  // namespace da::engine
