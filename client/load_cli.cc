#include "client/load_cli.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/cli_args.h"
#include "client/cli_format.h"

namespace da::client {

absl::StatusOr<grpc::StatusCode> ParseStatusCode(const std::string& name, const char* flag) {
  for (int code = grpc::StatusCode::OK; code <= grpc::StatusCode::UNAUTHENTICATED; ++code) {
    if (StatusCodeName(static_cast<grpc::StatusCode>(code)) == name) {
      return static_cast<grpc::StatusCode>(code);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      flag, ": '", name, "' is not a gRPC status code name (e.g. RESOURCE_EXHAUSTED)"));
}

absl::StatusOr<LoadOptions> LoadFlags::ToOptions() const {
  LoadOptions out = options;
  absl::StatusOr<ConnectionOptions> connection_options = LoadConnectionOptions(connection);
  if (!connection_options.ok()) return connection_options.status();
  out.connection = *std::move(connection_options);
  absl::StatusOr<Mix> parsed_mix = ParseMix(mix);
  if (!parsed_mix.ok()) return parsed_mix.status();
  out.mix = *parsed_mix;
  if (transport == "auto") {
    out.stream_override = -1;
  } else if (transport == "unary") {
    out.stream_override = 0;
  } else if (transport == "stream") {
    out.stream_override = 1;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport: '", transport, "' is not auto, unary or stream"));
  }
  if (seed < 0)
    return absl::InvalidArgumentError(absl::StrCat("--seed is ", seed, "; must be >= 0"));
  out.seed = static_cast<uint64_t>(seed);
  for (absl::string_view item : absl::StrSplit(expect_codes, ',', absl::SkipWhitespace())) {
    absl::StatusOr<grpc::StatusCode> code =
        ParseStatusCode(std::string(absl::StripAsciiWhitespace(item)), "--expect-codes");
    if (!code.ok()) return code.status();
    if (*code == grpc::StatusCode::OK) {
      return absl::InvalidArgumentError("--expect-codes: OK is always expected; list error codes");
    }
    out.expect_codes.insert(*code);
  }
  if (absl::Status status = out.Check(); !status.ok()) return status;
  return out;
}

CLI::App* AddLoadCommand(CLI::App& app, LoadFlags* flags) {
  CLI::App* command = app.add_subcommand(
      "load",
      "Load generator: concurrent requests of a mix for a duration; prints throughput, "
      "latency percentiles and answers by status code");
  LoadOptions& o = flags->options;
  command->add_option("--server", o.server, "Server address host:port")->capture_default_str();
  AddConnectionFlags(command, &flags->connection);
  command->add_option("--concurrency", o.concurrency, "Concurrent workers (calls in flight)")
      ->capture_default_str();
  command->add_option("--duration-s", o.duration_s, "Measured seconds")->capture_default_str();
  command->add_option("--warmup-s", o.warmup_s, "Seconds of uncounted requests first")
      ->capture_default_str();
  command->add_option("--mix", flags->mix, "small, mixed or large (see README)")
      ->capture_default_str();
  command
      ->add_option("--malformed-fraction", o.malformed_fraction,
                   "Share of requests malformed on purpose, in [0, 1]")
      ->capture_default_str();
  command->add_option("--seed", flags->seed, "Seed of the inputs and of the choice of requests")
      ->capture_default_str();
  command
      ->add_option("--deadline-ms", o.deadline_ms,
                   "Deadline of each call (0: none); makes DEADLINE_EXCEEDED expected")
      ->capture_default_str();
  command->add_option("--transport", flags->transport, "auto (per request kind), unary or stream")
      ->capture_default_str();
  command->add_option("--channels", o.channels, "gRPC channels (connections) shared by workers")
      ->capture_default_str();
  command
      ->add_option("--max-connection-age-ms", o.max_connection_age_ms,
                   "Replace each connection by a new one after about this long (0: never), so "
                   "that behind a load balancer the run reaches replicas added meanwhile")
      ->capture_default_str();
  command->add_option("--expect-codes", flags->expect_codes,
                      "Codes expected for any request under load, e.g. RESOURCE_EXHAUSTED against "
                      "a server with --max-queue");
  command->add_flag("--json", flags->json, "Print one JSON object instead of the table");
  return command;
}

int RunLoadCommand(const LoadFlags& flags) {
  absl::StatusOr<LoadOptions> options = flags.ToOptions();
  if (!options.ok()) {
    std::cerr << "da-client: error: " << options.status().message() << std::endl;
    return 2;
  }
  absl::StatusOr<LoadReport> report = RunLoad(*options);
  if (!report.ok()) {
    std::cerr << "da-client: error: " << report.status().message() << std::endl;
    return report.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::cout << (flags.json ? report->ToJson() + "\n" : report->ToText()) << std::flush;
  return report->unexpected_errors > 0 ? 1 : 0;
}

}  // namespace da::client
