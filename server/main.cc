// da-server: dilated attention over gRPC. With no flags it serves on CPU at 0.0.0.0:50051 and
// exposes Prometheus metrics at 0.0.0.0:9464/metrics.
//
//   da-server --listen 127.0.0.1:0 --port-file /tmp/port --log-level debug
//   da-server --warmup shapes.json --plan-cache-bytes 4294967296 --precision-fallback
//   da-server --memory-budget-bytes 8589934592 --max-queue 16
//   da-server --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem
//             --auth-token-file tokens.txt
//
// With --warmup, the file is read before anything listens (a bad file exits 1 naming the file,
// the entry and the field); the ports are then bound and written, liveness is SERVING, and
// readiness turns SERVING once every warm-up plan is built (a shape the engine refuses exits 1).
// Readiness also waits for the start-up self-check; a failed one keeps it off (server/health.h).
//
// SIGTERM or SIGINT: readiness turns NOT_SERVING, new calls are refused, calls in flight finish
// (for up to --drain-timeout-ms), then the process exits 0.
//
// Multi-process serving (docs/DISTRIBUTED.md, server/group_flags.h):
//   da-server --world-size 3 --rank 0 --coordinator host0:29500 --rank-address 10.0.0.5
//   da-server --world-size 3 --rank 1 --coordinator host0:29500 --rank-address 10.0.0.6
// Rank 0 serves gRPC and /metrics as above, with readiness NOT_SERVING while the group is not
// whole; the other ranks serve no gRPC (only /metrics, /livez and /readyz), compute their shares,
// and exit 0 on SIGTERM or SIGINT (after the run in progress, if any; at most --drain-timeout-ms
// later).
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/decimal_flags.h"
#include "client/grpc_poller.h"
#include "engine/host_resources.h"
#include "server/group_flags.h"
#include "server/malloc_tuning.h"
#include "server/metrics.h"
#include "server/server.h"
#include "server/warm_up_file.h"

namespace {

// A SIGINT (a second Ctrl-C) while `what`: exits at once with 128 + the signal, as shells do,
// cutting off the work in flight.
[[noreturn]] void ExitNowOn(int signal_number, const char* what) {
  spdlog::warn("{} while {}: exiting now, without the work in flight", strsignal(signal_number),
               what);
  spdlog::default_logger()->flush();
  std::_Exit(128 + signal_number);
}

// Writes value to path atomically (temporary file, then rename), so a reader polling for the
// file never sees it half written.
bool WritePortFile(const std::string& path, int port) {
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << port << "\n";
    if (!out) return false;
  }
  return std::rename(temporary.c_str(), path.c_str()) == 0;
}

// "0.0.0.0:0" with port 5123 -> "0.0.0.0:5123".
std::string WithPort(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  return (colon == std::string::npos ? address : address.substr(0, colon)) + ":" +
         std::to_string(port);
}

// A worker rank: the group loop on a thread of its own, until SIGTERM/SIGINT (then it leaves
// after the run in progress, within drain_timeout_ms) or until it ends by itself (a kShutdown
// frame, which it reports by raising SIGUSR1: every thread blocks the stop signals, so sigwait
// here is the one place that hears them).
// It serves no gRPC; with metrics_address, /metrics (build, process, its device's and its plan
// cache's metrics), /livez and /readyz (200 while it is in a generation of the group) on that
// address, so that every rank can be scraped and probed.
int RunWorkerMain(const da::server::GroupFlags& group, int threads, int64_t memory_budget_bytes,
                  const sigset_t& signals, int64_t drain_timeout_ms,
                  const std::string& metrics_address, const std::string& metrics_port_file) {
  // The probes' state before the metrics server that reads it: destroyed after it.
  std::mutex state_mutex;
  std::string not_serving = "starting";
  da::engine::WorkerStats computed;  // What the worker has computed (its device and plan cache).
  std::unique_ptr<da::server::Metrics> metrics;
  if (!metrics_address.empty()) {
    absl::StatusOr<std::unique_ptr<da::server::Metrics>> made =
        da::server::Metrics::Create(metrics_address);
    if (!made.ok()) {
      spdlog::error("rank {}: {}", group.rank, made.status().ToString());
      return 1;
    }
    metrics = *std::move(made);
    da::server::DescribeBuild(*metrics);
    metrics->SetProbes([] { return da::server::Metrics::ProbeResult{.ok = true, .reason = ""}; },
                       [&] {
                         std::lock_guard<std::mutex> lock(state_mutex);
                         return da::server::Metrics::ProbeResult{.ok = not_serving.empty(),
                                                                 .reason = not_serving};
                       });
    // Its device and plan cache, as on rank 0; no memory account (admission is rank 0's).
    metrics->SetDeviceSource([&] {
      std::lock_guard<std::mutex> lock(state_mutex);
      std::vector<da::server::DeviceSample> samples;
      if (computed.device.id.empty()) return samples;
      const da::engine::DeviceInfo& device = computed.device;
      samples.push_back({.id = device.id,
                         .kind = device.kind,
                         .name = device.name,
                         .capability = device.capability,
                         .memory_bytes = device.memory_bytes,
                         .busy_seconds = computed.compute_seconds,
                         .runs = computed.shares_computed,
                         .plan_cache_bytes = computed.plans.bytes,
                         .accounted = false,
                         .up = true});
      return samples;
    });
    metrics->SetPlanCacheSource([&] {
      std::lock_guard<std::mutex> lock(state_mutex);
      return computed.plans;
    });
    if (!metrics_port_file.empty() && !WritePortFile(metrics_port_file, metrics->port())) {
      spdlog::error("cannot write {}", metrics_port_file);
      return 1;
    }
  }
  spdlog::info("rank {} of {}: computing for the coordinator at {}; no gRPC here; {}", group.rank,
               group.world_size, group.coordinator,
               metrics ? absl::StrCat("/metrics, /livez and /readyz on ",
                                      WithPort(metrics_address, metrics->port()))
                       : std::string("no /metrics (--metrics-listen \"\")"));
  std::atomic<bool> stop{false};
  std::atomic<bool> ended{false};
  absl::Status result;
  std::thread loop([&] {
    result = da::server::RunWorkerRank(
        group, threads, memory_budget_bytes, stop,
        [&](const std::string& reason) {
          std::lock_guard<std::mutex> lock(state_mutex);
          not_serving = reason;
        },
        [&](const da::engine::WorkerStats& stats) {
          std::lock_guard<std::mutex> lock(state_mutex);
          computed = stats;
        });
    ended.store(true);
    kill(getpid(), SIGUSR1);
  });
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  if (signal_number != SIGUSR1) {
    spdlog::info("{}: leaving the group (up to {} ms)", strsignal(signal_number), drain_timeout_ms);
    stop.store(true);
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(drain_timeout_ms);
    while (!ended.load()) {
      // The loop ended raises SIGUSR1; a SIGINT exits at once, as on rank 0 (a repeated SIGTERM
      // asks again for the same graceful stop).
      timespec slice{0, 100 * 1000 * 1000};
      const int again = sigtimedwait(&signals, nullptr, &slice);
      if (again == SIGINT) {
        ExitNowOn(again, "leaving the group");
      }
      if (std::chrono::steady_clock::now() >= deadline && !ended.load()) {
        spdlog::warn("the run in progress did not end within {} ms; exiting", drain_timeout_ms);
        std::_Exit(0);
      }
    }
  }
  loop.join();
  if (!result.ok()) {
    spdlog::error("rank {}: {}", group.rank, result.ToString());
    return 1;
  }
  spdlog::info("stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  da::server::KeepFreedMessageMemory();  // Before any thread starts (server/malloc_tuning.h).
  da::server::ServerOptions options;
  std::string resources_root = "/";
  int64_t memory_elsewhere_bytes = 0;
  std::string log_level = "info";
  std::string port_file;
  std::string metrics_port_file;
  int64_t drain_timeout_ms = 30000;
  int64_t drain_grace_ms = 0;
  std::string warmup_file;

  CLI::App app{"da-server: dilated (LongNet-style) attention as a gRPC service"};
  app.add_option("--listen", options.listen_address, "gRPC address host:port (port 0: any free)")
      ->capture_default_str();
  app.add_option("--metrics-listen", options.metrics_address,
                 "Prometheus /metrics address host:port; empty disables it")
      ->capture_default_str();
  app.add_option("--threads", options.threads,
                 "Compute threads; 0: the CPUs this process may use (its affinity mask, lowered to "
                 "its container's CPU quota)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  std::string cpu_devices = "1";
  app.add_option(
         "--cpu-devices", cpu_devices,
         "The CPU as N compute devices, each with threads/N threads (requests are placed "
         "on one or sharded across several), or \"numa\": one device per NUMA node with CPUs "
         "in this process's affinity mask, --threads split over them and pinned there")
      ->capture_default_str()
      ->check([](const std::string& value) -> std::string {
        int n = 0;
        if (value == "numa" || (absl::SimpleAtoi(value, &n) && n >= 1)) return "";
        return absl::StrCat("--cpu-devices is \"", value, "\"; must be a number >= 1 or \"numa\"");
      });
  std::string devices;
  app.add_option("--devices", devices,
                 "Comma-separated device ids to compute on (cpu:0, cuda:1, ...); empty: every "
                 "device this build can compute on")
      ->capture_default_str();
  app.add_option("--max-message-bytes", options.max_message_bytes,
                 "Largest gRPC message received or sent")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{2147483647}));
  app.add_option("--max-request-bytes", options.max_request_bytes,
                 "Largest request: q + k + v + output bytes; 0: unlimited")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-tokens", options.max_tokens, "Largest batch * seq_len; 0: unlimited")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--plan-cache-bytes", options.plan_cache_bytes,
                 "Budget of the warm plan cache (LRU); 0 caches nothing. Default: min(1 GiB, M / "
                 "8), M the memory this process may use (physical or its container's limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--precision-fallback", options.precision_fallback,
               "A precision the device cannot do uses the nearest supported one (reported in "
               "ExecutionInfo) instead of failing with INVALID_ARGUMENT");
  app.add_option("--stream-pipeline-depth", options.stream_pipeline_depth,
                 "AttendStream: chunks of input one stream holds at once; a stream's memory is "
                 "about (depth + 2) chunks, whatever its length")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--stream-buffer-pool-bytes", options.stream_buffer_pool_bytes,
                 "AttendStream: idle chunk buffers kept for the next stream of the same shape; "
                 "counted in --memory-budget-bytes (at most a quarter of it); 0 keeps none")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--stream-progress-log-ms", options.stream_progress_log_ms,
                 "AttendStream: a stream running this long logs a progress line (tokens and "
                 "chunks done, bytes each way, elapsed) as a chunk finishes, then again each "
                 "time as long after; 0: none")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--stream-idle-timeout-ms", options.stream_idle_timeout_ms,
                 "AttendStream: a stream whose client sends and reads nothing for this long "
                 "(while none of its chunks computes) ends and frees its memory; so does an "
                 "Attend whose client has not read its answer this long after it was ready; 20 s "
                 "is one 64 MiB message at about 4 MB/s plus a margin; 0: never")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--max-client-stream-bytes", options.max_client_stream_bytes,
                 "Stream windows one client (its token with --auth-token-file, else its address) "
                 "may hold at once; -1: half of --memory-budget-bytes; 0: no cap")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{-1}, std::numeric_limits<int64_t>::max()));
  app.add_option("--stream-min-chunk-tokens", options.stream_min_chunk_tokens,
                 "AttendStream: least tokens per chunk; a chunk is a multiple of every segment "
                 "length and is computed as soon as its tokens have arrived")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--memory-budget-bytes", options.memory_budget_bytes,
                 "Bytes all admitted requests may hold at once (inputs, outputs, plan workspace); "
                 "over it a request gets RESOURCE_EXHAUSTED. Default: max(M / 8, M - "
                 "--grpc-memory-bytes - --plan-cache-bytes - min(512 MiB, M / 16)), M the memory "
                 "this process may use (physical or its container's limit; the last term is the "
                 "process's own); 0: unlimited. On a worker rank (--rank > 0): the most its part "
                 "of one sharded run may hold (its shares of q, k, v and the output, and the kept "
                 "K/V rows it exchanges), published to rank 0, which refuses a request whose part "
                 "does not fit with RESOURCE_EXHAUSTED naming the rank; default max(M / 8, M - "
                 "256 MiB of plan cache - min(512 MiB, M / 16))")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--grpc-memory-bytes", options.grpc_memory_bytes,
                 "What gRPC's own buffers may hold at once, above all unary requests still "
                 "arriving (counted nowhere else); near it gRPC narrows its flow-control windows, "
                 "past it sends idle connections GOAWAY and resets calls. Default: max(M / 4, "
                 "256 MiB), M as for --memory-budget-bytes; 0: unbounded")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--device-memory-budget-bytes", options.device_memory_budget_bytes,
                 "Bytes admitted requests may hold at once in one GPU's memory (its copies of "
                 "their tensors and the plan workspace); over it a request goes to another GPU, "
                 "is sharded, or gets RESOURCE_EXHAUSTED. 0: 90% of the GPU's memory")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-queue", options.max_queue,
                 "Requests that may wait for the engine (an open stream holds one place); more "
                 "get RESOURCE_EXHAUSTED. 0: only requests the engine can start at once")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--shard-min-flops", options.shard_min_flops,
                 "Requests with shard policy AUTO and at least this many FLOPs (4*N*D*w/r^2 per "
                 "head and pattern, docs/MATH.md) are sharded: across the ranks with --world-size "
                 "> 1, else "
                 "across the CPU devices or GPUs; smaller ones run on one device (rank 0's) each")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  std::string queue_order = "fair";
  app.add_option("--queue-order", queue_order,
                 "Order of waiting requests of equal priority: fair (least work first across "
                 "streams and requests, so small calls are not stuck behind long streams) or "
                 "arrival")
      ->capture_default_str()
      ->check(CLI::IsMember({"fair", "arrival"}));
  app.add_option("--max-priority", options.max_priority,
                 "The highest request priority a client may ask for (higher: PERMISSION_DENIED); "
                 "a token's own max_priority=N in --auth-token-file overrides it for that token. "
                 "Default: no cap")
      ->check(CLI::Range(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
  app.add_option("--warmup", warmup_file,
                 "JSON file of shapes whose plans are built before readiness turns SERVING");
  // Security and per-connection limits (server/security.h); files are checked before listening.
  app.add_option("--tls-cert", options.security.tls_cert_file,
                 "PEM certificate chain of the server: TLS on the gRPC port (needs --tls-key)");
  app.add_option("--tls-key", options.security.tls_key_file,
                 "PEM private key of --tls-cert (unencrypted)");
  app.add_option("--tls-client-ca", options.security.tls_client_ca_file,
                 "PEM CA certificate(s): mutual TLS, clients must present a certificate it signed");
  app.add_option("--auth-token-file", options.security.auth_token_file,
                 "Bearer tokens, one per line (# comments), each optionally followed by "
                 "max_priority=N: AttentionService calls need 'authorization: Bearer <token>'; "
                 "health and reflection stay open");
  app.add_option("--max-concurrent-streams", options.max_concurrent_streams,
                 "Calls one connection may have open at once; more wait on the client")
      ->capture_default_str()
      ->check(CLI::Range(1, 2147483647));
  app.add_option("--keepalive-time-ms", options.keepalive_time_ms,
                 "HTTP/2 keepalive: ping a connection idle this long, close it when the ping is "
                 "not answered within --keepalive-timeout-ms; 0: off")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--keepalive-timeout-ms", options.keepalive_timeout_ms,
                 "HTTP/2 keepalive: how long a ping may go unanswered")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--max-connection-idle-ms", options.max_connection_idle_ms,
                 "Close a connection with no call open for this long; 0: never")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--max-connection-age-ms", options.max_connection_age_ms,
                 "GOAWAY to connections older than this (calls in flight finish; clients "
                 "reconnect and rebalance); 0: no limit. Off by default: gRPC closes such a "
                 "connection once its last answer is written, and a client still reading it "
                 "can lose the answer's tail to a reset")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--max-connection-age-grace-ms", options.max_connection_age_grace_ms,
                 "After --max-connection-age-ms, how long calls in flight may still take; 0: as "
                 "long as they need")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{2147483647}));
  app.add_option("--drain-timeout-ms", drain_timeout_ms,
                 "On SIGTERM, how long calls in flight may take to finish (at most a day)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{86400000}));
  app.add_option("--drain-grace-ms", drain_grace_ms,
                 "On SIGTERM, how long new calls are still taken and refused with UNAVAILABLE "
                 "(readiness already NOT_SERVING) before the calls in flight are waited for "
                 "(--drain-timeout-ms); the server stops accepting once they have ended and "
                 "their answers have reached their clients")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{3600000}));
  // Multi-process serving (server/group_flags.h); checked by ValidateGroupFlags.
  da::server::GroupFlags group;
  app.add_option("--world-size", group.world_size,
                 "Ranks (processes) that compute each request together; 1: this process alone")
      ->capture_default_str();
  app.add_option("--rank", group.rank,
                 "This process's rank: 0 serves gRPC and coordinates, 1..world-size-1 compute")
      ->capture_default_str();
  app.add_option("--coordinator", group.coordinator,
                 "HOST:PORT of rank 0's rendezvous store: rank 0 listens on every interface at "
                 "PORT (0: any free port, see --coordinator-port-file), the others connect");
  app.add_option("--rank-address", group.rank_address,
                 "Address of this host the other ranks connect to for collectives")
      ->capture_default_str();
  app.add_option("--collective-timeout-ms", group.collective_timeout_ms,
                 "Limit of each collective step of a sharded run (a stalled rank fails the run "
                 "with UNAVAILABLE after it) and of forming the group")
      ->capture_default_str();
  app.add_option("--heartbeat-ms", group.heartbeat_ms,
                 "Rank 0's idle keep-alive period; a worker that hears nothing for 5 periods "
                 "re-joins")
      ->capture_default_str();
  app.add_option("--coordinator-port-file", group.coordinator_port_file,
                 "Rank 0: write the port the coordinator listens on to this file");
  app.add_option("--coordinator-secret-file", group.coordinator_secret_file,
                 "A file holding a secret every rank shares (16 to 4096 bytes; trailing "
                 "whitespace ignored): rank 0's rendezvous store then admits only ranks that "
                 "prove they know it and tags every frame. Without it the store authenticates "
                 "nobody and its port must be reachable by the ranks only");
  app.add_option("--data-plane", group.data_plane,
                 "What carries a sharded run's bulk bytes between ranks (every rank the same): "
                 "none (the Gloo group over TCP), nccl (NCCL between the ranks' GPUs; needs a "
                 "CUDA build with NCCL and a GPU per rank), gloo-staged (nccl's path with Gloo "
                 "and host staging, for CPU machines)")
      ->capture_default_str();
  app.add_option("--data-plane-device", group.data_plane_device,
                 "With --data-plane nccl: this rank's CUDA device")
      ->capture_default_str();
  app.add_option("--memory-elsewhere-bytes", memory_elsewhere_bytes,
                 "Bytes of this process's memory limit used by something else under it (a "
                 "memory-backed /dev/shm in the pod, a sidecar): taken off M before the default "
                 "budgets are derived from it")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--resources-root", resources_root,
                 "Where /proc/self/cgroup and /sys/fs/cgroup are read from for the default "
                 "threads and memory (tests)")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn or error")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
  app.add_option("--port-file", port_file, "Once serving, write the bound gRPC port to this file");
  app.add_option("--metrics-port-file", metrics_port_file,
                 "Once serving, write the bound /metrics port to this file");
  // An optional config file (TOML, or INI): `max-queue = 16`, one flag per line by its long name;
  // a name that is no flag is refused, as on the command line. DA_CONFIG names it too (CLI11 reads
  // the file before the environment, so the variable is its default here).
  const char* config_from_env = std::getenv("DA_CONFIG");
  app.set_config("--config", config_from_env != nullptr ? config_from_env : "",
                 "A TOML file of flags by their long names (max-queue = 16, listen = "
                 "\"0.0.0.0:50051\"); the command line wins over it, and it over the other DA_* "
                 "variables. Env: DA_CONFIG",
                 /*config_required=*/config_from_env != nullptr && *config_from_env != '\0');
  app.allow_config_extras(CLI::config_extras_mode::error);
  // Every flag also from the environment, as containers are configured: --max-queue from
  // DA_MAX_QUEUE. A flag on the command line (or in --config's file) wins.
  for (CLI::Option* option : app.get_options()) {
    const std::string& name = option->get_single_name();
    if (name.empty() || name == "help" || name == "config") continue;
    std::string env = "DA_" + name;
    for (char& c : env) c = c == '-' ? '_' : static_cast<char>(std::toupper(c));
    option->envname(env);
  }
  da::client::DecimalIntegers(app);  // Decimal, not CLI11's base 0 (client/decimal_flags.h).
  CLI11_PARSE(app, argc, argv);
  // CLI11 skips a variable set to "", but an empty --metrics-listen is what turns /metrics off:
  // DA_METRICS_LISTEN="" must do so too, or the unauthenticated port stays open on 0.0.0.0.
  if (const char* metrics_env = std::getenv("DA_METRICS_LISTEN");
      metrics_env != nullptr && *metrics_env == '\0' && app.count("--metrics-listen") == 0) {
    options.metrics_address.clear();
  }
  // Defaults from what the container gives this process (engine/host_resources.h).
  da::engine::SetHostResourcesRoot(resources_root);
  da::engine::SetMemoryElsewhere(memory_elsewhere_bytes);
  const da::engine::HostResources& host = da::engine::HostResourcesOfThisProcess();
  if (host.memory_bytes <= 0) {
    std::fprintf(stderr,
                 "da-server: --memory-elsewhere-bytes %lld leaves no memory to this process: %s\n",
                 static_cast<long long>(memory_elsewhere_bytes), host.memory_from.c_str());
    return 1;
  }
  const bool threads_given = options.threads > 0;
  if (!threads_given) options.threads = host.cpus;
  if (app.count("--plan-cache-bytes") == 0) {
    options.plan_cache_bytes = da::server::DefaultPlanCacheBytes(host.memory_bytes);
  }
  if (app.count("--grpc-memory-bytes") == 0) {
    options.grpc_memory_bytes = da::server::DefaultGrpcMemoryBytes(host.memory_bytes);
  }
  if (app.count("--memory-budget-bytes") == 0) {
    options.memory_budget_bytes =
        group.rank > 0
            ? da::server::DefaultWorkerMemoryBudgetBytes(host.memory_bytes,
                                                         da::server::kWorkerPlanCacheBytes)
            : da::server::DefaultMemoryBudgetBytes(host.memory_bytes, options.plan_cache_bytes,
                                                   options.grpc_memory_bytes);
  }
  options.queue_order =
      queue_order == "arrival" ? da::engine::QueueOrder::kArrival : da::engine::QueueOrder::kFair;
  options.cpu_devices_numa = cpu_devices == "numa";
  if (!options.cpu_devices_numa) (void)absl::SimpleAtoi(cpu_devices, &options.cpu_devices);
  for (absl::string_view id : absl::StrSplit(devices, ',', absl::SkipWhitespace())) {
    options.devices.emplace_back(absl::StripAsciiWhitespace(id));
  }
  if (absl::Status valid = da::server::ValidateGroupFlags(group); !valid.ok()) {
    std::fprintf(stderr, "da-server: %s\n", std::string(valid.message()).c_str());
    return 1;
  }

  // Blocked before any thread exists, so every thread inherits the mask and the signals reach
  // only the sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  // RunWorkerMain: the loop ended; rank 0: the warm-up ended.
  sigaddset(&stop_signals, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  spdlog::set_default_logger(spdlog::stderr_color_mt("da-server"));
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::info("gRPC poller: {}", da::client::GrpcPollerName());
  if (group.rank > 0) {
    spdlog::info(
        "rank {}: {} compute threads{}; memory {} bytes from {}; its part of a run may hold {} "
        "bytes{}; plan cache {} bytes",
        group.rank, options.threads,
        threads_given ? " (--threads)" : absl::StrCat(" from ", host.cpus_from), host.memory_bytes,
        host.memory_from, options.memory_budget_bytes,
        app.count("--memory-budget-bytes") > 0
            ? " (--memory-budget-bytes)"
            : " (max(memory / 8, memory - plan cache - min(512 MiB, memory / 16)))",
        da::server::kWorkerPlanCacheBytes);
    return RunWorkerMain(group, options.threads, options.memory_budget_bytes, stop_signals,
                         drain_timeout_ms, options.metrics_address, metrics_port_file);
  }
  spdlog::info(
      "resources: {} compute threads{}; memory {} bytes from {}; plan cache {} bytes{}; admission "
      "budget {} bytes{}; gRPC buffers {} bytes{}",
      options.threads, threads_given ? " (--threads)" : absl::StrCat(" from ", host.cpus_from),
      host.memory_bytes, host.memory_from, options.plan_cache_bytes,
      app.count("--plan-cache-bytes") > 0 ? " (--plan-cache-bytes)" : " (min(1 GiB, memory / 8))",
      options.memory_budget_bytes,
      app.count("--memory-budget-bytes") > 0
          ? " (--memory-budget-bytes)"
          : " (max(memory / 8, memory - gRPC buffers - plan cache - min(512 MiB, memory / 16)))",
      options.grpc_memory_bytes,
      app.count("--grpc-memory-bytes") > 0 ? " (--grpc-memory-bytes)"
                                           : " (max(memory / 4, 256 MiB))");
  // Rank 0 (workers admit nothing and run no gRPC): every bound full at once should leave the
  // process's own reserve within its memory; say so when the flags (or a pod too small for the
  // defaults) make them add up to more.
  if (options.memory_budget_bytes > 0 && options.grpc_memory_bytes > 0) {
    const int64_t bounds = options.memory_budget_bytes + options.plan_cache_bytes +
                           options.grpc_memory_bytes +
                           da::server::DefaultProcessReserveBytes(host.memory_bytes);
    if (bounds > host.memory_bytes) {
      spdlog::warn(
          "the admission budget, plan cache, gRPC buffers and the process's reserve ({} bytes) "
          "add up to {} bytes, more than the {} bytes of memory: under full load the process may "
          "be killed rather than refuse work; lower --memory-budget-bytes, --plan-cache-bytes or "
          "--grpc-memory-bytes",
          da::server::DefaultProcessReserveBytes(host.memory_bytes), bounds, host.memory_bytes);
    }
  }
  if (group.world_size > 1) {
    int coordinator_port = 0;
    absl::StatusOr<std::shared_ptr<da::engine::ShardGroup>> shard_group =
        da::server::StartCoordinator(group, &coordinator_port);
    if (!shard_group.ok()) {
      spdlog::error("cannot start the coordinator: {}", shard_group.status().ToString());
      return 1;
    }
    options.shard_group = *std::move(shard_group);
    spdlog::info("coordinating a group of {} ranks; rendezvous on port {}", group.world_size,
                 coordinator_port);
    if (!group.coordinator_port_file.empty() &&
        !WritePortFile(group.coordinator_port_file, coordinator_port)) {
      spdlog::error("cannot write --coordinator-port-file {}", group.coordinator_port_file);
      return 1;
    }
  }

  if (!warmup_file.empty()) {
    absl::StatusOr<std::vector<da::server::WarmUpShape>> shapes =
        da::server::ReadWarmUpFile(warmup_file);
    if (!shapes.ok()) {
      spdlog::error("--warmup {}: {}", warmup_file, std::string(shapes.status().message()));
      return 1;
    }
    options.warmup = *std::move(shapes);
  }

  absl::StatusOr<std::unique_ptr<da::server::Server>> server = da::server::Server::Start(options);
  if (!server.ok()) {
    spdlog::error("cannot start: {}", server.status().ToString());
    return 1;
  }
  spdlog::info("listening on {}", WithPort(options.listen_address, (*server)->port()));
  if ((*server)->metrics_port() != 0) {
    spdlog::info("metrics on http://{}/metrics",
                 WithPort(options.metrics_address, (*server)->metrics_port()));
  }
  if (!port_file.empty() && !WritePortFile(port_file, (*server)->port())) {
    spdlog::error("cannot write --port-file {}", port_file);
    return 1;
  }
  if (!metrics_port_file.empty() && !WritePortFile(metrics_port_file, (*server)->metrics_port())) {
    spdlog::error("cannot write --metrics-port-file {}", metrics_port_file);
    return 1;
  }

  int signal_number = 0;
  if (!options.warmup.empty()) {
    // On a thread of its own, so that a stop signal during a long warm-up (minutes of plans)
    // stops it and drains at once, instead of waiting for the kubelet's SIGKILL.
    const auto start = std::chrono::steady_clock::now();
    spdlog::info("warm-up: {} plans from {}", options.warmup.size(), warmup_file);
    std::atomic<bool> stop_warm_up{false};
    absl::Status warmed;
    std::thread warming([&] {
      warmed = (*server)->WarmUp(&stop_warm_up);
      kill(getpid(), SIGUSR1);
    });
    sigwait(&stop_signals, &signal_number);
    if (signal_number != SIGUSR1) {
      spdlog::info("{} during the warm-up: stopping it", strsignal(signal_number));
      stop_warm_up.store(true);
    }
    warming.join();
    if (signal_number == SIGUSR1) {
      if (!warmed.ok()) {
        spdlog::error("--warmup {}: {}", warmup_file, std::string(warmed.message()));
        return 1;
      }
      const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
      spdlog::info("warm-up done: {} plans in {:.3f} s", options.warmup.size(), elapsed.count());
    }
  }
  if (signal_number == 0 || signal_number == SIGUSR1) {
    // Readiness also needs the self-check and the devices (server/health.h); say which way it
    // went.
    if (const std::string not_ready = (*server)->health().NotReadyReason(); not_ready.empty()) {
      spdlog::info("ready");
    } else {
      spdlog::warn("not ready: {}; liveness stays SERVING", not_ready);
    }
    do {
      sigwait(&stop_signals, &signal_number);
    } while (signal_number == SIGUSR1);  // Only the warm-up raises it, once.
  }
  spdlog::info(
      "{}: draining: new calls refused; {} ms of grace, then up to {} ms for the calls in "
      "flight",
      strsignal(signal_number), drain_grace_ms, drain_timeout_ms);
  // A SIGINT during the drain (an operator's second Ctrl-C) ends the process at once rather than
  // after the grace and the drain, which may be minutes; the calls in flight are cut off. A
  // repeated SIGTERM does not: supervisors and test harnesses send it again to ask for the same
  // graceful stop, and Kubernetes follows it with SIGKILL anyway. Detached: it waits for a signal
  // that may never come.
  std::thread([] {
    sigset_t interrupt;
    sigemptyset(&interrupt);
    sigaddset(&interrupt, SIGINT);
    int again = 0;
    if (sigwait(&interrupt, &again) != 0) return;
    ExitNowOn(again, "draining");
  }).detach();
  (*server)->Shutdown(std::chrono::milliseconds(drain_timeout_ms),
                      std::chrono::milliseconds(drain_grace_ms));
  spdlog::info("stopped");
  return 0;
}
