#include "client/load.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/cli_format.h"

namespace da::client {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kConnectTimeoutMs = 10000;
constexpr size_t kMaxUnexpectedSamples = 10;
// Far above anything one machine can drive; refuses typos such as 16000 before 16000 threads.
constexpr int kMaxConcurrency = 4096;
// The longest --duration-s and --warmup-s: --deadline-ms's limit. Far past it the run's end, a
// nanosecond count, overflows and the run ends at once.
constexpr int64_t kMaxDurationS = kMaxTimeoutMs / 1000;

absl::Status Invalid(std::string message) { return absl::InvalidArgumentError(std::move(message)); }

struct KindCounters {
  int64_t sent = 0, ok = 0, expected_errors = 0, unexpected = 0;
  std::vector<double> latencies_ms;  // Completed requests.
};

// What one worker saw; merged after every worker has stopped, so workers share nothing mutable.
struct WorkerStats {
  std::vector<KindCounters> kinds;  // Indexed like the kinds vector.
  std::map<grpc::StatusCode, CodeCounts> codes;
  std::vector<UnexpectedSample> samples;
  double tokens = 0;
};

// One client per channel: a worker's calls, faulty streams included, go on its client's channel,
// replaced for its age where the run asks for it.
std::vector<std::unique_ptr<AttentionClient>> Connect(const LoadOptions& options) {
  std::vector<std::unique_ptr<AttentionClient>> clients;
  for (int i = 0; i < options.channels; ++i) {
    // Channels with equal arguments share one connection; a distinct id gives each its own.
    ConnectionOptions connection = options.connection;
    connection.channel_id = i;
    std::vector<std::shared_ptr<grpc::Channel>> channel{MakeChannel(options.server, connection)};
    AttentionClient::ChannelFactory fresh;
    if (options.max_connection_age_ms > 0) fresh = FreshChannels(options.server, connection);
    clients.push_back(std::make_unique<AttentionClient>(std::move(channel), std::move(fresh),
                                                        options.max_connection_age_ms));
  }
  return clients;
}

absl::Status CheckServer(AttentionClient& client, const std::string& server) {
  grpc::Status status = WaitForConnection(*client.channel(), kConnectTimeoutMs);
  grpc::health::v1::HealthCheckResponse::ServingStatus serving;
  if (status.ok()) status = client.CheckHealth("", &serving, {.timeout_ms = kConnectTimeoutMs});
  if (!status.ok()) {
    return absl::UnavailableError(
        absl::StrCat("server ", server, " does not answer: ", StatusCodeName(status.error_code()),
                     ": ", status.error_message()));
  }
  return absl::OkStatus();
}

// The loop of one worker: pick a kind, send it, judge the answer, until the end of the run (or
// until stop is set).
void RunWorker(int index, const LoadOptions& options, const std::vector<RequestKind>& kinds,
               const KindPicker& picker, const std::set<grpc::StatusCode>& load_codes,
               AttentionClient& client, Clock::time_point measure_start, Clock::time_point end,
               const std::atomic<bool>& stop, WorkerStats* stats) {
  std::mt19937_64 rng(options.seed * 1000003 + static_cast<uint64_t>(index));
  stats->kinds.resize(kinds.size());
  for (int64_t n = 0;; ++n) {
    const Clock::time_point start = Clock::now();
    if (start >= end || stop.load()) break;
    const size_t k = n == 0 ? picker.First(index) : picker.Pick(rng);
    const RequestKind& kind = kinds[k];
    // Each refusal counted as it came, none sent again: the report is the server's behaviour.
    CallOptions call{.timeout_ms = options.deadline_ms,
                     .request_id = absl::StrCat("load-", index, "-", n),
                     .retry = {.max_attempts = 1}};
    v1::AttendResponse response;
    grpc::Status status = SendKind(kind, client, call, options.stream_override, &response);
    const double latency_ms =
        std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (start < measure_start) continue;

    if (status.ok() && !kind.malformed()) status = CheckResponse(kind, response);
    const bool expected = status.error_code() == kind.expected_code ||
                          (!status.ok() && load_codes.count(status.error_code()) > 0);
    KindCounters& counters = stats->kinds[k];
    ++counters.sent;
    CodeCounts& code = stats->codes[status.error_code()];
    if (!expected) {
      ++counters.unexpected;
      ++code.unexpected;
      if (stats->samples.size() < kMaxUnexpectedSamples) {
        std::string message = status.ok() ? "OK for a request that must be refused with " +
                                                StatusCodeName(kind.expected_code)
                                          : status.error_message();
        stats->samples.push_back({kind.name, StatusCodeName(status.error_code()), message});
      }
    } else if (status.ok()) {
      ++counters.ok;
      ++code.expected;
      counters.latencies_ms.push_back(latency_ms);
      stats->tokens += static_cast<double>(kind.tokens);
    } else {
      ++counters.expected_errors;
      ++code.expected;
    }
  }
}

LoadReport Merge(const LoadOptions& options, const std::vector<RequestKind>& kinds,
                 const std::vector<WorkerStats>& workers, double elapsed_s,
                 int64_t connections_renewed) {
  LoadReport report;
  report.server = options.server;
  report.mix = MixName(options.mix);
  report.concurrency = options.concurrency;
  report.channels = options.channels;
  report.max_connection_age_ms = options.max_connection_age_ms;
  report.connections_renewed = connections_renewed;
  report.duration_s = options.duration_s;
  report.warmup_s = options.warmup_s;
  report.malformed_fraction = options.malformed_fraction;
  report.deadline_ms = options.deadline_ms;
  report.seed = options.seed;
  for (grpc::StatusCode code : options.LoadCodes()) {
    report.load_codes.push_back(StatusCodeName(code));
  }
  report.elapsed_s = elapsed_s;

  for (const RequestKind& kind : kinds) {
    KindReport& out = report.kinds[kind.name];
    out.stream = kind.stream;
    out.malformed = kind.malformed();
    out.expected_code = StatusCodeName(kind.expected_code);
    out.tokens = kind.tokens;
    out.request_bytes = kind.request_bytes;
    if (!kind.malformed()) {
      report.max_request_bytes = std::max(report.max_request_bytes, kind.request_bytes);
    }
  }
  std::vector<double> latencies_ms;
  std::vector<std::vector<double>> kind_latencies_ms(kinds.size());
  double tokens = 0;
  for (const WorkerStats& worker : workers) {
    tokens += worker.tokens;
    for (size_t k = 0; k < worker.kinds.size(); ++k) {
      const KindCounters& counters = worker.kinds[k];
      KindReport& out = report.kinds[kinds[k].name];
      out.sent += counters.sent;
      out.ok += counters.ok;
      out.expected_errors += counters.expected_errors;
      out.unexpected += counters.unexpected;
      latencies_ms.insert(latencies_ms.end(), counters.latencies_ms.begin(),
                          counters.latencies_ms.end());
      kind_latencies_ms[k].insert(kind_latencies_ms[k].end(), counters.latencies_ms.begin(),
                                  counters.latencies_ms.end());
    }
    for (const auto& [code, counts] : worker.codes) {
      CodeCounts& out = report.codes[StatusCodeName(code)];
      out.expected += counts.expected;
      out.unexpected += counts.unexpected;
    }
    for (const UnexpectedSample& sample : worker.samples) {
      if (report.unexpected_samples.size() < kMaxUnexpectedSamples) {
        report.unexpected_samples.push_back(sample);
      }
    }
  }
  for (const auto& [name, kind] : report.kinds) {
    report.sent += kind.sent;
    report.completed += kind.ok;
    report.expected_errors += kind.expected_errors;
    report.unexpected_errors += kind.unexpected;
  }
  if (elapsed_s > 0) {
    report.requests_per_s = static_cast<double>(report.completed) / elapsed_s;
    report.tokens_per_s = tokens / elapsed_s;
  }
  report.latency = SummarizeLatencies(std::move(latencies_ms));
  for (size_t k = 0; k < kinds.size(); ++k) {
    report.kinds[kinds[k].name].latency = SummarizeLatencies(std::move(kind_latencies_ms[k]));
  }
  return report;
}

nlohmann::json LatencyJson(const LatencyPercentiles& latency) {
  return {{"p50", latency.p50_ms},
          {"p90", latency.p90_ms},
          {"p99", latency.p99_ms},
          {"max", latency.max_ms},
          {"mean", latency.mean_ms}};
}

}  // namespace

absl::Status LoadOptions::Check() const {
  if (server.empty()) return Invalid("--server must not be empty");
  if (concurrency < 1 || concurrency > kMaxConcurrency) {
    return Invalid(
        absl::StrCat("--concurrency is ", concurrency, "; must be in [1, ", kMaxConcurrency, "]"));
  }
  if (channels < 1 || channels > concurrency) {
    return Invalid(absl::StrCat("--channels is ", channels,
                                "; must be in [1, --concurrency = ", concurrency, "]"));
  }
  if (!(duration_s > 0) || !std::isfinite(duration_s)) {
    return Invalid(absl::StrCat("--duration-s is ", duration_s, "; must be > 0"));
  }
  if (duration_s > kMaxDurationS) {
    return Invalid(absl::StrCat("--duration-s is ", duration_s, "; must be at most ", kMaxDurationS,
                                " (a year)"));
  }
  if (!(warmup_s >= 0) || !std::isfinite(warmup_s)) {
    return Invalid(absl::StrCat("--warmup-s is ", warmup_s, "; must be >= 0"));
  }
  if (warmup_s > kMaxDurationS) {
    return Invalid(
        absl::StrCat("--warmup-s is ", warmup_s, "; must be at most ", kMaxDurationS, " (a year)"));
  }
  if (!(malformed_fraction >= 0 && malformed_fraction <= 1)) {
    return Invalid(
        absl::StrCat("--malformed-fraction is ", malformed_fraction, "; must be in [0, 1]"));
  }
  if (deadline_ms < 0) {
    return Invalid(absl::StrCat("--deadline-ms is ", deadline_ms, "; must be >= 0 (0: none)"));
  }
  if (deadline_ms > kMaxTimeoutMs) {
    return Invalid(absl::StrCat("--deadline-ms is ", deadline_ms, "; must be at most ",
                                kMaxTimeoutMs, " (a year; 0: none)"));
  }
  if (max_connection_age_ms < 0 || max_connection_age_ms > kMaxTimeoutMs) {
    return Invalid(absl::StrCat("--max-connection-age-ms is ", max_connection_age_ms,
                                "; must be in [0, ", kMaxTimeoutMs, "] (a year; 0: never renew)"));
  }
  if (stream_override < -1 || stream_override > 1) {
    return Invalid(absl::StrCat("stream_override is ", stream_override, "; must be -1, 0 or 1"));
  }
  return absl::OkStatus();
}

std::set<grpc::StatusCode> LoadOptions::LoadCodes() const {
  std::set<grpc::StatusCode> codes = expect_codes;
  if (deadline_ms > 0) codes.insert(grpc::StatusCode::DEADLINE_EXCEEDED);
  codes.erase(grpc::StatusCode::OK);
  return codes;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::ceil(std::clamp(p, 0.0, 100.0) / 100.0 * values.size());
  const size_t index = rank < 1 ? 0 : static_cast<size_t>(rank) - 1;
  return values[std::min(index, values.size() - 1)];
}

LatencyPercentiles SummarizeLatencies(std::vector<double> latencies_ms) {
  LatencyPercentiles out;
  if (latencies_ms.empty()) return out;
  std::sort(latencies_ms.begin(), latencies_ms.end());
  out.p50_ms = Percentile(latencies_ms, 50);
  out.p90_ms = Percentile(latencies_ms, 90);
  out.p99_ms = Percentile(latencies_ms, 99);
  out.max_ms = latencies_ms.back();
  out.mean_ms = std::accumulate(latencies_ms.begin(), latencies_ms.end(), 0.0) /
                static_cast<double>(latencies_ms.size());
  return out;
}

std::string LoadReport::ToJson() const {
  nlohmann::json json = {
      {"server", server},
      {"mix", mix},
      {"concurrency", concurrency},
      {"channels", channels},
      {"max_connection_age_ms", max_connection_age_ms},
      {"connections_renewed", connections_renewed},
      {"duration_s", duration_s},
      {"warmup_s", warmup_s},
      {"malformed_fraction", malformed_fraction},
      {"deadline_ms", deadline_ms},
      {"seed", seed},
      {"load_codes", load_codes},
      {"elapsed_s", elapsed_s},
      {"sent", sent},
      {"completed", completed},
      {"expected_errors", expected_errors},
      {"unexpected_errors", unexpected_errors},
      {"requests_per_s", requests_per_s},
      {"tokens_per_s", tokens_per_s},
      {"latency_ms", LatencyJson(latency)},
      {"max_request_bytes", max_request_bytes},
  };
  nlohmann::json& code_json = json["codes"] = nlohmann::json::object();
  for (const auto& [name, counts] : codes) {
    code_json[name] = {{"expected", counts.expected}, {"unexpected", counts.unexpected}};
  }
  nlohmann::json& kind_json = json["kinds"] = nlohmann::json::object();
  for (const auto& [name, kind] : kinds) {
    kind_json[name] = {{"stream", kind.stream},
                       {"malformed", kind.malformed},
                       {"expected_code", kind.expected_code},
                       {"tokens", kind.tokens},
                       {"request_bytes", kind.request_bytes},
                       {"sent", kind.sent},
                       {"ok", kind.ok},
                       {"expected_errors", kind.expected_errors},
                       {"unexpected", kind.unexpected},
                       {"latency_ms", LatencyJson(kind.latency)}};
  }
  nlohmann::json& samples = json["unexpected_samples"] = nlohmann::json::array();
  for (const UnexpectedSample& sample : unexpected_samples) {
    samples.push_back({{"kind", sample.kind}, {"code", sample.code}, {"message", sample.message}});
  }
  return JsonLine(json);
}

std::string LoadReport::ToText() const {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1);
  out << "load: " << server << ", mix " << mix << ", concurrency " << concurrency << ", "
      << duration_s << " s (+" << warmup_s << " s warm-up), malformed fraction "
      << malformed_fraction << ", deadline "
      << (deadline_ms > 0 ? absl::StrCat(deadline_ms, " ms") : std::string("none")) << "\n";
  out << "connections         " << channels;
  if (max_connection_age_ms > 0) {
    out << ", renewed after about " << max_connection_age_ms << " ms: " << connections_renewed
        << " times";
  }
  out << "\n";
  out << "elapsed             " << elapsed_s << " s\n";
  out << "sent                " << sent << "\n";
  out << "completed           " << completed << "\n";
  out << "expected errors     " << expected_errors << "\n";
  out << "unexpected errors   " << unexpected_errors << "\n";
  out << "throughput          " << requests_per_s << " requests/s, " << std::setprecision(0)
      << tokens_per_s << " tokens/s\n"
      << std::setprecision(2);
  out << "latency ms          p50 " << latency.p50_ms << "  p90 " << latency.p90_ms << "  p99 "
      << latency.p99_ms << "  max " << latency.max_ms << "  mean " << latency.mean_ms << "\n";
  out << "\ncode                 expected  unexpected\n";
  for (const auto& [name, counts] : codes) {
    out << std::left << std::setw(20) << name << std::right << std::setw(10) << counts.expected
        << std::setw(12) << counts.unexpected << "\n";
  }
  out << "\nkind                          sent        ok  exp.err  unexpected   p50 ms   p99 ms\n";
  for (const auto& [name, kind] : kinds) {
    out << std::left << std::setw(28) << name << std::right << std::setw(6) << kind.sent
        << std::setw(10) << kind.ok << std::setw(9) << kind.expected_errors << std::setw(12)
        << kind.unexpected << std::setw(9) << kind.latency.p50_ms << std::setw(9)
        << kind.latency.p99_ms << "\n";
  }
  if (!load_codes.empty()) {
    out << "\nexpected for any request under load:";
    for (const std::string& code : load_codes) out << " " << code;
    out << "\n";
  }
  for (const UnexpectedSample& sample : unexpected_samples) {
    out << "unexpected: " << sample.kind << ": " << sample.code << ": " << sample.message << "\n";
  }
  return out.str();
}

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options) {
  if (absl::Status status = options.Check(); !status.ok()) return status;
  const std::vector<RequestKind> kinds =
      BuildMix(options.mix, options.malformed_fraction > 0, options.seed);
  const KindPicker picker(kinds, options.malformed_fraction);
  const std::set<grpc::StatusCode> load_codes = options.LoadCodes();

  std::vector<std::unique_ptr<AttentionClient>> clients = Connect(options);
  for (std::unique_ptr<AttentionClient>& client : clients) {
    if (absl::Status status = CheckServer(*client, options.server); !status.ok()) return status;
  }

  const Clock::time_point measure_start =
      Clock::now() +
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options.warmup_s));
  const Clock::time_point end =
      measure_start + std::chrono::duration_cast<Clock::duration>(
                          std::chrono::duration<double>(options.duration_s));
  std::vector<WorkerStats> stats(options.concurrency);
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  workers.reserve(options.concurrency);
  for (int i = 0; i < options.concurrency; ++i) {
    try {
      workers.emplace_back(RunWorker, i, std::cref(options), std::cref(kinds), std::cref(picker),
                           std::cref(load_codes), std::ref(*clients[i % clients.size()]),
                           measure_start, end, std::cref(stop), &stats[i]);
    } catch (const std::system_error& error) {
      // The workers started stop after their call in flight (bounded by --deadline-ms, if any).
      stop = true;
      for (std::thread& worker : workers) worker.join();
      return absl::ResourceExhaustedError(absl::StrCat("cannot start a thread: ", error.what(),
                                                       " (worker ", i + 1, " of ",
                                                       options.concurrency, ")"));
    }
  }
  for (std::thread& worker : workers) worker.join();
  // Calls started before the end finish after it; their time counts, so throughput is not
  // inflated by work that spilled past the nominal duration.
  const double elapsed_s = std::chrono::duration<double>(Clock::now() - measure_start).count();
  int64_t renewed = 0;
  for (const std::unique_ptr<AttentionClient>& client : clients) {
    renewed += client->connections_renewed();
  }
  return Merge(options, kinds, stats, elapsed_s, renewed);
}

}  // namespace da::client
