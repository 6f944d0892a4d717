// Output of da-client: names for enums and status codes, execution and server info as text lines
// or JSON objects. Only the CLI uses this.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>

#include "da/v1/attention.pb.h"

namespace da::client {

std::string StatusCodeName(grpc::StatusCode code);    // "UNAVAILABLE".
std::string PrecisionName(v1::Precision precision);   // "auto", "fp32", "bf16", "fp16", "fp8".
std::string ShardPolicyName(v1::ShardPolicy policy);  // "auto", "none", "heads", "sequence".

// The fields of ExecutionInfo with enums as the names above.
nlohmann::json ExecutionInfoJson(const v1::ExecutionInfo& info);
// One "name  value" line per field.
void PrintExecutionInfo(const v1::ExecutionInfo& info, std::ostream& out);

nlohmann::json ServerInfoJson(const v1::GetServerInfoResponse& info);
void PrintServerInfo(const v1::GetServerInfoResponse& info, std::ostream& out);

// A streamed request's progress: "sent 1.50 of 2.00 GiB (75%), received 0.25 of 0.50 GiB (50%),
// 1.34 GB/s, 1.4 s" (the rate of both directions together since the start).
std::string ProgressLine(int64_t sent, int64_t to_send, int64_t received, int64_t to_receive,
                         double seconds);

// Serialises to one line; invalid UTF-8 from the server is replaced instead of throwing.
std::string JsonLine(const nlohmann::json& value);

}  // namespace da::client
