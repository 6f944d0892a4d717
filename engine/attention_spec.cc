#include "engine/attention_spec.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace da::engine {
namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

// Checks one tensor's shape and byte count; name is "query", "key" or "value".
absl::Status ValidateTensor(const char* name, const TensorView& t) {
  const Shape4& s = t.shape;
  const std::pair<const char*, int64_t> dims[] = {
      {"batch", s.batch}, {"seq", s.seq_len}, {"heads", s.heads}, {"head_dim", s.head_dim}};
  for (const auto& [dim_name, value] : dims) {
    if (value < 1) {
      return Invalid(absl::StrCat(name, ".shape ", dim_name, " is ", value, "; must be >= 1"));
    }
  }
  // The dimensions come straight from the client: multiply without signed overflow.
  int64_t expected = DTypeSize(t.dtype);
  for (const auto& [dim_name, value] : dims) {
    if (__builtin_mul_overflow(expected, value, &expected)) {
      return Invalid(absl::StrCat(name, ".shape ", s.ToString(), " of ", DTypeName(t.dtype),
                                  " needs more than 2^63 bytes; ", name, ".data has ", t.bytes));
    }
  }
  if (t.bytes != expected) {
    return Invalid(absl::StrCat(name, ".data has ", t.bytes, " bytes; shape ", s.ToString(), " of ",
                                DTypeName(t.dtype), " needs ", expected));
  }
  if (t.data == nullptr) return Invalid(absl::StrCat(name, ".data is missing"));
  return absl::OkStatus();
}

}  // namespace

std::string CombineModeName(CombineMode mode) {
  return mode == CombineMode::kLongNet ? "longnet" : "grouped";
}

std::string PrecisionName(Precision precision) {
  switch (precision) {
    case Precision::kAuto:
      return "auto";
    case Precision::kFloat32:
      return "fp32";
    case Precision::kBFloat16:
      return "bf16";
    case Precision::kFloat16:
      return "fp16";
    case Precision::kFloat8:
      return "fp8";
  }
  return "unknown";
}

std::string ShardPolicyName(ShardPolicy policy) {
  switch (policy) {
    case ShardPolicy::kAuto:
      return "auto";
    case ShardPolicy::kNone:
      return "none";
    case ShardPolicy::kHeads:
      return "heads";
    case ShardPolicy::kSequence:
      return "sequence";
  }
  return "unknown";
}

absl::Status AttentionSpec::Validate() const {
  if (patterns.empty()) {
    return Invalid("spec.segment_lengths is empty; at least one pattern is required");
  }
  for (size_t i = 0; i < patterns.size(); ++i) {
    const Pattern& p = patterns[i];
    if (p.segment_len < 1) {
      return Invalid(
          absl::StrCat("spec.segment_lengths[", i, "] is ", p.segment_len, "; must be >= 1"));
    }
    if (p.segment_len > kMaxSegmentLen) {
      return Invalid(absl::StrCat("spec.segment_lengths[", i, "] is ", p.segment_len,
                                  "; must be at most ", kMaxSegmentLen,
                                  " (2^31; a segment as long as the sequence covers all of it)"));
    }
    if (p.dilation < 1 || p.dilation > p.segment_len) {
      return Invalid(absl::StrCat("spec.dilation_rates[", i, "] is ", p.dilation,
                                  "; must be in [1, segment_lengths[", i, "] = ", p.segment_len,
                                  "]"));
    }
  }
  if (softmax_scale.has_value() && !std::isfinite(*softmax_scale)) {
    return Invalid(absl::StrCat("spec.softmax_scale is ", *softmax_scale, "; must be finite"));
  }
  if (softmax_scale.has_value() && std::abs(*softmax_scale) > kMaxSoftmaxScale) {
    return Invalid(absl::StrCat("spec.softmax_scale is ", *softmax_scale,
                                "; its magnitude must be at most ", kMaxSoftmaxScale,
                                " (larger scales overflow fp32 scores; docs/MATH.md)"));
  }
  return absl::OkStatus();
}

double AttentionSpec::ScaleFor(int64_t head_dim) const {
  return softmax_scale.has_value() ? *softmax_scale
                                   : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

std::string AttentionSpec::PatternsToString() const {
  constexpr size_t kShown = 16;  // A log line's worth; the count says how many more.
  std::string out;
  for (size_t i = 0; i < patterns.size() && i < kShown; ++i) {
    absl::StrAppend(&out, i == 0 ? "" : ",", "(", patterns[i].segment_len, ",",
                    patterns[i].dilation, ")");
  }
  if (patterns.size() > kShown) {
    absl::StrAppend(&out, ",...(", patterns.size(), "_in_all)");
  }
  return out;
}

int64_t RequestBytes(const ProblemShape& shape, DType dtype, std::optional<DType> out_dtype) {
  const int64_t rows = shape.batch * shape.seq_len * shape.head_dim;
  // q and output have `heads` heads; k and v have `kv_heads`.
  return rows * ((shape.heads + 2 * shape.kv_heads) * DTypeSize(dtype) +
                 shape.heads * DTypeSize(out_dtype.value_or(dtype)));
}

absl::Status ValidateShape(const ProblemShape& shape, DType dtype, const AttentionSpec& spec,
                           const Limits& limits, std::optional<DType> out_dtype) {
  DA_RETURN_IF_ERROR(spec.Validate());
  if (shape.batch < 1) return Invalid(absl::StrCat("batch is ", shape.batch, "; must be >= 1"));
  if (shape.seq_len < 1) {
    return Invalid(absl::StrCat("seq_len is ", shape.seq_len, "; must be >= 1"));
  }
  if (shape.heads < 1) return Invalid(absl::StrCat("heads is ", shape.heads, "; must be >= 1"));
  if (shape.kv_heads < 1) {
    return Invalid(absl::StrCat("kv_heads is ", shape.kv_heads, "; must be >= 1"));
  }
  if (shape.head_dim < 1) {
    return Invalid(absl::StrCat("head_dim is ", shape.head_dim, "; must be >= 1"));
  }
  if (limits.max_heads > 0 && shape.heads > limits.max_heads) {
    return Invalid(absl::StrCat("heads is ", shape.heads, "; at most ", limits.max_heads));
  }
  if (shape.heads % shape.kv_heads != 0) {
    return Invalid(absl::StrCat("kv_heads (the key's heads) is ", shape.kv_heads,
                                "; must divide query heads ", shape.heads));
  }
  if (limits.max_head_dim > 0 && shape.head_dim > limits.max_head_dim) {
    return Invalid(absl::StrCat("head_dim is ", shape.head_dim, "; at most ", limits.max_head_dim));
  }
  if (limits.max_patterns > 0 && static_cast<int64_t>(spec.patterns.size()) > limits.max_patterns) {
    return Invalid(absl::StrCat("spec.segment_lengths has ", spec.patterns.size(),
                                " patterns; at most ", limits.max_patterns));
  }
  // Overflow guard before any multiplication: each dimension is far below 2^31 in practice,
  // but a hostile header (or a WarmUp shape, which carries no tensors) may claim anything. The
  // output is counted at 4 bytes an element (an engine's output may be wider than the input), and
  // the bound, 2^61, leaves room for the estimates that add workspace and copies to it.
  const double approx_bytes =
      static_cast<double>(shape.batch) * shape.seq_len * shape.head_dim *
      ((shape.heads + 2.0 * shape.kv_heads) * DTypeSize(dtype) + 4.0 * shape.heads);
  if (approx_bytes > 0x1p61) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request needs ", approx_bytes, " bytes; too large to represent"));
  }
  const int64_t tokens = shape.batch * shape.seq_len;
  if (limits.max_tokens > 0 && tokens > limits.max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat("request has ", tokens,
                                                     " tokens (batch x seq); limit is ",
                                                     limits.max_tokens, " (--max-tokens)"));
  }
  const int64_t bytes = RequestBytes(shape, dtype, out_dtype);
  if (limits.max_request_bytes > 0 && bytes > limits.max_request_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request needs ", bytes, " bytes for query, key, value and output; limit is ",
                     limits.max_request_bytes, " (--max-request-bytes)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateProblem(const TensorView& q, const TensorView& k, const TensorView& v,
                             const AttentionSpec& spec, const Limits& limits,
                             std::optional<DType> out_dtype) {
  DA_RETURN_IF_ERROR(ValidateTensor("query", q));
  DA_RETURN_IF_ERROR(ValidateTensor("key", k));
  DA_RETURN_IF_ERROR(ValidateTensor("value", v));
  if (k.dtype != q.dtype || v.dtype != q.dtype) {
    return Invalid(absl::StrCat("key/value dtype ", DTypeName(k.dtype), "/", DTypeName(v.dtype),
                                " differs from query dtype ", DTypeName(q.dtype)));
  }
  const std::pair<const char*, const TensorView*> others[] = {{"key", &k}, {"value", &v}};
  for (const auto& [name, t] : others) {
    if (t->shape.batch != q.shape.batch) {
      return Invalid(absl::StrCat(name, ".shape batch is ", t->shape.batch,
                                  "; must equal query batch ", q.shape.batch));
    }
    if (t->shape.seq_len != q.shape.seq_len) {
      return Invalid(absl::StrCat(name, ".shape seq is ", t->shape.seq_len,
                                  "; must equal query seq ", q.shape.seq_len));
    }
    if (t->shape.head_dim != q.shape.head_dim) {
      return Invalid(absl::StrCat(name, ".shape head_dim is ", t->shape.head_dim,
                                  "; must equal query head_dim ", q.shape.head_dim));
    }
  }
  if (v.shape.heads != k.shape.heads) {
    return Invalid(absl::StrCat("value.shape heads is ", v.shape.heads, "; must equal key heads ",
                                k.shape.heads));
  }
  const ProblemShape shape{q.shape.batch, q.shape.seq_len, q.shape.heads, k.shape.heads,
                           q.shape.head_dim};
  return ValidateShape(shape, q.dtype, spec, limits, out_dtype);
}

}  // namespace da::engine
