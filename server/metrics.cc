#include "server/metrics.h"

#include <CivetServer.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>
#include <sys/resource.h>
#include <unistd.h>

#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/status_conversion.h"

namespace da::server {
namespace {

// 1 ms to 10 min: a tiny unary call up to a billion-token stream.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1,     2.5,    5,     10,   30,    60,   120, 300,  600};
}

// 100 us to 1 min: a small table up to a plan that touches gigabytes of workspace.
prometheus::Histogram::BucketBoundaries BuildBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};
}

prometheus::MetricFamily OneValueFamily(std::string name, std::string help,
                                        prometheus::MetricType type, double value) {
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return {std::move(name), std::move(help), type, {metric}};
}

// A histogram family whose buckets the engine already counted (cumulative, one per bound).
prometheus::MetricFamily StopLatencyFamily(const engine::StopLatencyStats& stats) {
  prometheus::ClientMetric metric;
  for (size_t i = 0; i < stats.bounds_seconds.size() && i < stats.cumulative.size(); ++i) {
    metric.histogram.bucket.push_back(
        {static_cast<uint64_t>(stats.cumulative[i]), stats.bounds_seconds[i]});
  }
  metric.histogram.bucket.push_back(
      {static_cast<uint64_t>(stats.count), std::numeric_limits<double>::infinity()});
  metric.histogram.sample_count = static_cast<uint64_t>(stats.count);
  metric.histogram.sample_sum = stats.sum_seconds;
  return {"da_engine_stop_latency_seconds",
          "Time from the engine seeing a cancellation or a passed deadline to compute returning.",
          prometheus::MetricType::Histogram,
          {metric}};
}

}  // namespace

// Computed at scrape time from the engine's own statistics rather than mirrored into
// prometheus::Counter objects: nothing can drift between the metric, GetServerInfo and the
// engine, and no code path has to remember to sync after a request or a warm-up. A collector
// reads its source at every scrape; once the source is cleared it keeps reporting the last value.
template <typename Stats>
class SourcedCollector : public prometheus::Collectable {
 public:
  void SetSource(std::function<Stats()> source) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (source_) last_ = source_();  // What an empty source keeps reporting.
    source_ = std::move(source);
  }

 protected:
  Stats Read() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (source_) last_ = source_();
    return last_;
  }

 private:
  mutable std::mutex mutex_;
  std::function<Stats()> source_;
  mutable Stats last_;
};

// The standard process_* metrics (the names Prometheus' client libraries use), from /proc/self.
class ProcessCollector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::MetricType;
    std::vector<prometheus::MetricFamily> families;
    const long ticks = sysconf(_SC_CLK_TCK);
    const long page = sysconf(_SC_PAGE_SIZE);
    // /proc/self/stat: fields after the command's closing parenthesis, from field 3 (state) on.
    std::ifstream stat_file("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    const size_t close = stat.rfind(')');
    if (close != std::string::npos && ticks > 0 && page > 0) {
      std::vector<std::string> fields = absl::StrSplit(stat.substr(close + 2), ' ');
      // Field k of stat(5) is fields[k - 3].
      auto field = [&](size_t k) -> double {
        double value = 0;
        return k - 3 < fields.size() && absl::SimpleAtod(fields[k - 3], &value) ? value : 0;
      };
      families.push_back(OneValueFamily("process_cpu_seconds_total",
                                        "Total user and system CPU time spent in seconds.",
                                        MetricType::Counter, (field(14) + field(15)) / ticks));
      families.push_back(OneValueFamily("process_virtual_memory_bytes",
                                        "Virtual memory size in bytes.", MetricType::Gauge,
                                        field(23)));
      families.push_back(OneValueFamily("process_resident_memory_bytes",
                                        "Resident memory size in bytes.", MetricType::Gauge,
                                        field(24) * page));
      if (const double boot = BootTimeSeconds(); boot > 0) {
        families.push_back(OneValueFamily("process_start_time_seconds",
                                          "Start time of the process since unix epoch in seconds.",
                                          MetricType::Gauge, boot + field(22) / ticks));
      }
    }
    std::error_code error;
    int64_t fds = 0;
    for (auto it = std::filesystem::directory_iterator("/proc/self/fd", error);
         !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
      ++fds;
    }
    if (!error) {
      families.push_back(OneValueFamily("process_open_fds", "Number of open file descriptors.",
                                        MetricType::Gauge, fds));
    }
    if (rlimit limit; getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
      families.push_back(OneValueFamily("process_max_fds",
                                        "Maximum number of open file descriptors.",
                                        MetricType::Gauge, static_cast<double>(limit.rlim_cur)));
    }
    return families;
  }

 private:
  // /proc/stat's btime: the boot time, seconds since the epoch.
  static double BootTimeSeconds() {
    std::ifstream in("/proc/stat");
    std::string key;
    double value = 0;
    while (in >> key) {
      if (key == "btime" && (in >> value)) return value;
      in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    }
    return 0;
  }
};

class PlanCacheCollector final : public SourcedCollector<engine::PlanCacheStats> {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    const engine::PlanCacheStats stats = Read();
    using prometheus::MetricType;
    return {
        OneValueFamily("da_plan_cache_hits_total", "Plan lookups that found a ready plan.",
                       MetricType::Counter, stats.hits),
        OneValueFamily("da_plan_cache_misses_total",
                       "Plan lookups that found none (they built one or waited for its build).",
                       MetricType::Counter, stats.misses),
        OneValueFamily("da_plan_cache_builds_total",
                       "Plans built by requests or warm-up, successfully or not.",
                       MetricType::Counter, stats.builds),
        OneValueFamily("da_plan_cache_evictions_total",
                       "Plans dropped to keep the cache within --plan-cache-bytes.",
                       MetricType::Counter, stats.evictions),
        OneValueFamily("da_plan_cache_bytes", "Bytes held by the cached plans.", MetricType::Gauge,
                       stats.bytes),
        OneValueFamily("da_plan_cache_entries", "Plans cached.", MetricType::Gauge, stats.entries),
        OneValueFamily("da_plan_cache_capacity_bytes", "The plan cache's budget, in bytes.",
                       MetricType::Gauge, stats.capacity_bytes),
    };
  }
};

// The engine's admission state, read at scrape time like the plan cache's.
class EngineCollector final : public SourcedCollector<engine::EngineStats> {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    const engine::EngineStats stats = Read();
    using prometheus::MetricType;
    return {
        OneValueFamily("da_queue_length", "Requests waiting for the engine.", MetricType::Gauge,
                       stats.queued),
        OneValueFamily("da_queue_capacity", "Requests that may wait (--max-queue).",
                       MetricType::Gauge, stats.max_queue),
        OneValueFamily("da_engine_running_requests", "Requests the engine is computing.",
                       MetricType::Gauge, stats.running),
        OneValueFamily("da_memory_reserved_bytes",
                       "Bytes reserved by admitted requests (inputs, outputs, workspace).",
                       MetricType::Gauge, stats.memory_reserved_bytes),
        OneValueFamily("da_memory_budget_bytes",
                       "The admission memory budget (--memory-budget-bytes); 0: unlimited.",
                       MetricType::Gauge, stats.memory_budget_bytes),
        OneValueFamily("da_memory_kept_bytes",
                       "Bytes of the budget kept by the server outside requests (the stream "
                       "buffer pool's capacity).",
                       MetricType::Gauge, stats.memory_kept_bytes),
        OneValueFamily("da_queue_stream_places",
                       "Queue places held by open streams (one each, within --max-queue).",
                       MetricType::Gauge, stats.queue_places_held),
        OneValueFamily("da_engine_runs_completed_total", "Runs computed to the end.",
                       MetricType::Counter, stats.runs_completed),
        OneValueFamily("da_engine_deadline_flops_per_second",
                       "Throughput the up-front deadline checks of requests computed in this "
                       "process use: the best run measured on its own devices, or the start-up "
                       "self-check's before the first; 0: none.",
                       MetricType::Gauge, static_cast<int64_t>(stats.deadline_flops_per_second)),
        OneValueFamily("da_engine_group_deadline_flops_per_second",
                       "Throughput the up-front deadline checks of requests the multi-process "
                       "group runs use: the best measured group run; 0: none yet, or no group.",
                       MetricType::Gauge,
                       static_cast<int64_t>(stats.measured_group_flops_per_second)),
        OneValueFamily("da_engine_runs_cancelled_total",
                       "Runs stopped during compute because their request was cancelled.",
                       MetricType::Counter, stats.runs_cancelled),
        OneValueFamily("da_engine_runs_deadline_exceeded_total",
                       "Runs stopped during compute because their deadline passed.",
                       MetricType::Counter, stats.runs_deadline_exceeded),
        StopLatencyFamily(stats.stop_latency),
    };
  }
};

// The devices, read at scrape time too. Every family is present even with no device (HELP and
// TYPE only), so dashboards and promtool see the same set of names on every server.
class DeviceCollector final : public SourcedCollector<std::vector<DeviceSample>> {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    const std::vector<DeviceSample> devices = Read();
    using prometheus::MetricType;
    prometheus::MetricFamily info{"da_device_info",
                                  "Devices the engine computes on (always 1), with their kind, "
                                  "product name and capability.",
                                  MetricType::Gauge,
                                  {}};
    prometheus::MetricFamily memory{
        "da_device_memory_bytes",
        "Memory of the device: for a CPU what this process may use (host RAM, or its "
        "container's memory limit when lower), for a GPU its global memory.",
        MetricType::Gauge,
        {}};
    prometheus::MetricFamily busy{"da_device_busy_seconds_total",
                                  "Seconds runs spent computing on the device (concurrent runs "
                                  "each count their own time).",
                                  MetricType::Counter,
                                  {}};
    prometheus::MetricFamily runs{"da_device_runs_total",
                                  "Runs that computed on the device; a run sharded across "
                                  "several devices counts on each.",
                                  MetricType::Counter,
                                  {}};
    prometheus::MetricFamily plans{"da_device_plan_cache_bytes",
                                   "Bytes of the device's plans in the plan cache (its share of "
                                   "da_plan_cache_bytes).",
                                   MetricType::Gauge,
                                   {}};
    prometheus::MetricFamily reserved{
        "da_device_memory_reserved_bytes",
        "Bytes admitted requests hold in the device's memory account (label account): CPU "
        "devices share the host account (da_memory_reserved_bytes), a GPU has its own.",
        MetricType::Gauge,
        {}};
    prometheus::MetricFamily budget{
        "da_device_memory_budget_bytes",
        "The budget of the device's memory account (--memory-budget-bytes for the host, "
        "--device-memory-budget-bytes for a GPU); 0: unlimited.",
        MetricType::Gauge,
        {}};
    prometheus::MetricFamily up{
        "da_device_up",
        "1 when the device is up (discovered, self-check passed), 0 when it is down; readiness "
        "needs every device up.",
        MetricType::Gauge,
        {}};
    for (const DeviceSample& device : devices) {
      prometheus::ClientMetric metric;
      metric.label = {{"device", device.id}};
      metric.gauge.value = static_cast<double>(device.memory_bytes);
      memory.metric.push_back(metric);
      metric.gauge.value = device.up ? 1 : 0;
      up.metric.push_back(metric);
      metric.gauge.value = 0;
      metric.counter.value = device.busy_seconds;
      busy.metric.push_back(metric);
      metric.counter.value = static_cast<double>(device.runs);
      runs.metric.push_back(metric);
      metric.counter.value = 0;
      metric.gauge.value = static_cast<double>(device.plan_cache_bytes);
      plans.metric.push_back(metric);
      if (device.accounted) {
        prometheus::ClientMetric accounted;
        accounted.label = {{"account", device.memory_account}, {"device", device.id}};
        accounted.gauge.value = static_cast<double>(device.memory_reserved_bytes);
        reserved.metric.push_back(accounted);
        accounted.gauge.value = static_cast<double>(device.memory_budget_bytes);
        budget.metric.push_back(accounted);
      }
      prometheus::ClientMetric labelled;
      labelled.label = {{"capability", device.capability},
                        {"device", device.id},
                        {"kind", device.kind},
                        {"name", device.name}};
      labelled.gauge.value = 1;
      info.metric.push_back(labelled);
    }
    return {std::move(info),  std::move(memory),   std::move(busy),   std::move(runs),
            std::move(plans), std::move(reserved), std::move(budget), std::move(up)};
  }
};

// The shard group, read at scrape time. Every family is present on every server (a single
// process is a group of one, always whole), so dashboards see one set of names.
class GroupCollector final : public SourcedCollector<engine::ShardGroupStats> {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    engine::ShardGroupStats stats = Read();
    if (stats.status.world_size < 1) stats.status = engine::ShardGroupStatus();
    using prometheus::MetricType;
    prometheus::MetricFamily runs{
        "da_group_runs_total",
        "Sharded runs by outcome: completed, or failed (a rank lost or stalled; the group "
        "re-formed).",
        MetricType::Counter,
        {}};
    for (const auto& [outcome, value] :
         {std::pair{"completed", stats.runs_completed}, std::pair{"failed", stats.runs_failed}}) {
      prometheus::ClientMetric metric;
      metric.label = {{"outcome", outcome}};
      metric.counter.value = static_cast<double>(value);
      runs.metric.push_back(std::move(metric));
    }
    std::vector<prometheus::MetricFamily> families = {
        OneValueFamily("da_group_world_size", "Ranks in the group (1: a single process).",
                       MetricType::Gauge, stats.status.world_size),
        OneValueFamily("da_group_whole",
                       "1 when every rank is in the group (readiness needs it), 0 while it "
                       "re-forms.",
                       MetricType::Gauge, stats.status.whole ? 1 : 0),
        OneValueFamily("da_group_generation", "Attempts to form the group so far.",
                       MetricType::Gauge, stats.status.generation),
        std::move(runs),
        OneValueFamily("da_group_heartbeats_total",
                       "Idle keep-alive frames rank 0 sent to workers (not in da_rank_bytes_*).",
                       MetricType::Counter, stats.heartbeats_sent),
    };
    struct PerRank {
      const char* name;
      const char* help;
      double (*value)(const engine::ShardGroupStats::Rank&);
    };
    const PerRank per_rank[] = {
        {"da_rank_bytes_sent_total", "Bytes the rank sent in completed sharded runs.",
         [](const engine::ShardGroupStats::Rank& r) { return static_cast<double>(r.bytes_sent); }},
        {"da_rank_bytes_received_total", "Bytes the rank received in completed sharded runs.",
         [](const engine::ShardGroupStats::Rank& r) {
           return static_cast<double>(r.bytes_received);
         }},
        {"da_rank_exchange_bytes_total",
         "Of the received bytes: kept K/V rows of segments spanning ranks (SEQUENCE).",
         [](const engine::ShardGroupStats::Rank& r) {
           return static_cast<double>(r.exchange_bytes);
         }},
        {"da_rank_compute_seconds_total", "Seconds the rank computed its shares.",
         [](const engine::ShardGroupStats::Rank& r) { return r.compute_seconds; }},
        {"da_rank_collective_seconds_total",
         "Seconds the rank spent in scatter, exchange and gather (waits included).",
         [](const engine::ShardGroupStats::Rank& r) { return r.collective_seconds; }},
    };
    for (const PerRank& kind : per_rank) {
      prometheus::MetricFamily family{kind.name, kind.help, MetricType::Counter, {}};
      for (size_t r = 0; r < stats.ranks.size(); ++r) {
        prometheus::ClientMetric metric;
        metric.label = {{"rank", std::to_string(r)}};
        metric.counter.value = kind.value(stats.ranks[r]);
        family.metric.push_back(std::move(metric));
      }
      families.push_back(std::move(family));
    }
    return families;
  }
};

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  requests_ = &prometheus::BuildCounter()
                   .Name("da_requests_total")
                   .Help("RPCs finished, by method and gRPC status code.")
                   .Register(*registry_);
  request_duration_ = &prometheus::BuildHistogram()
                           .Name("da_request_duration_seconds")
                           .Help("Server-side RPC latency, from the first byte read to the answer.")
                           .Register(*registry_);
  queue_duration_ = &prometheus::BuildHistogram()
                         .Name("da_queue_duration_seconds")
                         .Help("Time engine runs waited in the queue before compute started.")
                         .Register(*registry_)
                         .Add({}, LatencyBuckets());
  compute_duration_ = &prometheus::BuildHistogram()
                           .Name("da_compute_duration_seconds")
                           .Help("Compute time of successful engine runs.")
                           .Register(*registry_)
                           .Add({}, LatencyBuckets());
  tokens_ = &prometheus::BuildCounter()
                 .Name("da_tokens_total")
                 .Help("Tokens (batch * seq_len) of successfully computed requests.")
                 .Register(*registry_)
                 .Add({});
  auto& bytes = prometheus::BuildCounter()
                    .Name("da_request_bytes_total")
                    .Help("Tensor bytes received (in) and sent (out).")
                    .Register(*registry_);
  bytes_in_ = &bytes.Add({{"direction", "in"}});
  bytes_out_ = &bytes.Add({{"direction", "out"}});
  in_flight_ = &prometheus::BuildGauge()
                    .Name("da_in_flight_requests")
                    .Help("Attention RPCs accepted and not yet answered.")
                    .Register(*registry_)
                    .Add({});
  plan_build_duration_ = &prometheus::BuildHistogram()
                              .Name("da_plan_build_duration_seconds")
                              .Help(
                                  "Time to build a plan, for requests that missed the plan "
                                  "cache and for warm-up.")
                              .Register(*registry_)
                              .Add({}, BuildBuckets());
  rejected_ = &prometheus::BuildCounter()
                   .Name("da_requests_rejected_total")
                   .Help(
                       "Attention RPCs refused without a result, by reason (invalid_argument, "
                       "too_large, queue_full, memory, deadline, cancelled, unauthenticated, "
                       "unavailable, idle, client_memory, priority).")
                   .Register(*registry_);
  for (const char* reason : kRejectReasons) rejected_->Add({{"reason", reason}});
  undelivered_ = &prometheus::BuildCounter()
                      .Name("da_answers_undelivered_total")
                      .Help(
                          "Answers computed and finished OK whose call was cancelled before "
                          "gRPC had sent them (the client went away), by method. An answer "
                          "gRPC has already taken into its transport is not seen lost.")
                      .Register(*registry_);
  for (const char* method : {"Attend", "GetServerInfo", "WarmUp"}) {
    undelivered_->Add({{"method", method}});
  }
  plan_cache_ = std::make_shared<PlanCacheCollector>();
  engine_ = std::make_shared<EngineCollector>();
  devices_ = std::make_shared<DeviceCollector>();
  group_ = std::make_shared<GroupCollector>();
  process_ = std::make_shared<ProcessCollector>();
  for (const char* method : {"Attend", "AttendStream", "GetServerInfo", "WarmUp"}) {
    request_duration_->Add({{"method", method}}, LatencyBuckets());
  }
}

Metrics::~Metrics() { http_.reset(); }  // No scrape may run while the members go.

// The HTTP port: /metrics (the text exposition format, Scrape()), /livez and /readyz (200 "ok"
// or 503 with the reason, from the probes), served by CivetWeb.
//
// CivetWeb gives each connection a worker thread from the moment it is accepted, and that thread
// waits for the request for up to request_timeout_ms (30 s by default): with 4 threads and that
// default, 4 connections that send nothing would hold /livez back for 30 s, long enough for the
// kubelet to restart a healthy pod. Hence more threads (cheap: they sleep) and a request timeout
// well inside a probe's period: a worker held by a silent connection is free again after 3 s.
constexpr char kHttpThreads[] = "8";
constexpr char kHttpRequestTimeoutMs[] = "3000";

class Metrics::HttpEndpoints {
 public:
  HttpEndpoints(const std::string& listen_address, Metrics& metrics)
      : server_({"listening_ports", listen_address, "num_threads", kHttpThreads,
                 "request_timeout_ms", kHttpRequestTimeoutMs}),
        metrics_(&metrics),
        live_(this, true),
        ready_(this, false) {
    server_.addHandler("/metrics$", metrics_);
    server_.addHandler("/livez$", live_);
    server_.addHandler("/readyz$", ready_);
  }
  ~HttpEndpoints() { server_.close(); }

  int port() { return server_.getListeningPorts().empty() ? 0 : server_.getListeningPorts()[0]; }

  void SetProbes(std::function<ProbeResult()> live, std::function<ProbeResult()> ready) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_probe_ = std::move(live);
    ready_probe_ = std::move(ready);
  }

 private:
  static void Answer(mg_connection* connection, int code, const char* content_type,
                     const std::string& body) {
    mg_printf(connection,
              "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: "
              "no-store\r\n\r\n",
              code, code == 200 ? "OK" : "Service Unavailable", content_type, body.size());
    mg_write(connection, body.data(), body.size());
  }

  class MetricsHandler final : public CivetHandler {
   public:
    explicit MetricsHandler(Metrics* metrics) : metrics_(metrics) {}
    bool handleGet(CivetServer*, mg_connection* connection) override {
      Answer(connection, 200, "text/plain; version=0.0.4; charset=utf-8", metrics_->Scrape());
      return true;
    }

   private:
    Metrics* metrics_;
  };

  // A probe: 200 "ok" or 503 with the reason. Until the server sets the probes, live answers
  // 200 and ready 503 "starting".
  class ProbeHandler final : public CivetHandler {
   public:
    ProbeHandler(HttpEndpoints* owner, bool live) : owner_(owner), live_(live) {}
    bool handleGet(CivetServer*, mg_connection* connection) override {
      ProbeResult result{live_, live_ ? "" : "starting"};
      {
        std::lock_guard<std::mutex> lock(owner_->mutex_);
        const std::function<ProbeResult()>& probe =
            live_ ? owner_->live_probe_ : owner_->ready_probe_;
        if (probe) result = probe();
      }
      Answer(connection, result.ok ? 200 : 503, "text/plain; charset=utf-8",
             result.ok ? "ok\n" : result.reason + "\n");
      return true;
    }

   private:
    HttpEndpoints* owner_;
    bool live_;
  };

  CivetServer server_;
  MetricsHandler metrics_;
  ProbeHandler live_, ready_;
  std::mutex mutex_;
  std::function<ProbeResult()> live_probe_, ready_probe_;
};

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& listen_address) {
  std::unique_ptr<Metrics> metrics(new Metrics());
  if (listen_address.empty()) return metrics;
  try {
    metrics->http_ = std::make_unique<HttpEndpoints>(listen_address, *metrics);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", listen_address, ": ", e.what()));
  }
  metrics->port_ = metrics->http_->port();
  return metrics;
}

void Metrics::SetProbes(std::function<ProbeResult()> live, std::function<ProbeResult()> ready) {
  if (http_ != nullptr) http_->SetProbes(std::move(live), std::move(ready));
}

void Metrics::RequestStarted() { in_flight_->Increment(); }

void Metrics::RequestEnded() { in_flight_->Decrement(); }

void Metrics::RequestFinished(std::string_view method, grpc::StatusCode code,
                              double total_seconds) {
  requests_->Add({{"method", std::string(method)}, {"code", StatusCodeName(code)}}).Increment();
  request_duration_->Add({{"method", std::string(method)}}, LatencyBuckets())
      .Observe(total_seconds);
}

void Metrics::RequestRefusedBeforeRunning(std::string_view method, grpc::StatusCode code) {
  requests_->Add({{"method", std::string(method)}, {"code", StatusCodeName(code)}}).Increment();
}

void Metrics::RunFinished(double queue_seconds, double compute_seconds, int64_t tokens) {
  queue_duration_->Observe(queue_seconds);
  compute_duration_->Observe(compute_seconds);
  tokens_->Increment(static_cast<double>(tokens));
}

void Metrics::AddBytes(int64_t bytes_in, int64_t bytes_out) {
  bytes_in_->Increment(static_cast<double>(bytes_in));
  bytes_out_->Increment(static_cast<double>(bytes_out));
}

void Metrics::PlanBuilt(double build_seconds) { plan_build_duration_->Observe(build_seconds); }

void Metrics::AnswerUndelivered(std::string_view method) {
  undelivered_->Add({{"method", std::string(method)}}).Increment();
}

void Metrics::RequestRejected(std::string_view reason) {
  rejected_->Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::SetEngineSource(std::function<engine::EngineStats()> source) {
  engine_->SetSource(std::move(source));
}

void Metrics::SetDeviceSource(std::function<std::vector<DeviceSample>()> source) {
  devices_->SetSource(std::move(source));
}

void Metrics::SetPlanCacheSource(std::function<engine::PlanCacheStats()> source) {
  plan_cache_->SetSource(std::move(source));
}

void Metrics::SetGroupSource(std::function<engine::ShardGroupStats()> source) {
  group_->SetSource(std::move(source));
}

void Metrics::SetTlsCertificateExpiry(int64_t not_after_unix_seconds) {
  // Registered on first use, so that a server without TLS exports no such gauge.
  std::call_once(tls_expiry_once_, [this] {
    tls_expiry_ = &prometheus::BuildGauge()
                       .Name("da_tls_certificate_expiry_timestamp_seconds")
                       .Help(
                           "notAfter of the serving TLS certificate (the first of --tls-cert), "
                           "in Unix seconds, as of the last time the TLS files passed the checks.")
                       .Register(*registry_)
                       .Add({});
  });
  tls_expiry_->Set(static_cast<double>(not_after_unix_seconds));
}

void Metrics::SetBuildInfo(const std::string& version, const std::string& revision,
                           const std::string& features) {
  prometheus::BuildGauge()
      .Name("da_build_info")
      .Help("The running build (always 1): its version, source revision and build features.")
      .Register(*registry_)
      .Add({{"version", version}, {"revision", revision}, {"features", features}})
      .Set(1);
}

std::string Metrics::Scrape() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  for (prometheus::MetricFamily& family : plan_cache_->Collect()) {
    families.push_back(std::move(family));
  }
  for (prometheus::MetricFamily& family : engine_->Collect()) {
    families.push_back(std::move(family));
  }
  for (prometheus::MetricFamily& family : devices_->Collect()) {
    families.push_back(std::move(family));
  }
  for (prometheus::MetricFamily& family : group_->Collect()) {
    families.push_back(std::move(family));
  }
  for (prometheus::MetricFamily& family : process_->Collect()) {
    families.push_back(std::move(family));
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace da::server
