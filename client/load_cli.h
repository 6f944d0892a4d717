// The `da-client load` subcommand: its flags, their conversion into LoadOptions, and the run that
// prints the report. Exit status: 0 with no unexpected answers, 1 with some (or when the server
// cannot be reached), 2 for bad flags.
//
//   da-client load --server 127.0.0.1:50051 --concurrency 16 --duration-s 20 --mix mixed
//                  --malformed-fraction 0.1 --json
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "client/load.h"

namespace da::client {

struct LoadFlags {
  LoadOptions options;
  ConnectionFiles connection;  // --tls-* and --token-file, read by ToOptions.
  std::string mix = "small";
  std::string transport = "auto";  // auto (each kind's choice), unary or stream.
  std::string expect_codes;        // "RESOURCE_EXHAUSTED,DEADLINE_EXCEEDED".
  int64_t seed = 1;
  bool json = false;

  // The options with mix, transport, expect_codes and seed applied, checked.
  absl::StatusOr<LoadOptions> ToOptions() const;
};

CLI::App* AddLoadCommand(CLI::App& app, LoadFlags* flags);

// Runs the load and prints the report on stdout; returns the exit status.
int RunLoadCommand(const LoadFlags& flags);

// "RESOURCE_EXHAUSTED" -> grpc::StatusCode::RESOURCE_EXHAUSTED; flag names the list in errors.
absl::StatusOr<grpc::StatusCode> ParseStatusCode(const std::string& name, const char* flag);

}  // namespace da::client
