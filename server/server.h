// The da gRPC server: engine, AttentionService, health, reflection and /metrics in one object.
//
//   ServerOptions options;
//   options.listen_address = "127.0.0.1:0";  // Port 0 picks a free port.
//   DA_ASSIGN_OR_RETURN(std::unique_ptr<Server> server, Server::Start(options));
//   std::cout << server->port();
//   DA_RETURN_IF_ERROR(server->WarmUp());       // Builds options.warmup's plans, then ready.
//   server->Shutdown(std::chrono::seconds(30));  // Drains, then returns.
//
// Health (server/health.h has the rules in full): liveness ("") is SERVING while the server
// answers, through warm-up, a failed self-check and the drain alike. Readiness
// ("da.v1.AttentionService") is SERVING only when
//   (a) the engine is warm: with options.warmup, WarmUp has built every plan; without, Start's
//       self-check passed (engine::SelfCheck: a small problem through an engine of the same
//       backend, ISA, threads and precision policy, compared with the reference, so a broken CPU
//       path never turns ready; it runs with a warm-up list too);
//   (b) its devices are up: the engine discovered at least one, and none is marked down (a failed
//       self-check marks the device it ran on down, and keeps it down: da_device_up shows 0);
//   (c) with options.shard_group, the group is whole (every rank joined; "group: ..." says
//       which rank is missing while it re-forms);
//   (d) with TLS, the TLS files pass the start-up checks (server/security.h's TlsFileWatcher
//       runs them every tls_reload_seconds: a key that no longer matches the certificate, or a
//       file that is not PEM, makes every new handshake fail; "tls: ..." names the flag, the file
//       and what is wrong; da_tls_certificate_expiry_timestamp_seconds is set from the same
//       check);
//   (e) the server is not draining: Shutdown turns it NOT_SERVING for good before anything else.
// The server answers calls whatever readiness says; only load balancers and probes read it.
// Watch streams get every change and end (UNAVAILABLE) when Shutdown begins, so they never hold
// up the drain. Thread safety: Shutdown may be called from any thread, more than once; the
// destructor shuts down without a drain if nobody did.
//
// Security: with options.security the gRPC port speaks TLS (mutual with a client CA) and/or every
// AttentionService method requires a bearer token; health and reflection stay open either way.
#pragma once

#include <grpcpp/resource_quota.h>
#include <grpcpp/server.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/attention_service.h"
#include "server/health.h"
#include "server/metrics.h"
#include "server/security.h"
#include "server/warm_up.h"

namespace da::server {

struct ServerOptions {
  std::string listen_address = "0.0.0.0:50051";
  std::string metrics_address = "0.0.0.0:9464";  // Empty: no /metrics endpoint.
  int threads = 0;                               // Engine compute threads; 0: every core.
  // The CPU as this many compute devices (EngineOptions::cpu_devices), or with cpu_devices_numa
  // one per NUMA node.
  int cpu_devices = 1;
  bool cpu_devices_numa = false;
  std::vector<std::string> devices;             // Device ids to compute on; empty: every one found.
  int64_t max_message_bytes = 64LL << 20;       // gRPC receive and send limit, per message.
  int64_t max_request_bytes = 16LL << 30;       // q + k + v + output bytes; 0: unlimited.
  int64_t max_tokens = 0;                       // batch * seq_len; 0: unlimited.
  std::string backend = "cpu";                  // Engine backend: "cpu" or "reference".
  int64_t plan_cache_bytes = int64_t{1} << 30;  // Plan cache budget; 0 caches nothing.
  bool precision_fallback = false;  // Unsupported precision wishes use the nearest supported one.
  std::vector<WarmUpShape> warmup;  // Plans WarmUp builds before readiness turns SERVING.
  // AttendStream: chunks of input one stream holds at once, and the least tokens per chunk
  // (chunks are multiples of every segment length; see attend_stream_reactor.h).
  int stream_pipeline_depth = 2;
  int64_t stream_min_chunk_tokens = 4096;
  // Idle chunk buffers kept for the next stream of the same shape (no first-touch cost). Counted
  // in the memory budget: the pool's capacity is kept out of it from the start (at most a
  // quarter of the budget; the pool is cut to fit). 0: none kept.
  int64_t stream_buffer_pool_bytes = int64_t{256} << 20;
  // A stream whose client makes no progress (no message read or written) for this long, while no
  // chunk of it computes, ends (DEADLINE_EXCEEDED, or CANCELLED when it did not read its answer)
  // and frees its window. 20 s: one largest message (64 MiB) at about 4 MB/s, a slow link, plus
  // a few seconds; a client that stops sending or reading holds its reservation no longer. A
  // unary Attend whose answer the client has not read this long after it was ready ends the same
  // way (CANCELLED), and the answer, counted against the memory budget while it waits, is freed.
  // 0: never.
  int64_t stream_idle_timeout_ms = 20000;
  // A stream still running this long after its start, and again each time as long after its last
  // such line, logs a progress line (tokens and chunks done, bytes each way, elapsed) as a chunk
  // finishes computing. 0: none.
  int64_t stream_progress_log_ms = 10000;
  // Stream windows one client (its bearer token with tokens on, else its peer address) may hold
  // at once; -1: half of memory_budget_bytes (none when the budget is unlimited); 0: no cap.
  int64_t max_client_stream_bytes = -1;
  // Admission: bytes all admitted requests may hold (inputs, outputs, plan workspace); 0:
  // unlimited (da-server's default is DefaultMemoryBudgetBytes()). Requests that may wait for the
  // engine; more are refused with RESOURCE_EXHAUSTED.
  int64_t memory_budget_bytes = 0;
  // A GPU's admission budget (EngineOptions::device_memory_budget_bytes); 0: 90% of its memory.
  int64_t device_memory_budget_bytes = 0;
  int max_queue = 64;
  // AUTO requests of at least this many FLOPs are sharded (EngineOptions::shard_min_flops).
  double shard_min_flops = 1e9;
  engine::QueueOrder queue_order = engine::QueueOrder::kFair;
  // The highest request priority a client may ask for, unless its token's line in the token file
  // gives its own max_priority (PriorityCap); higher is PERMISSION_DENIED. INT32_MAX: no cap.
  int32_t max_priority = std::numeric_limits<int32_t>::max();
  // TLS, mutual TLS and bearer tokens on the gRPC port (server/security.h); default: plaintext,
  // no authentication. Health and reflection never require a token.
  SecurityOptions security;
  // HTTP/2 streams (calls) one connection may have open at once; further calls on that connection
  // wait client-side until one ends. Bounds what a single client can hold.
  int max_concurrent_streams = 100;
  // HTTP/2 keepalive: the server pings a connection idle this long and closes it when the ping is
  // not answered within keepalive_timeout_ms, so dead peers do not keep their calls open. 0: off.
  int64_t keepalive_time_ms = 60000;
  int64_t keepalive_timeout_ms = 20000;
  // A connection with no call open for this long is closed (GOAWAY); 0: never. Clients that
  // pause between bursts reconnect and so rebalance across replicas. An answer its client reads
  // later than this after it was written can be lost (below).
  int64_t max_connection_idle_ms = 300000;
  // A connection older than this gets GOAWAY: its calls in flight finish (for up to
  // max_connection_age_grace_ms; 0: as long as they take), new calls go to a new connection, so
  // clients rebalance across replicas. 0 (the default): no limit, because gRPC closes a connection
  // it sent GOAWAY to as soon as its last call has handed its answer to the kernel, not once the
  // client has read it: a client frame arriving then (the window update of a client reading the
  // answer) makes the kernel reset the connection and throw the answer's unsent tail away, and
  // the client gets UNAVAILABLE for a finished call (tests/python/test_hostile.py's slow reader
  // lost 3-4 MiB of an 8 MiB answer that way). The drain does not have this race: it sends its
  // GOAWAY only after the answers in flight have reached their clients.
  int64_t max_connection_age_ms = 0;
  int64_t max_connection_age_grace_ms = 0;
  // What gRPC's own buffers may hold at once (its resource quota): above all the unary requests
  // still arriving, which nothing else counts (a client that sends all but the last byte of a
  // 64 MiB message holds 64 MiB, and a connection may have max_concurrent_streams such calls).
  // Near it gRPC narrows its flow-control windows; past it, it reclaims memory: GOAWAY to idle
  // connections, RST_STREAM to calls (in tests/python/test_hostile.py it reset the incomplete
  // calls). da-server's default is DefaultGrpcMemoryBytes(); 0: unbounded.
  int64_t grpc_memory_bytes = 0;
  // Multi-process serving (rank 0): the group requests run across (engine/shard_group.h). The
  // server puts it in the engine, reports its state in readiness (NOT_SERVING while it is not
  // whole) and its statistics in /metrics. Null: this process alone.
  std::shared_ptr<engine::ShardGroup> shard_group;
  // Test hook: what Start runs instead of engine::SelfCheck (on an engine configured like the
  // serving one, without its limits) before readiness may turn SERVING; a non-OK status marks the
  // serving engine's first device down. Null: engine::SelfCheck.
  std::function<absl::Status(engine::Engine&)> self_check;
  // Test hook: runs after a unary Attend computed OK, just before its answer is sent (to order a
  // client's cancellation against the send). Null: none.
  std::function<void(grpc::CallbackServerContext&)> before_unary_answer;
};

// Defaults from the memory this process may use (engine::HostResources: the smaller of physical
// memory and the container's cgroup limit, less --memory-elsewhere-bytes), M:
// - the plan cache: min(1 GiB, M / 8);
// - the admission budget: max(M / 8, M - gRPC's buffers - plan cache bytes - the process's
//   reserve). The stream buffer pool is kept inside the budget; gRPC's buffers have their own
//   bound (--grpc-memory-bytes, by default DefaultGrpcMemoryBytes: a quarter of M, at least
//   256 MiB), the plan cache has its own budget beside it, and the reserve, min(512 MiB, M / 16),
//   is the process's own (code, stacks, allocator caches): with every budget full a pod stays
//   under its memory limit and refuses work instead of being killed. Only the floor (a pod too
//   small for the rest, or a plan cache of most of M) passes M; da-server warns when it does.
int64_t DefaultPlanCacheBytes(int64_t memory_bytes);

// da_build_info on metrics: this build's version, source revision and features (worker ranks,
// which run no Server, call it themselves).
void DescribeBuild(Metrics& metrics);
// grpc_memory_bytes: the bound gRPC's buffers have (0, unbounded: counted at the default).
int64_t DefaultMemoryBudgetBytes(int64_t memory_bytes, int64_t plan_cache_bytes,
                                 int64_t grpc_memory_bytes);
// A worker rank's budget for its part of a run (it runs no gRPC and admits nothing):
// max(M / 8, M - plan_cache_bytes - min(512 MiB, M / 16)).
int64_t DefaultWorkerMemoryBudgetBytes(int64_t memory_bytes, int64_t plan_cache_bytes);
// What the default budgets leave to the process itself: min(512 MiB, M / 16).
int64_t DefaultProcessReserveBytes(int64_t memory_bytes);
// ServerOptions::grpc_memory_bytes from M: max(M / 4, 256 MiB), the quarter of M the admission
// budget leaves to gRPC and the process. (A bound costs some transport speed: on the 2-core build
// machine the near-zero-compute stream at K = 1 took 3-11% longer under bounds from M / 8 to
// 1 TiB than unbounded, 3.4% under M / 4; docs/PERFORMANCE.md.)
int64_t DefaultGrpcMemoryBytes(int64_t memory_bytes);

class Server {
 public:
  // Builds the engine, binds both ports and starts serving.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);
  ~Server();

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The bound gRPC port and /metrics port (0 when metrics are off).
  int port() const { return port_; }
  int metrics_port() const { return metrics_->port(); }
  const Metrics& metrics() const { return *metrics_; }
  const Health& health() const { return *health_; }

  // Builds the plans of options.warmup in order (one log line each), then turns readiness
  // SERVING unless Shutdown has begun. On the first shape the engine refuses it returns that
  // error, prefixed with "entry <i> (<shape>): ", and readiness stays NOT_SERVING. Call once,
  // after Start, and not concurrently with Shutdown.
  // `stop` (optional) turning true ends it with CANCELLED (a SIGTERM during a long warm-up).
  absl::Status WarmUp(const std::atomic<bool>* stop = nullptr);

  // Readiness NOT_SERVING and Watch streams ended; new attention calls are refused with
  // UNAVAILABLE ("draining") while gRPC still accepts them: for `grace` (time for load balancers
  // to read readiness and for clients to move), then while calls in flight finish (for up to
  // drain_timeout, then they are cancelled) and until their answers have reached their clients
  // (DeliverAnswersInFlight); then gRPC stops taking calls and sends GOAWAY, and it waits until
  // the engine is idle.
  void Shutdown(std::chrono::milliseconds drain_timeout,
                std::chrono::milliseconds grace = std::chrono::milliseconds(0));

 private:
  Server() = default;
  // The drain's wait before gRPC's shutdown: until every attention call in flight is done and the
  // server's connections hold no byte their clients have not acknowledged, or `cut_off`.
  // gRPC closes a connection as soon as its last call has written its answer after the GOAWAY
  // that its shutdown sends. A frame from the client arriving then (a window update for the
  // answer it is reading) resets the connection, and the kernel throws away the answer's bytes
  // not yet delivered: the client sees UNAVAILABLE ("Connection reset by peer") for a call the
  // server finished (drain_test under load, about one run in 50; strace showed gRPC's
  // shutdown(fd) 1 ms after a 3 MB final write). It also waits, for up to kArrivingWait, for the
  // calls that were still arriving when it began (OpenServerStreams): a unary call whose message
  // is not whole has no reactor yet, and the GOAWAY would close its connection under it with no
  // status at all. New calls
  // meanwhile are refused by the service (UNAVAILABLE, "draining"), as during the grace. Logs how
  // long it waited.
  void DeliverAnswersInFlight(std::chrono::steady_clock::time_point cut_off);
  static constexpr std::chrono::milliseconds kDeliveryPoll{5};
  static constexpr std::chrono::milliseconds kDeliverySettle{50};
  // How long the drain waits for calls still arriving (DeliverAnswersInFlight): about a 64 MiB
  // unary request at 100 Mbit/s.
  static constexpr std::chrono::milliseconds kArrivingWait{5000};
  // Runs the self-check (hook, or engine::SelfCheck) on an engine configured like engine_ and
  // marks engine_'s first device down on failure.
  void RunSelfCheck(const engine::EngineOptions& engine_options,
                    const std::function<absl::Status(engine::Engine&)>& hook);
  // Starts tls_watcher_: readiness and da_tls_certificate_expiry_timestamp_seconds follow the
  // TLS files' checks.
  void WatchTlsFiles(const SecurityOptions& security);

  std::vector<WarmUpShape> warmup_;
  WarmUpTransport warmup_transport_;
  std::shared_ptr<engine::ShardGroup> shard_group_;  // Outlives engine_ (it runs through it).
  std::unique_ptr<engine::Engine> engine_;
  // Outlives server_ (gRPC calls into it until it is gone) and metrics_ (whose HTTP threads call
  // into it through the probes and the device source, also when Start failed after setting them).
  std::unique_ptr<Health> health_;
  std::unique_ptr<Metrics> metrics_;  // Destroyed before engine_ and health_, which it reads.
  std::unique_ptr<TlsFileWatcher> tls_watcher_;  // Null without TLS; calls into health_, metrics_.
  std::unique_ptr<AttentionService> service_;
  std::unique_ptr<BearerTokenAuthenticator> authenticator_;  // Null: no authentication.
  std::unique_ptr<AttentionServiceBase> guarded_;            // service_ behind the tokens.
  std::unique_ptr<grpc::ResourceQuota> grpc_quota_;          // Null: gRPC's memory unbounded.
  std::unique_ptr<grpc::Server> server_;                     // Declared last: destroyed first.
  int port_ = 0;
  std::mutex shutdown_mu_;
  bool shut_down_ = false;
};

}  // namespace da::server
