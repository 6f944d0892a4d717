// Multi-process serving (issue #6): rank 0 serves gRPC and coordinates, ranks 1..W-1 compute.
//
//   // rank 0 (da-server --world-size 3 --rank 0 --coordinator host0:29500)
//   DA_ASSIGN_OR_RETURN(auto group, CoordinatorGroup::Start(options));
//   engine_options.shard_group = group;  // requests now run across the ranks
//   // ranks 1 and 2 (the same flags with --rank 1, --rank 2)
//   std::atomic<bool> stop{false};
//   absl::Status ended = RunWorker(options, stop);  // until stop (SIGTERM) or kShutdown
//
// How the group forms (generations). Rank 0 serves the rendezvous store (store.h) on every
// interface at the port of `coordinator` and publishes a random session id under "da/session";
// every key below lives under "da/<session>/". A rank 0 that restarts has a new session, so
// workers never mistake its keys for the old one's. Each attempt to form the group is a new
// generation g = 1, 2, ... with keys of its own; once g has formed, rank 0 deletes the keys of
// every older one (every worker has joined g by then):
//   1. rank 0 sets "generation" = g, then "g<g>/open";
//   2. a worker that starts reads "generation"; one that tried generation `last` before waits
//      for "g<last+1>/open"; it then reads
//      "generation" (the newest open one), skips it if "g<g>/go" is already set (it formed, or is
//      forming, without this worker), else sets "g<g>/joined/<rank>" and waits for "g<g>/go";
//   3. rank 0 waits, without a time limit, until every rank has joined (readiness says which are
//      missing), sets "g<g>/go", and all ranks form a Gloo group under "g<g>/gloo" and pass a
//      barrier, each within collective_timeout; with a data plane (data_plane.h) they then form
//      it under "g<g>/gloo/plane" (NCCL: rank 0's id under "g<g>/gloo/plane/nccl/nccl_id") and
//      pass a second barrier;
//   4. a failure anywhere (a rank gone after joining, a failed rendezvous) sends everybody to the
//      next generation: rank 0 opens g+1 at once, the workers were already waiting for it.
// Convergence: only rank 0 gives up on a generation, and only after every rank joined it; a
// worker never gives up on a generation it is waiting in, except when the store (rank 0) is
// gone. So a rank that comes back joins the open generation and the group forms as soon as the
// last rank has joined (plus one Gloo rendezvous).
//
// While formed, rank 0 sends a heartbeat control frame to every worker when it has been idle for
// `heartbeat`; a worker that receives no frame for kIdleHeartbeats heartbeats takes rank 0 as lost
// and re-joins, and a worker that does not take a heartbeat within kIdleHeartbeats periods (or
// collective_timeout, if shorter) is lost to rank 0. A run (CoordinateShardedRun, sharded_run.h)
// and the heartbeats take turns; runs are serialised, and a run waiting for its turn is answered
// at once when its request is cancelled or its deadline passes. A run that fails on the
// communicator (a rank lost: UNAVAILABLE at once; a rank stalled: after collective_timeout) breaks
// the generation: rank 0 drops its communicator (the workers see their connections close) and
// re-forms; Run returns UNAVAILABLE naming the cause, and refuses new runs with UNAVAILABLE until
// the group is whole again.
//
// Shutdown: destroying the CoordinatorGroup stops the rendezvous and closes the group; workers
// see rank 0 gone and wait for the next rank 0 (they do not exit: each rank's lifetime is its
// own, as in a StatefulSet). A worker leaves when `stop` is set (SIGTERM) or on a kShutdown frame.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/device.h"
#include "engine/dist/data_plane.h"
#include "engine/shard_group.h"

namespace da::dist {

// A worker takes rank 0 as lost after this many heartbeat periods without a control frame.
inline constexpr int kIdleHeartbeats = 5;

struct ServingGroupOptions {
  int world_size = 1;  // Ranks in the group, rank 0 included.
  int rank = 0;        // 0: the coordinator; 1..world_size-1: workers.
  // HOST:PORT of rank 0's store. Rank 0 listens on every interface at PORT (0: a free port, see
  // CoordinatorGroup::coordinator_port); workers connect to HOST:PORT.
  std::string coordinator;
  // Shared by every rank (empty: none): the coordinator's store lets in only clients that prove
  // they know it, and tags every frame (store.h, store_auth.h). 16 to 4096 bytes.
  std::string coordinator_secret;
  // The address this rank's Gloo device listens on and advertises; every other rank must reach
  // it (a pod IP in Kubernetes, 127.0.0.1 for ranks on one machine).
  std::string interface_address = "127.0.0.1";
  // Limit of every collective step of a run, and of forming the group once all ranks joined.
  std::chrono::milliseconds collective_timeout{30000};
  // Rank 0's idle keep-alive period.
  std::chrono::milliseconds heartbeat{1000};
  // The communicator of a run's bulk bytes (data_plane.h), formed by every rank right after the
  // Gloo group in each generation; every rank must name the same. kNone: the Gloo group itself.
  DataPlaneKind data_plane = DataPlaneKind::kNone;
  int data_plane_device = 0;  // kNccl: this rank's CUDA device.
  int threads = 0;  // Workers: compute threads (0: every core). Rank 0 uses the engine's pool.
  // Workers: the budget of the plan cache their shares' plans stay warm in. Rank 0 uses the
  // engine's cache.
  int64_t plan_cache_bytes = int64_t{256} << 20;
  // Workers: the most host memory the worker's part of one run may hold (its shares, output and
  // exchanged rows; ShardRunOptions::memory_budget_bytes); 0, no limit. Published when it joins,
  // so that rank 0 refuses a run whose part does not fit before sending anything (the worker
  // refuses it in step too).
  int64_t memory_budget_bytes = 0;
  // Workers: told "" when the worker has joined a generation (it serves runs), and why not
  // otherwise ("waiting for the coordinator at ...", "left generation 3: ..."): its readiness.
  // Called from the worker's thread; null: nobody listens.
  std::function<void(const std::string& not_serving_reason)> on_state = nullptr;
  // Workers: told what the worker has computed so far, once its device is known and after every
  // run (its /metrics). Called from the worker's thread; null: nobody listens.
  std::function<void(const engine::WorkerStats& stats)> on_stats = nullptr;
};

// INVALID_ARGUMENT naming the field, its value and the limit.
absl::Status ValidateServingGroupOptions(const ServingGroupOptions& options);

// Rank 0's side: an engine::ShardGroup over the workers (see the file comment).
class CoordinatorGroup final : public engine::ShardGroup {
 public:
  // Starts the store and the thread that forms the group and sends heartbeats; returns at once
  // (the group is not whole until every worker has joined). UNAVAILABLE when the port is taken.
  static absl::StatusOr<std::shared_ptr<CoordinatorGroup>> Start(
      const ServingGroupOptions& options);
  ~CoordinatorGroup() override;

  int coordinator_port() const;

  int world_size() const override;
  engine::ShardGroupStatus status() const override;
  absl::StatusOr<engine::ShardGroupRunInfo> Run(const engine::ShardedProblem& problem) override;
  engine::ShardGroupStats stats() const override;
  void SetStatusListener(std::function<void(const engine::ShardGroupStatus&)> listener) override;

  class Impl;

 private:
  explicit CoordinatorGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The device a worker computes on, of `devices` (engine::DiscoverDevices): with the nccl data
// plane its GPU (cuda:<data_plane_device>; FAILED_PRECONDITION when absent), otherwise the first
// GPU when it has one (as the engine prefers), else its CPU.
absl::StatusOr<engine::DeviceInfo> WorkerDevice(const std::vector<engine::DeviceInfo>& devices,
                                                const ServingGroupOptions& options);

// A worker's life: joins the current generation, serves kRun frames (ServeShardedRun) and
// heartbeats, re-joins the next generation after any failure, and returns OK when `stop` is set
// (checked at least every heartbeat while idle, and between store waits) or a kShutdown frame
// arrives. Waits for the coordinator as long as it takes. INVALID_ARGUMENT for bad options.
absl::Status RunWorker(const ServingGroupOptions& options, const std::atomic<bool>& stop);

}  // namespace da::dist
