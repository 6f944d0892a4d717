// The policy table of docs/PRECISION.md over synthetic capabilities: every GPU generation and CPU
// feature set, every wish, with and without fallback, and the tolerance option.
#include "engine/precision_policy.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace da::engine {
namespace {

constexpr Precision kAuto = Precision::kAuto;
constexpr Precision kF32 = Precision::kFloat32;
constexpr Precision kBf16 = Precision::kBFloat16;
constexpr Precision kF16 = Precision::kFloat16;
constexpr Precision kF8 = Precision::kFloat8;
constexpr std::optional<Precision> kRefused = std::nullopt;

constexpr std::array<Precision, 5> kWishes = {kAuto, kF32, kBf16, kF16, kF8};

DeviceCapabilities Cpu(bool avx2, bool avx512f, bool avx512_bf16, bool bf16_kernel,
                       bool bf16_slower = false) {
  DeviceCapabilities caps;
  caps.kind = DeviceCapabilities::Kind::kCpu;
  caps.cpu.avx2 = avx2;
  caps.cpu.fma = avx2;
  caps.cpu.avx512f = avx512f;
  caps.cpu.avx512_bf16 = avx512_bf16;
  caps.cpu_bf16_kernel = bf16_kernel;
  caps.cpu_bf16_slower = bf16_slower;
  return caps;
}

// The result for each wish, in kWishes order: a precision, or kRefused (INVALID_ARGUMENT).
using PerWish = std::array<std::optional<Precision>, 5>;

// One row of docs/PRECISION.md, seen from the request side.
struct TableRow {
  const char* name;
  DeviceCapabilities caps;
  std::string supported;  // As error messages list it, fastest first.
  PerWish wish;           // Default options.
  PerWish fallback;       // With options.fallback.
};

std::vector<TableRow> Table() {
  const std::string all = "fp8, bf16, fp16, fp32";
  const std::string ampere = "bf16, fp16, fp32";
  // Each PerWish lists AUTO, FP32, BF16, FP16, FP8.
  const PerWish fp32_only{kF32, kF32, kRefused, kRefused, kRefused};
  const PerWish fp32_only_fb{kF32, kF32, kF32, kF32, kF32};
  const PerWish volta{kF16, kF32, kRefused, kF16, kRefused};
  const PerWish volta_fb{kF16, kF32, kF16, kF16, kF16};
  const PerWish amp{kBf16, kF32, kBf16, kF16, kRefused};
  const PerWish amp_fb{kBf16, kF32, kBf16, kF16, kBf16};
  const PerWish fp8{kBf16, kF32, kBf16, kF16, kF8};
  const PerWish cpu_bf16{kBf16, kF32, kBf16, kRefused, kRefused};
  const PerWish cpu_bf16_fb{kBf16, kF32, kBf16, kBf16, kBf16};
  // AUTO takes fp32 where the bf16 kernel is the slower; bf16 is still there when asked for, and
  // still the nearest to fp16 and fp8 (fallback goes by precision, not speed).
  const PerWish cpu_slow_bf16{kF32, kF32, kBf16, kRefused, kRefused};
  const PerWish cpu_slow_bf16_fb{kF32, kF32, kBf16, kBf16, kBf16};
  const PerWish none{kRefused, kRefused, kRefused, kRefused, kRefused};
  return {
      {"sm_50", CudaCapabilities(5, 0), "none", none, none},
      {"sm_60", CudaCapabilities(6, 0), "fp32", fp32_only, fp32_only_fb},
      {"sm_61", CudaCapabilities(6, 1), "fp32", fp32_only, fp32_only_fb},
      {"sm_70", CudaCapabilities(7, 0), "fp16, fp32", volta, volta_fb},
      {"sm_75", CudaCapabilities(7, 5), "fp16, fp32", volta, volta_fb},
      {"sm_80", CudaCapabilities(8, 0), ampere, amp, amp_fb},
      {"sm_86", CudaCapabilities(8, 6), ampere, amp, amp_fb},
      {"sm_87", CudaCapabilities(8, 7), ampere, amp, amp_fb},
      {"sm_89", CudaCapabilities(8, 9), all, fp8, fp8},
      {"sm_90", CudaCapabilities(9, 0), all, fp8, fp8},
      {"sm_100", CudaCapabilities(10, 0), all, fp8, fp8},
      {"sm_120", CudaCapabilities(12, 0), all, fp8, fp8},
      {"cpu none", Cpu(false, false, false, false), "fp32", fp32_only, fp32_only_fb},
      {"cpu avx2 fma", Cpu(true, false, false, false), "fp32", fp32_only, fp32_only_fb},
      {"cpu avx512f", Cpu(true, true, false, false), "fp32", fp32_only, fp32_only_fb},
      {"cpu avx512_bf16, avx2 path", Cpu(true, true, true, false), "fp32", fp32_only, fp32_only_fb},
      {"cpu avx512_bf16, avx512 path", Cpu(true, true, true, true), "bf16, fp32", cpu_bf16,
       cpu_bf16_fb},
      {"cpu avx512_bf16, avx512 path, bf16 the slower", Cpu(true, true, true, true, true),
       "fp32, bf16", cpu_slow_bf16, cpu_slow_bf16_fb},
  };
}

void ExpectContains(const std::string& text, const std::string& needle, const std::string& where) {
  EXPECT_NE(text.find(needle), std::string::npos)
      << where << ": '" << text << "' lacks '" << needle << "'";
}

TEST(PrecisionPolicyTest, TableForEveryDeviceAndWish) {
  for (const TableRow& row : Table()) {
    EXPECT_EQ(PrecisionListName(SupportedPrecisions(row.caps)), row.supported) << row.name;
    for (size_t i = 0; i < kWishes.size(); ++i) {
      const std::string where = std::string(row.name) + " wish " + PrecisionName(kWishes[i]);
      const absl::StatusOr<PrecisionChoice> choice = ChoosePrecision(row.caps, kWishes[i]);
      if (row.wish[i].has_value()) {
        ASSERT_TRUE(choice.ok()) << where << ": " << choice.status();
        EXPECT_EQ(choice->precision, *row.wish[i]) << where;
        ExpectContains(choice->reason, kWishes[i] == kAuto ? "auto: " : "requested ", where);
        ExpectContains(choice->reason, row.caps.Describe(), where);
      } else {
        ASSERT_EQ(choice.status().code(), absl::StatusCode::kInvalidArgument) << where;
        ExpectContains(std::string(choice.status().message()),
                       "spec.precision " + PrecisionName(kWishes[i]) + " is not supported by " +
                           row.caps.Describe() + "; supported: " + row.supported,
                       where);
      }
    }
  }
}

TEST(PrecisionPolicyTest, FallbackUsesTheNearestSupportedPrecision) {
  const PrecisionPolicyOptions options{.fallback = true};
  for (const TableRow& row : Table()) {
    for (size_t i = 0; i < kWishes.size(); ++i) {
      const std::string where = std::string(row.name) + " wish " + PrecisionName(kWishes[i]);
      const absl::StatusOr<PrecisionChoice> choice = ChoosePrecision(row.caps, kWishes[i], options);
      if (!row.fallback[i].has_value()) {
        EXPECT_EQ(choice.status().code(), absl::StatusCode::kInvalidArgument) << where;
        continue;
      }
      ASSERT_TRUE(choice.ok()) << where << ": " << choice.status();
      EXPECT_EQ(choice->precision, *row.fallback[i]) << where;
      // Supported wishes are untouched by fallback; the others say what happened.
      if (row.wish[i].has_value()) {
        EXPECT_EQ(choice->precision, *row.wish[i]) << where;
        EXPECT_EQ(choice->reason.find("fallback"), std::string::npos) << where;
      } else {
        ExpectContains(choice->reason, "fallback: " + PrecisionName(kWishes[i]) + " requested",
                       where);
        ExpectContains(choice->reason, row.caps.Describe(), where);
        ExpectContains(choice->reason, PrecisionName(choice->precision) + " is the nearest", where);
      }
    }
  }
}

TEST(PrecisionPolicyTest, FallbackIsNeverLessPreciseWhenSomethingAtLeastAsPreciseExists) {
  const PrecisionPolicyOptions options{.fallback = true};
  for (const TableRow& row : Table()) {
    for (Precision wish : {kBf16, kF16, kF8}) {
      const absl::StatusOr<PrecisionChoice> choice = ChoosePrecision(row.caps, wish, options);
      if (!choice.ok()) continue;
      const bool same_width = (wish == kBf16 || wish == kF16) &&
                              (choice->precision == kBf16 || choice->precision == kF16);
      EXPECT_TRUE(same_width || ErrorBound(choice->precision) <= ErrorBound(wish))
          << row.name << " wish " << PrecisionName(wish) << " got "
          << PrecisionName(choice->precision);
    }
  }
}

TEST(PrecisionPolicyTest, TooOldGpuIsRefusedNamingTheDevice) {
  for (const PrecisionPolicyOptions& options :
       {PrecisionPolicyOptions{}, PrecisionPolicyOptions{.fallback = true}}) {
    const absl::StatusOr<PrecisionChoice> choice =
        ChoosePrecision(CudaCapabilities(5, 2), kAuto, options);
    EXPECT_EQ(choice.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(choice.status().message(),
              "spec.precision auto is not supported by cuda sm_52; supported: none (cuda devices "
              "need sm_60 or newer)");
  }
}

TEST(PrecisionPolicyTest, ErrorMessageMatchesTheDocumentedForm) {
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(7, 5), kBf16).status().message(),
            "spec.precision bf16 is not supported by cuda sm_75; supported: fp16, fp32");
  EXPECT_EQ(ChoosePrecision(Cpu(true, true, true, false), kBf16).status().message(),
            "spec.precision bf16 is not supported by cpu (avx2 fma avx512f avx512_bf16; bf16 "
            "kernel not selected); supported: fp32");
}

TEST(PrecisionPolicyTest, FallbackReasonNamesWhyTheChoiceIsNearest) {
  const PrecisionPolicyOptions options{.fallback = true};
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(7, 5), kBf16, options)->reason,
            "fallback: bf16 requested, which cuda sm_75 does not support (supported: fp16, fp32); "
            "fp16 is the nearest (same width, error bound 5e-3)");
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(8, 6), kF8, options)->reason,
            "fallback: fp8 requested, which cuda sm_86 does not support (supported: bf16, fp16, "
            "fp32); bf16 is the nearest (more precise, error bound 2e-2)");
}

TEST(PrecisionPolicyTest, AutoReasonSaysWhyAndWhatItSkipped) {
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(9, 0), kAuto)->reason,
            "auto: bf16 is the fastest precision cuda sm_90 supports within tolerance 2e-2 (error "
            "bound 2e-2); fp8 (1e-1) exceeds it");
  EXPECT_EQ(ChoosePrecision(Cpu(true, false, false, false), kAuto)->reason,
            "auto: fp32 is the fastest precision cpu (avx2 fma) supports within tolerance 2e-2 "
            "(error bound 1e-5)");
}

TEST(PrecisionPolicyTest, ToleranceBoundsAuto) {
  const DeviceCapabilities hopper = CudaCapabilities(9, 0);
  const auto auto_with = [&](double tolerance) {
    return ChoosePrecision(hopper, kAuto, {.tolerance = tolerance});
  };
  EXPECT_EQ(auto_with(1e-5)->precision, kF32);
  EXPECT_EQ(auto_with(1e-2)->precision, kF16);  // bf16's 2e-2 is over it.
  EXPECT_EQ(auto_with(kDefaultTolerance)->precision, kBf16);
  EXPECT_EQ(auto_with(1e-1)->precision, kF8);  // fp8 under AUTO only when the tolerance allows.
  ExpectContains(auto_with(1e-5)->reason, "fp8 (1e-1), bf16 (2e-2), fp16 (5e-3) exceed it", "1e-5");
  ExpectContains(auto_with(1e-2)->reason, "within tolerance 1e-2", "1e-2");
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(7, 5), kAuto, {.tolerance = 1e-3})->precision, kF32);

  const absl::StatusOr<PrecisionChoice> too_tight = auto_with(1e-6);
  EXPECT_EQ(too_tight.status().code(), absl::StatusCode::kInvalidArgument);
  ExpectContains(std::string(too_tight.status().message()), "within tolerance 1e-6", "1e-6");
}

TEST(PrecisionPolicyTest, ExplicitWishIgnoresTheTolerance) {
  const PrecisionPolicyOptions strict{.tolerance = 1e-5};
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(9, 0), kF8, strict)->precision, kF8);
  EXPECT_EQ(ChoosePrecision(CudaCapabilities(8, 0), kBf16, strict)->precision, kBf16);
}

TEST(PrecisionPolicyTest, OptionsValidateTheTolerance) {
  EXPECT_TRUE(PrecisionPolicyOptions{}.Validate().ok());
  EXPECT_TRUE(PrecisionPolicyOptions{.tolerance = 1e-5}.Validate().ok());
  EXPECT_TRUE(PrecisionPolicyOptions{.tolerance = 0.5}.Validate().ok());
  for (double bad : {9e-6, 0.0, -1.0, std::nan(""), HUGE_VAL}) {
    const absl::Status status = PrecisionPolicyOptions{.tolerance = bad}.Validate();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    ExpectContains(std::string(status.message()), "precision tolerance", "validate");
  }
  ExpectContains(std::string(PrecisionPolicyOptions{.tolerance = 9e-6}.Validate().message()),
                 "precision tolerance 9e-6 is below 1e-5", "9e-6");
}

TEST(PrecisionPolicyTest, ErrorBoundsAreTheDocumentedOnes) {
  EXPECT_EQ(ErrorBound(kF32), 1e-5);
  EXPECT_EQ(ErrorBound(kBf16), 2e-2);
  EXPECT_EQ(ErrorBound(kF16), 5e-3);
  EXPECT_EQ(ErrorBound(kF8), 1e-1);
  EXPECT_EQ(ErrorBound(kAuto), kDefaultTolerance);
  EXPECT_EQ(kDefaultTolerance, ErrorBound(kBf16));
}

TEST(PrecisionPolicyTest, CapabilitiesAndDescriptions) {
  EXPECT_EQ(CudaCapabilities(8, 6).cuda_sm, 86);
  EXPECT_EQ(CudaCapabilities(10, 0).Describe(), "cuda sm_100");
  EXPECT_EQ(Cpu(true, true, true, true).Describe(), "cpu (avx2 fma avx512f avx512_bf16)");
  EXPECT_EQ(Cpu(false, false, false, false).Describe(), "cpu (no avx2 or avx512)");
  EXPECT_EQ(Cpu(true, true, true, true, true).Describe(),
            "cpu (avx2 fma avx512f avx512_bf16; bf16 dot products slower than fp32 here)");

  const CpuFeatures features = DetectCpuFeatures();
  const bool bf16_hardware = features.avx512f && features.avx512_bf16;
  for (bool amx : {false, true}) {
    const DeviceCapabilities selected = CpuCapabilities(true, amx);
    EXPECT_EQ(selected.kind, DeviceCapabilities::Kind::kCpu);
    EXPECT_EQ(selected.cpu.ToString(), features.ToString());
    EXPECT_EQ(selected.cpu_bf16_kernel, bf16_hardware);
    // vdpbf16ps is the slower on every vendor but AMD; AMX never.
    const bool slower = bf16_hardware && !amx && !features.amd;
    EXPECT_EQ(selected.cpu_bf16_slower, slower) << "amx " << amx;
    EXPECT_EQ(ChoosePrecision(selected, kAuto)->precision, bf16_hardware && !slower ? kBf16 : kF32)
        << "amx " << amx;
  }
  EXPECT_FALSE(CpuCapabilities(false, false).cpu_bf16_kernel);
  EXPECT_FALSE(CpuCapabilities(false, false).cpu_bf16_slower);
}

}  // namespace
}  // namespace da::engine
