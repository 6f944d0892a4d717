// The engine: validates a problem, queues it, runs it on a backend and reports how it ran.
// Plain C++; no gRPC, protobuf or logging library inside.
//
//   auto engine = Engine::Create({.threads = 2});
//   RunRequest request{q, k, v, spec, out};
//   absl::StatusOr<ExecutionInfo> info = (*engine)->Run(request);       // blocking
//   (*engine)->Submit(request, [](absl::StatusOr<ExecutionInfo> info) { ... });  // queued
//
// Thread safety: Run and Submit may be called from any thread. Submit's callback runs on an engine
// thread (a dispatcher, or the watchdog for a queued request whose deadline passed or that was
// cancelled), except for a request refused at once (validation, queue full, memory, deadline):
// then it runs before Submit returns, on the caller's thread (no compute happens there). The views
// in a request, its cancelled flag and its reservation must stay valid until Run returns or the
// callback has been called.
//
// Admission (engine/admission.h): a request's memory (MemoryEstimate) is reserved against
// memory_budget_bytes from Submit (or Run) until just before its callback (or Run's return), unless
// the caller passes a reservation it made itself; at most max_queue requests wait for a
// dispatcher (a stream holds one place for all its chunks: TakeQueuePlace), taken highest
// priority first; among equal priorities the fair queue (QueueOrder::kFair) serves the least
// work first, so a small request is not stuck behind the chunks of long streams. Deadlines
// and the cancelled flag are watched every few milliseconds: a queued request leaves the queue at
// once, and a computing one is stopped within a kernel panel (DEADLINE_EXCEEDED or CANCELLED).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/admission.h"
#include "engine/attention_spec.h"
#include "engine/device.h"
#include "engine/plan_cache.h"
#include "engine/precision_policy.h"
#include "engine/shard_group.h"
#include "engine/tensor.h"

namespace da::engine {

// How the queue orders requests of equal priority.
enum class QueueOrder {
  // Least work first, with aging: a request's turn is its arrival time plus kQueueAging times its
  // estimated compute time (estimated FLOPs over the engine's throughput), the earliest turn
  // first. A small call then waits for the run in progress, not behind every stream's queued
  // chunk; a large request is passed by later, smaller ones for at most kQueueAging times its own
  // compute time, so nothing starves.
  kFair,
  kArrival,  // First come, first served.
};

// How many times its own estimated compute time a request may be passed by smaller ones.
inline constexpr double kQueueAging = 16;

std::string QueueOrderName(QueueOrder order);  // "fair", "arrival".

struct EngineOptions {
  int threads = 0;  // Compute threads of the CPU devices together; 0 means every core.
  // Requests computed at once per device (each uses the device's whole pool).
  int max_concurrent_runs = 1;
  // The CPU as this many devices, each with its own pool of threads / cpu_devices threads
  // (DESIGN §3; issue #14): requests are placed on one device or sharded across several.
  int cpu_devices = 1;
  // One CPU device per NUMA node instead (/sys/devices/system/node), its threads pinned to the
  // node's CPUs and its plans first-touched there; threads and cpu_devices are then ignored.
  bool cpu_devices_numa = false;
  // The devices to compute on, by id ("cpu:0", "cuda:1"); empty: every discovered device this
  // build has a backend for.
  std::vector<std::string> devices;
  // AUTO requests of at least this many FLOPs are sharded: across the shard group's ranks where
  // there is one (below), else across the local devices (engine/placement.h). Smaller ones take
  // one device each (with a group, one of rank 0's, taking turns with the group's runs there).
  double shard_min_flops = 1e9;
  // The backend by name (engine/backend_registry.h): "cpu" (the default of CPU devices) or
  // "reference".
  std::string backend = "cpu";
  Limits limits;
  int64_t plan_cache_bytes = int64_t{1} << 30;  // Budget of the warm plan cache (LRU).
  PrecisionPolicyOptions precision;             // Fallback for unsupported wishes, tolerance.
  // Host bytes all admitted requests may hold at once (MemoryEstimate::total each); 0:
  // unlimited. CPU devices compute in host memory: this is their account too.
  int64_t memory_budget_bytes = 0;
  // A device with memory of its own (a GPU): the bytes requests may hold in it at once (its
  // copies of their inputs and outputs, and the workspace: MemoryEstimate::device); 0:
  // device_memory_fraction of its physical memory (DeviceInfo::memory_bytes, unlimited when
  // that is unknown).
  int64_t device_memory_budget_bytes = 0;
  double device_memory_fraction = 0.9;  // The rest for the plan cache's device memory, the
                                        // runtime and other processes.
  // Devices beyond those DiscoverDevices finds, computed on by their kind's registered backend:
  // tests add devices of a test backend's kind (engine/testing/staged_backend.h).
  std::vector<DeviceInfo> added_devices;
  // Submitted requests that may wait for a dispatcher, beyond those an idle dispatcher takes at
  // once. 0: no waiting; a request is accepted only when a dispatcher is free for it. A held
  // QueuePlace counts as one waiting request; runs that carry one (chunks of an admitted stream)
  // are never refused for a full queue.
  int max_queue = 64;
  QueueOrder queue_order = QueueOrder::kFair;
  // Ranks that compute requests together (engine/shard_group.h); null or one rank: this process
  // alone. With a group of several ranks, a request runs across it (strategy: ChooseShardStrategy
  // with memory_budget_bytes as the per-rank budget) when its shard policy asks for HEADS or
  // SEQUENCE, or is AUTO with at least shard_min_flops and enough heads or tokens to give every
  // rank some (GroupShards); the others run here, on rank 0's devices, as in a process of its own
  // (the group runs one request at a time, each paying to move its tensors to the ranks).
  std::shared_ptr<ShardGroup> shard_group;
};

// A share of a larger problem, run as a request of its own: a stream's window where the segment
// lengths leave no chunk boundary that every segment respects (server/stream_assembler.h). The
// request's q, k, v and out hold the share's tokens; segments, kept positions and offsets follow
// `whole` (engine/share.h), and `spanning` and `gathered` carry the kept K/V rows, in host
// memory, of the segments that reach outside the share. Its output rows equal those rows of the
// whole problem's output on the same backend.
struct ShareOfRequest {
  ProblemShape whole;
  Share share;
  const std::vector<SpanningKeys>* spanning = nullptr;
  const std::vector<GatheredKeys>* gathered = nullptr;
};

struct RunRequest {
  TensorView q;
  TensorView k;
  TensorView v;
  AttentionSpec spec;
  MutableTensorView out;  // [B, N, H, D], the dtype the caller wants back.
  std::string request_id;
  const std::atomic<bool>* cancelled = nullptr;  // Optional; true stops the run with CANCELLED.
  int priority = 0;  // Higher leaves the queue first; equal priorities in arrival order.
  // When it passes: DEADLINE_EXCEEDED, whether queued or computing. Also refused up front when
  // the measured throughput says the compute cannot finish in time.
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Memory the caller already reserved for this run (ReserveMemory); null: the engine estimates
  // and reserves the request's memory itself.
  const MemoryReservation* reservation = nullptr;
  // The queue place the caller holds for a sequence of runs (TakeQueuePlace); the queue limit
  // then does not apply. One run at a time.
  QueuePlace* queue_place = nullptr;
  // The device to compute on (an id of Engine::devices()); empty: wherever placement puts it.
  // The self-check uses it to check every device.
  std::string device;
  // Where q's first token lies in the caller's whole sequence (a stream's chunk): messages about
  // the inputs' values name positions in it.
  int64_t first_token = 0;
  // Set: the request is this share of a larger problem (its geometry), computed on one device
  // with a plan built for the run alone, never sharded or sent to the group. Must outlive the
  // run (Submit: until its callback).
  const ShareOfRequest* share_of = nullptr;
};

struct ExecutionInfo {
  Precision precision_used = Precision::kFloat32;
  std::string precision_reason;
  ShardPolicy shard_strategy = ShardPolicy::kNone;
  std::string backend;
  std::vector<std::string> devices;
  int64_t queue_time_us = 0;
  int64_t compute_time_us = 0;
  // Of compute_time_us on a device that is not the host's (a GPU): the longest share's time in its
  // backend's RunShare, and the longest share's copies in and out (0 where all ran on the host).
  int64_t device_compute_us = 0;
  int64_t device_copy_us = 0;
  bool plan_cache_hit = false;  // Filled once the plan cache exists.
  int64_t plan_build_time_us = 0;
  // fp8 runs: per device, the per-tensor scales its share was quantized with (RunReport).
  struct Fp8Scales {
    std::string device;
    float amax[3] = {0, 0, 0};   // q, k, v.
    float scale[3] = {1, 1, 1};  // 448 / amax.
  };
  std::vector<Fp8Scales> fp8_scales;
};

using RunCallback = std::function<void(absl::StatusOr<ExecutionInfo>)>;

// What warming one problem's plan did.
struct WarmUpResult {
  bool already_warm = false;  // The plan was in the cache already.
  int64_t plan_bytes = 0;
  int64_t build_time_us = 0;
  Precision precision = Precision::kFloat32;
  std::string plan_key;                // The first plan's.
  std::vector<std::string> plan_keys;  // Every plan's (one per device or share), plan_key first.
  // 0: the whole problem's plan on every placeable device; 2 or more: the share plans of a
  // request placement shards across that many local devices (one per device).
  int shares = 0;
};

// How long Engine::WarmUp waits, per plan, for memory that calls in flight hold.
inline constexpr std::chrono::milliseconds kWarmUpMemoryWait{60000};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();  // Finishes queued work first.

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates and computes on the calling thread (and the compute pool).
  absl::StatusOr<ExecutionInfo> Run(const RunRequest& request);

  // Validates, then queues; done runs on a dispatcher thread with the result. A validation error
  // is reported through done too, before Submit returns.
  void Submit(const RunRequest& request, RunCallback done);

  // Builds (or finds) the plan of a problem without running it, so that the first real request
  // of this shape is a cache hit. out_dtype is the dtype the requests will want back. `stop`
  // (optional) turning true ends a build with CANCELLED. A plan it builds reserves its workspace
  // (Backend::PlanWorkspaceBytes) in its device's memory budget while it is built:
  // RESOURCE_EXHAUSTED naming the bytes and the budget when they would not fit even with no call
  // in flight; while only calls in flight hold the room, it waits for them, at most
  // kWarmUpMemoryWait per plan (then RESOURCE_EXHAUSTED saying it waited).
  absl::StatusOr<WarmUpResult> WarmUp(const ProblemShape& shape, DType dtype, DType out_dtype,
                                      const AttentionSpec& spec,
                                      const std::atomic<bool>* stop = nullptr);

  // The memory a problem would hold while queued and computed: q, k, v, the output and the
  // workspace of its plan (Backend::PlanWorkspaceBytes). The workspace is always counted in full,
  // even when the plan is cached: a run whose plan's workspace is in use by a concurrent run
  // allocates its own, so the estimate depends on the problem alone, never on the cache's state.
  // (The cached plans themselves are bounded by plan_cache_bytes, a separate budget.) Errors:
  // what ValidateShape and the backend's Supports report.
  absl::StatusOr<MemoryEstimate> EstimateMemory(const ProblemShape& shape, DType dtype,
                                                DType out_dtype, const AttentionSpec& spec) const;

  // Reserves bytes against memory_budget_bytes until the reservation is destroyed; over budget:
  // RESOURCE_EXHAUSTED (RejectReason kMemory) naming `what`, the budget and the bytes in use.
  absl::StatusOr<MemoryReservation> ReserveMemory(int64_t bytes, std::string_view what);
  // Counts bytes that exist already against memory_budget_bytes, past it if need be (a unary
  // answer computed and waiting on its client), until the reservation is destroyed: what is
  // admitted meanwhile sees them.
  MemoryReservation HoldMemory(int64_t bytes);

  // A place in the queue for a sequence of runs (a stream's chunks), counted as one waiting
  // request until destroyed; RESOURCE_EXHAUSTED (RejectReason kQueueFull) when max_queue requests
  // already wait, as Submit refuses a request.
  absl::StatusOr<QueuePlace> TakeQueuePlace();

  // The throughput the up-front deadline checks use until a run has been measured: a start-up
  // measurement (Server: the self-check's timed run). Ignored when not positive.
  void SetStartupThroughput(double flops_per_second);

  // Memory the caller keeps outside any request (the server's stream buffer pool), which the
  // budget must leave room for: later reservations fit in budget - reserved - kept.
  void SetKeptMemory(int64_t bytes, std::string what);

  // FLOP/s the up-front deadline check divides a request's estimated FLOPs by: for a run of
  // `shape` the multi-process group computes, the best group run measured; otherwise the best
  // run of this process's own devices, or before any was measured the start-up figure. 0:
  // nothing is refused up front. (A share request, RunRequest::share_of, always runs here: ask
  // with shard_policy NONE for it.)
  double DeadlineThroughput(const ProblemShape& shape, const AttentionSpec& spec) const;

  PlanCacheStats plan_cache_stats() const;
  EngineStats stats() const;

  // Requests queued or running.
  int64_t pending() const;

  const std::vector<DeviceInfo>& devices() const;
  const Limits& limits() const;
  int threads() const;
  // Whether its backend computes shares of a problem (Backend::ComputesShares), which a share
  // request (RunRequest::share_of) needs; the reference backend computes whole problems only.
  bool ComputesShares() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace da::engine
