// The precision policy: which compute precision a device runs a request in, and why. One table
// (precision_policy.cc, shown again in docs/PRECISION.md) maps device capabilities to the
// precisions the device supports; ChoosePrecision applies the request's wish to it.
//
//   const DeviceCapabilities caps = CudaCapabilities(8, 6);  // or CpuCapabilities(avx512_path)
//   DA_ASSIGN_OR_RETURN(PrecisionChoice choice, ChoosePrecision(caps, spec.precision, options));
//   // choice.precision: bf16 for AUTO on sm_86; choice.reason: why, for ExecutionInfo.
//
// Rules (docs/PRECISION.md):
// - AUTO picks the fastest supported precision whose ErrorBound is within options.tolerance; under
//   the default tolerance that is never fp8, which is used only when asked for.
// - An explicit wish the device supports is used as asked, whatever the tolerance.
// - An explicit wish the device does not support is INVALID_ARGUMENT naming the wish, the device
//   and the supported precisions; with options.fallback the nearest supported precision is used
//   instead and the reason starts with "fallback:".
// - A device that supports nothing (a GPU older than sm_60) is INVALID_ARGUMENT for every wish.
// All functions are pure and thread-safe, except CpuCapabilities, which reads cpuid.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/backend.h"
#include "engine/device.h"

namespace da::engine {

// What a device can do, from cpuid (CPU) or device properties (CUDA).
struct DeviceCapabilities {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  CpuFeatures cpu;               // kCpu: the features cpuid reports.
  bool cpu_bf16_kernel = false;  // kCpu: the bf16 kernel can run (avx512f, avx512_bf16 and the
                                 // AVX-512 path selected).
  // kCpu: that kernel is slower than the fp32 one on this CPU, so AUTO prefers fp32 (bf16 stays
  // available when asked for). vdpbf16ps on Intel: 0.70-0.75x the fp32 kernel, measured
  // (docs/PERFORMANCE.md, "bf16 on AMX tiles"); on AMD Zen 4 it is 1.6x, and AMX tiles 2.2-3.4x.
  bool cpu_bf16_slower = false;
  int cuda_sm = 0;  // kCuda: compute capability as major * 10 + minor, e.g. 90.

  // "cpu (avx2 fma avx512f avx512_bf16)", "cuda sm_90"; names the device in reasons and errors.
  std::string Describe() const;
};

// This CPU, from DetectCpuFeatures(); avx512_path_selected: the CPU backend runs its AVX-512
// kernels (not forced to AVX2 or portable code by DA_CPU_ISA); bf16_on_amx: its bf16 kernel is
// the AMX one. The bf16 kernel counts as slower than fp32 on a CPU that is not AMD and runs it on
// vdpbf16ps.
DeviceCapabilities CpuCapabilities(bool avx512_path_selected, bool bf16_on_amx);
// A CUDA device of compute capability major.minor (cudaDeviceProp::major, ::minor).
DeviceCapabilities CudaCapabilities(int major, int minor);

// The documented error bound of a compute precision: the relative L2 error of the output against
// the fp64 reference. fp32 1e-5, bf16 2e-2, fp16 5e-3, fp8 1e-1. kAuto is not a compute precision;
// it returns kDefaultTolerance, the bound AUTO meets under default options.
double ErrorBound(Precision precision);

// The tolerance AUTO chooses within unless configured otherwise: bf16's bound.
constexpr double kDefaultTolerance = 2e-2;

// The precisions caps can compute in, fastest first (fp8, bf16, fp16, fp32; bf16 and fp16 run at
// the same rate, bf16 comes first for its range; fp32 before bf16 on a CPU whose bf16 kernel is
// the slower). Empty for a device the policy cannot use.
std::vector<Precision> SupportedPrecisions(const DeviceCapabilities& caps);

// "fp16, fp32"; "none" for an empty list.
std::string PrecisionListName(const std::vector<Precision>& precisions);

struct PrecisionPolicyOptions {
  bool fallback = false;  // An unsupported explicit wish uses the nearest supported precision.
  double tolerance = kDefaultTolerance;  // AUTO's ceiling on ErrorBound.

  // INVALID_ARGUMENT unless tolerance is finite and at least ErrorBound(fp32), the bound of the
  // most precise precision (below that AUTO could never choose anything).
  absl::Status Validate() const;
};

// The compute precision for a request's wish on a device, with a non-empty reason.
absl::StatusOr<PrecisionChoice> ChoosePrecision(const DeviceCapabilities& caps, Precision wish,
                                                const PrecisionPolicyOptions& options = {});

}  // namespace da::engine
