#include "engine/precision_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace da::engine {
namespace {

using Kind = DeviceCapabilities::Kind;

constexpr unsigned Mask(std::initializer_list<Precision> precisions) {
  unsigned mask = 0;
  for (Precision p : precisions) mask |= 1u << static_cast<int>(p);
  return mask;
}

constexpr Precision kF32 = Precision::kFloat32;
constexpr Precision kBf16 = Precision::kBFloat16;
constexpr Precision kF16 = Precision::kFloat16;
constexpr Precision kF8 = Precision::kFloat8;
constexpr int kNoUpperSm = 1 << 30;

// The policy, one row per device class; the first row a device matches decides. docs/PRECISION.md
// shows the same rows: change both together.
struct PolicyRow {
  Kind kind;
  int min_sm;                  // kCuda: lowest compute capability (major * 10 + minor) of the row.
  int max_sm;                  // kCuda: highest, inclusive.
  bool needs_cpu_bf16_kernel;  // kCpu: the row applies only when the bf16 kernel can run.
  unsigned precisions;         // Mask of the supported precisions.
};

constexpr PolicyRow kPolicyTable[] = {
    // Pascal: no tensor cores, so fp16 products with fp32 accumulation gain nothing over fp32;
    // sm_61 (GeForce, Quadro, Tesla P4/P40) even runs fp16 arithmetic at 1/64 of the fp32 rate.
    {Kind::kCuda, 60, 69, false, Mask({kF32})},
    // Volta, Xavier, Turing: fp16 tensor cores with fp32 accumulation; no bf16.
    {Kind::kCuda, 70, 79, false, Mask({kF16, kF32})},
    // Ampere (A100, GA10x, Orin): bf16 and fp16 tensor cores at the same rate.
    {Kind::kCuda, 80, 88, false, Mask({kBf16, kF16, kF32})},
    // Ada, Hopper, Blackwell and later: fp8 tensor cores besides bf16 and fp16.
    {Kind::kCuda, 89, kNoUpperSm, false, Mask({kF8, kBf16, kF16, kF32})},
    // AVX512-BF16: vdpbf16ps multiplies bf16 pairs and accumulates in fp32.
    {Kind::kCpu, 0, 0, true, Mask({kBf16, kF32})},
    // Any other CPU computes in fp32. No CPU has an fp16 or fp8 kernel (avx512_fp16 is not used):
    // fp16 and bf16 inputs are widened to fp32 on load, so a CPU accepts them in any case.
    {Kind::kCpu, 0, 0, false, Mask({kF32})},
};

// Fastest first. bf16 and fp16 run at the same rate on every device that has both; bf16 comes
// first because its fp32-sized exponent keeps large scores from overflowing.
constexpr Precision kFastestFirst[] = {kF8, kBf16, kF16, kF32};

const PolicyRow* FindRow(const DeviceCapabilities& caps) {
  for (const PolicyRow& row : kPolicyTable) {
    if (row.kind != caps.kind) continue;
    if (caps.kind == Kind::kCuda && caps.cuda_sm >= row.min_sm && caps.cuda_sm <= row.max_sm) {
      return &row;
    }
    if (caps.kind == Kind::kCpu && (!row.needs_cpu_bf16_kernel || caps.cpu_bf16_kernel)) {
      return &row;
    }
  }
  return nullptr;
}

int WidthBits(Precision p) {
  switch (p) {
    case Precision::kFloat8:
      return 8;
    case Precision::kBFloat16:
    case Precision::kFloat16:
      return 16;
    case Precision::kAuto:
    case Precision::kFloat32:
      break;
  }
  return 32;
}

// 2e-2, 1.5e-3, 1e-5: short enough for reasons and messages.
std::string FormatBound(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.2e", value);  // "2.00e-02"
  std::string text(buffer);
  const size_t e = text.find('e');
  if (e == std::string::npos) return text;  // inf, nan
  std::string mantissa = text.substr(0, e);
  while (mantissa.back() == '0') mantissa.pop_back();
  if (mantissa.back() == '.') mantissa.pop_back();
  const int exponent = std::atoi(text.c_str() + e + 1);
  return exponent == 0 ? mantissa : absl::StrCat(mantissa, "e", exponent);
}

struct Candidate {
  Precision precision;
  const char* why;  // Why it is the nearest, for the reason.
};

// Every other compute precision, nearest first: the same width (bf16 <-> fp16), then the more
// precise ones from the least to the most precise, then the less precise ones from the most to the
// least precise (only reached when nothing at least as precise is supported).
std::vector<Candidate> FallbackOrder(Precision wish) {
  std::vector<Candidate> order;
  for (Precision p : kFastestFirst) {
    if (p != wish && WidthBits(p) == WidthBits(wish)) order.push_back({p, "same width"});
  }
  // kFastestFirst runs from the least to the most precise.
  for (Precision p : kFastestFirst) {
    if (WidthBits(p) != WidthBits(wish) && ErrorBound(p) < ErrorBound(wish)) {
      order.push_back({p, "more precise"});
    }
  }
  for (auto it = std::rbegin(kFastestFirst); it != std::rend(kFastestFirst); ++it) {
    if (WidthBits(*it) != WidthBits(wish) && ErrorBound(*it) > ErrorBound(wish)) {
      order.push_back({*it, "less precise: nothing at least as precise is supported"});
    }
  }
  return order;
}

bool Contains(const std::vector<Precision>& list, Precision p) {
  for (Precision q : list) {
    if (q == p) return true;
  }
  return false;
}

absl::StatusOr<PrecisionChoice> ChooseAuto(const DeviceCapabilities& caps,
                                           const std::vector<Precision>& supported,
                                           double tolerance) {
  std::vector<std::string> too_coarse;
  for (Precision p : supported) {
    if (ErrorBound(p) <= tolerance) {
      std::string reason =
          absl::StrCat("auto: ", PrecisionName(p), " is the fastest precision ", caps.Describe(),
                       " supports within tolerance ", FormatBound(tolerance), " (error bound ",
                       FormatBound(ErrorBound(p)), ")");
      if (!too_coarse.empty()) {
        absl::StrAppend(&reason, "; ", absl::StrJoin(too_coarse, ", "),
                        too_coarse.size() == 1 ? " exceeds it" : " exceed it");
      }
      return PrecisionChoice{p, std::move(reason)};
    }
    too_coarse.push_back(absl::StrCat(PrecisionName(p), " (", FormatBound(ErrorBound(p)), ")"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "spec.precision auto: no precision ", caps.Describe(), " supports is within tolerance ",
      FormatBound(tolerance), "; supported: ", absl::StrJoin(too_coarse, ", ")));
}

}  // namespace

std::string DeviceCapabilities::Describe() const {
  if (kind == Kind::kCuda) return absl::StrCat("cuda sm_", cuda_sm);
  std::string features = cpu.ToString();
  if (features.empty()) features = "no avx2 or avx512";
  // Say so when the hardware has bf16 dot products but the selected kernel path cannot use them,
  // or an error naming bf16 would read as a contradiction.
  if (cpu.avx512f && cpu.avx512_bf16 && !cpu_bf16_kernel) {
    absl::StrAppend(&features, "; bf16 kernel not selected");
  }
  // And why AUTO passes over bf16 where it is offered.
  if (cpu_bf16_kernel && cpu_bf16_slower) {
    absl::StrAppend(&features, "; bf16 dot products slower than fp32 here");
  }
  return absl::StrCat("cpu (", features, ")");
}

DeviceCapabilities CpuCapabilities(bool avx512_path_selected, bool bf16_on_amx) {
  DeviceCapabilities caps;
  caps.kind = DeviceCapabilities::Kind::kCpu;
  caps.cpu = DetectCpuFeatures();
  caps.cpu_bf16_kernel = avx512_path_selected && caps.cpu.avx512f && caps.cpu.avx512_bf16;
  caps.cpu_bf16_slower = caps.cpu_bf16_kernel && !bf16_on_amx && !caps.cpu.amd;
  return caps;
}

DeviceCapabilities CudaCapabilities(int major, int minor) {
  DeviceCapabilities caps;
  caps.kind = DeviceCapabilities::Kind::kCuda;
  caps.cuda_sm = major * 10 + minor;
  return caps;
}

// Bounds are a few unit roundoffs u of the product format (bf16 u = 2^-8, fp16 u = 2^-11, fp8
// e4m3 u = 2^-4) with fp32 accumulation; docs/PRECISION.md gives the argument and measurements.
double ErrorBound(Precision precision) {
  switch (precision) {
    case Precision::kFloat32:
      return 1e-5;
    case Precision::kBFloat16:
      return 2e-2;
    case Precision::kFloat16:
      return 5e-3;
    case Precision::kFloat8:
      return 1e-1;
    case Precision::kAuto:
      break;
  }
  return kDefaultTolerance;
}

std::vector<Precision> SupportedPrecisions(const DeviceCapabilities& caps) {
  std::vector<Precision> supported;
  const PolicyRow* row = FindRow(caps);
  if (row == nullptr) return supported;
  for (Precision p : kFastestFirst) {
    if (row->precisions & Mask({p})) supported.push_back(p);
  }
  if (caps.kind == Kind::kCpu && caps.cpu_bf16_slower) {
    std::stable_partition(supported.begin(), supported.end(),
                          [](Precision p) { return p == Precision::kFloat32; });
  }
  return supported;
}

std::string PrecisionListName(const std::vector<Precision>& precisions) {
  if (precisions.empty()) return "none";
  return absl::StrJoin(precisions, ", ", [](std::string* out, Precision p) {
    absl::StrAppend(out, PrecisionName(p));
  });
}

absl::Status PrecisionPolicyOptions::Validate() const {
  const double floor = ErrorBound(Precision::kFloat32);
  if (!std::isfinite(tolerance) || tolerance < floor) {
    return absl::InvalidArgumentError(absl::StrCat(
        "precision tolerance ", FormatBound(tolerance), " is below ", FormatBound(floor),
        ", the error bound of fp32, the most precise precision; use at least ",
        FormatBound(floor)));
  }
  return absl::OkStatus();
}

absl::StatusOr<PrecisionChoice> ChoosePrecision(const DeviceCapabilities& caps, Precision wish,
                                                const PrecisionPolicyOptions& options) {
  const std::vector<Precision> supported = SupportedPrecisions(caps);
  const std::string unsupported =
      absl::StrCat("spec.precision ", PrecisionName(wish), " is not supported by ", caps.Describe(),
                   "; supported: ", PrecisionListName(supported));
  if (supported.empty()) {
    // A GPU older than the table's first row (or an unset capability): nothing can run, and
    // fallback has nothing to fall back to.
    return absl::InvalidArgumentError(absl::StrCat(
        unsupported, caps.kind == Kind::kCuda ? " (cuda devices need sm_60 or newer)" : ""));
  }
  if (wish == Precision::kAuto) return ChooseAuto(caps, supported, options.tolerance);
  if (Contains(supported, wish)) {
    return PrecisionChoice{
        wish, absl::StrCat("requested ", PrecisionName(wish), "; ", caps.Describe(),
                           " supports it (error bound ", FormatBound(ErrorBound(wish)), ")")};
  }
  if (!options.fallback) return absl::InvalidArgumentError(unsupported);
  for (const Candidate& candidate : FallbackOrder(wish)) {
    if (!Contains(supported, candidate.precision)) continue;
    return PrecisionChoice{
        candidate.precision,
        absl::StrCat("fallback: ", PrecisionName(wish), " requested, which ", caps.Describe(),
                     " does not support (supported: ", PrecisionListName(supported), "); ",
                     PrecisionName(candidate.precision), " is the nearest (", candidate.why,
                     ", error bound ", FormatBound(ErrorBound(candidate.precision)), ")")};
  }
  return absl::InvalidArgumentError(unsupported);  // Unreachable: supported is not empty.
}

}  // namespace da::engine
