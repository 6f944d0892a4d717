#include "server/conversion.h"

#include <string_view>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace da::server {
namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

absl::StatusOr<engine::CombineMode> CombineModeFromProto(v1::CombineMode mode) {
  switch (mode) {
    case v1::COMBINE_MODE_UNSPECIFIED:
    case v1::COMBINE_MODE_LONGNET:
      return engine::CombineMode::kLongNet;
    case v1::COMBINE_MODE_GROUPED:
      return engine::CombineMode::kGrouped;
    default:
      return Invalid("spec.combine_mode", absl::StrCat("has unknown value ", mode));
  }
}

absl::StatusOr<engine::Precision> PrecisionFromProto(v1::Precision precision) {
  switch (precision) {
    case v1::PRECISION_AUTO:
      return engine::Precision::kAuto;
    case v1::PRECISION_FP32:
      return engine::Precision::kFloat32;
    case v1::PRECISION_BF16:
      return engine::Precision::kBFloat16;
    case v1::PRECISION_FP16:
      return engine::Precision::kFloat16;
    case v1::PRECISION_FP8:
      return engine::Precision::kFloat8;
    default:
      return Invalid("spec.precision", absl::StrCat("has unknown value ", precision));
  }
}

absl::StatusOr<engine::ShardPolicy> ShardPolicyFromProto(v1::ShardPolicy policy) {
  switch (policy) {
    case v1::SHARD_POLICY_AUTO:
      return engine::ShardPolicy::kAuto;
    case v1::SHARD_POLICY_NONE:
      return engine::ShardPolicy::kNone;
    case v1::SHARD_POLICY_HEADS:
      return engine::ShardPolicy::kHeads;
    case v1::SHARD_POLICY_SEQUENCE:
      return engine::ShardPolicy::kSequence;
    default:
      return Invalid("spec.shard_policy", absl::StrCat("has unknown value ", policy));
  }
}

// The dtype of other must equal the query's.
absl::Status CheckSameDType(const v1::Tensor& query, const v1::Tensor& other,
                            const std::string& field) {
  if (other.dtype() == query.dtype()) return absl::OkStatus();
  return Invalid(absl::StrCat(field, ".dtype"),
                 absl::StrCat("is ", v1::DType_Name(other.dtype()), " but query.dtype is ",
                              v1::DType_Name(query.dtype()), "; q, k and v must share a dtype"));
}

}  // namespace

absl::StatusOr<engine::DType> DTypeFromProto(v1::DType dtype, const std::string& field) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return engine::DType::kFloat32;
    case v1::DTYPE_FP16:
      return engine::DType::kFloat16;
    case v1::DTYPE_BF16:
      return engine::DType::kBFloat16;
    case v1::DTYPE_UNSPECIFIED:
      return Invalid(field, "is DTYPE_UNSPECIFIED; expected DTYPE_FP32, DTYPE_FP16 or DTYPE_BF16");
    default:
      return Invalid(field, absl::StrCat("has unknown value ", dtype));
  }
}

v1::DType DTypeToProto(engine::DType dtype) {
  switch (dtype) {
    case engine::DType::kFloat32:
      return v1::DTYPE_FP32;
    case engine::DType::kFloat16:
      return v1::DTYPE_FP16;
    case engine::DType::kBFloat16:
      return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

v1::Precision PrecisionToProto(engine::Precision precision) {
  switch (precision) {
    case engine::Precision::kAuto:
      return v1::PRECISION_AUTO;
    case engine::Precision::kFloat32:
      return v1::PRECISION_FP32;
    case engine::Precision::kBFloat16:
      return v1::PRECISION_BF16;
    case engine::Precision::kFloat16:
      return v1::PRECISION_FP16;
    case engine::Precision::kFloat8:
      return v1::PRECISION_FP8;
  }
  return v1::PRECISION_AUTO;
}

v1::ShardPolicy ShardPolicyToProto(engine::ShardPolicy policy) {
  switch (policy) {
    case engine::ShardPolicy::kAuto:
      return v1::SHARD_POLICY_AUTO;
    case engine::ShardPolicy::kNone:
      return v1::SHARD_POLICY_NONE;
    case engine::ShardPolicy::kHeads:
      return v1::SHARD_POLICY_HEADS;
    case engine::ShardPolicy::kSequence:
      return v1::SHARD_POLICY_SEQUENCE;
  }
  return v1::SHARD_POLICY_AUTO;
}

absl::StatusOr<engine::AttentionSpec> SpecFromProto(const v1::AttentionSpec& spec) {
  if (spec.segment_lengths_size() != spec.dilation_rates_size()) {
    return Invalid(
        "spec.segment_lengths",
        absl::StrCat("has ", spec.segment_lengths_size(), " entries but spec.dilation_rates has ",
                     spec.dilation_rates_size(), "; they must have equal lengths"));
  }
  // Refused before a pattern is built: the wire allows millions, which would otherwise be copied
  // into the spec and the request's log line only to be refused by ValidateShape.
  const int64_t max_patterns = engine::Limits{}.max_patterns;
  if (spec.segment_lengths_size() > max_patterns) {
    return Invalid("spec.segment_lengths", absl::StrCat("has ", spec.segment_lengths_size(),
                                                        " patterns; at most ", max_patterns));
  }
  engine::AttentionSpec out;
  for (int i = 0; i < spec.segment_lengths_size(); ++i) {
    out.patterns.push_back({spec.segment_lengths(i), spec.dilation_rates(i)});
  }
  out.causal = spec.causal();
  if (spec.has_softmax_scale()) out.softmax_scale = spec.softmax_scale();
  DA_ASSIGN_OR_RETURN(out.mode, CombineModeFromProto(spec.combine_mode()));
  DA_ASSIGN_OR_RETURN(out.precision, PrecisionFromProto(spec.precision()));
  DA_ASSIGN_OR_RETURN(out.shard_policy, ShardPolicyFromProto(spec.shard_policy()));
  return out;
}

absl::StatusOr<engine::TensorView> TensorViewFromProto(const v1::Tensor& tensor,
                                                       const std::string& field) {
  if (tensor.shape_size() != 4) {
    return Invalid(absl::StrCat(field, ".shape"),
                   absl::StrCat("has rank ", tensor.shape_size(),
                                "; expected rank 4 [batch, seq, heads, head_dim]"));
  }
  engine::TensorView view;
  DA_ASSIGN_OR_RETURN(view.dtype, DTypeFromProto(tensor.dtype(), absl::StrCat(field, ".dtype")));
  view.shape = {tensor.shape(0), tensor.shape(1), tensor.shape(2), tensor.shape(3)};
  view.data = tensor.data().data();
  view.bytes = static_cast<int64_t>(tensor.data().size());
  return view;
}

// The output's dtype: `wanted`, or the inputs' when it is DTYPE_UNSPECIFIED.
absl::StatusOr<engine::DType> OutputDType(v1::DType wanted, engine::DType inputs,
                                          const std::string& field) {
  if (wanted == v1::DTYPE_UNSPECIFIED) return inputs;
  return DTypeFromProto(wanted, field);
}

absl::StatusOr<UnaryProblem> ProblemFromRequest(const v1::AttendRequest& request) {
  UnaryProblem problem;
  DA_ASSIGN_OR_RETURN(problem.q, TensorViewFromProto(request.query(), "query"));
  DA_ASSIGN_OR_RETURN(problem.k, TensorViewFromProto(request.key(), "key"));
  DA_ASSIGN_OR_RETURN(problem.v, TensorViewFromProto(request.value(), "value"));
  DA_RETURN_IF_ERROR(CheckSameDType(request.query(), request.key(), "key"));
  DA_RETURN_IF_ERROR(CheckSameDType(request.query(), request.value(), "value"));
  DA_ASSIGN_OR_RETURN(problem.out_dtype,
                      OutputDType(request.output_dtype(), problem.q.dtype, "output_dtype"));
  DA_ASSIGN_OR_RETURN(problem.spec, SpecFromProto(request.spec()));
  return problem;
}

absl::StatusOr<StreamProblem> ProblemFromHeader(const v1::StreamHeader& header,
                                                const std::string& dtype_field) {
  StreamProblem problem;
  DA_ASSIGN_OR_RETURN(problem.dtype, DTypeFromProto(header.dtype(), dtype_field));
  const std::string prefix =
      absl::EndsWith(dtype_field, "dtype")
          ? dtype_field.substr(0, dtype_field.size() - std::string_view("dtype").size())
          : dtype_field + ".";
  DA_ASSIGN_OR_RETURN(problem.out_dtype,
                      OutputDType(header.output_dtype(), problem.dtype, prefix + "output_dtype"));
  problem.shape.batch = header.batch();
  problem.shape.seq_len = header.seq_len();
  problem.shape.heads = header.heads();
  problem.shape.kv_heads = header.kv_heads() == 0 ? header.heads() : header.kv_heads();
  problem.shape.head_dim = header.head_dim();
  DA_ASSIGN_OR_RETURN(problem.spec, SpecFromProto(header.spec()));
  return problem;
}

std::chrono::system_clock::time_point ClientDeadline(gpr_timespec raw_deadline) {
  constexpr int64_t kFarthestSeconds = int64_t{1} << 33;
  if (gpr_time_cmp(raw_deadline, gpr_inf_future(raw_deadline.clock_type)) == 0) {
    return std::chrono::system_clock::time_point::max();
  }
  const gpr_timespec realtime = gpr_convert_clock_type(raw_deadline, GPR_CLOCK_REALTIME);
  if (realtime.tv_sec >= kFarthestSeconds) return std::chrono::system_clock::time_point::max();
  return std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(
          std::chrono::seconds(realtime.tv_sec) + std::chrono::nanoseconds(realtime.tv_nsec)));
}

std::optional<std::chrono::steady_clock::time_point> SteadyDeadline(
    std::chrono::system_clock::time_point deadline) {
  if (deadline == std::chrono::system_clock::time_point::max()) return std::nullopt;
  const auto left = deadline - std::chrono::system_clock::now();
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(left);
}

bool CancelledByDeadline(std::chrono::system_clock::time_point deadline) {
  constexpr auto kDeadlineSlack = std::chrono::milliseconds(50);
  return std::chrono::system_clock::now() + kDeadlineSlack >= deadline;
}

void ExecutionInfoToProto(const engine::ExecutionInfo& info, const std::string& request_id,
                          int64_t total_time_us, v1::ExecutionInfo* out) {
  out->set_request_id(request_id);
  out->set_precision_used(PrecisionToProto(info.precision_used));
  out->set_precision_reason(info.precision_reason);
  out->set_shard_strategy(ShardPolicyToProto(info.shard_strategy));
  out->set_backend(info.backend);
  for (const std::string& device : info.devices) out->add_devices(device);
  out->set_queue_time_us(info.queue_time_us);
  out->set_compute_time_us(info.compute_time_us);
  out->set_plan_cache_hit(info.plan_cache_hit);
  out->set_plan_build_time_us(info.plan_build_time_us);
  out->set_total_time_us(total_time_us);
  for (const engine::ExecutionInfo::Fp8Scales& scales : info.fp8_scales) {
    v1::Fp8Scales* wire = out->add_fp8_scales();
    wire->set_device(scales.device);
    wire->set_query_amax(scales.amax[0]);
    wire->set_key_amax(scales.amax[1]);
    wire->set_value_amax(scales.amax[2]);
    wire->set_query_scale(scales.scale[0]);
    wire->set_key_scale(scales.scale[1]);
    wire->set_value_scale(scales.scale[2]);
  }
}

void DeviceInfoToProto(const engine::DeviceInfo& device, v1::DeviceInfo* out) {
  out->set_id(device.id);
  out->set_kind(device.kind);
  out->set_name(device.name);
  for (engine::Precision precision : device.precisions) {
    out->add_precisions(PrecisionToProto(precision));
  }
  out->set_memory_bytes(device.memory_bytes);
  out->set_compute_units(device.compute_units);
  out->set_capability(device.capability);
}

void PlanCacheStatsToProto(const engine::PlanCacheStats& stats, v1::PlanCacheStats* out) {
  out->set_hits(stats.hits);
  out->set_misses(stats.misses);
  out->set_evictions(stats.evictions);
  out->set_bytes(stats.bytes);
  out->set_entries(stats.entries);
  out->set_builds(stats.builds);
  out->set_capacity_bytes(stats.capacity_bytes);
}

void WarmUpResultToProto(const engine::WarmUpResult& result, v1::WarmUpResult* out) {
  out->set_plan_key(result.plan_key);
  out->set_already_warm(result.already_warm);
  out->set_plan_bytes(result.plan_bytes);
  out->set_build_time_us(result.build_time_us);
  out->set_precision(PrecisionToProto(result.precision));
  for (const std::string& key : result.plan_keys) out->add_plan_keys(key);
}

}  // namespace da::server
