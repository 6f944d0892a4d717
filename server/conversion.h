// Conversions between the da.v1 wire messages and the engine's types.
//
//   DA_ASSIGN_OR_RETURN(UnaryProblem problem, ProblemFromRequest(request));
//   // problem.q/k/v point into request's bytes: no copy; request must outlive them.
//
// Checks that exist only on the wire (rank-4 shapes, unspecified or unknown enums, dtypes that
// differ between tensors, equal list lengths) live here and fail with INVALID_ARGUMENT naming the
// proto field. Everything else is the engine's ValidateProblem / ValidateShape.
#pragma once

#include <grpc/support/time.h>
#include <grpcpp/server_context.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "da/v1/attention.pb.h"
#include "engine/attention_spec.h"
#include "engine/device.h"
#include "engine/engine.h"
#include "engine/tensor.h"

namespace da::server {

absl::StatusOr<engine::DType> DTypeFromProto(v1::DType dtype, const std::string& field);
v1::DType DTypeToProto(engine::DType dtype);
v1::Precision PrecisionToProto(engine::Precision precision);
v1::ShardPolicy ShardPolicyToProto(engine::ShardPolicy policy);

// Patterns, causal, scale, mode, precision wish and shard policy. Does not run spec.Validate().
absl::StatusOr<engine::AttentionSpec> SpecFromProto(const v1::AttentionSpec& spec);

// A view of tensor's bytes (no copy). field names the tensor in messages ("query").
absl::StatusOr<engine::TensorView> TensorViewFromProto(const v1::Tensor& tensor,
                                                       const std::string& field);

// An AttendRequest as engine inputs; views point into request.
struct UnaryProblem {
  engine::TensorView q;
  engine::TensorView k;
  engine::TensorView v;
  engine::AttentionSpec spec;
  engine::DType out_dtype = engine::DType::kFloat32;  // output_dtype, else the query's.
};
absl::StatusOr<UnaryProblem> ProblemFromRequest(const v1::AttendRequest& request);

// A StreamHeader as a problem shape, dtype and spec (also what a warm-up shape is).
struct StreamProblem {
  engine::ProblemShape shape;
  engine::DType dtype = engine::DType::kFloat32;
  engine::DType out_dtype = engine::DType::kFloat32;  // output_dtype, else dtype.
  engine::AttentionSpec spec;
};
// dtype_field names the header's dtype in messages ("header.dtype"; its output_dtype is then
// "header.output_dtype").
absl::StatusOr<StreamProblem> ProblemFromHeader(const v1::StreamHeader& header,
                                                const std::string& dtype_field = "header.dtype");

// A call's deadline on system_clock: the largest time point for none, or for one so far away
// (past 2^33 s after 1970, about the year 2242) that gRPC's own conversion
// (ServerContextBase::deadline) would overflow system_clock's nanoseconds and put it in the past
// (a client's timeout of 1e10 s).
std::chrono::system_clock::time_point ClientDeadline(gpr_timespec raw_deadline);
inline std::chrono::system_clock::time_point ClientDeadline(
    const grpc::ServerContextBase& context) {
  return ClientDeadline(context.raw_deadline());
}

// The client's deadline on the engine's clock; none when the client set none (ClientDeadline
// gives the largest time point).
std::optional<std::chrono::steady_clock::time_point> SteadyDeadline(
    std::chrono::system_clock::time_point deadline);

// Whether a cancellation seen now is gRPC ending a call whose deadline passed. gRPC cancels such
// a call too, and its timer may fire a few ms early as read back through system_clock, so a
// cancellation within 50 ms of the deadline counts as the deadline.
bool CancelledByDeadline(std::chrono::system_clock::time_point deadline);

void ExecutionInfoToProto(const engine::ExecutionInfo& info, const std::string& request_id,
                          int64_t total_time_us, v1::ExecutionInfo* out);
void DeviceInfoToProto(const engine::DeviceInfo& device, v1::DeviceInfo* out);
void PlanCacheStatsToProto(const engine::PlanCacheStats& stats, v1::PlanCacheStats* out);
void WarmUpResultToProto(const engine::WarmUpResult& result, v1::WarmUpResult* out);

}  // namespace da::server
