// The load generator behind `da-client load`: `concurrency` worker threads, each in its own request
// loop with at most one call in flight, send the requests of a mix (client/load_mix.h) for
// `duration_s` seconds and judge every answer against the status code its request must get. Worker
// i starts with well-formed kind i (in turn), then draws kinds at random; calls still in flight at
// the end are waited for and counted.
//
//   LoadOptions options;
//   options.server = "127.0.0.1:50051";
//   options.concurrency = 16;
//   options.duration_s = 20;
//   options.mix = Mix::kMixed;
//   options.malformed_fraction = 0.1;
//   absl::StatusOr<LoadReport> report = RunLoad(options);
//   std::cout << report->ToJson();  // Exit 1 when report->unexpected_errors > 0.
//
// Expected and unexpected answers. A well-formed request expects OK (with an output of the right
// dtype, shape and byte count); a malformed one expects its own code (INVALID_ARGUMENT). Codes a
// loaded server may rightly answer any request with are expected only when the run says so:
// DEADLINE_EXCEEDED whenever deadline_ms > 0, and whatever expect_codes adds (e.g.
// RESOURCE_EXHAUSTED against a server started with --max-queue or --memory-budget-bytes).
// Everything else, UNAVAILABLE included, is unexpected.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/connection_options.h"
#include "client/load_mix.h"

namespace da::client {

struct LoadOptions {
  std::string server = "localhost:50051";
  // Plaintext without a token by default; the CLI fills it from the connection flags.
  ConnectionOptions connection;
  int concurrency = 1;  // Worker threads, each with at most one call in flight.
  int channels = 1;     // gRPC channels (connections); workers use them round robin.
  // > 0: each channel is replaced by a new connection once it has taken calls for about this long
  // (AttentionClient's max_connection_age_ms), so that behind a load balancer the run reaches
  // replicas added while it runs. 0: the run keeps its first connections.
  int64_t max_connection_age_ms = 0;
  double duration_s = 10;  // Measured time, after warm-up; at most a year.
  double warmup_s = 0;     // Requests before this are sent but not counted; at most a year.
  Mix mix = Mix::kSmall;
  double malformed_fraction = 0;  // Share of requests that are malformed on purpose, in [0, 1].
  uint64_t seed = 1;              // Inputs and each worker's choice of kinds.
  int64_t deadline_ms = 0;        // Per call; 0: none.
  int stream_override = -1;       // -1: each kind's own choice; 0: all unary; 1: all streamed.
  std::set<grpc::StatusCode> expect_codes;  // Codes expected for any request, besides its own.

  // InvalidArgument naming the field and its limit.
  absl::Status Check() const;
  // expect_codes, plus DEADLINE_EXCEEDED when deadline_ms > 0.
  std::set<grpc::StatusCode> LoadCodes() const;
};

// p-th percentile (p in [0, 100]) of values by the nearest-rank method: the smallest value with at
// least p% of the values at or below it (p = 0 gives the minimum). 0 for no values.
double Percentile(std::vector<double> values, double p);

struct LatencyPercentiles {
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;
};
LatencyPercentiles SummarizeLatencies(std::vector<double> latencies_ms);

struct CodeCounts {
  int64_t expected = 0;
  int64_t unexpected = 0;
};

struct KindReport {
  bool stream = false;
  bool malformed = false;
  std::string expected_code;  // "OK" or the malformed kind's code.
  int64_t tokens = 0;         // Per request.
  int64_t request_bytes = 0;  // Per request: q + k + v + output.
  int64_t sent = 0;
  int64_t ok = 0;
  int64_t expected_errors = 0;
  int64_t unexpected = 0;  // Includes an OK with a wrong output and an OK for a malformed request.
  LatencyPercentiles latency;  // Over this kind's completed requests.
};

// One unexpected answer, for diagnosis (the first few of a run are kept).
struct UnexpectedSample {
  std::string kind;
  std::string code;
  std::string message;
};

struct LoadReport {
  std::string server;
  std::string mix;
  int concurrency = 0;
  int channels = 0;
  double duration_s = 0, warmup_s = 0, malformed_fraction = 0;
  int64_t deadline_ms = 0;
  int64_t max_connection_age_ms = 0;
  uint64_t seed = 0;
  std::vector<std::string> load_codes;  // Codes expected for any request (LoadOptions::LoadCodes).

  double elapsed_s = 0;   // From the end of warm-up until the last counted call returned.
  int64_t sent = 0;       // Calls started after warm-up.
  int64_t completed = 0;  // Of those, answered OK as expected (well-formed, output checked).
  int64_t expected_errors = 0;
  int64_t unexpected_errors = 0;
  double requests_per_s = 0;                // completed / elapsed_s.
  double tokens_per_s = 0;                  // Tokens of the completed requests / elapsed_s.
  LatencyPercentiles latency;               // Over completed requests only.
  std::map<std::string, CodeCounts> codes;  // By code name ("OK", "INVALID_ARGUMENT", ...).
  std::map<std::string, KindReport> kinds;  // By kind name; every kind of the mix is listed.
  int64_t max_request_bytes = 0;            // Largest request_bytes among the well-formed kinds.
  int64_t connections_renewed = 0;          // Channels replaced for their age, warm-up included.
  std::vector<UnexpectedSample> unexpected_samples;

  // One JSON object on one line (fields as above; latency as {"p50_ms", ...}; codes as
  // {"NAME": {"expected": n, "unexpected": n}}).
  std::string ToJson() const;
  // The human table.
  std::string ToText() const;
};

// Connects (failing with UNAVAILABLE when the server does not answer a health check within 10 s),
// runs the workers and returns the report. InvalidArgument when options fail Check;
// RESOURCE_EXHAUSTED when a worker thread cannot be started (the started ones are stopped).
absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options);

}  // namespace da::client
