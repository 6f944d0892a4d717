// Prometheus metrics of the server, exposed on /metrics by prometheus-cpp.
//
//   DA_ASSIGN_OR_RETURN(auto metrics, Metrics::Create("0.0.0.0:9464"));
//   metrics->RequestStarted();
//   metrics->RequestFinished("Attend", grpc::StatusCode::OK, 0.012);
//   metrics->RequestEnded();
//   metrics->SetPlanCacheSource([&engine] { return engine.plan_cache_stats(); });
//
// Names follow Prometheus conventions: da_ prefix, base units (seconds, bytes), counters end in
// _total. Thread safe. Besides da_*, the standard process metrics every Prometheus client library
// exports, read from /proc/self at scrape time: process_cpu_seconds_total,
// process_resident_memory_bytes, process_virtual_memory_bytes, process_open_fds,
// process_max_fds and process_start_time_seconds; and da_build_info{version,revision,features}.
//
// The plan cache's counters and gauges (da_plan_cache_*) and the engine's admission state
// (da_queue_length, da_engine_*, da_memory_*) are not kept here: they are read from their sources
// at every scrape, so they always equal Engine::plan_cache_stats(), Engine::stats() and
// GetServerInfo.
//
// Per device (DeviceSample, read at scrape time from SetDeviceSource): da_device_info{device,
// kind,name,capability} (always 1), da_device_memory_bytes{device} (physical memory: host RAM or
// GPU global memory), da_device_busy_seconds_total{device} (compute time of runs on it,
// EngineStats::device_busy_seconds) and da_device_up{device} (1 or 0, the state readiness uses).
//
// Multi-process serving (read at scrape time from SetGroupSource, engine::ShardGroupStats):
// da_group_world_size, da_group_whole (1 when every rank is in the group, the state readiness
// uses), da_group_generation (attempts to form the group so far), da_group_runs_total{outcome}
// (completed, failed: a run that lost a rank), da_group_heartbeats_total, and per rank, as rank 0
// collected them from completed runs: da_rank_bytes_sent_total{rank},
// da_rank_bytes_received_total{rank}, da_rank_exchange_bytes_total{rank} (of the received bytes,
// the kept K/V rows of spanning segments), da_rank_compute_seconds_total{rank} and
// da_rank_collective_seconds_total{rank} (scatter, exchange and gather, waits included). A single
// process reports world size 1, whole, generation 0 and no per-rank samples.
//
// TLS (SetTlsCertificateExpiry, from the server's TlsFileWatcher):
// da_tls_certificate_expiry_timestamp_seconds, the notAfter of the serving certificate (the first
// one of --tls-cert) in Unix seconds, as of the last time the files passed the checks; absent
// when TLS is off.
//
// da_requests_rejected_total{reason} counts calls refused without a result (every
// AttentionService method: GetServerInfo and WarmUp too, while draining, unparsable, or a WarmUp
// shape refused); the reasons
// (kRejectReasons) are invalid_argument, too_large (a configured size limit), queue_full, memory,
// deadline (refused up front or expired while queued), cancelled (by the client before compute
// began), unauthenticated, unavailable (e.g. draining), idle (a stream whose client made no
// progress for --stream-idle-timeout-ms), client_memory (one client's streams at
// --max-client-stream-bytes) and priority (above the client's cap, --max-priority). Runs stopped
// during compute are not rejections: they count in
// da_engine_runs_{cancelled,deadline_exceeded}_total; nor are runs that failed after they began (a
// rank lost mid-run: da_group_runs_total{outcome="failed"}).
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/admission.h"
#include "engine/plan_cache.h"
#include "engine/shard_group.h"

namespace prometheus {
class Counter;
template <typename T>
class Family;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace da::server {

class PlanCacheCollector;
class EngineCollector;
class DeviceCollector;
class GroupCollector;
class ProcessCollector;

// What /metrics reports of one device.
struct DeviceSample {
  std::string id;  // "cpu:0", "cuda:0", ...
  std::string kind;
  std::string name;
  std::string capability;
  int64_t memory_bytes = 0;
  double busy_seconds = 0;
  int64_t runs = 0;  // Runs that computed on it (a sharded run counts on each of its devices).
  int64_t plan_cache_bytes = 0;  // Its plans' bytes in the engine's plan cache.
  // Whether its requests hold memory in an account (false on a worker rank, whose admission is
  // rank 0's: no da_device_memory_reserved_bytes or _budget_bytes for it).
  bool accounted = true;
  // The memory account its requests hold bytes in: "host" (CPU devices share it) or its own id.
  std::string memory_account = "host";
  int64_t memory_reserved_bytes = 0;  // In that account now.
  int64_t memory_budget_bytes = 0;    // That account's budget; 0: unlimited.
  bool up = false;
};

// Every reason da_requests_rejected_total is exported with (all start at 0).
inline constexpr const char* kRejectReasons[] = {
    "invalid_argument", "too_large",   "queue_full", "memory",        "deadline", "cancelled",
    "unauthenticated",  "unavailable", "idle",       "client_memory", "priority"};

class Metrics {
 public:
  // listen_address "host:port" (port 0 picks a free one); empty: no HTTP endpoint. The endpoint
  // serves 8 connections at once and closes one that has not sent its request within 3 s, so
  // that idle connections cannot hold the probes back for long.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen_address);
  ~Metrics();

  // The bound HTTP port, 0 when not exposed.
  int port() const { return port_; }

  // An attention RPC entered / left the server (da_in_flight_requests).
  void RequestStarted();
  void RequestEnded();
  // Any RPC's outcome and latency.
  void RequestFinished(std::string_view method, grpc::StatusCode code, double total_seconds);
  // An RPC refused before it ran (its token was missing or wrong): counted in da_requests_total
  // like RequestFinished, but with no latency, so that a flood of refused calls does not pull
  // da_request_duration_seconds towards zero.
  void RequestRefusedBeforeRunning(std::string_view method, grpc::StatusCode code);
  // A completed engine run: its queue and compute times and its batch * seq_len.
  void RunFinished(double queue_seconds, double compute_seconds, int64_t tokens);
  void AddBytes(int64_t bytes_in, int64_t bytes_out);
  // A plan was built, by a request that missed the cache or by warm-up.
  void PlanBuilt(double build_seconds);
  // An AttentionService call was refused; reason is one of kRejectReasons.
  void RequestRejected(std::string_view reason);
  // A unary call finished OK whose answer did not reach the client (da_answers_undelivered_total).
  void AnswerUndelivered(std::string_view method);

  // Where scrapes read the plan cache's statistics. The source must stay callable until it is
  // replaced; an empty source keeps reporting the last statistics read (so the engine may be
  // destroyed after SetPlanCacheSource(nullptr)). Until a source is set, all zero.
  void SetPlanCacheSource(std::function<engine::PlanCacheStats()> source);
  // The same for the engine's admission statistics (Engine::stats).
  void SetEngineSource(std::function<engine::EngineStats()> source);
  // The same for the devices (da_device_*); until a source is set, no device is reported.
  void SetDeviceSource(std::function<std::vector<DeviceSample>()> source);

  // The same for the shard group (da_group_*, da_rank_*); until a source is set, one process.
  void SetGroupSource(std::function<engine::ShardGroupStats()> source);

  // da_tls_certificate_expiry_timestamp_seconds: exported from the first call on.
  void SetTlsCertificateExpiry(int64_t not_after_unix_seconds);

  // da_build_info{version,revision,features} 1: what is running (features joined by ',').
  void SetBuildInfo(const std::string& version, const std::string& revision,
                    const std::string& features);

  // The plaintext probes on the metrics port, for orchestrators whose probes cannot speak TLS or
  // gRPC: GET /livez and /readyz answer 200 "ok" when the probe says ok, else 503 with its
  // reason. Until set: live, and not ready ("starting"). Null functions go back to that.
  struct ProbeResult {
    bool ok = false;
    std::string reason;
  };
  void SetProbes(std::function<ProbeResult()> live, std::function<ProbeResult()> ready);

  // The text exposition format, as /metrics serves it.
  std::string Scrape() const;

 private:
  Metrics();

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Family<prometheus::Histogram>* request_duration_ = nullptr;
  prometheus::Histogram* queue_duration_ = nullptr;
  prometheus::Histogram* compute_duration_ = nullptr;
  prometheus::Counter* tokens_ = nullptr;
  prometheus::Counter* bytes_in_ = nullptr;
  prometheus::Counter* bytes_out_ = nullptr;
  prometheus::Gauge* in_flight_ = nullptr;
  prometheus::Histogram* plan_build_duration_ = nullptr;
  prometheus::Family<prometheus::Counter>* rejected_ = nullptr;
  prometheus::Family<prometheus::Counter>* undelivered_ = nullptr;
  std::once_flag tls_expiry_once_;
  prometheus::Gauge* tls_expiry_ = nullptr;  // Set once, by the first SetTlsCertificateExpiry.
  std::shared_ptr<PlanCacheCollector> plan_cache_;
  std::shared_ptr<EngineCollector> engine_;
  std::shared_ptr<DeviceCollector> devices_;
  std::shared_ptr<GroupCollector> group_;
  std::shared_ptr<ProcessCollector> process_;
  class HttpEndpoints;
  std::unique_ptr<HttpEndpoints> http_;
  int port_ = 0;
};

}  // namespace da::server
