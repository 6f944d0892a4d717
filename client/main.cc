// da-client: the command-line client of da-server.
//
//   da-client attend --q q.npy --k k.npy --v v.npy --segments 2048,4096 --dilations 1,2 --out o.npy
//   da-client random --seq-len 65536 --heads 8 --head-dim 64 --segments 2048 --dilations 1 --json
//   da-client info
//   da-client health --service da.v1.AttentionService
//   da-client health --service da.v1.AttentionService --http 127.0.0.1:9464   # /readyz, no gRPC
//   da-client load --concurrency 16 --duration-s 20 --mix mixed --json
//   da-client info --server db:50051 --tls-ca ca.pem --token-file token.txt
//
// Every failure is one line on stderr and a non-zero exit: 2 for bad flags, 1 for anything else
// (files, the server, a health status other than SERVING).
#include <grpc/support/log.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "client/cli_args.h"
#include "client/cli_format.h"
#include "client/connection_options.h"
#include "client/decimal_flags.h"
#include "client/http_probe.h"
#include "client/load_cli.h"
#include "client/stream_blocks.h"
#include "client/tensor_io.h"

namespace da::client {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
// Bounds the wait for a connection (the call's own timeout may be larger or absent), and the
// whole call for info and health when --timeout-ms is not given.
constexpr int64_t kConnectTimeoutMs = 10000;

std::string OneLine(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  return text;
}

int Fail(absl::string_view message, int exit_code = kExitFailure) {
  std::cerr << "da-client: error: " << OneLine(std::string(message)) << std::endl;
  return exit_code;
}

int FailRpc(const grpc::Status& status, const std::string& server) {
  std::cerr << "da-client: " << StatusCodeName(status.error_code()) << ": "
            << OneLine(status.error_message()) << " (server " << server << ")" << std::endl;
  return kExitFailure;
}

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// The parallel streams a request is sent with (as many as it can be cut into): 0 for a unary call.
int ParallelStreams(const CallFlags& flags, const v1::AttendRequest& request) {
  if (!flags.stream && flags.parallel_streams <= 1) return flags.parallel_streams == 1 ? 1 : 0;
  int64_t wanted = flags.parallel_streams;
  if (wanted == 0) {
    wanted = DefaultParallelStreams(RequestAndAnswerBytes(request));
  }
  const int64_t seq_len = request.query().shape_size() == 4 ? request.query().shape(1) : 1;
  return static_cast<int>(CutParts(request.spec(), seq_len, static_cast<int>(wanted)).size());
}

// A connected client, or the status that says why not; with `channels` connections of its own
// (one per parallel stream). `loaded` (optional) gets the connection options it used.
grpc::Status Connect(const CallFlags& flags, std::unique_ptr<AttentionClient>* client,
                     int channels = 1, ConnectionOptions* loaded = nullptr) {
  absl::StatusOr<ConnectionOptions> connection = LoadConnectionOptions(flags.connection);
  if (!connection.ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        std::string(connection.status().message()));
  }
  if (loaded != nullptr) *loaded = *connection;
  const int64_t connect_ms =
      flags.timeout_ms > 0 ? std::min(flags.timeout_ms, kConnectTimeoutMs) : kConnectTimeoutMs;
  std::vector<std::shared_ptr<grpc::Channel>> made;
  for (int i = 0; i < std::max(channels, 1); ++i) {
    connection->channel_id = i;
    made.push_back(MakeChannel(flags.server, *connection));
    if (grpc::Status status = WaitForConnection(*made.back(), connect_ms); !status.ok()) {
      return status;
    }
  }
  // A retry goes on a connection of its own (client/retry.h).
  *client =
      std::make_unique<AttentionClient>(std::move(made), FreshChannels(flags.server, *connection));
  return grpc::Status::OK;
}

// info and health are quick: without --timeout-ms they get the connect bound as their deadline.
CallOptions QueryOptions(const CallFlags& flags) {
  CallOptions options;
  options.timeout_ms = flags.timeout_ms > 0 ? flags.timeout_ms : kConnectTimeoutMs;
  options.retry = flags.Retry();
  return options;
}

// A connected client for request, with the transport settled in *flags as the Python client
// settles it, from the message limit (the smaller of the server's, from GetServerInfo, and this
// client's): a request the flags leave unary (neither --stream nor --parallel-streams) is
// streamed when it does not fit one message (NeedsStream), with parallel streams chosen from its
// size; it would otherwise fail with gRPC's "larger than max" once the whole request was sent. A
// stream's blocks, unless --block-tokens sets them, stay within half a message (BlockTokensFor).
grpc::Status ConnectFor(CallFlags* flags, const v1::AttendRequest& request,
                        std::unique_ptr<AttentionClient>* client) {
  const bool transport_open = !flags->stream && flags->parallel_streams == 0;
  ConnectionOptions connection;
  if (grpc::Status status = Connect(*flags, client, ParallelStreams(*flags, request), &connection);
      !status.ok() || (!transport_open && flags->block_tokens > 0)) {
    return status;
  }
  v1::GetServerInfoResponse info;
  if (grpc::Status status = (*client)->GetServerInfo(&info, QueryOptions(*flags)); !status.ok()) {
    return status;
  }
  const int64_t limit =
      MessageLimit(info.limits().max_message_bytes(), connection.max_message_bytes);
  if (transport_open) {
    if (!NeedsStream(request, limit)) return grpc::Status::OK;
    flags->stream = true;
  }
  if (flags->block_tokens == 0) flags->block_tokens = BlockTokensFor(request, limit);
  const int streams = ParallelStreams(*flags, request);
  return transport_open && streams > 1 ? Connect(*flags, client, streams) : grpc::Status::OK;
}

// Prints a streamed request's progress on stderr about once a second while it lives, and a last
// line when it ends: on a terminal one line rewritten in place, otherwise a line each time.
class ProgressReporter {
 public:
  ProgressReporter(const StreamProgress* progress, int64_t to_send, int64_t to_receive)
      : progress_(progress),
        to_send_(to_send),
        to_receive_(to_receive),
        terminal_(isatty(STDERR_FILENO) == 1),
        thread_([this] { Loop(); }) {}
  ~ProgressReporter() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    wake_.notify_all();
    thread_.join();
    Print(/*last=*/true);
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!wake_.wait_for(lock, std::chrono::seconds(1), [this] { return done_; })) {
      Print(/*last=*/false);
    }
  }
  void Print(bool last) const {
    const std::string line =
        "da-client: " + ProgressLine(progress_->sent_bytes.load(), to_send_,
                                     progress_->received_bytes.load(), to_receive_,
                                     MillisecondsSince(start_) / 1e3);
    if (terminal_) {  // Back to the line's start, the line, the rest of the old one cleared.
      std::cerr << '\r' << line << "\033[K" << (last ? "\n" : "") << std::flush;
    } else {
      std::cerr << line << std::endl;
    }
  }

  const StreamProgress* const progress_;
  const int64_t to_send_, to_receive_;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  const bool terminal_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool done_ = false;   // Guarded by mutex_.
  std::thread thread_;  // Last: starts once the members above are set.
};

grpc::Status Call(AttentionClient& client, const CallFlags& flags, const v1::AttendRequest& request,
                  v1::AttendResponse* response) {
  const CallOptions options{
      .timeout_ms = flags.timeout_ms, .request_id = request.request_id(), .retry = flags.Retry()};
  const int streams = ParallelStreams(flags, request);
  if (streams == 0) return client.Attend(request, response, options);
  StreamProgress progress;
  std::optional<ProgressReporter> reporter;
  if (flags.progress > 0 || (flags.progress == 0 && isatty(STDERR_FILENO) == 1)) {
    const int64_t q_bytes = static_cast<int64_t>(request.query().data().size());
    reporter.emplace(
        &progress,
        q_bytes + static_cast<int64_t>(request.key().data().size() + request.value().data().size()),
        OutputBytes(request));
  }
  return client.AttendStream(
      request, response, options,
      {.block_tokens = flags.block_tokens, .parallel_streams = streams, .progress = &progress});
}

int RunAttend(const AttendFlags& flags) {
  if (absl::Status status = flags.call.Check(); !status.ok()) {
    return Fail(status.message(), kExitUsage);
  }
  v1::AttendRequest request;
  absl::StatusOr<v1::AttentionSpec> spec = BuildSpec(flags.spec);
  if (!spec.ok()) return Fail(spec.status().message(), kExitUsage);
  *request.mutable_spec() = *std::move(spec);
  request.set_request_id(flags.call.request_id);
  request.set_priority(flags.call.priority);
  request.set_output_dtype(*ParseOutputDType(flags.call.out_dtype));  // Checked above.
  for (auto [path, tensor] : {std::pair{&flags.q_path, request.mutable_query()},
                              {&flags.k_path, request.mutable_key()},
                              {&flags.v_path, request.mutable_value()}}) {
    absl::StatusOr<v1::Tensor> read =
        ReadTensorNpy(*path, {.bf16_as_uint16 = flags.bf16_as_uint16});
    if (!read.ok()) return Fail(read.status().message());
    *tensor = *std::move(read);
  }

  CallFlags call = flags.call;
  std::unique_ptr<AttentionClient> client;
  if (grpc::Status status = ConnectFor(&call, request, &client); !status.ok()) {
    return FailRpc(status, call.server);
  }
  v1::AttendResponse response;
  const auto start = std::chrono::steady_clock::now();
  const grpc::Status status = Call(*client, call, request, &response);
  const double latency_ms = MillisecondsSince(start);
  if (!status.ok()) return FailRpc(status, flags.call.server);

  const std::string shape = ShapeString(response.output());
  const std::string dtype = DTypeName(response.output().dtype());
  const std::vector<int64_t> dims(response.output().shape().begin(),
                                  response.output().shape().end());
  if (!flags.out_path.empty()) {
    absl::Status written = WriteTensorNpy(flags.out_path, std::move(*response.mutable_output()),
                                          {.bf16_as_uint16 = flags.bf16_as_uint16});
    if (!written.ok()) return Fail(written.message());
  }
  if (flags.call.json) {
    nlohmann::json json = ExecutionInfoJson(response.info());
    json["shape"] = dims;
    json["dtype"] = dtype;
    json["stream"] = ParallelStreams(call, request) > 0;
    json["parallel_streams"] = ParallelStreams(call, request);
    json["client_latency_ms"] = latency_ms;
    json["output"] =
        flags.out_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(flags.out_path);
    std::cout << JsonLine(json) << std::endl;
  } else {
    std::cout << "output_shape        " << shape << " " << dtype << "\n";
    PrintExecutionInfo(response.info(), std::cout);
    std::cout << "client_latency_ms   " << latency_ms << "\n";
    if (!flags.out_path.empty()) std::cout << "output              " << flags.out_path << "\n";
    std::cout << std::flush;
  }
  return 0;
}

int RunRandom(const RandomFlags& flags) {
  if (absl::Status status = flags.Check(); !status.ok()) return Fail(status.message(), kExitUsage);
  v1::AttendRequest request;
  absl::StatusOr<v1::AttentionSpec> spec = BuildSpec(flags.spec);
  if (!spec.ok()) return Fail(spec.status().message(), kExitUsage);
  *request.mutable_spec() = *std::move(spec);
  request.set_priority(flags.call.priority);
  request.set_output_dtype(*ParseOutputDType(flags.call.out_dtype));  // Checked above.
  const v1::DType dtype = *ParseDType(flags.dtype);
  const int64_t kv_heads = flags.kv_heads > 0 ? flags.kv_heads : flags.heads;
  const uint64_t seed = static_cast<uint64_t>(flags.seed);
  *request.mutable_query() =
      RandomTensor(dtype, {flags.batch, flags.seq_len, flags.heads, flags.head_dim}, seed, 0);
  *request.mutable_key() =
      RandomTensor(dtype, {flags.batch, flags.seq_len, kv_heads, flags.head_dim}, seed, 1);
  *request.mutable_value() =
      RandomTensor(dtype, {flags.batch, flags.seq_len, kv_heads, flags.head_dim}, seed, 2);

  CallFlags call = flags.call;
  std::unique_ptr<AttentionClient> client;
  if (grpc::Status status = ConnectFor(&call, request, &client); !status.ok()) {
    return FailRpc(status, call.server);
  }
  const double tokens = static_cast<double>(flags.batch * flags.seq_len);
  std::vector<double> latencies_ms;
  nlohmann::json calls = nlohmann::json::array();
  if (!flags.call.json) {
    std::cout << "random: q " << ShapeString(request.query()) << ", k/v "
              << ShapeString(request.key()) << " " << DTypeName(dtype)
              << (ParallelStreams(call, request) == 0
                      ? std::string(", unary")
                      : absl::StrCat(", streamed (", ParallelStreams(call, request),
                                     " parallel streams)"))
              << std::endl;
  }
  for (int64_t i = 0; i < flags.repeat; ++i) {
    if (!flags.call.request_id.empty()) {
      request.set_request_id(absl::StrCat(flags.call.request_id, "-", i));
    }
    v1::AttendResponse response;
    const auto start = std::chrono::steady_clock::now();
    const grpc::Status status = Call(*client, call, request, &response);
    const double latency_ms = MillisecondsSince(start);
    if (!status.ok()) return FailRpc(status, call.server);
    latencies_ms.push_back(latency_ms);
    const double tokens_per_s = tokens / (latency_ms / 1e3);
    if (flags.call.json) {
      calls.push_back({{"call", i},
                       {"latency_ms", latency_ms},
                       {"tokens_per_s", tokens_per_s},
                       {"info", ExecutionInfoJson(response.info())}});
    } else {
      std::cout << "call " << i << ": " << latency_ms << " ms, " << tokens_per_s
                << " tokens/s (server compute " << response.info().compute_time_us()
                << " us, queue " << response.info().queue_time_us() << " us, "
                << PrecisionName(response.info().precision_used()) << " on "
                << response.info().backend() << ")" << std::endl;
    }
  }
  const LatencySummary summary = Summarize(latencies_ms);
  const double mean_tokens_per_s = tokens / (summary.mean_ms / 1e3);
  if (flags.call.json) {
    nlohmann::json json = {{"shape", {flags.batch, flags.seq_len, flags.heads, flags.head_dim}},
                           {"kv_heads", kv_heads},
                           {"dtype", DTypeName(dtype)},
                           {"output_dtype", DTypeName(OutputDType(request))},
                           {"stream", ParallelStreams(call, request) > 0},
                           {"parallel_streams", ParallelStreams(call, request)},
                           {"calls", calls},
                           {"summary",
                            {{"calls", flags.repeat},
                             {"tokens_per_call", flags.batch * flags.seq_len},
                             {"mean_latency_ms", summary.mean_ms},
                             {"min_latency_ms", summary.min_ms},
                             {"median_latency_ms", summary.median_ms},
                             {"max_latency_ms", summary.max_ms},
                             {"tokens_per_s", mean_tokens_per_s}}}};
    std::cout << JsonLine(json) << std::endl;
  } else {
    std::cout << "summary: " << flags.repeat << " calls, latency mean " << summary.mean_ms
              << " ms, median " << summary.median_ms << " ms, min " << summary.min_ms << " ms, max "
              << summary.max_ms << " ms; " << mean_tokens_per_s << " tokens/s" << std::endl;
  }
  return 0;
}

int RunInfo(const CallFlags& flags) {
  if (absl::Status status = flags.Check(); !status.ok()) return Fail(status.message(), kExitUsage);
  std::unique_ptr<AttentionClient> client;
  if (grpc::Status status = Connect(flags, &client); !status.ok()) {
    return FailRpc(status, flags.server);
  }
  v1::GetServerInfoResponse info;
  if (grpc::Status status = client->GetServerInfo(&info, QueryOptions(flags)); !status.ok()) {
    return FailRpc(status, flags.server);
  }
  if (flags.json) {
    std::cout << JsonLine(ServerInfoJson(info)) << std::endl;
  } else {
    PrintServerInfo(info, std::cout);
    std::cout << std::flush;
  }
  return 0;
}

// health --http: the server's plaintext probe on its metrics port, /livez for the service "" and
// /readyz for da.v1.AttentionService (what the gRPC health service answers, without TLS).
int RunHttpHealth(const CallFlags& flags, const std::string& service, const std::string& http) {
  std::string path;
  if (service.empty()) {
    path = "/livez";
  } else if (service == "da.v1.AttentionService") {
    path = "/readyz";
  } else {
    return Fail(absl::StrCat("--http probes the service '' (/livez) or da.v1.AttentionService "
                             "(/readyz), not '",
                             service, "'"),
                kExitUsage);
  }
  const absl::StatusOr<HttpAnswer> answer = HttpGet(http, path, QueryOptions(flags).timeout_ms);
  if (!answer.ok()) {
    if (absl::IsInvalidArgument(answer.status())) {
      return Fail(answer.status().message(), kExitUsage);
    }
    std::cerr << "da-client: " << absl::StatusCodeToString(answer.status().code()) << ": "
              << OneLine(std::string(answer.status().message()))
              << (absl::IsInternal(answer.status())
                      ? " (--http takes the metrics port, --metrics-listen, not the gRPC port)"
                      : "")
              << std::endl;
    return kExitFailure;
  }
  if (answer->status != 200 && answer->status != 503) {
    return Fail(absl::StrCat("http://", http, path, " answered HTTP ", answer->status,
                             ", not a da-server probe's 200 or 503"));
  }
  const bool serving = answer->status == 200;
  const std::string name = serving ? "SERVING" : "NOT_SERVING";
  const std::string reason = serving ? "" : OneLine(answer->body);
  if (flags.json) {
    nlohmann::json line = {{"service", service}, {"status", name}};
    if (!serving) line["reason"] = reason;
    std::cout << JsonLine(line) << std::endl;
  } else {
    std::cout << name << (serving ? "" : absl::StrCat(": ", reason)) << std::endl;
  }
  return serving ? 0 : kExitFailure;
}

int RunHealth(const CallFlags& flags, const std::string& service, const std::string& http) {
  if (absl::Status status = flags.Check(); !status.ok()) return Fail(status.message(), kExitUsage);
  if (!http.empty()) return RunHttpHealth(flags, service, http);
  std::unique_ptr<AttentionClient> client;
  if (grpc::Status status = Connect(flags, &client); !status.ok()) {
    return FailRpc(status, flags.server);
  }
  grpc::health::v1::HealthCheckResponse::ServingStatus serving;
  if (grpc::Status status = client->CheckHealth(service, &serving, QueryOptions(flags));
      !status.ok()) {
    return FailRpc(status, flags.server);
  }
  const std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(serving);
  if (flags.json) {
    std::cout << JsonLine({{"service", service}, {"status", name}}) << std::endl;
  } else {
    std::cout << name << std::endl;
  }
  return serving == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : kExitFailure;
}

// gRPC logs connection failures on stderr; the CLI reports them itself, in one line. Setting
// GRPC_VERBOSITY brings gRPC's own logging back for debugging.
void SilenceGrpcLogging() {
  if (std::getenv("GRPC_VERBOSITY") == nullptr) gpr_set_log_function([](gpr_log_func_args*) {});
}

int Main(int argc, char** argv) {
  CLI::App app("da-client: send dilated attention requests to da-server", "da-client");
  app.require_subcommand(1);
  AttendFlags attend;
  RandomFlags random;
  CallFlags info;
  CallFlags health;
  std::string health_service;
  CLI::App* attend_command = AddAttendCommand(app, &attend);
  CLI::App* random_command = AddRandomCommand(app, &random);
  CLI::App* info_command =
      app.add_subcommand("info", "Print the server's version, devices, limits");
  AddCallFlags(info_command, &info, /*attend=*/false);
  CLI::App* health_command =
      app.add_subcommand("health", "Print a service's health; exit 0 only when SERVING");
  AddCallFlags(health_command, &health, /*attend=*/false);
  health_command->add_option("--service", health_service,
                             "Service name: '' (liveness) or da.v1.AttentionService (readiness)");
  std::string health_http;
  health_command->add_option(
      "--http", health_http,
      "Ask the server's plaintext probe on its metrics port (HOST:PORT, e.g. 127.0.0.1:9464: "
      "/livez or /readyz) instead of gRPC: works when the gRPC port is TLS-only");
  LoadFlags load;
  CLI::App* load_command = AddLoadCommand(app, &load);
  DecimalIntegers(app);  // "--timeout-ms 010" is 10, not 8 (client/decimal_flags.h).
  // CLI11 would call an unknown word "A subcommand is required"; say what was wrong instead.
  const std::string first = argc > 1 ? argv[1] : "-";
  if (first[0] != '-' && first != "attend" && first != "random" && first != "info" &&
      first != "health" && first != "load") {
    return Fail(absl::StrCat("unknown subcommand '", first,
                             "' (expected attend, random, info, health or load)"),
                kExitUsage);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help.
    return Fail(e.what(), kExitUsage);
  }

  SilenceGrpcLogging();
  if (attend_command->parsed()) return RunAttend(attend);
  if (random_command->parsed()) return RunRandom(random);
  if (info_command->parsed()) return RunInfo(info);
  if (load_command->parsed()) return RunLoadCommand(load);
  return RunHealth(health, health_service, health_http);
}

}  // namespace
}  // namespace da::client

int main(int argc, char** argv) {
  try {
    return da::client::Main(argc, argv);
  } catch (const std::bad_alloc&) {
    return da::client::Fail("out of memory");
  } catch (const std::exception& e) {
    return da::client::Fail(e.what());
  }
}
