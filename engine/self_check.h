// A start-up self-check of the engine's compute path: one small random attention problem run
// through Engine::Run on every device of the engine (RunRequest::device) and compared, element by
// element, with the fp64 reference (ReferenceRow).
// The server keeps readiness off until it passes, so a broken kernel, a bad ISA dispatch or a
// miscompiled build never takes traffic.
//
//   absl::StatusOr<SelfCheckResult> checked = SelfCheck(*engine);
//   if (!checked.ok()) ...  // INTERNAL: the device, the element, its value and the expected one.
//
// The problem is fixed in shape (fp32, [1, 80, 4, 16] queries, 2 key/value heads, two LONGNET
// patterns whose last segments are short, so grouped-query heads, offsets and partial segments
// all take part) and seeded, so two runs compute the same thing. It costs well under a
// millisecond of compute and leaves one small plan in the cache. Thread safe like Engine::Run.
//
// Then it times a larger problem (fp32 [1, 512, 4, 64], one dense segment: 268 MFLOP, a few
// milliseconds on two AVX2 cores) twice and reports the engine's measured throughput: what the
// server's up-front deadline checks use before its first real run (Engine::SetStartupThroughput).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"

namespace da::engine {

struct SelfCheckResult {
  std::string device;           // The devices checked, "cpu:0,cpu:1".
  Precision precision;          // The compute precision the engine chose for it.
  double max_abs_error = 0;     // Largest |output - reference| over every element and device.
  double tolerance = 0;         // The bound it was held to (atol + rtol * |reference|, at worst).
  double flops_per_second = 0;  // Measured on the timed problem; 0 if it ran too short to tell.
};

// Runs the check. INTERNAL when the run fails or an element is off by more than the tolerance of
// the precision used (fp32: 1e-4 + 1e-3 * |reference|; bf16, fp16: 3e-2 + 3e-2 * |reference|),
// naming the device, the element and both values; a NaN output always fails.
absl::StatusOr<SelfCheckResult> SelfCheck(Engine& engine);

}  // namespace da::engine
