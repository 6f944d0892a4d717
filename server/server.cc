#include "server/server.h"

#include <grpcpp/ext/health_check_service_server_builder_option.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/self_check.h"
#include "engine/status_macros.h"
#include "server/authenticated_service.h"
#include "server/open_streams.h"
#include "server/send_queue.h"

#ifndef DA_VERSION
#define DA_VERSION "unknown"
#endif
#ifndef DA_REVISION
#define DA_REVISION "unknown"
#endif

namespace da::server {

void DescribeBuild(Metrics& metrics) {
  metrics.SetBuildInfo(DA_VERSION, DA_REVISION, absl::StrJoin(engine::BuildFeatures(), ","));
}

int64_t DefaultPlanCacheBytes(int64_t memory_bytes) {
  return std::min<int64_t>(int64_t{1} << 30, memory_bytes / 8);
}

int64_t DefaultProcessReserveBytes(int64_t memory_bytes) {
  return std::min<int64_t>(int64_t{512} << 20, memory_bytes / 16);
}

int64_t DefaultMemoryBudgetBytes(int64_t memory_bytes, int64_t plan_cache_bytes,
                                 int64_t grpc_memory_bytes) {
  // gRPC's real bound, at least 256 MiB: in a pod under 1 GiB that is more than a quarter. An
  // unbounded gRPC (0) is counted at its default.
  const int64_t grpc =
      grpc_memory_bytes > 0 ? grpc_memory_bytes : DefaultGrpcMemoryBytes(memory_bytes);
  return std::max(memory_bytes / 8, memory_bytes - grpc - plan_cache_bytes -
                                        DefaultProcessReserveBytes(memory_bytes));
}

int64_t DefaultWorkerMemoryBudgetBytes(int64_t memory_bytes, int64_t plan_cache_bytes) {
  return std::max(memory_bytes / 8,
                  memory_bytes - plan_cache_bytes - DefaultProcessReserveBytes(memory_bytes));
}

int64_t DefaultGrpcMemoryBytes(int64_t memory_bytes) {
  return std::max(memory_bytes / 4, int64_t{256} << 20);
}

namespace {

std::vector<DeviceSample> DeviceSamples(const engine::Engine& engine, const Health& health) {
  const engine::EngineStats stats = engine.stats();
  const engine::PlanCacheStats plans = engine.plan_cache_stats();
  const std::vector<std::pair<std::string, bool>> up = health.DevicesUp();
  std::vector<DeviceSample> samples;
  for (const engine::DeviceInfo& device : engine.devices()) {
    DeviceSample sample{.id = device.id,
                        .kind = device.kind,
                        .name = device.name,
                        .capability = device.capability,
                        .memory_bytes = device.memory_bytes};
    if (auto busy = stats.device_busy_seconds.find(device.id);
        busy != stats.device_busy_seconds.end()) {
      sample.busy_seconds = busy->second;
    }
    if (auto runs = stats.device_runs.find(device.id); runs != stats.device_runs.end()) {
      sample.runs = runs->second;
    }
    if (auto bytes = plans.bytes_by_device.find(device.id); bytes != plans.bytes_by_device.end()) {
      sample.plan_cache_bytes = bytes->second;
    }
    if (auto account = stats.device_memory_account.find(device.id);
        account != stats.device_memory_account.end()) {
      sample.memory_account = account->second;
      sample.memory_reserved_bytes = stats.device_memory_reserved_bytes.at(device.id);
      sample.memory_budget_bytes = stats.device_memory_budget_bytes.at(device.id);
    }
    for (const auto& [id, is_up] : up) {
      if (id == device.id) sample.up = is_up;
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

}  // namespace

void Server::RunSelfCheck(const engine::EngineOptions& engine_options,
                          const std::function<absl::Status(engine::Engine&)>& hook) {
  // The check runs on an engine of the same backend, instruction set, thread count and precision
  // policy as the serving one, so it exercises the same compute path; but without the request
  // limits and memory budget (a --max-tokens below the check's 80 tokens must not keep the server
  // unready for good) and apart from the serving engine's plan cache and statistics, which then
  // count client traffic only.
  engine::EngineOptions check_options = engine_options;
  check_options.limits = engine::Limits();
  check_options.memory_budget_bytes = 0;
  check_options.plan_cache_bytes = int64_t{64} << 20;
  check_options.shard_group = nullptr;  // The check is of this process's compute path.
  absl::Status checked;
  std::string passed;
  absl::StatusOr<std::unique_ptr<engine::Engine>> check_engine =
      engine::Engine::Create(check_options);
  if (!check_engine.ok()) {
    checked = check_engine.status();
  } else if (hook) {
    checked = hook(**check_engine);
  } else {
    absl::StatusOr<engine::SelfCheckResult> result = engine::SelfCheck(**check_engine);
    checked = result.status();
    if (result.ok()) {
      passed = absl::StrFormat(
          " on %s (%s): max error %.2g within %.2g; %.1f GFLOP/s until a request is measured",
          result->device, engine::PrecisionName(result->precision), result->max_abs_error,
          result->tolerance, result->flops_per_second / 1e9);
      // Up-front deadline checks need a throughput before the first request has been timed.
      engine_->SetStartupThroughput(result->flops_per_second);
    }
  }
  if (engine_->devices().empty()) return;  // Readiness already says "no device discovered".
  if (checked.ok()) {
    spdlog::info("self-check passed{}", passed);
    return;
  }
  // The check ran on every device; the reason names the one that failed. A device that failed
  // (or could not be reached because an earlier one failed) is not vouched for: every one is
  // down until a restart.
  const std::string reason = absl::StrCat("self-check failed: ", checked.message());
  for (const engine::DeviceInfo& device : engine_->devices()) {
    spdlog::error("device {} down, readiness stays NOT_SERVING: {}", device.id, reason);
    health_->SetDeviceUp(device.id, false, reason);
  }
}

void Server::WatchTlsFiles(const SecurityOptions& security) {
  // Called from one thread at a time (TlsFileWatcher), so `logged` needs no lock: it keeps the log
  // to one line per change instead of one per interval.
  tls_watcher_ = std::make_unique<TlsFileWatcher>(
      security, [security, health = health_.get(), metrics = metrics_.get(),
                 logged = std::string()](const absl::StatusOr<TlsFilesState>& files) mutable {
        const std::string reason = files.ok() ? "" : std::string(files.status().message());
        if (!files.ok() && !TlsFilesReadable(security)) {
          // gRPC serves the pair it has meanwhile: readiness stays as it was.
          if (reason != logged) {
            spdlog::warn("TLS files unreadable; the pair read before is still served: {}", reason);
            logged = reason;
          }
          return;
        }
        if (files.ok()) metrics->SetTlsCertificateExpiry(files->certificate_not_after_unix_seconds);
        health->SetTlsFiles(files.ok(), reason);
        if (reason == logged) return;
        if (files.ok()) {
          spdlog::info("TLS files pass the checks again; readiness no longer held off by them");
        } else {
          spdlog::error("TLS files fail the checks, new handshakes fail, readiness NOT_SERVING: {}",
                        reason);
        }
        logged = reason;
      });
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (options.stream_pipeline_depth < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream_pipeline_depth is ", options.stream_pipeline_depth, "; must be >= 1"));
  }
  if (options.stream_min_chunk_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream_min_chunk_tokens is ", options.stream_min_chunk_tokens, "; must be >= 1"));
  }
  if (!(options.shard_min_flops >= 0) || !std::isfinite(options.shard_min_flops)) {
    return absl::InvalidArgumentError(absl::StrCat("shard_min_flops is ", options.shard_min_flops,
                                                   "; must be a finite number >= 0"));
  }
  if (options.stream_buffer_pool_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream_buffer_pool_bytes is ", options.stream_buffer_pool_bytes, "; must be >= 0"));
  }
  if (options.max_message_bytes < 1 || options.max_message_bytes > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes is ", options.max_message_bytes, "; must be in [1, ", INT_MAX, "]"));
  }
  for (const auto& [name, value] :
       {std::pair<const char*, int64_t>{"stream_idle_timeout_ms", options.stream_idle_timeout_ms},
        {"stream_progress_log_ms", options.stream_progress_log_ms},
        {"keepalive_time_ms", options.keepalive_time_ms},
        {"keepalive_timeout_ms", options.keepalive_timeout_ms},
        {"max_connection_idle_ms", options.max_connection_idle_ms},
        {"max_connection_age_ms", options.max_connection_age_ms},
        {"max_connection_age_grace_ms", options.max_connection_age_grace_ms}}) {
    if (value < 0 || value > INT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " is ", value, "; must be in [0, ", INT_MAX, "] (0: off)"));
    }
  }
  if (options.grpc_memory_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grpc_memory_bytes is ", options.grpc_memory_bytes, "; must be >= 0 (0: unbounded)"));
  }
  if (options.max_client_stream_bytes < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_client_stream_bytes is ", options.max_client_stream_bytes,
                     "; must be >= 0 (0: no cap), or -1 for half the memory budget"));
  }
  if (options.max_concurrent_streams < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_concurrent_streams is ", options.max_concurrent_streams, "; must be at least 1"));
  }
  // Files first: a bad certificate or token file fails before the engine is built.
  DA_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                      MakeServerCredentials(options.security));
  std::unique_ptr<Server> server(new Server());
  if (!options.security.auth_token_file.empty()) {
    DA_ASSIGN_OR_RETURN(server->authenticator_,
                        BearerTokenAuthenticator::FromFile(options.security.auth_token_file));
  }

  engine::EngineOptions engine_options;
  engine_options.threads = options.threads;
  engine_options.cpu_devices = options.cpu_devices;
  engine_options.cpu_devices_numa = options.cpu_devices_numa;
  engine_options.devices = options.devices;
  engine_options.backend = options.backend;
  engine_options.limits.max_request_bytes = options.max_request_bytes;
  engine_options.limits.max_tokens = options.max_tokens;
  engine_options.plan_cache_bytes = options.plan_cache_bytes;
  engine_options.precision.fallback = options.precision_fallback;
  engine_options.memory_budget_bytes = options.memory_budget_bytes;
  engine_options.device_memory_budget_bytes = options.device_memory_budget_bytes;
  engine_options.max_queue = options.max_queue;
  engine_options.shard_min_flops = options.shard_min_flops;
  engine_options.queue_order = options.queue_order;
  engine_options.shard_group = options.shard_group;
  server->shard_group_ = options.shard_group;
  DA_ASSIGN_OR_RETURN(server->engine_, engine::Engine::Create(engine_options));
  DA_ASSIGN_OR_RETURN(server->metrics_, Metrics::Create(options.metrics_address));
  DescribeBuild(*server->metrics_);
  server->metrics_->SetPlanCacheSource(
      [engine = server->engine_.get()] { return engine->plan_cache_stats(); });
  server->metrics_->SetEngineSource([engine = server->engine_.get()] { return engine->stats(); });
  server->health_ = std::make_unique<Health>(server->engine_->devices());
  // /livez and /readyz on the metrics port say what grpc.health.v1 says, in plaintext HTTP.
  server->metrics_->SetProbes([] { return Metrics::ProbeResult{.ok = true, .reason = ""}; },
                              [health = server->health_.get()] {
                                std::string reason = health->NotReadyReason();
                                return Metrics::ProbeResult{.ok = reason.empty(),
                                                            .reason = std::move(reason)};
                              });
  server->RunSelfCheck(engine_options, options.self_check);
  if (!options.security.tls_cert_file.empty()) server->WatchTlsFiles(options.security);
  if (server->shard_group_ != nullptr) {
    // The listener first, then the current state: a change in between is reported twice, never
    // lost.
    server->shard_group_->SetStatusListener(
        [health = server->health_.get()](const engine::ShardGroupStatus& status) {
          if (status.whole) {
            spdlog::info("group of {} ranks whole (generation {})", status.world_size,
                         status.generation);
          } else {
            spdlog::warn("group not whole: {}", status.reason);
          }
          health->SetGroup(status.whole, status.reason);
        });
    const engine::ShardGroupStatus status = server->shard_group_->status();
    server->health_->SetGroup(status.whole, status.reason);
    server->metrics_->SetGroupSource(
        [group = server->shard_group_.get()] { return group->stats(); });
  }
  server->metrics_->SetDeviceSource(
      [engine = server->engine_.get(), health = server->health_.get()] {
        return DeviceSamples(*engine, *health);
      });
  server->warmup_ = options.warmup;
  server->warmup_transport_ = {.max_message_bytes = options.max_message_bytes,
                               .stream_min_chunk_tokens = options.stream_min_chunk_tokens,
                               .stream_windows = server->engine_->ComputesShares()};
  // The stream buffer pool keeps memory the budget must count: its capacity is kept out of the
  // budget for good (cut to a quarter of it, so that streams keep most of it).
  int64_t pool_bytes = options.stream_buffer_pool_bytes;
  if (options.memory_budget_bytes > 0) {
    pool_bytes = std::min(pool_bytes, options.memory_budget_bytes / 4);
    server->engine_->SetKeptMemory(pool_bytes, "the stream buffer pool");
  }
  const int64_t client_cap = options.max_client_stream_bytes >= 0
                                 ? options.max_client_stream_bytes
                                 : std::max<int64_t>(options.memory_budget_bytes / 2, 0);
  server->service_ = std::make_unique<AttentionService>(
      server->engine_.get(), server->metrics_.get(),
      ServiceOptions{.max_message_bytes = options.max_message_bytes,
                     .version = DA_VERSION,
                     .stream_pipeline_depth = options.stream_pipeline_depth,
                     .stream_min_chunk_tokens = options.stream_min_chunk_tokens,
                     .stream_buffer_pool_bytes = pool_bytes,
                     .stream_idle_timeout_ms = options.stream_idle_timeout_ms,
                     .stream_progress_log_ms = options.stream_progress_log_ms,
                     .max_client_stream_bytes = client_cap,
                     .client_by_token = server->authenticator_ != nullptr,
                     .max_priority = options.max_priority,
                     .authenticator = server->authenticator_.get(),
                     .before_unary_answer = options.before_unary_answer});

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // Our own grpc.health.v1.Health (server/health.h) instead of gRPC's default one, whose Watch
  // calls stay open through Shutdown and so would hold every drain up to its deadline. A null
  // interface turns the default service off whatever EnableDefaultHealthCheckService said.
  builder.SetOption(std::make_unique<grpc::HealthCheckServiceServerBuilderOption>(nullptr));
  builder.RegisterService(server->health_.get());
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  if (server->authenticator_ != nullptr) {
    server->guarded_ = std::make_unique<AuthenticatedAttentionService>(
        server->service_.get(), server->authenticator_.get(), server->metrics_.get());
    builder.RegisterService(server->guarded_.get());
  } else {
    builder.RegisterService(server->service_.get());
  }
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  if (options.grpc_memory_bytes > 0) {
    server->grpc_quota_ = std::make_unique<grpc::ResourceQuota>("da-server");
    server->grpc_quota_->Resize(static_cast<size_t>(options.grpc_memory_bytes));
    builder.SetResourceQuota(*server->grpc_quota_);
  }
  // Dead peers and idle connections (ServerOptions): without these a vanished client's calls stay
  // open until TCP notices, which may be never.
  // Both or neither: a timeout of 0 would close every connection at its first ping.
  if (options.keepalive_time_ms > 0 && options.keepalive_timeout_ms > 0) {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                               static_cast<int>(options.keepalive_time_ms));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                               static_cast<int>(options.keepalive_timeout_ms));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  }
  // Clients may ping every 10 s (gRPC's default refuses pings more often than every 5 minutes
  // without data and closes the connection after two).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  if (options.max_connection_idle_ms > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                               static_cast<int>(options.max_connection_idle_ms));
  }
  if (options.max_connection_age_ms > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                               static_cast<int>(options.max_connection_age_ms));
    if (options.max_connection_age_grace_ms > 0) {
      builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                                 static_cast<int>(options.max_connection_age_grace_ms));
    }
  }
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  // Flow control: a stream the server is not reading (its pipeline window is full) may have at
  // most this much in flight towards it. gRPC's bandwidth-delay probing would otherwise grow the
  // HTTP/2 window, and so the bytes buffered per stream, without a bound we state.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                             static_cast<int>(kStreamLookaheadBytes));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen_address));
  }
  if (server->warmup_.empty()) server->health_->SetWarm(true);
  return server;
}

absl::Status Server::WarmUp(const std::atomic<bool>* stop) {
  const int64_t evicted_before = engine_->plan_cache_stats().evictions;
  for (size_t i = 0; i < warmup_.size(); ++i) {
    absl::StatusOr<engine::WarmUpResult> result =
        WarmUpPlan(*engine_, *metrics_, warmup_[i], warmup_transport_, stop);
    if (!result.ok()) {
      return Prefixed(result.status(),
                      absl::StrCat("entry ", i, " (", DescribeWarmUpShape(warmup_[i]), "): "));
    }
  }
  // Plans that did not stay are built again by their first requests: the warm-up did not do what
  // the operator asked, which only the evictions counter would otherwise show.
  const engine::PlanCacheStats cache = engine_->plan_cache_stats();
  if (const int64_t evicted = cache.evictions - evicted_before; evicted > 0) {
    spdlog::warn(
        "warm-up: {} plans were dropped from the plan cache while it ran, to stay within its {} "
        "bytes (--plan-cache-bytes); the first requests of the shapes dropped will build them "
        "again",
        evicted, cache.capacity_bytes);
  }
  health_->SetWarm(true);  // Draining, if it has begun, still keeps readiness off.
  return absl::OkStatus();
}

Server::~Server() {
  Shutdown(std::chrono::milliseconds(0));
  // Also when Start failed before serving (Shutdown then does nothing).
  if (shard_group_ != nullptr) shard_group_->SetStatusListener(nullptr);
}

void Server::DeliverAnswersInFlight(std::chrono::steady_clock::time_point cut_off) {
  const auto start = std::chrono::steady_clock::now();
  if (start >= cut_off) return;  // No drain time (~Server): nothing to wait for.
  const int calls = service_->live_calls();
  if (!service_->WaitForCallsToEnd(cut_off)) {
    spdlog::warn("drain: calls in flight still running at the cut-off; cancelling them");
    return;
  }
  // gRPC may still hold the last bytes of an answer whose call is done (its writer thread
  // descheduled on a loaded machine), so a connection counts as delivered only once it has shown
  // nothing unacknowledged at a poll at least kDeliverySettle after the calls ended. Connections
  // that close meanwhile drop out.
  //
  // The calls still arriving are waited for too (for up to kArrivingWait): a unary call whose
  // message is not whole has no reactor yet, and gRPC's shutdown would close the connection
  // under it with no status; once whole it is refused ("draining") like any call of the drain.
  // Channelz counts streams, not which ones, so a connection's wait ends once as many streams
  // have ended on it as its client had started when it was first looked at: calls that keep
  // coming and are refused do not hold the drain. While a connection still waits for one, its
  // refusal is still to be written, so no connection counts as delivered yet.
  const auto settled = std::chrono::steady_clock::now() + kDeliverySettle;
  const auto arriving_until = std::min(cut_off, settled + kArrivingWait);
  std::set<uint64_t> delivered;        // Connections (socket inodes) seen empty once settled.
  std::map<int64_t, int64_t> started;  // Channelz id -> streams started when first looked at.
  std::set<int64_t> answered;          // Channelz ids whose awaited streams have all ended.
  bool streams_known = true;
  int64_t most = 0;
  int64_t most_arriving = 0;
  int64_t arriving = 0;
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    bool waiting_for_arrivals = false;
    if (streams_known && now >= settled && now < arriving_until) {
      absl::StatusOr<std::vector<ConnectionStreams>> streams = OpenServerStreams(port_, &answered);
      if (!streams.ok()) {
        spdlog::warn(
            "drain: cannot see the calls gRPC has not handed over yet ({}); not waiting "
            "for them",
            streams.status().ToString());
        streams_known = false;
      } else {
        arriving = 0;
        for (const ConnectionStreams& connection : *streams) {
          const int64_t awaited =
              started.emplace(connection.socket_id, connection.started).first->second;
          if (connection.ended >= awaited) {
            answered.insert(connection.socket_id);
          } else {
            arriving += std::min(awaited - connection.ended, connection.open());
          }
        }
        most_arriving = std::max(most_arriving, arriving);
        waiting_for_arrivals = arriving > 0;
        if (waiting_for_arrivals) delivered.clear();
      }
    }
    absl::StatusOr<std::vector<SocketQueue>> queues = ServerSocketQueues(port_);
    if (!queues.ok()) {
      spdlog::warn(
          "drain: {} calls in flight ended; cannot tell whether their answers reached the "
          "clients ({}); closing the connections",
          calls, queues.status().ToString());
      return;
    }
    bool pending = now < settled || waiting_for_arrivals;
    int64_t unacknowledged = 0;
    for (const SocketQueue& queue : *queues) {
      unacknowledged += queue.unacknowledged;
      if (now >= settled && !waiting_for_arrivals && queue.unacknowledged == 0) {
        delivered.insert(queue.inode);
      }
      if (delivered.count(queue.inode) == 0) pending = true;
    }
    most = std::max(most, unacknowledged);
    if (!pending || now >= cut_off) {
      const double ms = std::chrono::duration<double, std::milli>(now - start).count();
      const std::string arrivals =
          !streams_known ? "calls still arriving unknown"
          : arriving > 0 ? absl::StrCat(arriving, " calls still arriving after ",
                                        kArrivingWait.count(), " ms left to gRPC")
                         : absl::StrCat(most_arriving, " calls still arriving answered");
      if (!pending) {
        spdlog::info(
            "drain: {} calls in flight ended and their answers reached the clients (at most {} "
            "bytes were on the way; {}) in {:.1f} ms; closing the connections",
            calls, most, arrivals, ms);
      } else {
        spdlog::warn(
            "drain: {} calls in flight ended; {} bytes of answers still unacknowledged by the "
            "clients at the cut-off, {:.1f} ms after the drain began; closing the connections",
            calls, unacknowledged, ms);
      }
      return;
    }
    std::this_thread::sleep_for(kDeliveryPoll);
  }
}

void Server::Shutdown(std::chrono::milliseconds drain_timeout, std::chrono::milliseconds grace) {
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  if (shut_down_ || server_ == nullptr) return;
  shut_down_ = true;
  health_->BeginDrain();
  service_->BeginDrain();
  if (grace.count() > 0) std::this_thread::sleep_for(grace);
  const auto cut_off = std::chrono::steady_clock::now() + drain_timeout;
  service_->SetDrainCutOff(cut_off);
  DeliverAnswersInFlight(cut_off);
  // gRPC sends its GOAWAY and stops taking calls; calls still in flight (only when the cut-off
  // came first) are cancelled at once (their reactors see OnCancel, the engine stops them).
  // Returns when every reactor is done, so no engine callback can touch the service afterwards.
  const auto left = std::max(std::chrono::steady_clock::duration::zero(),
                             cut_off - std::chrono::steady_clock::now());
  server_->Shutdown(std::chrono::system_clock::now() + left);
  // Scrapes keep the plan cache's and the engine's last statistics; the engine's destructor
  // finishes anything still queued.
  metrics_->SetPlanCacheSource(nullptr);
  metrics_->SetEngineSource(nullptr);
  metrics_->SetDeviceSource(nullptr);
  metrics_->SetProbes([] { return Metrics::ProbeResult{.ok = true, .reason = ""}; },
                      [] { return Metrics::ProbeResult{.ok = false, .reason = "stopped"}; });
  engine_.reset();
  if (shard_group_ != nullptr) {
    // The group may outlive the server (the caller holds it too): no more calls into health_.
    shard_group_->SetStatusListener(nullptr);
    metrics_->SetGroupSource(nullptr);
  }
}

}  // namespace da::server
