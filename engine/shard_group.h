// engine::ShardGroup: a group of ranks (processes) that computes one request together. The engine
// calls it instead of its local backend when EngineOptions::shard_group is set, the group has more
// than one rank and the request's shard policy is not NONE (DESIGN §3, Sharding; issue #6).
//
//   EngineOptions options;
//   options.shard_group = group;  // e.g. dist::CoordinatorGroup::Start(...) on rank 0
//   auto engine = Engine::Create(options);
//   // Requests now run across the group; ExecutionInfo names the strategy and the ranks.
//
// The interface is plain C++ (no dist, Gloo or gRPC types): the engine library knows nothing of
// transports, and the server reads the group's status (readiness) and statistics (metrics)
// through it.
//
// Contract for implementations:
// - Run is called with a validated problem and blocks until the group has computed `out`. Runs
//   may be called from several threads; the group serialises them.
// - A group that is not whole (a rank lost, re-forming) refuses runs with UNAVAILABLE naming why.
//   A run that loses a rank midway returns UNAVAILABLE naming the lost rank (or the failed
//   operation) and the cause; the group then re-forms by itself.
// - `stop` set (cancellation or deadline) makes Run return CANCELLED as soon as the ranks are back
//   in step; the engine turns that into what stopped it.
// - Thread safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/backend.h"
#include "engine/device.h"
#include "engine/plan_cache.h"
#include "engine/tensor.h"

namespace da::engine {

// One request cut across a group of devices or ranks: the whole tensors live in this process,
// and `compute` is what this process computes its own share with (the engine's backend, plan
// cache and pool of the device it runs on).
struct ShardedProblem {
  TensorView q, k, v;
  AttentionSpec spec;
  MutableTensorView out;
  Precision precision = Precision::kFloat32;      // What the engine's precision policy chose.
  ShardPolicy strategy = ShardPolicy::kSequence;  // kHeads or kSequence (ChooseShardStrategy).
  ShareCompute compute;
  const std::atomic<bool>* stop = nullptr;
};

// What a successful run did.
struct ShardGroupRunInfo {
  ShardPolicy strategy = ShardPolicy::kSequence;
  std::vector<std::string> devices;  // One per rank, in rank order: "rank0:cpu", "rank1:cpu", ...
  int64_t generation = 0;            // The group generation that ran it.
};

// Whether the group can run requests now, and why not.
struct ShardGroupStatus {
  int world_size = 1;
  bool whole = true;       // Every rank is in the current generation.
  int64_t generation = 0;  // Incremented at every attempt to form the group.
  std::string reason;      // Empty when whole; else e.g. "rank 2 missing, re-forming generation 5".
};

// Cumulative statistics since the group started (every rank's entry is kept by rank 0).
struct ShardGroupStats {
  ShardGroupStatus status;
  int64_t runs_completed = 0;
  int64_t runs_failed = 0;      // Runs that broke the group (a rank lost or stalled).
  int64_t heartbeats_sent = 0;  // Idle keep-alive frames sent by rank 0 (not in the rank bytes).
  struct Rank {
    int64_t bytes_sent = 0;         // Payload bytes of runs this rank sent (control, shares, rows).
    int64_t bytes_received = 0;     // And received.
    int64_t exchange_bytes = 0;     // Of bytes_received: kept K/V rows of spanning segments.
    double compute_seconds = 0;     // Kernel time of this rank's shares.
    double collective_seconds = 0;  // Time in scatter, exchange and gather, waits included.
  };
  std::vector<Rank> ranks;  // world_size entries; completed runs only.
};

// What a worker rank (1..W-1) has computed, for its own /metrics: cumulative since it started,
// across generations. Rank 0's view of the same ranks is ShardGroupStats.
struct WorkerStats {
  DeviceInfo device;            // The device it computes its shares on; empty id until discovered.
  int64_t shares_computed = 0;  // Runs whose share it computed to the end.
  int64_t shares_stopped = 0;   // Runs it answered in step without an output (cancelled, or a
                                // compute failure rank 0 was told of).
  double compute_seconds = 0;   // Kernel time of the shares computed to the end.
  PlanCacheStats plans;         // Its plan cache, as of its last run.
};

// Marks a Run error that means a worker cannot hold its part of the problem (over its memory
// budget, or its share buffers could not be had): the problem may still fit this process alone.
inline constexpr char kPartRefusedPayload[] = "da.engine/part-refused";
inline bool PartRefused(const absl::Status& status) {
  return status.GetPayload(kPartRefusedPayload).has_value();
}

class ShardGroup {
 public:
  virtual ~ShardGroup() = default;

  virtual int world_size() const = 0;
  virtual ShardGroupStatus status() const = 0;
  bool whole() const { return status().whole; }

  // Runs one problem across the group (see the contract above).
  virtual absl::StatusOr<ShardGroupRunInfo> Run(const ShardedProblem& problem) = 0;

  virtual ShardGroupStats stats() const = 0;

  // Called with the new status whenever it changes (from the group's own threads, without its
  // locks held); replaces any earlier listener. The listener must stay callable until it is
  // replaced (with nullptr) or the group is destroyed.
  virtual void SetStatusListener(std::function<void(const ShardGroupStatus&)> listener) = 0;
};

}  // namespace da::engine
