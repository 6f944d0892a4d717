// The Gloo backend of dist::Communicator: CPU processes on one or many machines, TCP transport.
//
// Rendezvous runs over the coordinator's KeyValueStore: an adapter implements Gloo's
// gloo::rendezvous::Store on top of it (keys "<prefix>/<gloo key>"), so connectFullMesh needs
// no extra infrastructure (Debian's Gloo has no TCP store).
//
//   GlooOptions options{.rank = rank, .size = world_size, .interface_address = "10.0.0.5",
//                       .prefix = "group-3"};
//   DA_ASSIGN_OR_RETURN(auto comm, MakeGlooCommunicator(*store, options));
//
// Errors: Gloo's exceptions (gloo::IoException for I/O, gloo::EnforceNotMet, which does not
// derive from gloo::Exception, for broken invariants) are caught at each call and become
// UNAVAILABLE (lost peer), DEADLINE_EXCEEDED (timeout) or INTERNAL. A killed peer is noticed
// within milliseconds, a silent one at the timeout. The process ignores SIGPIPE from the first
// communicator on (a write to a dead peer must not kill it), unless a handler is already set.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/dist/communicator.h"
#include "engine/dist/store.h"

namespace da::dist {

struct GlooOptions {
  int rank = 0;  // 0 <= rank < size.
  int size = 1;  // Ranks in the group.
  // Address this rank listens on for its peers; must be reachable from every other rank.
  std::string interface_address = "127.0.0.1";
  // Store key prefix of this group: a group that re-forms must use a new one (keys stay).
  std::string prefix = "da";
  // Limit for the rendezvous (all ranks present) and for connecting to each peer.
  std::chrono::milliseconds timeout{30000};
};

// Meets the other ranks through `store` (used only during this call) and connects to each.
// INVALID_ARGUMENT for bad options; DEADLINE_EXCEEDED when a rank does not show up within
// options.timeout (naming the key it waited for); UNAVAILABLE when the store or a peer fails.
absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(KeyValueStore& store,
                                                                   const GlooOptions& options);

}  // namespace da::dist
