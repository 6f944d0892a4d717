// Flags of da-client's subcommands and their conversion into request fields. Only the CLI uses
// this. Checks return InvalidArgument with a message that names the flag and the value, e.g.
// "--segments: 'x' is not an integer".
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/connection_options.h"
#include "client/retry.h"
#include "da/v1/attention.pb.h"

namespace da::client {

// Flags every subcommand that talks to the server has.
struct CallFlags {
  std::string server = "localhost:50051";
  int64_t timeout_ms = 0;  // 0: none for attend and random; a 10 s default for info and health.
  // Times a call the server refused unread (draining) is sent again, within timeout_ms
  // (client/retry.h); 0: never.
  int64_t retries = RetryPolicy{}.max_attempts - 1;
  bool json = false;
  // attend and random only.
  bool stream = false;
  int64_t block_tokens = 0;
  // Concurrent streams per request, each on a connection of its own; any value from 1 implies
  // streaming (1: one stream, as --stream). 0: with --stream, chosen from the request's size;
  // without it, a unary call.
  int64_t parallel_streams = 0;
  // A progress line on stderr about once a second while a request streams: 1 (--progress), -1
  // (--no-progress), 0: when stderr is a terminal. block_tokens > 0 and progress 1 need streaming
  // (stream or parallel_streams > 0); Check refuses them otherwise.
  int progress = 0;
  std::string request_id;
  int32_t priority = 0;   // Higher leaves the server's queue first (up to the server's cap).
  std::string out_dtype;  // "fp32", "fp16", "bf16"; empty: the inputs' dtype.
  // --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token-file.
  ConnectionFiles connection;

  absl::Status Check() const;
  // The retry policy of --retries.
  RetryPolicy Retry() const;
};

// The attention spec, as typed.
struct SpecFlags {
  std::string segments;   // "2048,4096"
  std::string dilations;  // "1,2"
  bool causal = false;
  std::string mode = "longnet";
  double scale = 0;  // Used only when has_scale.
  bool has_scale = false;
  std::string precision = "auto";
};

struct AttendFlags {
  CallFlags call;
  SpecFlags spec;
  std::string q_path, k_path, v_path, out_path;
  bool bf16_as_uint16 = false;  // bf16 .npy files as raw uint16 bits ('<u2') instead of '<V2'.
};

struct RandomFlags {
  CallFlags call;
  SpecFlags spec;
  int64_t batch = 1;
  int64_t seq_len = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;  // 0: equal to heads.
  int64_t head_dim = 0;
  std::string dtype = "fp32";
  int64_t repeat = 1;
  int64_t seed = 0;

  absl::Status Check() const;  // Also checks call flags and the dtype name.
};

// attend: true adds --stream, --block-tokens, --parallel-streams, --progress and --request-id.
// Every command gets --server,
// --timeout-ms, --json and the connection flags (TLS files and the token file).
void AddCallFlags(CLI::App* command, CallFlags* flags, bool attend);

// --tls-ca, --tls-cert, --tls-key, --tls-server-name and --token-file (every subcommand has them).
void AddConnectionFlags(CLI::App* command, ConnectionFiles* files);
CLI::App* AddAttendCommand(CLI::App& app, AttendFlags* flags);
CLI::App* AddRandomCommand(CLI::App& app, RandomFlags* flags);

// "2048,4096" -> {2048, 4096}; flag names the list in errors.
absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& text, const char* flag);
absl::StatusOr<v1::AttentionSpec> BuildSpec(const SpecFlags& flags);
// "fp32", "fp16", "bf16"; flag names the flag in the error.
absl::StatusOr<v1::DType> ParseDType(const std::string& name, const std::string& flag = "--dtype");
// --out-dtype: DTYPE_UNSPECIFIED (the inputs' dtype) when empty.
absl::StatusOr<v1::DType> ParseOutputDType(const std::string& name);

struct LatencySummary {
  double mean_ms = 0, min_ms = 0, median_ms = 0, max_ms = 0;
};
LatencySummary Summarize(std::vector<double> latencies_ms);

}  // namespace da::client
