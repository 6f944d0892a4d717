// The multi-process entry points of da-server, on engine/dist (built when Gloo is found).
#include <chrono>

#include "absl/strings/str_cat.h"
#include "engine/dist/data_plane.h"
#include "engine/dist/serving_group.h"
#include "engine/dist/store_auth.h"
#include "engine/status_macros.h"
#include "server/group_flags.h"

namespace da::server {
namespace {

static_assert(kMinCoordinatorSecretBytes == dist::internal::kMinStoreSecretBytes &&
              kMaxCoordinatorSecretBytes == dist::internal::kMaxStoreSecretBytes);

// The flags as options; a data plane this build or machine cannot form is refused here, at
// start-up, naming the flag.
absl::StatusOr<dist::ServingGroupOptions> ToOptions(const GroupFlags& flags, int threads) {
  DA_ASSIGN_OR_RETURN(const dist::DataPlaneKind plane, dist::ParseDataPlane(flags.data_plane));
  if (absl::Status usable = dist::CheckDataPlane(plane, flags.data_plane_device); !usable.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--data-plane ", flags.data_plane, ": ", usable.message()));
  }
  DA_ASSIGN_OR_RETURN(std::string secret, ReadCoordinatorSecret(flags));
  return dist::ServingGroupOptions{
      .world_size = flags.world_size,
      .rank = flags.rank,
      .coordinator = flags.coordinator,
      .coordinator_secret = std::move(secret),
      .interface_address = flags.rank_address,
      .collective_timeout = std::chrono::milliseconds(flags.collective_timeout_ms),
      .heartbeat = std::chrono::milliseconds(flags.heartbeat_ms),
      .data_plane = plane,
      .data_plane_device = flags.data_plane_device,
      .threads = threads};
}

}  // namespace

absl::StatusOr<std::shared_ptr<engine::ShardGroup>> StartCoordinator(const GroupFlags& flags,
                                                                     int* coordinator_port) {
  DA_ASSIGN_OR_RETURN(const dist::ServingGroupOptions options, ToOptions(flags, 0));
  DA_ASSIGN_OR_RETURN(std::shared_ptr<dist::CoordinatorGroup> group,
                      dist::CoordinatorGroup::Start(options));
  *coordinator_port = group->coordinator_port();
  return group;
}

absl::Status RunWorkerRank(const GroupFlags& flags, int threads, int64_t memory_budget_bytes,
                           const std::atomic<bool>& stop,
                           std::function<void(const std::string&)> on_state,
                           std::function<void(const engine::WorkerStats&)> on_stats) {
  DA_ASSIGN_OR_RETURN(dist::ServingGroupOptions options, ToOptions(flags, threads));
  options.plan_cache_bytes = kWorkerPlanCacheBytes;
  options.memory_budget_bytes = memory_budget_bytes;
  options.on_state = std::move(on_state);
  options.on_stats = std::move(on_stats);
  return dist::RunWorker(options, stop);
}

}  // namespace da::server
