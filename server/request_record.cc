#include "server/request_record.h"

#include <spdlog/spdlog.h>

#include <optional>
#include <random>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/admission.h"
#include "server/status_conversion.h"

namespace da::server {
namespace {

// Ids come from clients and end up in log lines: keep them short and printable.
std::string SanitizeRequestId(std::string_view id) {
  std::string out(id.substr(0, kMaxRequestIdChars));
  for (char& c : out) {
    if (c < 0x21 || c > 0x7e) c = '_';
  }
  return out;
}

double Millis(int64_t micros) { return static_cast<double>(micros) / 1e3; }

}  // namespace

absl::Status WithServerRejectReason(absl::Status status, std::string_view reason) {
  if (!status.ok())
    status.SetPayload(engine::kRejectReasonPayload, absl::Cord(std::string(reason)));
  return status;
}

std::string RejectionReason(const absl::Status& status) {
  if (engine::IsFailedWhileRunning(status)) return "";  // It ran: a failure, not a refusal.
  const engine::RejectReason reason = engine::RejectReasonOf(status);
  if (reason != engine::RejectReason::kNone) return engine::RejectReasonName(reason);
  if (const auto payload = status.GetPayload(engine::kRejectReasonPayload); payload.has_value()) {
    for (const char* known : kRejectReasons) {
      if (*payload == known) return known;
    }
  }
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
      return "invalid_argument";
    case absl::StatusCode::kResourceExhausted:
      return "too_large";
    case absl::StatusCode::kUnauthenticated:
      return "unauthenticated";
    case absl::StatusCode::kUnavailable:
      return "unavailable";
    default:
      return "";
  }
}

std::string GenerateRequestId() {
  thread_local std::mt19937_64 generator(std::random_device{}());
  return absl::StrFormat("%016x", generator());
}

std::optional<std::string> MetadataRequestId(const grpc::ServerContextBase& context) {
  auto it = context.client_metadata().find("x-request-id");
  if (it == context.client_metadata().end() || it->second.length() == 0) return std::nullopt;
  return SanitizeRequestId(std::string_view(it->second.data(), it->second.length()));
}

std::string RequestIdOf(const grpc::ServerContextBase& context) {
  return MetadataRequestId(context).value_or(GenerateRequestId());
}

RequestRecord::RequestRecord(Metrics* metrics, std::string method,
                             const grpc::CallbackServerContext& context)
    : metrics_(metrics), method_(std::move(method)), start_(std::chrono::steady_clock::now()) {
  if (std::optional<std::string> id = MetadataRequestId(context)) {
    id_ = *std::move(id);
    id_from_metadata_ = true;
  } else {
    id_ = GenerateRequestId();
  }
  metrics_->RequestStarted();
}

RequestRecord::~RequestRecord() {
  if (!finished_) metrics_->RequestEnded();
}

void RequestRecord::SetRequestIdField(std::string_view field_id) {
  if (!id_from_metadata_ && !field_id.empty()) id_ = SanitizeRequestId(field_id);
}

void RequestRecord::SetProblem(const engine::ProblemShape& shape, engine::DType dtype,
                               const engine::AttentionSpec& spec) {
  has_problem_ = true;
  shape_ = shape;
  dtype_ = dtype;
  spec_ = spec;
}

void RequestRecord::AddBytes(int64_t bytes_in, int64_t bytes_out) {
  bytes_in_ += bytes_in;
  bytes_out_ += bytes_out;
  metrics_->AddBytes(bytes_in, bytes_out);
}

void RequestRecord::LogProgress(std::string_view detail) const {
  spdlog::info("progress id={} method={} {} bytes_in={} bytes_out={} elapsed_ms={:.3f}", id_,
               method_, detail, bytes_in_, bytes_out_, Millis(ElapsedUs()));
}

int64_t RequestRecord::ElapsedUs() const {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                               start_)
      .count();
}

grpc::Status RequestRecord::Finish(const absl::Status& status, const engine::ExecutionInfo* info) {
  grpc::Status grpc_status = ToGrpcStatus(status);
  if (finished_) return grpc_status;
  finished_ = true;
  const int64_t total_us = ElapsedUs();
  const int64_t queue_us = info != nullptr ? info->queue_time_us : 0;
  const int64_t compute_us = info != nullptr ? info->compute_time_us : 0;

  metrics_->RequestFinished(method_, grpc_status.error_code(), total_us / 1e6);
  if (const std::string reason = RejectionReason(status); !reason.empty()) {
    metrics_->RequestRejected(reason);
  }
  if (status.ok() && info != nullptr) {
    metrics_->RunFinished(queue_us / 1e6, compute_us / 1e6, shape_.batch * shape_.seq_len);
    // A miss that waited for a concurrent build of the same plan reports (and is counted with)
    // that build's time: the engine does not say which of the requests built it.
    if (!info->plan_cache_hit) metrics_->PlanBuilt(info->plan_build_time_us / 1e6);
  }
  metrics_->RequestEnded();

  // key=value pairs without spaces inside values, so the line splits on whitespace.
  std::string problem = "shape=-";
  if (has_problem_) {
    problem = absl::StrFormat(
        "shape=%dx%dx%dx%d kv_heads=%d dtype=%s patterns=%s mode=%s causal=%d", shape_.batch,
        shape_.seq_len, shape_.heads, shape_.head_dim, shape_.kv_heads, engine::DTypeName(dtype_),
        spec_.PatternsToString(), engine::CombineModeName(spec_.mode), spec_.causal ? 1 : 0);
  }
  const std::string run =
      info == nullptr
          ? ""
          : absl::StrFormat(
                " precision=%s backend=%s devices=%s shard=%s plan=%s "
                "plan_build_ms=%.3f",
                engine::PrecisionName(info->precision_used), info->backend,
                info->devices.empty() ? "-" : absl::StrJoin(info->devices, ","),
                engine::ShardPolicyName(info->shard_strategy),
                info->plan_cache_hit ? "hit" : "miss", Millis(info->plan_build_time_us));
  const std::string line = absl::StrFormat(
      "request id=%s method=%s %s code=%s%s queue_ms=%.3f compute_ms=%.3f total_ms=%.3f "
      "bytes_in=%d bytes_out=%d",
      id_, method_, problem, StatusCodeName(grpc_status.error_code()), run, Millis(queue_us),
      Millis(compute_us), Millis(total_us), bytes_in_, bytes_out_);
  if (status.ok()) {
    spdlog::info("{}", line);
  } else {
    spdlog::warn("{} error=\"{}\"", line, std::string(status.message()));
  }
  return grpc_status;
}

}  // namespace da::server
