// da-server built without Gloo: one process only (--world-size 1).
#include "absl/strings/str_cat.h"
#include "server/group_flags.h"

namespace da::server {
namespace {

absl::Status NoGloo(const GroupFlags& flags) {
  return absl::UnimplementedError(
      absl::StrCat("--world-size ", flags.world_size,
                   " needs multi-process serving, and this da-server was built without Gloo "
                   "(libgloo-dev; see docs/DISTRIBUTED.md)"));
}

}  // namespace

absl::StatusOr<std::shared_ptr<engine::ShardGroup>> StartCoordinator(const GroupFlags& flags,
                                                                     int*) {
  return NoGloo(flags);
}

absl::Status RunWorkerRank(const GroupFlags& flags, int, int64_t, const std::atomic<bool>&,
                           std::function<void(const std::string&)>,
                           std::function<void(const engine::WorkerStats&)>) {
  return NoGloo(flags);
}

}  // namespace da::server
