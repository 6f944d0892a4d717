// What a request asks the engine to compute, and the checks that make a request well formed.
// The math is normative in docs/MATH.md (DESIGN §2).
//
//   AttentionSpec spec;
//   spec.patterns = {{2048, 1}, {4096, 2}};
//   spec.mode = CombineMode::kLongNet;
//   DA_RETURN_IF_ERROR(spec.Validate());
//   DA_RETURN_IF_ERROR(ValidateProblem(q, k, v, spec, limits));
//
// Every failure is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a configured limit) with a message
// that names the field, the value and the limit.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/tensor.h"

namespace da::engine {

// One dilated pattern: segments of segment_len tokens, every dilation-th token kept.
struct Pattern {
  int64_t segment_len = 0;  // w >= 1.
  int64_t dilation = 1;     // r with 1 <= r <= w.
};

enum class CombineMode {
  kLongNet,  // Every head runs every pattern; outputs combined with softmax over their LSEs.
  kGrouped,  // Head group i runs pattern i only; the output is divided by the pattern count.
};

// The precision a request wishes its dot products to use.
enum class Precision { kAuto, kFloat32, kBFloat16, kFloat16, kFloat8 };

enum class ShardPolicy { kAuto, kNone, kHeads, kSequence };

std::string CombineModeName(CombineMode mode);   // "longnet", "grouped".
std::string PrecisionName(Precision precision);  // "auto", "fp32", "bf16", "fp16", "fp8".
std::string ShardPolicyName(ShardPolicy policy);

// The largest |softmax_scale| a request may set. Backends fold scale * log2(e) into q in fp32, so
// the scores stay finite for every permitted scale and every input within fp16's range
// (|x| <= 65504, head_dim <= 256: |score| <= 1.6e18); docs/MATH.md states the bound. Scales near
// it already make the softmax an argmax, so no real use is refused.
inline constexpr double kMaxSoftmaxScale = 1e6;

// The longest segment a request may name: 2^31 tokens. A segment at least as long as the sequence
// is one segment of the whole sequence, so no real use is refused, and every count derived from a
// segment or a dilation (ceil divisions, strides w * H * D in elements, with H * D within a
// message) stays inside int64. Unbounded, w = r = 2^63 - 1 wrapped (H + r - 1) / r to zero: a
// division by zero that stopped the server.
inline constexpr int64_t kMaxSegmentLen = int64_t{1} << 31;

struct AttentionSpec {
  std::vector<Pattern> patterns;
  bool causal = false;
  std::optional<double> softmax_scale;  // Default 1/sqrt(head_dim); |scale| <= kMaxSoftmaxScale.
  CombineMode mode = CombineMode::kLongNet;
  Precision precision = Precision::kAuto;
  ShardPolicy shard_policy = ShardPolicy::kAuto;

  // Checks the patterns and the scale on their own (no shapes involved).
  absl::Status Validate() const;

  // The scale used for a given head_dim.
  double ScaleFor(int64_t head_dim) const;

  // "(2048,1),(4096,2)"; past 16 patterns the first 16 and ",...(N_in_all)" (no spaces: a
  // log line's value).
  std::string PatternsToString() const;
};

// Configured ceilings; 0 means unlimited.
struct Limits {
  int64_t max_tokens = 0;         // Per request: batch * seq_len.
  int64_t max_request_bytes = 0;  // Per request: q + k + v + output bytes.
  int64_t max_patterns = 64;
  int64_t max_head_dim = 1024;
  // Query heads (and so key heads): far above any model's, and a bound on what per-head tables
  // (plans, estimates) can cost before a request's memory is reserved.
  int64_t max_heads = 65536;
};

// The shape of a problem, as implied by q and k.
struct ProblemShape {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;

  Shape4 QueryShape() const { return {batch, seq_len, heads, head_dim}; }
  Shape4 KeyShape() const { return {batch, seq_len, kv_heads, head_dim}; }
};

// Validates the shape and the spec against each other and the limits, without touching data.
// out_dtype: the output's dtype (for max_request_bytes); none: dtype.
absl::Status ValidateShape(const ProblemShape& shape, DType dtype, const AttentionSpec& spec,
                           const Limits& limits, std::optional<DType> out_dtype = std::nullopt);

// Validates q, k, v views: rank-4 shapes, equal batch/seq/head_dim, H % Hkv == 0, equal dtypes,
// byte counts equal to shape x dtype size, then everything ValidateShape checks.
absl::Status ValidateProblem(const TensorView& q, const TensorView& k, const TensorView& v,
                             const AttentionSpec& spec, const Limits& limits,
                             std::optional<DType> out_dtype = std::nullopt);

// Total bytes of q, k, v (of dtype) and the output (of out_dtype; none: dtype) of a problem.
int64_t RequestBytes(const ProblemShape& shape, DType dtype,
                     std::optional<DType> out_dtype = std::nullopt);

}  // namespace da::engine
