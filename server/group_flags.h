// The flags of multi-process serving (issue #6) and their checks:
//
//   da-server --world-size 3 --rank 0 --coordinator host0:29500   # serves gRPC, coordinates
//   da-server --world-size 3 --rank 1 --coordinator host0:29500   # computes
//
// engine/dist/serving_group.h has the protocol; docs/DISTRIBUTED.md the operator's view.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/shard_group.h"

namespace da::server {

// Limits of the flags.
inline constexpr int kMaxWorldSize = 1024;
inline constexpr int64_t kMaxCollectiveTimeoutMs = 3600 * 1000;

struct GroupFlags {
  int world_size = 1;       // --world-size: ranks, rank 0 included; 1 = no group.
  int rank = 0;             // --rank: 0 serves gRPC and coordinates; others compute.
  std::string coordinator;  // --coordinator HOST:PORT: rank 0 listens at PORT, workers connect.
  std::string rank_address = "127.0.0.1";  // --rank-address: where this rank's peers reach it.
  int64_t collective_timeout_ms = 30000;   // --collective-timeout-ms
  int64_t heartbeat_ms = 1000;             // --heartbeat-ms
  std::string coordinator_port_file;       // --coordinator-port-file (rank 0)
  std::string coordinator_secret_file;     // --coordinator-secret-file: every rank the same
  std::string data_plane = "none";         // --data-plane: none, nccl or gloo-staged
  int data_plane_device = 0;               // --data-plane-device: the CUDA device (nccl)
};

// INVALID_ARGUMENT naming the flag, its value and the limit, e.g. "--rank is 3; must be in
// [0, 3) (below --world-size 3)".
absl::Status ValidateGroupFlags(const GroupFlags& flags);

// A coordinator secret's length limits (engine/dist/store_auth.h's, checked there too).
inline constexpr size_t kMinCoordinatorSecretBytes = 16;
inline constexpr size_t kMaxCoordinatorSecretBytes = 4096;

// The secret in --coordinator-secret-file (empty without the flag), without trailing whitespace
// (a file written by `echo` or a Kubernetes Secret ends in a newline). INVALID_ARGUMENT naming
// the flag and the file when it cannot be read or its length is outside the limits.
absl::StatusOr<std::string> ReadCoordinatorSecret(const GroupFlags& flags);

// Implemented in group_launch.cc when the build has Gloo (engine/dist), else in
// group_launch_none.cc (UNIMPLEMENTED naming the missing library); part of da-server only.
//
// Rank 0: starts the coordinator (store and group formation) and returns the group for
// ServerOptions::shard_group; *coordinator_port is the port it listens on.
absl::StatusOr<std::shared_ptr<engine::ShardGroup>> StartCoordinator(const GroupFlags& flags,
                                                                     int* coordinator_port);
// The plan cache a worker rank keeps its shares' plans warm in.
inline constexpr int64_t kWorkerPlanCacheBytes = int64_t{256} << 20;

// A worker rank: serves the group until stop is set or rank 0 sends kShutdown.
// memory_budget_bytes: the most its part of one run may hold (0: no limit), published to rank 0.
// on_state: ServingGroupOptions::on_state (the worker's readiness), may be null; on_stats:
// ServingGroupOptions::on_stats (what it computed, for its /metrics), may be null.
absl::Status RunWorkerRank(const GroupFlags& flags, int threads, int64_t memory_budget_bytes,
                           const std::atomic<bool>& stop,
                           std::function<void(const std::string&)> on_state = nullptr,
                           std::function<void(const engine::WorkerStats&)> on_stats = nullptr);

}  // namespace da::server
