#include "engine/self_check.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/reference/reference_backend.h"
#include "engine/status_macros.h"

namespace da::engine {
namespace {

struct Bound {
  double atol;
  double rtol;
};

// fp32 products accumulate in fp32: a few ulps over 16-element dot products and a softmax over at
// most 40 keys. Reduced-precision products round every input to 8 (bf16) or 11 (fp16) bits of
// mantissa first; 3e-2 still catches any kernel that computes the wrong thing, whose errors are of
// the size of the outputs themselves (about 0.1 to 1 here).
Bound BoundFor(Precision precision) {
  return precision == Precision::kFloat32 ? Bound{1e-4, 1e-3} : Bound{3e-2, 3e-2};
}

std::vector<float> RandomValues(int64_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(count);
  for (float& x : values) x = uniform(rng);
  return values;
}

// The engine's measured throughput after two runs of a fixed fp32 problem (the first may build its
// plan; the engine times compute without the build either way); 0 when it could not be measured.
double MeasureThroughput(Engine& engine) {
  const Shape4 shape{1, 512, 4, 64};
  std::mt19937 rng(20241203);
  const std::vector<float> q = RandomValues(shape.elements(), rng);
  std::vector<float> out(shape.elements());
  const int64_t bytes = static_cast<int64_t>(q.size() * sizeof(float));
  RunRequest request;
  request.q = {DType::kFloat32, shape, q.data(), bytes};
  request.k = request.q;
  request.v = request.q;
  request.out = {DType::kFloat32, shape, out.data(), bytes};
  request.spec.patterns = {{512, 1}};
  request.spec.precision = Precision::kFloat32;
  request.request_id = "self-check-throughput";
  for (int i = 0; i < 2; ++i) {
    if (!engine.Run(request).ok()) return 0;
  }
  return engine.stats().measured_flops_per_second;
}

// The check's problem on one device, compared element by element with the reference.
absl::StatusOr<SelfCheckResult> CheckDevice(Engine& engine, const std::string& device) {
  // Head dimension 32: one every backend computes (the CUDA backend takes 32, 64 and 128).
  const Shape4 q_shape{1, 80, 4, 32};
  const Shape4 kv_shape{1, 80, 2, 32};
  // A fixed seed: a failure reproduces, and the check does not depend on the time of start-up.
  std::mt19937 rng(20240607);
  const std::vector<float> q = RandomValues(q_shape.elements(), rng);
  const std::vector<float> k = RandomValues(kv_shape.elements(), rng);
  const std::vector<float> v = RandomValues(kv_shape.elements(), rng);
  // NaN everywhere first, so an element the backend forgets to write fails the comparison.
  std::vector<float> out(q_shape.elements(), std::nanf(""));

  RunRequest request;
  request.q = {DType::kFloat32, q_shape, q.data(), static_cast<int64_t>(q.size() * sizeof(float))};
  request.k = {DType::kFloat32, kv_shape, k.data(), static_cast<int64_t>(k.size() * sizeof(float))};
  request.v = {DType::kFloat32, kv_shape, v.data(), static_cast<int64_t>(v.size() * sizeof(float))};
  request.out = {DType::kFloat32, q_shape, out.data(),
                 static_cast<int64_t>(out.size() * sizeof(float))};
  // 80 = 2 * 32 + 16 and 80 = 48 + 32: both patterns end on a short segment.
  request.spec.patterns = {{32, 1}, {48, 2}};
  request.spec.mode = CombineMode::kLongNet;
  request.request_id = "self-check";
  request.device = device;

  absl::StatusOr<ExecutionInfo> info = engine.Run(request);
  if (!info.ok()) {
    return absl::InternalError(absl::StrCat("self-check run failed: ", info.status().ToString()));
  }
  SelfCheckResult result;
  result.device = info->devices.empty() ? "unknown device" : info->devices.front();
  result.precision = info->precision_used;
  const Bound bound = BoundFor(result.precision);
  for (int64_t position = 0; position < q_shape.seq_len; ++position) {
    for (int64_t head = 0; head < q_shape.heads; ++head) {
      const std::vector<double> expected =
          ReferenceRow(request.q, request.k, request.v, request.spec, 0, position, head);
      for (int64_t d = 0; d < q_shape.head_dim; ++d) {
        const double got = out[(position * q_shape.heads + head) * q_shape.head_dim + d];
        const double allowed = bound.atol + bound.rtol * std::abs(expected[d]);
        const double error = std::abs(got - expected[d]);
        // Written so that a NaN output (error NaN) fails too.
        if (!(error <= allowed)) {
          return absl::InternalError(absl::StrFormat(
              "self-check on %s (%s, backend %s): output[0, %d, %d, %d] is %.6g, the reference "
              "is %.6g; error %.3g exceeds the tolerance %.3g",
              result.device, PrecisionName(result.precision), info->backend, position, head, d, got,
              expected[d], error, allowed));
        }
        result.max_abs_error = std::max(result.max_abs_error, error);
        result.tolerance = std::max(result.tolerance, allowed);
      }
    }
  }
  return result;
}

}  // namespace

absl::StatusOr<SelfCheckResult> SelfCheck(Engine& engine) {
  SelfCheckResult result;
  std::vector<std::string> ids;
  for (const DeviceInfo& device : engine.devices()) {
    DA_ASSIGN_OR_RETURN(const SelfCheckResult checked, CheckDevice(engine, device.id));
    if (ids.empty()) result = checked;
    result.max_abs_error = std::max(result.max_abs_error, checked.max_abs_error);
    result.tolerance = std::max(result.tolerance, checked.tolerance);
    ids.push_back(checked.device);
  }
  if (ids.empty()) return absl::InternalError("self-check: the engine has no device");
  result.device = absl::StrJoin(ids, ",");
  result.flops_per_second = MeasureThroughput(engine);
  return result;
}

}  // namespace da::engine
