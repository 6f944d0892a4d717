#include "client/cli_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace da::client {
namespace {

// Each parallel stream is two client threads, a connection and a stream window of server memory;
// far fewer than this fill any link.
constexpr int64_t kMaxParallelStreamsFlag = 64;
constexpr int64_t kMaxRetriesFlag = 100;

absl::Status Invalid(std::string message) { return absl::InvalidArgumentError(std::move(message)); }

absl::Status CheckAtLeast(int64_t value, int64_t least, const char* flag) {
  if (value >= least) return absl::OkStatus();
  return Invalid(absl::StrCat(flag, " must be >= ", least, ", got ", value));
}

void AddSpecFlags(CLI::App* command, SpecFlags* flags) {
  command->add_option("--segments", flags->segments, "Segment lengths, e.g. 2048,4096")->required();
  command->add_option("--dilations", flags->dilations, "Dilation rates, one per segment length")
      ->required();
  command->add_flag("--causal", flags->causal, "Causal attention inside each segment");
  command->add_option("--mode", flags->mode, "Combine mode: longnet or grouped")
      ->capture_default_str();
  command->add_option_function<double>(
      "--scale",
      [flags](double scale) {
        flags->scale = scale;
        flags->has_scale = true;
      },
      "Softmax scale (default 1/sqrt(head_dim))");
  command->add_option("--precision", flags->precision, "auto, fp32, bf16, fp16 or fp8")
      ->capture_default_str();
}

}  // namespace

RetryPolicy CallFlags::Retry() const {
  RetryPolicy policy;
  policy.max_attempts = static_cast<int>(std::clamp<int64_t>(retries, 0, kMaxRetriesFlag)) + 1;
  return policy;
}

absl::Status CallFlags::Check() const {
  if (server.empty()) return Invalid("--server must not be empty");
  if (connection.tls_cert.empty() != connection.tls_key.empty()) {
    return Invalid(connection.tls_cert.empty() ? "--tls-key needs --tls-cert as well"
                                               : "--tls-cert needs --tls-key as well");
  }
  if (absl::Status status = CheckAtLeast(timeout_ms, 0, "--timeout-ms"); !status.ok()) {
    return status;
  }
  if (timeout_ms > kMaxTimeoutMs) {
    // Past it the deadline would overflow the clock into the past.
    return Invalid(absl::StrCat("--timeout-ms: ", timeout_ms, " is above the limit of ",
                                kMaxTimeoutMs, " (a year; 0: no deadline)"));
  }
  if (absl::Status status = CheckAtLeast(retries, 0, "--retries"); !status.ok()) return status;
  if (retries > kMaxRetriesFlag) {
    return Invalid(
        absl::StrCat("--retries: ", retries, " is above the limit of ", kMaxRetriesFlag));
  }
  if (absl::Status status = CheckAtLeast(parallel_streams, 0, "--parallel-streams"); !status.ok()) {
    return status;
  }
  if (parallel_streams > kMaxParallelStreamsFlag) {
    return Invalid(absl::StrCat("--parallel-streams: ", parallel_streams, " is above the limit of ",
                                kMaxParallelStreamsFlag));
  }
  if (absl::Status status = CheckAtLeast(block_tokens, 0, "--block-tokens"); !status.ok()) {
    return status;
  }
  // A unary call would ignore them.
  const bool streamed = stream || parallel_streams > 0;
  if (block_tokens > 0 && !streamed) {
    return Invalid(absl::StrCat("--block-tokens ", block_tokens,
                                " needs --stream or --parallel-streams (a unary call sends the "
                                "request in one message)"));
  }
  if (progress > 0 && !streamed) {
    return Invalid(
        "--progress needs --stream or --parallel-streams (only a streamed request reports it)");
  }
  if (absl::StatusOr<v1::DType> out = ParseOutputDType(out_dtype); !out.ok()) return out.status();
  return absl::OkStatus();
}

absl::Status RandomFlags::Check() const {
  if (absl::Status status = call.Check(); !status.ok()) return status;
  for (auto [value, least, flag] : {std::tuple{batch, 1, "--batch"},
                                    {seq_len, 1, "--seq-len"},
                                    {heads, 1, "--heads"},
                                    {kv_heads, 0, "--kv-heads"},
                                    {head_dim, 1, "--head-dim"},
                                    {repeat, 1, "--repeat"}}) {
    if (absl::Status status = CheckAtLeast(value, least, flag); !status.ok()) return status;
  }
  if (absl::StatusOr<v1::DType> parsed = ParseDType(dtype); !parsed.ok()) return parsed.status();
  // Refuse sizes whose byte count overflows before trying to allocate them.
  constexpr int64_t kMaxElements = int64_t{1} << 50;
  int64_t elements = 1;
  for (int64_t dim : {batch, seq_len, std::max(heads, kv_heads), head_dim}) {
    if (dim > kMaxElements / elements) {
      return Invalid(absl::StrCat("--batch x --seq-len x --heads x --head-dim is too large (",
                                  batch, " x ", seq_len, " x ", heads, " x ", head_dim, ")"));
    }
    elements *= dim;
  }
  return absl::OkStatus();
}

void AddConnectionFlags(CLI::App* command, ConnectionFiles* files) {
  command->add_option("--tls-ca", files->tls_ca,
                      "PEM CA certificate(s) that verify the server: connect with TLS");
  command->add_option("--tls-cert", files->tls_cert,
                      "PEM client certificate for mutual TLS (needs --tls-key)");
  command->add_option("--tls-key", files->tls_key, "PEM private key of --tls-cert");
  command->add_option("--tls-server-name", files->tls_server_name,
                      "Name to check the server's certificate against instead of --server's host");
  command->add_option("--token-file", files->token_file,
                      "File whose first non-comment line is the bearer token sent with each call");
}

void AddCallFlags(CLI::App* command, CallFlags* flags, bool attend) {
  command->add_option("--server", flags->server, "Server address host:port")->capture_default_str();
  command->add_option("--timeout-ms", flags->timeout_ms,
                      attend ? "Deadline of each call in ms (0: none)"
                             : "Deadline in ms (0: the default of 10000)");
  command->add_flag("--json", flags->json, "Print one JSON object");
  command
      ->add_option("--retries", flags->retries,
                   "Times a call is sent again, after a backoff of 0.25 s doubling up to 2 s and "
                   "within --timeout-ms, when the server refused it before reading or computing "
                   "anything (UNAVAILABLE from a draining server); 0: never")
      ->capture_default_str();
  AddConnectionFlags(command, &flags->connection);
  if (!attend) return;
  command->add_flag("--stream", flags->stream,
                    "Use the streaming RPC (AttendStream); without it, a request that does not fit "
                    "one message is streamed all the same");
  command->add_option("--block-tokens", flags->block_tokens,
                      "Tokens per streamed block (0: blocks of about 4 MiB, at most half a "
                      "message); needs --stream or --parallel-streams");
  command->add_option("--parallel-streams", flags->parallel_streams,
                      "Stream the request as K concurrent parts cut at chunk boundaries, each on a "
                      "connection of its own; any K >= 1 streams, even without --stream (0: with "
                      "--stream, one per 256 MiB, at most 4; without it, a unary call where the "
                      "request fits one message)");
  command->add_flag("--progress,!--no-progress", flags->progress,
                    "While a request streams, print the bytes sent and received, the rate and the "
                    "time about once a second on stderr (default: when stderr is a terminal)");
  command->add_option("--request-id", flags->request_id, "Request id sent to the server");
  command->add_option("--out-dtype", flags->out_dtype,
                      "Output dtype: fp32, fp16 or bf16 (default: the inputs'), e.g. fp32 for "
                      "bf16 inputs");
  command
      ->add_option("--priority", flags->priority,
                   "Higher runs first among the server's queued requests; at most the cap "
                   "`info` shows as max_priority")
      ->capture_default_str()
      ->check(CLI::Range(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
}

CLI::App* AddAttendCommand(CLI::App& app, AttendFlags* flags) {
  CLI::App* command = app.add_subcommand(
      "attend",
      "Dilated attention over q, k, v from .npy files (float32, float16 or bfloat16; B,N,H,D)");
  AddCallFlags(command, &flags->call, /*attend=*/true);
  AddSpecFlags(command, &flags->spec);
  command->add_option("--q", flags->q_path, "Query .npy, shape (B, N, H, D)")->required();
  command->add_option("--k", flags->k_path, "Key .npy, shape (B, N, Hkv, D)")->required();
  command->add_option("--v", flags->v_path, "Value .npy, shape (B, N, Hkv, D)")->required();
  command->add_option("--out", flags->out_path, "Write the output here, in the input's dtype");
  command->add_flag("--bf16-as-uint16", flags->bf16_as_uint16,
                    "bfloat16 .npy files hold raw bits as uint16 ('<u2'); by default bfloat16 is "
                    "ml_dtypes' '<V2', as np.save writes it");
  return command;
}

CLI::App* AddRandomCommand(CLI::App& app, RandomFlags* flags) {
  CLI::App* command = app.add_subcommand(
      "random", "Dilated attention over seeded random inputs; prints latency and tokens/s");
  AddCallFlags(command, &flags->call, /*attend=*/true);
  AddSpecFlags(command, &flags->spec);
  command->add_option("--batch", flags->batch, "Batch size")->capture_default_str();
  command->add_option("--seq-len", flags->seq_len, "Tokens per sequence")->required();
  command->add_option("--heads", flags->heads, "Query heads")->required();
  command->add_option("--kv-heads", flags->kv_heads, "Key/value heads (default: --heads)");
  command->add_option("--head-dim", flags->head_dim, "Head dimension")->required();
  command->add_option("--dtype", flags->dtype, "fp32, fp16 or bf16")->capture_default_str();
  command->add_option("--repeat", flags->repeat, "Number of calls")->capture_default_str();
  command->add_option("--seed", flags->seed, "Random seed")->capture_default_str();
  return command;
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& text, const char* flag) {
  std::vector<int64_t> values;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    item = absl::StripAsciiWhitespace(item);
    int64_t value = 0;
    if (!absl::SimpleAtoi(item, &value)) {
      return Invalid(absl::StrCat(flag, ": '", item, "' is not an integer"));
    }
    if (value < 1) return Invalid(absl::StrCat(flag, ": values must be >= 1, got ", value));
    values.push_back(value);
  }
  return values;
}

absl::StatusOr<v1::AttentionSpec> BuildSpec(const SpecFlags& flags) {
  v1::AttentionSpec spec;
  absl::StatusOr<std::vector<int64_t>> segments = ParseIntList(flags.segments, "--segments");
  if (!segments.ok()) return segments.status();
  absl::StatusOr<std::vector<int64_t>> dilations = ParseIntList(flags.dilations, "--dilations");
  if (!dilations.ok()) return dilations.status();
  if (segments->size() != dilations->size()) {
    return Invalid(absl::StrCat("--segments has ", segments->size(), " values but --dilations has ",
                                dilations->size(), "; give one dilation per segment length"));
  }
  spec.mutable_segment_lengths()->Add(segments->begin(), segments->end());
  spec.mutable_dilation_rates()->Add(dilations->begin(), dilations->end());
  spec.set_causal(flags.causal);

  if (flags.mode == "longnet") {
    spec.set_combine_mode(v1::COMBINE_MODE_LONGNET);
  } else if (flags.mode == "grouped") {
    spec.set_combine_mode(v1::COMBINE_MODE_GROUPED);
  } else {
    return Invalid(absl::StrCat("--mode: '", flags.mode, "' is not longnet or grouped"));
  }

  if (flags.has_scale) {
    if (!std::isfinite(flags.scale) || flags.scale <= 0) {
      return Invalid(absl::StrCat("--scale must be a positive finite number, got ", flags.scale));
    }
    spec.set_softmax_scale(flags.scale);
  }

  static const std::pair<const char*, v1::Precision> kPrecisions[] = {{"auto", v1::PRECISION_AUTO},
                                                                      {"fp32", v1::PRECISION_FP32},
                                                                      {"bf16", v1::PRECISION_BF16},
                                                                      {"fp16", v1::PRECISION_FP16},
                                                                      {"fp8", v1::PRECISION_FP8}};
  const auto* precision =
      std::find_if(std::begin(kPrecisions), std::end(kPrecisions),
                   [&](const auto& entry) { return flags.precision == entry.first; });
  if (precision == std::end(kPrecisions)) {
    return Invalid(
        absl::StrCat("--precision: '", flags.precision, "' is not auto, fp32, bf16, fp16 or fp8"));
  }
  spec.set_precision(precision->second);
  return spec;
}

absl::StatusOr<v1::DType> ParseDType(const std::string& name, const std::string& flag) {
  if (name == "fp32") return v1::DTYPE_FP32;
  if (name == "fp16") return v1::DTYPE_FP16;
  if (name == "bf16") return v1::DTYPE_BF16;
  return Invalid(absl::StrCat(flag, ": '", name, "' is not fp32, fp16 or bf16"));
}

absl::StatusOr<v1::DType> ParseOutputDType(const std::string& name) {
  if (name.empty()) return v1::DTYPE_UNSPECIFIED;
  return ParseDType(name, "--out-dtype");
}

LatencySummary Summarize(std::vector<double> latencies_ms) {
  LatencySummary summary;
  if (latencies_ms.empty()) return summary;
  std::sort(latencies_ms.begin(), latencies_ms.end());
  const size_t n = latencies_ms.size();
  summary.min_ms = latencies_ms.front();
  summary.max_ms = latencies_ms.back();
  summary.median_ms =
      n % 2 == 1 ? latencies_ms[n / 2] : (latencies_ms[n / 2 - 1] + latencies_ms[n / 2]) / 2;
  summary.mean_ms = std::accumulate(latencies_ms.begin(), latencies_ms.end(), 0.0) / n;
  return summary;
}

}  // namespace da::client
