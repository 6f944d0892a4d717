#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/backend.h"
#include "engine/backend_registry.h"
#include "engine/local_shard.h"
#include "engine/placement.h"
#include "engine/shard_plan.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"
#include "engine/value_scan.h"

namespace da::engine {
namespace {

using Clock = std::chrono::steady_clock;

int64_t MicrosSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
}

double Millis(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// How often the watchdog looks at deadlines and cancelled flags while there is something to
// watch. A kernel panel takes a few milliseconds more, so runs stop well within 100 ms.
constexpr auto kWatchdogPeriod = std::chrono::milliseconds(2);

// Runs shorter than this, or of fewer FLOPs, are dominated by fixed costs (plan lookup, thread
// wake-ups, and on a loaded machine whole scheduler slices): they would understate the
// throughput, so they do not update it. A request of 64 tokens measured at a few MFLOP/s on a busy
// two-core machine once made every later request with a deadline look hopeless.
constexpr int64_t kMinMeasuredComputeUs = 1000;
constexpr double kMinMeasuredFlops = 1e8;

std::vector<double> StopLatencyBounds() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
}

enum class StopCause { kNone, kCancelled, kDeadline };

}  // namespace

std::string QueueOrderName(QueueOrder order) {
  return order == QueueOrder::kFair ? "fair" : "arrival";
}

struct Engine::Impl {
  EngineOptions options;
  // One compute device: its backend instance, its pool and its memory account. CPU devices
  // compute in host memory and share the host account (the engine's `memory`); a device with
  // memory of its own (a GPU) has an account of its own. The plan cache keys plans by device.
  struct Device {
    DeviceInfo info;
    std::unique_ptr<Backend> backend;
    std::unique_ptr<ThreadPool> pool;
    std::vector<int> cpus;  // Pinned (NUMA devices): its pool's threads and, for a run, thread 0.
    std::shared_ptr<MemoryAccount> memory;
    int running = 0;  // Runs computing on it now. Guarded by mutex.
    bool host() const { return backend->Space().host(); }
    ShareCompute Compute(PlanCache* plans) const {
      return {backend.get(), plans, pool.get(), info.id, cpus};
    }
  };
  std::vector<std::unique_ptr<Device>> slots;
  // Where placement puts a request that names no device: the devices with memory of their own
  // (GPUs) when there are any, else every device. The others compute requests that name them.
  std::vector<Device*> placeable;
  std::vector<DeviceInfo> devices;  // slots' infos, for Engine::devices().
  Device& Default() const { return *placeable.front(); }
  Backend& backend() const { return *Default().backend; }
  std::unique_ptr<PlanCache> plans;
  std::shared_ptr<MemoryAccount> memory;  // Host memory.

  // What a request holds from admission until just before its callback: its host bytes
  // (unless the caller brought a reservation) and, on devices with memory of their own, each
  // device's bytes; `bound` is the one device admission chose for it (a device with memory of
  // its own: its bytes are reserved there), null when the dispatcher picks the least busy.
  struct Held {
    MemoryReservation host;
    std::vector<MemoryReservation> devices;
    Device* bound = nullptr;
    void Reset() {
      host.Reset();
      devices.clear();
    }
  };

  struct Job {
    RunRequest request;
    RunCallback done;
    Clock::time_point enqueued;
    Held held;  // The engine's reservations.
    double flops = 0;
    Placement placement;
    double turn = 0;  // The fair queue's order (QueueOrder::kFair), seconds; 0 in arrival order.
  };
  // A run in compute, as the watchdog sees it. `stop` is what the backend polls.
  struct Active {
    const std::atomic<bool>* cancelled = nullptr;
    std::optional<Clock::time_point> deadline;
    std::atomic<bool> stop{false};
    StopCause cause = StopCause::kNone;  // Guarded by mutex.
    Clock::time_point stop_seen;         // Guarded by mutex.
  };
  // Ordered by (-priority, turn, arrival): begin() is the next to run.
  using QueueKey = std::tuple<int64_t, double, uint64_t>;

  mutable std::mutex mutex;
  std::condition_variable cv;           // Dispatchers: work queued, or stopping.
  std::condition_variable watchdog_cv;  // Watchdog: something to watch, or stopping.
  std::map<QueueKey, Job> queue;
  uint64_t next_arrival = 0;
  const Clock::time_point created = Clock::now();  // The fair queue's turns count from here.
  // QueuePlaces held: each counts as a waiting request. Incremented under `mutex`, decremented by
  // the places themselves.
  std::shared_ptr<std::atomic<int64_t>> places_held = std::make_shared<std::atomic<int64_t>>(0);
  double startup_flops_per_second = 0;
  std::set<Active*> active;
  int64_t dispatching = 0;  // Dispatchers busy with a job (for the idle count).
  int64_t pending = 0;      // Submitted, callback not yet called.
  int64_t admitting = 0;    // Past the queue check, reserving memory: they hold a queue place.
  bool stopping = false;
  bool watchdog_stopping = false;
  std::vector<std::thread> dispatchers;
  std::thread watchdog;
  EngineStats counters;  // Only the counters and stop latencies are kept here.

  // The share problem of a request for a share of a larger one (RunRequest::share_of).
  static ShareProblem ShareOf(const RunRequest& request) {
    const ShareOfRequest& of = *request.share_of;
    ShareProblem p;
    p.shape = of.whole;
    p.spec = request.spec;
    p.share = of.share;
    p.q = request.q;
    p.k = request.k;
    p.v = request.v;
    p.out = request.out;
    p.spanning = of.spanning;
    p.gathered = of.gathered;
    return p;
  }

  absl::Status Validate(const RunRequest& request) const {
    DA_RETURN_IF_ERROR(ValidateProblem(request.q, request.k, request.v, request.spec,
                                       options.limits, request.out.dtype));
    if (request.share_of != nullptr) {
      if (!DeviceFor(request).backend->ComputesShares()) {
        return absl::InvalidArgumentError(
            absl::StrCat("a share of a problem (a stream's window) needs a backend that computes "
                         "shares; ",
                         DeviceFor(request).backend->Name(), " computes whole problems only"));
      }
      DA_RETURN_IF_ERROR(CheckShareViews(ShareOf(request)));
    }
    const Shape4& qs = request.q.shape;
    const Shape4& os = request.out.shape;
    if (os.batch != qs.batch || os.seq_len != qs.seq_len || os.heads != qs.heads ||
        os.head_dim != qs.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("output shape ", os.ToString(), " must equal query shape ", qs.ToString()));
    }
    if (request.out.bytes != os.elements() * DTypeSize(request.out.dtype) ||
        request.out.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "output buffer has ", request.out.bytes, " bytes; shape ", os.ToString(), " of ",
          DTypeName(request.out.dtype), " needs ", os.elements() * DTypeSize(request.out.dtype)));
    }
    if (!request.device.empty() && FindDevice(request.device) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", request.device,
                       "' is not one of the engine's: ", absl::StrJoin(DeviceIds(), ", ")));
    }
    return DeviceFor(request).backend->Supports(ShapeOf(request), request.q.dtype, request.spec);
  }

  // The device named by a validated request, else the default one (the first placeable).
  Device& DeviceFor(const RunRequest& request) const {
    return request.device.empty() ? Default() : *FindDevice(request.device);
  }

  Device* FindDevice(const std::string& id) const {
    for (const auto& slot : slots) {
      if (slot->info.id == id) return slot.get();
    }
    return nullptr;
  }

  std::vector<std::string> DeviceIds() const {
    std::vector<std::string> ids;
    for (const auto& slot : slots) ids.push_back(slot->info.id);
    return ids;
  }

  static ProblemShape ShapeOf(const RunRequest& request) {
    const Shape4& qs = request.q.shape;
    return {qs.batch, qs.seq_len, qs.heads, request.k.shape.heads, qs.head_dim};
  }

  // The memory of a problem computed whole on `device`: on a host device everything is host
  // memory; a device with memory of its own also holds copies of the inputs and the output, and
  // the workspace.
  absl::StatusOr<MemoryEstimate> Estimate(const ProblemShape& shape, DType dtype, DType out_dtype,
                                          const AttentionSpec& spec, const Device& device) const {
    DA_ASSIGN_OR_RETURN(const PrecisionChoice precision, device.backend->ChoosePrecision(spec));
    const TensorView q{dtype, shape.QueryShape(), nullptr, 0};
    const TensorView k{dtype, shape.KeyShape(), nullptr, 0};
    const PlanKey key = MakePlanKey(q, k, out_dtype, spec, precision.precision, device.info.id,
                                    device.pool->size());
    MemoryEstimate estimate;
    estimate.inputs =
        (shape.QueryShape().elements() + 2 * shape.KeyShape().elements()) * DTypeSize(dtype);
    estimate.outputs = shape.QueryShape().elements() * DTypeSize(out_dtype);
    estimate.workspace = device.backend->PlanWorkspaceBytes(key);
    estimate.workspace_on_host = device.host();
    if (device.host()) {
      estimate.total = estimate.inputs + estimate.outputs + estimate.workspace;
      estimate.device = estimate.total;
    } else {
      estimate.total = estimate.inputs + estimate.outputs;
      estimate.device = estimate.total + estimate.workspace;
    }
    return estimate;
  }

  // The plan key of one share of a problem on `device`, as the run builds it.
  static PlanKey ShareKeyOn(const ProblemShape& shape, DType dtype, DType out_dtype,
                            const AttentionSpec& spec, const Share& part, Precision precision,
                            const Device& device) {
    ShareProblem share;
    share.shape = shape;
    share.spec = spec;
    share.share = part;
    share.q = {dtype, part.QueryShape(shape), nullptr, 0};
    share.k = share.v = {dtype, part.KeyShape(shape), nullptr, 0};
    share.out = {out_dtype, part.QueryShape(shape), nullptr, 0};
    return MakeShareKey(share, precision, device.info.id, device.pool->size());
  }

  // Which local devices compute a validated request (engine/placement.h), and the memory that
  // placement holds. A request for the multi-process shard group is the group's to place.
  struct Placed {
    Placement placement;
    MemoryEstimate estimate;
  };
  // `count_refusal`: a refusal counts as a rejected request (not for WarmUp's question).
  absl::StatusOr<Placed> Place(const RunRequest& request, double flops, bool count_refusal = true) {
    const Device& first = DeviceFor(request);
    if (request.reservation != nullptr && first.host() &&
        (placeable.size() == 1 || !request.device.empty())) {
      return Placed{Placement{1, ShardPolicy::kNone, "one device"}, MemoryEstimate()};
    }
    const ProblemShape shape = ShapeOf(request);
    DA_ASSIGN_OR_RETURN(MemoryEstimate estimate,
                        Estimate(shape, request.q.dtype, request.out.dtype, request.spec, first));
    if (request.share_of != nullptr && !first.host() && request.share_of->spanning != nullptr) {
      // A device with memory of its own also holds the share's gathered rows, copied in.
      for (const SpanningKeys& set : *request.share_of->spanning) {
        estimate.device += 2 * GatheredRowsBytes(request.share_of->whole, set, request.k.dtype);
      }
    }
    PlacementOptions o;
    o.devices = GroupShards(ShapeOf(request), request.spec) || !request.device.empty() ||
                        request.share_of != nullptr
                    ? 1
                    : static_cast<int>(placeable.size());
    o.computes_shares = first.backend->ComputesShares();
    if (first.host()) {
      o.device_budget_bytes =
          options.memory_budget_bytes > 0 ? options.memory_budget_bytes / o.devices : 0;
    } else {
      o.device_budget_bytes = first.memory->budget_bytes();
    }
    o.min_shard_flops = options.shard_min_flops;
    o.shares_request_memory = first.host();
    absl::StatusOr<Placement> placement =
        PlaceRequest(shape, request.q.dtype, request.out.dtype, request.spec, estimate, flops, o);
    if (!placement.ok()) {
      if (absl::IsResourceExhausted(placement.status()) && count_refusal) {
        std::lock_guard<std::mutex> lock(mutex);
        ++counters.rejected_memory;
      }
      return placement.status();
    }
    if (placement->devices > 1) {
      // Every share's copy of its inputs and output (none in place), and the gathered rows,
      // beside the whole tensors; and every device's plan for its share (each of its threads
      // holds whole segments, so the shares' workspaces add up to more than the whole's).
      DA_ASSIGN_OR_RETURN(
          const ShardLayout layout,
          MakeShardLayout(shape, request.spec, placement->strategy, placement->devices));
      DA_ASSIGN_OR_RETURN(const PrecisionChoice precision,
                          first.backend->ChoosePrecision(request.spec));
      estimate.workspace = 0;
      for (int d = 0; d < placement->devices; ++d) {
        estimate.workspace += placeable[d]->backend->PlanWorkspaceBytes(
            ShareKeyOn(shape, request.q.dtype, request.out.dtype, request.spec, layout.shares[d],
                       precision.precision, *placeable[d]));
      }
      // Devices with memory of their own: the copies pass through host staging (and the
      // gathered rows are host memory first), and land in the devices' memory.
      const int64_t copies = LocalShardCopyBytes(shape, request.q.dtype, request.out.dtype,
                                                 request.spec, layout, first.host());
      estimate.inputs += copies;
      if (first.host()) {
        estimate.total = estimate.inputs + estimate.outputs + estimate.workspace;
        estimate.device = estimate.total;
      } else {
        estimate.total = estimate.inputs + estimate.outputs;
        estimate.device = copies + estimate.workspace;
      }
    }
    return Placed{*std::move(placement), estimate};
  }

  // Reserves `bytes` on `account` as a refusal admission counts.
  absl::StatusOr<MemoryReservation> ReserveOn(const std::shared_ptr<MemoryAccount>& account,
                                              int64_t bytes, std::string_view what) {
    absl::Status reserved = account->Reserve(bytes, what);
    if (!reserved.ok()) {
      std::lock_guard<std::mutex> lock(mutex);
      ++counters.rejected_memory;
      return reserved;
    }
    return MemoryReservation(account, bytes);
  }

  // The engine's reservations for a placed request: its host bytes (unless the caller brought a
  // reservation), and on devices with memory of their own the device bytes: split over the
  // devices of a sharded run, on the named device, or else on the placeable device with the
  // most room (fewest runs among equals), which the request is then bound to.
  absl::StatusOr<Held> ReserveFor(const RunRequest& request, const Placed& placed) {
    Held held;
    const MemoryEstimate& estimate = placed.estimate;
    const Device& first = DeviceFor(request);
    if (request.reservation == nullptr) {
      DA_ASSIGN_OR_RETURN(held.host, ReserveOn(memory, estimate.total, estimate.ToString()));
    } else if (placed.placement.devices > 1 && estimate.total > request.reservation->bytes()) {
      // The caller reserved for the request computed whole (a stream's chunk); split over the
      // local devices it also needs the shares' copies (and, on the CPU, their plans), which pass
      // through host memory also for devices with memory of their own: the rest is reserved here.
      const int64_t rest = estimate.total - request.reservation->bytes();
      DA_ASSIGN_OR_RETURN(
          held.host,
          ReserveOn(memory, rest,
                    absl::StrCat(rest, " bytes beyond the caller's ", request.reservation->bytes(),
                                 " for a run split over ", placed.placement.devices, " devices (",
                                 estimate.ToString(), ")")));
    }
    if (first.host()) return held;
    const std::string what =
        absl::StrCat(estimate.device, " bytes in device memory (", estimate.ToString(), ")");
    if (placed.placement.devices > 1) {
      const int n = placed.placement.devices;
      const int64_t each = (estimate.device + n - 1) / n;
      for (int d = 0; d < n; ++d) {
        DA_ASSIGN_OR_RETURN(MemoryReservation share,
                            ReserveOn(placeable[d]->memory, each,
                                      absl::StrCat(each, " bytes, its share of ", what)));
        held.devices.push_back(std::move(share));
      }
      return held;
    }
    std::vector<Device*> order;
    if (!request.device.empty()) {
      order.push_back(FindDevice(request.device));
    } else {
      std::lock_guard<std::mutex> lock(mutex);
      // Each device's room is read once, before sorting: other threads reserve and release
      // without this lock, and a comparison whose answer changes during the sort is undefined
      // behaviour (std::stable_sort may then run past the vector's ends).
      struct Ranked {
        int64_t room;
        int running;
        Device* device;
      };
      std::vector<Ranked> ranked;
      for (Device* d : placeable) {
        const int64_t budget = d->memory->budget_bytes();
        ranked.push_back({budget == 0
                              ? std::numeric_limits<int64_t>::max()
                              : budget - d->memory->reserved_bytes() - d->memory->kept_bytes(),
                          d->running, d});
      }
      std::stable_sort(ranked.begin(), ranked.end(), [](const Ranked& a, const Ranked& b) {
        return std::pair(-a.room, a.running) < std::pair(-b.room, b.running);
      });
      for (const Ranked& r : ranked) order.push_back(r.device);
    }
    absl::Status first_refusal;
    for (Device* device : order) {
      absl::Status reserved = device->memory->Reserve(estimate.device, what);
      if (reserved.ok()) {
        held.devices.emplace_back(device->memory, estimate.device);
        held.bound = device;
        return held;
      }
      if (first_refusal.ok()) first_refusal = reserved;
    }
    std::lock_guard<std::mutex> lock(mutex);
    ++counters.rejected_memory;
    return first_refusal;
  }

  // CANCELLED when the request was cancelled before it reached compute.
  absl::Status CheckNotCancelled(const RunRequest& request, const char* when) {
    if (request.cancelled == nullptr || !request.cancelled->load()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mutex);
    ++counters.rejected_cancelled;
    return WithRejectReason(absl::CancelledError(absl::StrCat("cancelled ", when)),
                            RejectReason::kCancelled);
  }

  // DEADLINE_EXCEEDED when the deadline has passed, or when the compute estimated from the
  // measured throughput cannot fit the time left. `when` says where the request is.
  absl::Status CheckDeadline(const RunRequest& request, double flops, std::string_view when,
                             Clock::time_point enqueued) {
    if (!request.deadline.has_value()) return absl::OkStatus();
    const Clock::time_point now = Clock::now();
    absl::Status refused;
    if (now >= *request.deadline) {
      refused = absl::DeadlineExceededError(
          absl::StrFormat("deadline passed %s, after waiting %.1f ms (%.1f ms past the deadline)",
                          when, Millis(now - enqueued), Millis(now - *request.deadline)));
    } else {
      double flops_per_second = 0;
      {
        std::lock_guard<std::mutex> lock(mutex);
        // A request bound to a device, or a share, runs here whatever its shard policy.
        flops_per_second = DeadlineFlopsPerSecond(RunsOnGroup(request));
      }
      const double left_ms = Millis(*request.deadline - now);
      if (flops_per_second > 0 && flops / flops_per_second * 1e3 > left_ms) {
        refused = absl::DeadlineExceededError(absl::StrFormat(
            "request needs an estimated %.1f ms of compute (%.3g GFLOP at the measured %.1f "
            "GFLOP/s) but only %.1f ms remain before its deadline",
            flops / flops_per_second * 1e3, flops / 1e9, flops_per_second / 1e9, left_ms));
      }
    }
    if (refused.ok()) return refused;
    std::lock_guard<std::mutex> lock(mutex);
    ++counters.rejected_deadline;
    return WithRejectReason(refused, RejectReason::kDeadline);
  }

  // The plan of `key` on `device`. `stop` (optional) ends a build in progress, or the wait for
  // another run's, with CANCELLED.
  absl::StatusOr<std::shared_ptr<Plan>> GetPlan(Device& device, const PlanKey& key, bool* hit,
                                                const std::atomic<bool>* stop = nullptr) {
    return plans->GetOrBuild(
        key, [&] { return device.backend->BuildPlan(key, stop); }, hit, stop);
  }

  // Whether this request runs on the multi-process shard group: a run bound to a device (the
  // self-check's) never does.
  bool RunsOnGroup(const RunRequest& request) const {
    return GroupShards(ShapeOf(request), request.spec) && request.device.empty() &&
           request.share_of == nullptr;
  }

  // Whether a run of `shape` goes to the multi-process shard group (EngineOptions::shard_group):
  // HEADS and SEQUENCE always; AUTO from shard_min_flops, where every rank can take some heads or
  // some tokens (else ChooseShardStrategy could only refuse it).
  bool GroupShards(const ProblemShape& shape, const AttentionSpec& spec) const {
    if (options.shard_group == nullptr || spec.shard_policy == ShardPolicy::kNone) return false;
    const int world = options.shard_group->world_size();
    if (world <= 1) return false;
    if (spec.shard_policy != ShardPolicy::kAuto) return true;
    return EstimateFlops(shape, spec) >= options.shard_min_flops &&
           (shape.heads >= world || shape.seq_len >= world);
  }

  // The device asked for, else the least busy placeable one (the first among equals), now
  // counted as running one more run.
  Device& TakeDevice(const std::string& wanted) {
    std::lock_guard<std::mutex> lock(mutex);
    Device* best = wanted.empty() ? placeable.front() : FindDevice(wanted);
    for (Device* device : placeable) {
      if (wanted.empty() && device->running < best->running) best = device;
    }
    ++best->running;
    return *best;
  }

  void ReleaseDevice(Device& device) {
    std::lock_guard<std::mutex> lock(mutex);
    --device.running;
  }

  // A validated request across the multi-process shard group: rank 0 (this process) computes its
  // share on its first device, the other ranks theirs.
  absl::StatusOr<ExecutionInfo> ComputeSharded(const RunRequest& request, int64_t queue_time_us,
                                               const std::atomic<bool>* stop,
                                               std::vector<std::string>* used) {
    const Clock::time_point start = Clock::now();
    ShardGroup& group = *options.shard_group;
    Device& device = *slots.front();
    // Rank 0's share computes there: counted as running, so that the runs of requests the group
    // does not take go to another device, where there is one, while it does.
    {
      std::lock_guard<std::mutex> lock(mutex);
      ++device.running;
    }
    struct Release {
      Impl* impl;
      Device& device;
      ~Release() { impl->ReleaseDevice(device); }
    } release{this, device};
    used->push_back(device.info.id);
    DA_ASSIGN_OR_RETURN(const PrecisionChoice precision,
                        device.backend->ChoosePrecision(request.spec));
    DA_ASSIGN_OR_RETURN(
        const ShardPolicy strategy,
        ChooseShardStrategy(ShapeOf(request), request.q.dtype, request.out.dtype, request.spec,
                            group.world_size(), options.memory_budget_bytes));
    ShardedProblem problem{request.q,   request.k,           request.v, request.spec,
                           request.out, precision.precision, strategy,  device.Compute(plans.get()),
                           stop};
    DA_ASSIGN_OR_RETURN(ShardGroupRunInfo run, group.Run(problem));
    ExecutionInfo info;
    info.precision_used = precision.precision;
    info.precision_reason = precision.reason;
    info.shard_strategy = run.strategy;
    info.backend = device.backend->Name();
    info.devices = std::move(run.devices);
    info.queue_time_us = queue_time_us;
    info.compute_time_us = MicrosSince(start);
    return info;
  }

  // A validated request across local devices at once (engine/local_shard.h), or on one device
  // with memory of its own: its share is the whole problem, copied in and out through the
  // device's backend. The devices were counted as running by the caller; they are released here.
  absl::StatusOr<ExecutionInfo> ComputeOnDevices(const RunRequest& request,
                                                 const std::vector<Device*>& on,
                                                 ShardPolicy strategy, int64_t queue_time_us,
                                                 const std::atomic<bool>* stop) {
    const Clock::time_point start = Clock::now();
    const Backend& backend = *on.front()->backend;
    absl::StatusOr<PrecisionChoice> precision = backend.ChoosePrecision(request.spec);
    absl::StatusOr<LocalShardStats> stats = absl::UnknownError("not run");
    if (!precision.ok()) {
      stats = precision.status();
    } else {
      std::vector<ShareCompute> computes;
      for (const Device* device : on) computes.push_back(device->Compute(plans.get()));
      ShardedProblem problem{request.q,
                             request.k,
                             request.v,
                             request.spec,
                             request.out,
                             precision->precision,
                             on.size() > 1 ? strategy : ShardPolicy::kSequence,
                             {},
                             stop};
      HostKeyExchange exchange;
      stats = RunLocalSharded(problem, computes, exchange);
    }
    for (Device* device : on) ReleaseDevice(*device);
    // The plans are released: bring the cache back within budget if it was over, failed or not.
    plans->Trim();
    DA_RETURN_IF_ERROR(stats.status());
    ExecutionInfo info;
    info.precision_used = precision->precision;
    info.precision_reason = precision->reason;
    info.shard_strategy = on.size() > 1 ? stats->strategy : ShardPolicy::kNone;
    info.backend = backend.Name();
    for (const Device* device : on) info.devices.push_back(device->info.id);
    info.plan_cache_hit = stats->plan_cache_hits == static_cast<int>(on.size());
    info.queue_time_us = queue_time_us;
    info.compute_time_us = MicrosSince(start);
    // Each device's precision (its fallback where it reported one); the result is as precise as
    // its least precise share.
    std::vector<std::string> fallbacks;  // "device computed precision (why)".
    Precision least = Precision::kAuto;
    for (size_t r = 0; r < on.size() && r < stats->reports.size(); ++r) {
      const RunReport& report = stats->reports[r];
      Precision computed = info.precision_used;
      if (report.fallback != Precision::kAuto) {
        computed = report.fallback;
        fallbacks.push_back(absl::StrCat(on[r]->info.id, " computed ", PrecisionName(computed),
                                         " (", report.fallback_why, ")"));
      }
      if (least == Precision::kAuto || ErrorBound(computed) > ErrorBound(least)) least = computed;
      if (!report.fp8) continue;
      ExecutionInfo::Fp8Scales scales{on[r]->info.id};
      std::copy(report.amax, report.amax + 3, scales.amax);
      std::copy(report.scale, report.scale + 3, scales.scale);
      info.fp8_scales.push_back(scales);
    }
    if (!fallbacks.empty()) {  // Then `least` is set.
      const std::string which = absl::StrJoin(fallbacks, ", ");
      if (least != info.precision_used) {
        info.precision_reason = absl::StrCat("fallback: computed ", PrecisionName(least), ", not ",
                                             PrecisionName(info.precision_used), " (",
                                             info.precision_reason, "); ", which);
        info.precision_used = least;
      } else {
        absl::StrAppend(&info.precision_reason, "; ", which);
      }
    }
    if (!on.front()->host()) {
      for (size_t r = 0; r < on.size(); ++r) {
        info.device_compute_us = std::max<int64_t>(
            info.device_compute_us, static_cast<int64_t>(stats->compute_seconds[r] * 1e6));
        info.device_copy_us = std::max<int64_t>(info.device_copy_us,
                                                static_cast<int64_t>(stats->copy_seconds[r] * 1e6));
      }
    }
    return info;
  }

  // The gathered rows of a share request, scanned as CheckInputValues scans q, k and v: a NaN or
  // an infinity among them is refused naming where it lies in the whole sequence, and their
  // largest magnitudes bound the scores and sums with the share's own.
  static absl::StatusOr<OutsideKeys> ScanGatheredRows(const RunRequest& request) {
    const ShareOfRequest& of = *request.share_of;
    OutsideKeys outside;
    outside.seq_len = of.whole.seq_len;
    if (of.spanning == nullptr || of.gathered == nullptr) return outside;
    const ProblemShape& whole = of.whole;
    for (size_t i = 0; i < of.spanning->size(); ++i) {
      const SpanningKeys& set = (*of.spanning)[i];
      const GatheredKeys& rows = (*of.gathered)[i];
      const Shape4 shape{whole.batch, set.kept.count, 1, whole.head_dim};
      const int64_t bytes = shape.elements() * DTypeSize(request.k.dtype);
      const std::pair<const void*, const char*> tensors[] = {{rows.k, "k"}, {rows.v, "v"}};
      // With causal attention the share reads no key after its last token: those rows may not
      // even have been gathered.
      const int64_t read =
          request.spec.causal ? KeptRowsIn(set.kept, 0, of.share.token_end).second : set.kept.count;
      for (const auto& [data, name] : tensors) {
        if (data == nullptr) continue;
        ValueScan scan;
        for (int64_t b = 0; b < whole.batch && scan.first_non_finite < 0; ++b) {
          const int64_t begin = b * set.kept.count * whole.head_dim;
          const ValueScan part = ScanValues({request.k.dtype, shape, data, bytes}, begin,
                                            begin + read * whole.head_dim);
          scan.amax = std::max(scan.amax, part.amax);
          scan.first_non_finite = part.first_non_finite;
        }
        float& amax = name[0] == 'k' ? outside.k_amax : outside.v_amax;
        amax = std::max(amax, scan.amax);
        if (scan.first_non_finite < 0) continue;
        const int64_t e = scan.first_non_finite;
        const int64_t row = (e / whole.head_dim) % set.kept.count;
        return absl::InvalidArgumentError(
            absl::StrCat(name, " holds a value that is not finite at batch ",
                         e / (whole.head_dim * set.kept.count), ", token ",
                         set.kept.first + row * set.kept.stride, ", kv head ", set.kv_head,
                         ", dim ", e % whole.head_dim, "; q, k and v must be finite"));
      }
    }
    return outside;
  }

  // A request for a share of a larger problem (RunRequest::share_of), on one device: its inputs'
  // values checked (check_values), a plan built for this run alone (a window's share rarely
  // repeats, and would only push warm plans out of the cache), its inputs and gathered rows
  // copied to a device with memory of its own and its output back (RunHostShareWithPlan).
  absl::StatusOr<ExecutionInfo> ComputeShareOf(
      const RunRequest& request, const Device* bound, int64_t queue_time_us,
      const std::atomic<bool>* stop, std::vector<std::string>* used, bool* failed_in_plan,
      const std::function<absl::Status(Device&, const OutsideKeys*)>& check_values) {
    const Clock::time_point start = Clock::now();
    Device& device = TakeDevice(bound != nullptr ? bound->info.id : request.device);
    used->push_back(device.info.id);
    struct Release {
      Impl* impl;
      Device& device;
      ~Release() { impl->ReleaseDevice(device); }
    } release{this, device};
    const ScopedAffinity pinned(device.cpus);
    DA_ASSIGN_OR_RETURN(const OutsideKeys outside, ScanGatheredRows(request));
    DA_RETURN_IF_ERROR(check_values(device, &outside));
    DA_ASSIGN_OR_RETURN(const PrecisionChoice precision,
                        device.backend->ChoosePrecision(request.spec));
    // The plan is built first, into a cache of this run alone, so that its build is timed (and a
    // stop during it reported) apart from the compute.
    PlanCache own(std::numeric_limits<int64_t>::max());
    const ShareProblem problem = ShareOf(request);
    const PlanKey key = MakeShareKey(problem, precision.precision, device.info.id,
                                     device.pool != nullptr ? device.pool->size() : 1);
    bool hit = false;
    const absl::StatusOr<std::shared_ptr<Plan>> plan = own.GetOrBuild(
        key, [&] { return device.backend->BuildPlan(key, stop); }, &hit, stop);
    if (!plan.ok()) {
      *failed_in_plan = true;
      return plan.status();
    }
    const int64_t build_us = (*plan)->build_time_us;
    RunReport report;
    DA_RETURN_IF_ERROR(RunHostShareWithPlan(device.Compute(&own), problem, precision.precision,
                                            stop, nullptr, &report));
    ExecutionInfo info;
    info.plan_build_time_us = build_us;
    info.precision_used = precision.precision;
    info.precision_reason = precision.reason;
    if (report.fallback != Precision::kAuto) {
      info.precision_used = report.fallback;
      info.precision_reason = absl::StrCat("fallback: computed ", PrecisionName(report.fallback),
                                           ", not ", PrecisionName(precision.precision), " (",
                                           precision.reason, "); ", report.fallback_why);
    }
    if (report.fp8) {
      ExecutionInfo::Fp8Scales scales{device.info.id};
      std::copy(report.amax, report.amax + 3, scales.amax);
      std::copy(report.scale, report.scale + 3, scales.scale);
      info.fp8_scales.push_back(scales);
    }
    info.plan_cache_hit = false;
    info.shard_strategy = ShardPolicy::kNone;
    info.backend = device.backend->Name();
    info.devices = {device.info.id};
    info.queue_time_us = queue_time_us;
    info.compute_time_us = MicrosSince(start) - build_us;
    return info;
  }

  // Runs a validated request where it was placed; the plan build and the backend poll `stop`.
  // *failed_in_plan says whether a failure came from getting the plan; *used names the devices
  // it occupied.
  absl::StatusOr<ExecutionInfo> Compute(const RunRequest& request, const Placement& placement,
                                        const Device* bound, int64_t queue_time_us,
                                        const std::atomic<bool>* stop, bool* failed_in_plan,
                                        std::vector<std::string>* used) {
    // A request holding a NaN, an infinity or values whose scores overflow fp32 is refused
    // before it computes (engine/value_scan.h): here, on this thread, unless it runs on one host
    // device, whose pool scans it below.
    // With fp16 inputs' bound as well where a device computes in fp16 (a GPU's choice; the
    // ranks of a sharded run choose their own, so there the request's explicit wish counts).
    const auto check_values = [&](ThreadPool* pool, const std::vector<Device*>& devices,
                                  const OutsideKeys* outside = nullptr) {
      Precision compute = request.spec.precision == Precision::kFloat16 && devices.empty()
                              ? Precision::kFloat16
                              : Precision::kFloat32;
      for (Device* device : devices) {
        const absl::StatusOr<PrecisionChoice> choice =
            device->backend->ChoosePrecision(request.spec);
        if (choice.ok() && choice->precision == Precision::kFloat16) compute = Precision::kFloat16;
      }
      return CheckInputValues(request.q, request.k, request.v, request.spec, request.first_token,
                              stop, pool, compute, outside);
    };
    if (request.share_of != nullptr) {
      return ComputeShareOf(request, bound, queue_time_us, stop, used, failed_in_plan,
                            [&](Device& device, const OutsideKeys* outside) {
                              return check_values(device.host() ? device.pool.get() : nullptr,
                                                  {&device}, outside);
                            });
    }
    if (RunsOnGroup(request)) {
      DA_RETURN_IF_ERROR(check_values(nullptr, {}));
      absl::StatusOr<ExecutionInfo> sharded = ComputeSharded(request, queue_time_us, stop, used);
      // An AUTO request some worker cannot hold its part of (its memory budget) is computed here
      // alone, as one below the group's threshold is: it was admitted for this process's memory.
      // Its ExecutionInfo names this process's device only (strategy NONE).
      if (sharded.ok() || request.spec.shard_policy != ShardPolicy::kAuto ||
          !PartRefused(sharded.status())) {
        return sharded;
      }
      used->clear();
    }
    if (placement.devices > 1) {
      DA_RETURN_IF_ERROR(check_values(
          nullptr, std::vector<Device*>(placeable.begin(), placeable.begin() + placement.devices)));
      std::vector<Device*> on;
      {
        std::lock_guard<std::mutex> lock(mutex);
        for (int d = 0; d < placement.devices; ++d) {
          ++placeable[d]->running;
          on.push_back(placeable[d]);
          used->push_back(placeable[d]->info.id);
        }
      }
      return ComputeOnDevices(request, on, placement.strategy, queue_time_us, stop);
    }
    const Clock::time_point start = Clock::now();
    Device& device = TakeDevice(bound != nullptr ? bound->info.id : request.device);
    used->push_back(device.info.id);
    if (!device.host()) {
      // ComputeOnDevices gives the device back; a refusal before it must too.
      if (absl::Status checked = check_values(nullptr, {&device}); !checked.ok()) {
        ReleaseDevice(device);
        return checked;
      }
      return ComputeOnDevices(request, {&device}, ShardPolicy::kNone, queue_time_us, stop);
    }
    struct Release {
      Impl* impl;
      Device& device;
      ~Release() { impl->ReleaseDevice(device); }
    } release{this, device};
    const ScopedAffinity pinned(device.cpus);  // NUMA: plans and buffers first-touched there.
    DA_RETURN_IF_ERROR(check_values(device.pool.get(), {&device}));
    DA_ASSIGN_OR_RETURN(const PrecisionChoice precision,
                        device.backend->ChoosePrecision(request.spec));
    const PlanKey key = MakePlanKey(request.q, request.k, request.out.dtype, request.spec,
                                    precision.precision, device.info.id, device.pool->size());
    bool hit = false;
    ExecutionInfo info;
    absl::Status ran;
    {
      absl::StatusOr<std::shared_ptr<Plan>> got = GetPlan(device, key, &hit, stop);
      if (!got.ok()) {
        *failed_in_plan = true;
        return got.status();
      }
      const std::shared_ptr<Plan>& plan = *got;
      RunContext context{device.pool.get(), stop};
      ran = device.backend->RunShare(
          *plan, WholeProblem(request.q, request.k, request.v, request.spec, request.out), context);
      info.plan_build_time_us = hit ? 0 : plan->build_time_us;
    }
    // The plan is released: bring the cache back within budget if it was over, after a failed or
    // cancelled run too (a fresh plan over the budget stayed because it was in use; left there,
    // its memory would stay held while admission counts it free).
    plans->Trim();
    DA_RETURN_IF_ERROR(ran);
    info.plan_cache_hit = hit;
    info.precision_used = precision.precision;
    info.precision_reason = precision.reason;
    info.shard_strategy = ShardPolicy::kNone;
    info.backend = device.backend->Name();
    info.devices = {device.info.id};
    info.queue_time_us = queue_time_us;
    info.compute_time_us = MicrosSince(start) - info.plan_build_time_us;
    return info;
  }

  // Compute under the watchdog's eye: a cancellation or a passed deadline sets the run's stop
  // flag, and the result then says which of the two stopped it and how fast.
  absl::StatusOr<ExecutionInfo> Execute(const RunRequest& request, const Placement& placement,
                                        const Device* bound, int64_t queue_time_us, double flops) {
    Active run;
    run.cancelled = request.cancelled;
    run.deadline = request.deadline;
    {
      std::lock_guard<std::mutex> lock(mutex);
      active.insert(&run);
    }
    watchdog_cv.notify_one();
    const Clock::time_point start = Clock::now();
    bool failed_in_plan = false;
    std::vector<std::string> used;
    absl::StatusOr<ExecutionInfo> result =
        Compute(request, placement, bound, queue_time_us, &run.stop, &failed_in_plan, &used);
    const Clock::time_point returned = Clock::now();

    std::lock_guard<std::mutex> lock(mutex);
    active.erase(&run);
    for (const std::string& id : used) {
      counters.device_busy_seconds[id] += std::chrono::duration<double>(returned - start).count();
      ++counters.device_runs[id];
    }
    if (!result.ok() && run.cause != StopCause::kNone) {
      // The status the backend returned for its stop flag becomes what stopped it.
      const double latency_s = std::chrono::duration<double>(returned - run.stop_seen).count();
      RecordStopLatency(latency_s);
      const std::string computed = absl::StrFormat(
          "after %.1f ms of compute (%.1f ms queued)%s; compute stopped %.1f ms later",
          Millis(run.stop_seen - start), queue_time_us / 1e3,
          failed_in_plan ? ", while its plan was being built" : "", latency_s * 1e3);
      if (run.cause == StopCause::kCancelled) {
        ++counters.runs_cancelled;
        return absl::CancelledError(absl::StrCat("request cancelled during compute ", computed));
      }
      ++counters.runs_deadline_exceeded;
      return absl::DeadlineExceededError(absl::StrCat("deadline passed during compute ", computed));
    }
    if (result.ok()) {
      ++counters.runs_completed;
      if (result->compute_time_us >= kMinMeasuredComputeUs && flops >= kMinMeasuredFlops) {
        // The best throughput seen, of this process alone or of the group: a refusal then only
        // happens when even that is too slow. Kept apart because the two differ by the ranks'
        // number and the network between them.
        // (A group request computed here alone, a worker having refused its part, ran on one
        // device: strategy NONE.)
        const bool on_group = RunsOnGroup(request) && result->shard_strategy != ShardPolicy::kNone;
        double& best = on_group ? counters.measured_group_flops_per_second
                                : counters.measured_flops_per_second;
        best = std::max(best, flops / (result->compute_time_us / 1e6));
      }
    }
    return result;
  }

  // Under mutex: the better of the best measured throughput and the start-up figure (a refusal
  // only when even the best this process has shown is too slow); 0 when neither exists.
  double KnownFlopsPerSecond() const {
    return std::max(counters.measured_flops_per_second, startup_flops_per_second);
  }

  // Under mutex. The start-up figure and the measured runs of this process are of its own compute
  // path; a request the group runs is judged by the group's measured runs alone (none yet: 0).
  double DeadlineFlopsPerSecond(bool on_group) const {
    return on_group ? counters.measured_group_flops_per_second : KnownFlopsPerSecond();
  }

  // Under mutex: requests that wait or hold a place to wait, and the refusal when one more would
  // pass max_queue (OK when it fits).
  absl::Status CheckQueueRoom() {
    // Every device's dispatchers (max_concurrent_runs per device), not one device's: with several
    // devices, an idle one's dispatcher takes the next request at once.
    const int64_t dispatcher_count = static_cast<int64_t>(dispatchers.size());
    const int64_t idle = dispatcher_count - dispatching;
    int64_t unplaced = admitting;
    for (const auto& [key, job] : queue) {
      if (job.request.queue_place == nullptr) ++unplaced;
    }
    const int64_t places = places_held->load();
    const int64_t waiting = unplaced + places;
    if (waiting - idle + 1 <= options.max_queue) return absl::OkStatus();
    ++counters.rejected_queue_full;
    return WithRejectReason(
        absl::ResourceExhaustedError(absl::StrCat(
            "queue full: ", waiting, " requests wait for ", dispatcher_count,
            " busy dispatcher(s) and max_queue is ", options.max_queue,
            places > 0 ? absl::StrCat(" (", places, " of them open streams, one place each)")
                       : "")),
        RejectReason::kQueueFull);
  }

  void RecordStopLatency(double seconds) {
    StopLatencyStats& s = counters.stop_latency;
    for (size_t i = 0; i < s.bounds_seconds.size(); ++i) {
      if (seconds <= s.bounds_seconds[i]) ++s.cumulative[i];
    }
    ++s.count;
    s.sum_seconds += seconds;
    s.max_seconds = std::max(s.max_seconds, seconds);
    s.last_seconds = seconds;
  }

  void Finish(Job& job, absl::StatusOr<ExecutionInfo> result) {
    job.held.Reset();  // Memory is back before the caller hears of the result.
    job.done(std::move(result));
    std::lock_guard<std::mutex> lock(mutex);
    --pending;
  }

  void DispatchLoop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // Stopping with nothing left to do.
        job = std::move(queue.begin()->second);
        queue.erase(queue.begin());
        ++dispatching;
      }
      const int64_t queue_time_us = MicrosSince(job.enqueued);
      absl::StatusOr<ExecutionInfo> result = absl::UnknownError("not run");
      if (absl::Status live = CheckNotCancelled(job.request, "while queued"); !live.ok()) {
        result = live;
      } else if (absl::Status in_time =
                     CheckDeadline(job.request, job.flops, "in the queue", job.enqueued);
                 !in_time.ok()) {
        result = in_time;
      } else {
        result = Execute(job.request, job.placement, job.held.bound, queue_time_us, job.flops);
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        --dispatching;
      }
      Finish(job, std::move(result));
    }
  }

  bool SomethingToWatch() const {
    if (!active.empty()) return true;
    for (const auto& [key, job] : queue) {
      if (job.request.deadline.has_value() || job.request.cancelled != nullptr) return true;
    }
    return false;
  }

  // Takes queued requests whose deadline passed or that were cancelled out of the queue, and
  // raises the stop flag of running ones, every kWatchdogPeriod while anything is watched.
  void WatchdogLoop() {
    std::unique_lock<std::mutex> lock(mutex);
    while (!watchdog_stopping) {
      if (SomethingToWatch()) {
        watchdog_cv.wait_for(lock, kWatchdogPeriod);
      } else {
        watchdog_cv.wait(lock);
      }
      const Clock::time_point now = Clock::now();
      for (Active* run : active) {
        if (run->cause != StopCause::kNone) continue;
        // The deadline first: a server cancels a call whose deadline passed, so both may hold.
        if (run->deadline.has_value() && now >= *run->deadline) {
          run->cause = StopCause::kDeadline;
        } else if (run->cancelled != nullptr && run->cancelled->load()) {
          run->cause = StopCause::kCancelled;
        } else {
          continue;
        }
        run->stop_seen = now;
        run->stop.store(true);
      }
      std::vector<std::pair<Job, absl::Status>> expired;
      for (auto it = queue.begin(); it != queue.end();) {
        const RunRequest& request = it->second.request;
        absl::Status status;
        if (request.deadline.has_value() && now >= *request.deadline) {
          ++counters.rejected_deadline;
          status = WithRejectReason(
              absl::DeadlineExceededError(absl::StrFormat(
                  "deadline passed in the queue, after waiting %.1f ms behind %d queued and %d "
                  "running requests",
                  Millis(now - it->second.enqueued), std::distance(queue.begin(), it),
                  dispatching)),
              RejectReason::kDeadline);
        } else if (request.cancelled != nullptr && request.cancelled->load()) {
          ++counters.rejected_cancelled;
          status = WithRejectReason(
              absl::CancelledError(absl::StrFormat("cancelled while queued, after waiting %.1f ms",
                                                   Millis(now - it->second.enqueued))),
              RejectReason::kCancelled);
        } else {
          ++it;
          continue;
        }
        expired.emplace_back(std::move(it->second), std::move(status));
        it = queue.erase(it);
      }
      if (expired.empty()) continue;
      lock.unlock();
      for (auto& [job, status] : expired) Finish(job, status);
      lock.lock();
    }
  }

  // The compute devices: the CPU cut per cpu_devices (or per NUMA node), then any other device
  // whose kind has a registered backend; only those named in options.devices when it is set.
  absl::Status MakeDevices() {
    std::vector<std::vector<int>> numa;
    std::vector<int> allowed;
    if (options.cpu_devices_numa) {
      numa = NumaNodeCpus();
      allowed = AffinityCpus();
    }
    DA_ASSIGN_OR_RETURN(
        std::vector<CpuDevicePlan> cpus,
        PlanCpuDevices(options.threads, options.cpu_devices,
                       options.cpu_devices_numa ? &numa : nullptr,
                       options.cpu_devices_numa && !allowed.empty() ? &allowed : nullptr));
    std::vector<std::pair<DeviceInfo, CpuDevicePlan>> found;
    for (CpuDevicePlan& plan : cpus) found.emplace_back(plan.info, std::move(plan));
    for (const DeviceInfo& other : DiscoverDevices(1)) {
      if (other.kind != "cpu") found.emplace_back(other, CpuDevicePlan{});
    }
    for (const DeviceInfo& added : options.added_devices)
      found.emplace_back(added, CpuDevicePlan{});
    std::vector<std::string> ids;
    for (const auto& [info, plan] : found) ids.push_back(info.id);
    for (const std::string& wanted : options.devices) {
      if (std::find(ids.begin(), ids.end(), wanted) == ids.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("device '", wanted,
                         "' is not among this machine's devices: ", absl::StrJoin(ids, ", ")));
      }
    }
    for (auto& [info, plan] : found) {
      const bool named = std::find(options.devices.begin(), options.devices.end(), info.id) !=
                         options.devices.end();
      if (!options.devices.empty() && !named) continue;
      const std::string backend_name =
          info.kind == "cpu" && options.backend != "cpu" ? options.backend : "";
      absl::StatusOr<std::unique_ptr<Backend>> backend =
          MakeBackend(backend_name, info, {options.precision});
      if (!backend.ok()) {
        // A discovered device this build cannot compute on is left out, unless asked for.
        if (info.kind != "cpu" && !named) continue;
        return backend.status();
      }
      auto device = std::make_unique<Device>();
      device->info = info;
      device->info.precisions = (*backend)->Precisions();
      device->backend = *std::move(backend);
      device->cpus = plan.cpus;
      device->pool = std::make_unique<ThreadPool>(info.kind == "cpu" ? plan.threads : 1, plan.cpus);
      if (device->host()) {
        device->memory = memory;
      } else {
        const int64_t budget = options.device_memory_budget_bytes > 0
                                   ? options.device_memory_budget_bytes
                                   : static_cast<int64_t>(static_cast<double>(info.memory_bytes) *
                                                          options.device_memory_fraction);
        device->memory = std::make_shared<MemoryAccount>(budget);
      }
      devices.push_back(device->info);
      slots.push_back(std::move(device));
    }
    if (slots.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("no device to compute on: devices ",
                                                     absl::StrJoin(options.devices, ","), " of ",
                                                     absl::StrJoin(ids, ", ")));
    }
    for (const auto& slot : slots) {
      if (!slot->host()) placeable.push_back(slot.get());
    }
    if (placeable.empty()) {
      for (const auto& slot : slots) placeable.push_back(slot.get());
    }
    return absl::OkStatus();
  }

  void StartQueued(Job job) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (job.request.queue_place == nullptr) --admitting;
      if (options.queue_order == QueueOrder::kFair) {
        // Before any measurement, a nominal 100 GFLOP/s: only the ratio of costs matters then.
        const double known = KnownFlopsPerSecond();
        const double rate = known > 0 ? known : 1e11;
        job.turn = std::chrono::duration<double>(job.enqueued - created).count() +
                   kQueueAging * job.flops / rate;
      }
      const int64_t priority = job.request.priority;
      queue.emplace(QueueKey{-priority, job.turn, next_arrival++}, std::move(job));
    }
    cv.notify_one();
    watchdog_cv.notify_one();
  }
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads is ", options.threads, "; must be >= 0 (0 = every core)"));
  }
  if (options.max_concurrent_runs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_concurrent_runs is ", options.max_concurrent_runs, "; must be >= 1"));
  }
  if (options.plan_cache_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("plan_cache_bytes is ", options.plan_cache_bytes,
                                                   "; must be >= 0 (0 caches nothing)"));
  }
  if (options.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory_budget_bytes is ", options.memory_budget_bytes, "; must be >= 0 (0 = unlimited)"));
  }
  if (options.max_queue < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queue is ", options.max_queue, "; must be >= 0 (0 = no waiting)"));
  }
  if (options.device_memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("device_memory_budget_bytes is ", options.device_memory_budget_bytes,
                     "; must be >= 0 (0 = a fraction of the device's)"));
  }
  if (!(options.device_memory_fraction > 0 && options.device_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device_memory_fraction is ", options.device_memory_fraction, "; must be in (0, 1]"));
  }
  impl->memory = std::make_shared<MemoryAccount>(options.memory_budget_bytes);
  impl->counters.stop_latency.bounds_seconds = StopLatencyBounds();
  impl->counters.stop_latency.cumulative.assign(StopLatencyBounds().size(), 0);
  impl->plans = std::make_unique<PlanCache>(options.plan_cache_bytes);
  DA_RETURN_IF_ERROR(impl->MakeDevices());
  if (options.shard_group != nullptr && !impl->backend().ComputesShares()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a shard group needs a backend that computes shares; backend '",
                     options.backend, "' does not"));
  }
  for (const DeviceInfo& device : impl->devices) {
    impl->counters.device_busy_seconds[device.id] = 0;
    impl->counters.device_runs[device.id] = 0;
  }
  // max_concurrent_runs per device: a free device always has a dispatcher to feed it.
  const int dispatchers = options.max_concurrent_runs * static_cast<int>(impl->slots.size());
  for (int i = 0; i < dispatchers; ++i) {
    impl->dispatchers.emplace_back([raw = impl.get()] { raw->DispatchLoop(); });
  }
  impl->watchdog = std::thread([raw = impl.get()] { raw->WatchdogLoop(); });
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  for (std::thread& t : impl_->dispatchers) t.join();
  // The watchdog keeps watching until the queue is drained: queued deadlines still hold.
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->watchdog_stopping = true;
  }
  impl_->watchdog_cv.notify_all();
  impl_->watchdog.join();
}

absl::StatusOr<ExecutionInfo> Engine::Run(const RunRequest& request) {
  DA_RETURN_IF_ERROR(impl_->Validate(request));
  DA_RETURN_IF_ERROR(impl_->CheckNotCancelled(request, "before the run"));
  const double flops = EstimateFlops(Impl::ShapeOf(request), request.spec);
  DA_RETURN_IF_ERROR(impl_->CheckDeadline(request, flops, "before the run", Clock::now()));
  DA_ASSIGN_OR_RETURN(const Impl::Placed placed, impl_->Place(request, flops));
  DA_ASSIGN_OR_RETURN(Impl::Held held, impl_->ReserveFor(request, placed));
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    ++impl_->pending;
  }
  absl::StatusOr<ExecutionInfo> result =
      impl_->Execute(request, placed.placement, held.bound, 0, flops);
  held.Reset();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  --impl_->pending;
  return result;
}

void Engine::Submit(const RunRequest& request, RunCallback done) {
  const Clock::time_point now = Clock::now();
  absl::Status valid = impl_->Validate(request);
  if (!valid.ok()) {
    done(valid);
    return;
  }
  if (absl::Status live = impl_->CheckNotCancelled(request, "before queueing"); !live.ok()) {
    done(live);
    return;
  }
  Impl::Job job{request, std::move(done), now, Impl::Held(), 0, {}, 0};
  job.flops = EstimateFlops(Impl::ShapeOf(request), request.spec);
  if (absl::Status in_time = impl_->CheckDeadline(request, job.flops, "before queueing", now);
      !in_time.ok()) {
    job.done(in_time);
    return;
  }
  absl::StatusOr<Impl::Placed> placed = impl_->Place(request, job.flops);
  if (!placed.ok()) {
    job.done(placed.status());
    return;
  }
  job.placement = placed->placement;
  {
    // A request is refused for a full queue only when it would wait: idle dispatchers take the
    // first requests at once. Checked before the memory, which a refused request must not hold.
    // A run that carries a queue place was counted when its place was taken.
    std::unique_lock<std::mutex> lock(impl_->mutex);
    if (request.queue_place == nullptr) {
      if (absl::Status room = impl_->CheckQueueRoom(); !room.ok()) {
        lock.unlock();
        job.done(room);
        return;
      }
      ++impl_->admitting;  // Holds its queue place while it reserves: concurrent Submits see it.
    }
    ++impl_->pending;
  }
  absl::StatusOr<Impl::Held> held = impl_->ReserveFor(request, *placed);
  if (!held.ok()) {
    {
      std::lock_guard<std::mutex> lock(impl_->mutex);
      --impl_->pending;
      if (request.queue_place == nullptr) --impl_->admitting;
    }
    job.done(held.status());
    return;
  }
  job.held = *std::move(held);
  impl_->StartQueued(std::move(job));
}

absl::StatusOr<WarmUpResult> Engine::WarmUp(const ProblemShape& shape, DType dtype, DType out_dtype,
                                            const AttentionSpec& spec,
                                            const std::atomic<bool>* stop) {
  DA_RETURN_IF_ERROR(ValidateShape(shape, dtype, spec, impl_->options.limits, out_dtype));
  DA_RETURN_IF_ERROR(impl_->backend().Supports(shape, dtype, spec));
  DA_ASSIGN_OR_RETURN(const PrecisionChoice precision, impl_->backend().ChoosePrecision(spec));
  const TensorView q{dtype, shape.QueryShape(), nullptr, 0};
  const TensorView k{dtype, shape.KeyShape(), nullptr, 0};
  // The plans a request of this shape will use: when placement shards it across the local
  // devices, each device's share plan; otherwise the whole problem's plan on every placeable
  // device (a request placed on any of them finds it warm).
  WarmUpResult result;
  std::vector<std::pair<Impl::Device*, PlanKey>> keys;
  RunRequest probe;
  probe.q = q;
  probe.k = k;
  probe.v = k;
  probe.spec = spec;
  probe.out = {out_dtype, shape.QueryShape(), nullptr, 0};
  const absl::StatusOr<Impl::Placed> placed =
      impl_->Place(probe, EstimateFlops(shape, spec), /*count_refusal=*/false);
  if (placed.ok() && placed->placement.devices > 1) {
    DA_ASSIGN_OR_RETURN(
        const ShardLayout layout,
        MakeShardLayout(shape, spec, placed->placement.strategy, placed->placement.devices));
    result.shares = placed->placement.devices;
    for (int d = 0; d < placed->placement.devices; ++d) {
      Impl::Device* device = impl_->placeable[d];
      keys.emplace_back(device, Impl::ShareKeyOn(shape, dtype, out_dtype, spec, layout.shares[d],
                                                 precision.precision, *device));
    }
  } else {
    for (Impl::Device* device : impl_->placeable) {
      keys.emplace_back(device, MakePlanKey(q, k, out_dtype, spec, precision.precision,
                                            device->info.id, device->pool->size()));
    }
  }
  result.already_warm = true;
  // Within budget on every return, even when a plan does not fit (none is held then).
  struct Trim {
    PlanCache& plans;
    ~Trim() { plans.Trim(); }
  } trim{*impl_->plans};
  for (auto& [device, key] : keys) {
    bool warm = false;
    {
      const ScopedAffinity pinned(device->cpus);
      // A plan built here counts its workspace in the device's budget while it is built, as a
      // request's does: a warm-up cannot allocate past what admission allows. Built, it is the
      // plan cache's (within the cache's own budget, or trimmed below). Memory that calls in
      // flight hold (requests that reached the server before it was ready, say) comes back when
      // they end, so the warm-up waits for room (`stop` ends the wait, as does
      // kWarmUpMemoryWait) rather than fail a start-up over a passing load. It waits holding
      // nothing, before it claims the key's build (a request of the same key waiting for that
      // build would hold memory of its own), and stops waiting once the plan is cached (a
      // request of the shape built it). The build reserves as before; room taken in between
      // sends it back to wait, and that refusal is not handed to requests waiting for the build
      // (PlanCache::BuilderOnly). A workspace that would not fit even then is refused at once.
      const int64_t bytes = device->backend->PlanWorkspaceBytes(key);
      const std::string what =
          absl::StrCat(bytes, " bytes of plan workspace to warm up ", key.ToString());
      const auto build = [&, device = device,
                          key = &key]() -> absl::StatusOr<std::shared_ptr<Plan>> {
        if (absl::Status reserved = device->memory->Reserve(bytes, what); !reserved.ok()) {
          return PlanCache::BuilderOnly(std::move(reserved));
        }
        const MemoryReservation held(device->memory, bytes);
        return device->backend->BuildPlan(*key, stop);
      };
      const auto until = Clock::now() + kWarmUpMemoryWait;
      const auto cached = [&, key = &key] { return impl_->plans->Contains(*key); };
      absl::StatusOr<std::shared_ptr<Plan>> plan;
      for (;;) {
        absl::Status room = WaitForRoom(*device->memory, bytes, what, stop, until, cached);
        if (room.ok()) plan = impl_->plans->GetOrBuild(key, build, &warm, stop);
        const absl::Status& refused = room.ok() ? plan.status() : room;
        if (refused.ok() || RejectReasonOf(refused) != RejectReason::kMemory ||
            !device->memory->FitsWhenFree(bytes)) {
          DA_RETURN_IF_ERROR(refused);
          break;
        }
        if (Clock::now() >= until) {
          return WithRejectReason(
              absl::ResourceExhaustedError(
                  absl::StrCat(refused.message(), " (after waiting ", kWarmUpMemoryWait.count(),
                               " ms for calls in flight to give memory back)")),
              RejectReason::kMemory);
        }
      }
      result.plan_bytes += (*plan)->bytes();
      result.build_time_us += warm ? 0 : (*plan)->build_time_us;
    }
    result.already_warm = result.already_warm && warm;
    if (result.plan_key.empty()) result.plan_key = key.ToString();
    result.plan_keys.push_back(key.ToString());
  }
  result.precision = precision.precision;
  return result;
}

absl::StatusOr<MemoryEstimate> Engine::EstimateMemory(const ProblemShape& shape, DType dtype,
                                                      DType out_dtype,
                                                      const AttentionSpec& spec) const {
  DA_RETURN_IF_ERROR(ValidateShape(shape, dtype, spec, impl_->options.limits, out_dtype));
  DA_RETURN_IF_ERROR(impl_->backend().Supports(shape, dtype, spec));
  return impl_->Estimate(shape, dtype, out_dtype, spec, impl_->Default());
}

MemoryReservation Engine::HoldMemory(int64_t bytes) {
  bytes = std::max<int64_t>(bytes, 0);
  impl_->memory->Hold(bytes);
  return MemoryReservation(impl_->memory, bytes);
}

absl::StatusOr<MemoryReservation> Engine::ReserveMemory(int64_t bytes, std::string_view what) {
  if (bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot reserve ", bytes, " bytes"));
  }
  absl::Status reserved = impl_->memory->Reserve(bytes, what);
  if (!reserved.ok()) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    ++impl_->counters.rejected_memory;
    return reserved;
  }
  return MemoryReservation(impl_->memory, bytes);
}

absl::StatusOr<QueuePlace> Engine::TakeQueuePlace() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  DA_RETURN_IF_ERROR(impl_->CheckQueueRoom());
  impl_->places_held->fetch_add(1);
  return QueuePlace(impl_->places_held);
}

double Engine::DeadlineThroughput(const ProblemShape& shape, const AttentionSpec& spec) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->DeadlineFlopsPerSecond(impl_->GroupShards(shape, spec));
}

void Engine::SetKeptMemory(int64_t bytes, std::string what) {
  impl_->memory->SetKept(std::max<int64_t>(bytes, 0), std::move(what));
}

void Engine::SetStartupThroughput(double flops_per_second) {
  if (!(flops_per_second > 0)) return;
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->startup_flops_per_second = flops_per_second;
}

PlanCacheStats Engine::plan_cache_stats() const { return impl_->plans->stats(); }

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  EngineStats stats = impl_->counters;
  stats.queued = static_cast<int64_t>(impl_->queue.size());
  stats.running = static_cast<int64_t>(impl_->active.size());
  stats.max_queue = impl_->options.max_queue;
  stats.memory_reserved_bytes = impl_->memory->reserved_bytes();
  stats.memory_budget_bytes = impl_->memory->budget_bytes();
  stats.memory_kept_bytes = impl_->memory->kept_bytes();
  stats.deadline_flops_per_second = impl_->KnownFlopsPerSecond();
  stats.queue_places_held = impl_->places_held->load();
  for (const auto& device : impl_->slots) {
    const std::string& id = device->info.id;
    stats.device_memory_account[id] = device->host() ? "host" : id;
    stats.device_memory_reserved_bytes[id] = device->memory->reserved_bytes();
    stats.device_memory_budget_bytes[id] = device->memory->budget_bytes();
  }
  return stats;
}

int64_t Engine::pending() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->pending;
}

const std::vector<DeviceInfo>& Engine::devices() const { return impl_->devices; }
const Limits& Engine::limits() const { return impl_->options.limits; }
bool Engine::ComputesShares() const { return impl_->backend().ComputesShares(); }

int Engine::threads() const {
  int threads = 0;
  for (const auto& device : impl_->slots) threads += device->pool->size();
  return threads;
}

}  // namespace da::engine
