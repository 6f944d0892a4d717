// Book-keeping for one attention RPC: its id, its clock, and when it ends one log line and the
// metrics. Nothing here runs per token.
//
//   RequestRecord record(metrics, "Attend", *context);
//   record.SetRequestIdField(request.request_id());
//   record.SetProblem(shape, dtype, spec);
//   reactor->Finish(record.Finish(status, &info));
//
// The id comes from the x-request-id metadata, else the request's request_id field, else it is
// generated (16 hex digits). Not thread safe: one RPC uses it from one thread at a time.
#pragma once

#include <grpcpp/server_context.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "engine/attention_spec.h"
#include "engine/engine.h"
#include "server/metrics.h"

namespace da::server {

// A request id's longest form: ids come from clients and end up in log lines and answers, cut to
// this many printable characters.
inline constexpr size_t kMaxRequestIdChars = 128;

class RequestRecord {
 public:
  // Counts the RPC as in flight until Finish.
  RequestRecord(Metrics* metrics, std::string method, const grpc::CallbackServerContext& context);
  ~RequestRecord();

  RequestRecord(const RequestRecord&) = delete;
  RequestRecord& operator=(const RequestRecord&) = delete;

  const std::string& id() const { return id_; }

  // The request's own request_id field; used when the metadata carried none.
  void SetRequestIdField(std::string_view field_id);
  void SetProblem(const engine::ProblemShape& shape, engine::DType dtype,
                  const engine::AttentionSpec& spec);
  // Tensor bytes received and sent, counted in the metrics at once (a long stream's rate shows
  // while it runs) and in the log lines.
  void AddBytes(int64_t bytes_in, int64_t bytes_out);
  // One log line while the RPC runs: "progress id=... method=... <detail> bytes_in=...
  // bytes_out=... elapsed_ms=...".
  void LogProgress(std::string_view detail) const;

  // Microseconds since the RPC started.
  int64_t ElapsedUs() const;

  // Records the outcome (metrics, one log line) and returns the status to finish the RPC with.
  // info is the engine's report, or null when no run completed. Call once.
  grpc::Status Finish(const absl::Status& status, const engine::ExecutionInfo* info);

 private:
  Metrics* metrics_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
  std::string id_;
  bool id_from_metadata_ = false;
  bool finished_ = false;
  bool has_problem_ = false;
  engine::ProblemShape shape_;
  engine::DType dtype_ = engine::DType::kFloat32;
  engine::AttentionSpec spec_;
  int64_t bytes_in_ = 0;
  int64_t bytes_out_ = 0;
};

// Why an RPC that ended with status was refused, as counted in da_requests_rejected_total (one of
// kRejectReasons); "" when it was not a refusal (OK, or a run that failed or was stopped during
// compute). The engine's admission refusals carry their reason (engine::RejectReasonOf); other
// codes map: INVALID_ARGUMENT -> invalid_argument, RESOURCE_EXHAUSTED -> too_large (a configured
// limit), UNAUTHENTICATED -> unauthenticated, UNAVAILABLE -> unavailable.
std::string RejectionReason(const absl::Status& status);

// status with a refusal reason of the server's own (one of kRejectReasons, e.g. "idle" or
// "client_memory"), which RejectionReason reads back.
absl::Status WithServerRejectReason(absl::Status status, std::string_view reason);

// A fresh request id: 16 lowercase hex digits.
std::string GenerateRequestId();

// The call's x-request-id metadata (sanitized as RequestRecord does), else a fresh id: for the
// log lines of calls that do not keep a RequestRecord (refused before, or not attention calls).
std::string RequestIdOf(const grpc::ServerContextBase& context);

}  // namespace da::server
