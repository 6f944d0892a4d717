// The multi-process entry points of da-server, on engine/dist (built when Gloo is found).
#include <chrono>

#include "engine/dist/serving_group.h"
#include "engine/status_macros.h"
#include "server/group_flags.h"

namespace da::server {
namespace {

dist::ServingGroupOptions ToOptions(const GroupFlags& flags, int threads) {
  return {.world_size = flags.world_size,
          .rank = flags.rank,
          .coordinator = flags.coordinator,
          .interface_address = flags.rank_address,
          .collective_timeout = std::chrono::milliseconds(flags.collective_timeout_ms),
          .heartbeat = std::chrono::milliseconds(flags.heartbeat_ms),
          .threads = threads};
}

}  // namespace

absl::StatusOr<std::shared_ptr<engine::ShardGroup>> StartCoordinator(const GroupFlags& flags,
                                                                     int* coordinator_port) {
  DA_ASSIGN_OR_RETURN(std::shared_ptr<dist::CoordinatorGroup> group,
                      dist::CoordinatorGroup::Start(ToOptions(flags, 0)));
  *coordinator_port = group->coordinator_port();
  return group;
}

absl::Status RunWorkerRank(const GroupFlags& flags, int threads, const std::atomic<bool>& stop,
                           std::function<void(const std::string&)> on_state) {
  dist::ServingGroupOptions options = ToOptions(flags, threads);
  options.on_state = std::move(on_state);
  return dist::RunWorker(options, stop);
}

}  // namespace da::server
