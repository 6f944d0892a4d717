#include "client/cli_format.h"

#include <cstdio>
#include <iterator>

#include "absl/strings/str_join.h"

namespace da::client {
namespace {

std::string DeviceList(const google::protobuf::RepeatedPtrField<std::string>& devices) {
  return devices.empty() ? "-" : absl::StrJoin(devices, ",");
}

std::string PrecisionList(const google::protobuf::RepeatedField<int>& precisions) {
  std::vector<std::string> names;
  for (int precision : precisions) names.push_back(PrecisionName(v1::Precision(precision)));
  return names.empty() ? "-" : absl::StrJoin(names, ",");
}

std::string Bytes(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f GiB", static_cast<double>(bytes) / (1LL << 30));
  return text;
}

}  // namespace

std::string StatusCodeName(grpc::StatusCode code) {
  // Indexed by the code's value, as in grpc/impl/codegen/status_code_enum.h.
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  if (index < 0 || index >= static_cast<int>(std::size(kNames))) {
    return "CODE_" + std::to_string(index);
  }
  return kNames[index];
}

std::string PrecisionName(v1::Precision precision) {
  static const char* const kNames[] = {"auto", "fp32", "bf16", "fp16", "fp8"};  // Enum order.
  const int index = static_cast<int>(precision);
  if (index < 0 || index >= static_cast<int>(std::size(kNames))) {
    return "precision_" + std::to_string(index);
  }
  return kNames[index];
}

std::string ShardPolicyName(v1::ShardPolicy policy) {
  static const char* const kNames[] = {"auto", "none", "heads", "sequence"};  // Enum order.
  const int index = static_cast<int>(policy);
  if (index < 0 || index >= static_cast<int>(std::size(kNames))) {
    return "shard_policy_" + std::to_string(index);
  }
  return kNames[index];
}

nlohmann::json ExecutionInfoJson(const v1::ExecutionInfo& info) {
  nlohmann::json fp8 = nlohmann::json::array();
  for (const v1::Fp8Scales& s : info.fp8_scales()) {
    fp8.push_back({{"device", s.device()},
                   {"amax", {s.query_amax(), s.key_amax(), s.value_amax()}},
                   {"scale", {s.query_scale(), s.key_scale(), s.value_scale()}}});
  }
  nlohmann::json json = {
      {"request_id", info.request_id()},
      {"precision_used", PrecisionName(info.precision_used())},
      {"precision_reason", info.precision_reason()},
      {"shard_strategy", ShardPolicyName(info.shard_strategy())},
      {"backend", info.backend()},
      {"devices", std::vector<std::string>(info.devices().begin(), info.devices().end())},
      {"queue_time_us", info.queue_time_us()},
      {"compute_time_us", info.compute_time_us()},
      {"plan_build_time_us", info.plan_build_time_us()},
      {"total_time_us", info.total_time_us()},
      {"plan_cache_hit", info.plan_cache_hit()},
  };
  if (!fp8.empty()) json["fp8_scales"] = fp8;  // fp8 runs only: q, k, v each.
  if (info.stream_chunks() > 0) {              // Streamed requests only.
    json["stream_chunk_tokens"] = info.stream_chunk_tokens();
    json["stream_chunks"] = info.stream_chunks();
    json["stream_buffer_bytes"] = info.stream_buffer_bytes();
  }
  return json;
}

void PrintExecutionInfo(const v1::ExecutionInfo& info, std::ostream& out) {
  out << "request_id          " << info.request_id() << "\n"
      << "precision_used      " << PrecisionName(info.precision_used());
  if (!info.precision_reason().empty()) out << " (" << info.precision_reason() << ")";
  out << "\n"
      << "backend             " << info.backend() << " on " << DeviceList(info.devices()) << "\n"
      << "shard_strategy      " << ShardPolicyName(info.shard_strategy()) << "\n"
      << "queue_time_us       " << info.queue_time_us() << "\n"
      << "compute_time_us     " << info.compute_time_us() << "\n"
      << "plan_build_time_us  " << info.plan_build_time_us() << "\n"
      << "total_time_us       " << info.total_time_us() << "\n"
      << "plan_cache_hit      " << (info.plan_cache_hit() ? "true" : "false") << "\n";
  if (info.stream_chunks() > 0) {
    out << "stream_chunks       " << info.stream_chunks() << " of " << info.stream_chunk_tokens()
        << " tokens, " << info.stream_buffer_bytes() << " bytes of stream buffers\n";
  }
  for (const v1::Fp8Scales& s : info.fp8_scales()) {  // fp8 runs: each device's (and chunk's).
    out << "fp8_scales          " << s.device() << ": q " << s.query_scale() << " (amax "
        << s.query_amax() << "), k " << s.key_scale() << " (amax " << s.key_amax() << "), v "
        << s.value_scale() << " (amax " << s.value_amax() << ")\n";
  }
}

nlohmann::json ServerInfoJson(const v1::GetServerInfoResponse& info) {
  nlohmann::json devices = nlohmann::json::array();
  for (const v1::DeviceInfo& device : info.devices()) {
    nlohmann::json precisions = nlohmann::json::array();
    for (int precision : device.precisions()) {
      precisions.push_back(PrecisionName(v1::Precision(precision)));
    }
    devices.push_back({{"id", device.id()},
                       {"kind", device.kind()},
                       {"name", device.name()},
                       {"precisions", precisions},
                       {"memory_bytes", device.memory_bytes()},
                       {"compute_units", device.compute_units()},
                       {"capability", device.capability()}});
  }
  return {
      {"version", info.version()},
      {"build_features",
       std::vector<std::string>(info.build_features().begin(), info.build_features().end())},
      {"devices", devices},
      {"limits",
       {{"max_message_bytes", info.limits().max_message_bytes()},
        {"max_request_bytes", info.limits().max_request_bytes()},
        {"max_tokens", info.limits().max_tokens()},
        {"max_priority", info.limits().max_priority()}}},
      {"plan_cache",
       {{"hits", info.plan_cache().hits()},
        {"misses", info.plan_cache().misses()},
        {"evictions", info.plan_cache().evictions()},
        {"bytes", info.plan_cache().bytes()},
        {"entries", info.plan_cache().entries()}}},
  };
}

void PrintServerInfo(const v1::GetServerInfoResponse& info, std::ostream& out) {
  out << "version         " << info.version() << "\n"
      << "build_features  " << DeviceList(info.build_features()) << "\n";
  for (const v1::DeviceInfo& device : info.devices()) {
    out << "device          " << device.id() << "  " << device.name() << "  "
        << device.compute_units() << " units  " << Bytes(device.memory_bytes()) << "  precisions "
        << PrecisionList(device.precisions());
    if (!device.capability().empty()) out << "  capability " << device.capability();
    out << "\n";
  }
  const v1::Limits& limits = info.limits();
  out << "limits          max_message_bytes " << limits.max_message_bytes()
      << ", max_request_bytes " << limits.max_request_bytes() << ", max_tokens "
      << limits.max_tokens() << ", max_priority " << limits.max_priority() << "\n";
  const v1::PlanCacheStats& cache = info.plan_cache();
  out << "plan_cache      hits " << cache.hits() << ", misses " << cache.misses() << ", evictions "
      << cache.evictions() << ", entries " << cache.entries() << ", bytes " << cache.bytes()
      << "\n";
}

std::string ProgressLine(int64_t sent, int64_t to_send, int64_t received, int64_t to_receive,
                         double seconds) {
  const auto part = [](int64_t done, int64_t total) {
    char text[64];
    std::snprintf(text, sizeof(text), "%.2f of %.2f GiB (%d%%)",
                  static_cast<double>(done) / (1LL << 30), static_cast<double>(total) / (1LL << 30),
                  total > 0 ? static_cast<int>(100 * static_cast<double>(done) / total) : 100);
    return std::string(text);
  };
  char rate[64];
  std::snprintf(rate, sizeof(rate), "%.2f GB/s, %.1f s",
                seconds > 0 ? static_cast<double>(sent + received) / seconds / 1e9 : 0.0, seconds);
  return "sent " + part(sent, to_send) + ", received " + part(received, to_receive) + ", " + rate;
}

std::string JsonLine(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace da::client
