// The data plane of a serving group (issue #16): which communicator carries a sharded run's bulk
// bytes (shares, the SEQUENCE exchange, outputs; ShardRunOptions::data_plane), formed by every
// rank right after the group's Gloo control communicator, in the same generation.
//
//   none         the control communicator carries everything (Gloo over TCP), the default.
//   nccl         NCCL between the ranks' GPUs (NVLink, InfiniBand/RoCE where NCCL finds them):
//                rank 0 creates the NCCL id and hands it out through the coordinator's store
//                (under the generation's keys); the host shares are staged through device memory
//                (staged_plane.h). Needs a build with NCCL and a CUDA device on every rank.
//   gloo-staged  the nccl path with Gloo in NCCL's place and host staging: a second Gloo group
//                held to NCCL's terms (one thread, no tags), fed through the same staged plane,
//                so that CPU machines run and test everything of the nccl path but NCCL itself.
//
//   DA_ASSIGN_OR_RETURN(DataPlaneKind kind, ParseDataPlane("nccl"));
//   DA_RETURN_IF_ERROR(CheckDataPlane(kind, /*device=*/0));   // at start-up, naming the flag
//   DA_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> plane,
//                       FormDataPlane(kind, store, rank, size, prefix, options));  // null: none
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/dist/communicator.h"
#include "engine/dist/store.h"

namespace da::dist {

enum class DataPlaneKind { kNone, kNccl, kGlooStaged };

// "none", "nccl", "gloo-staged"; INVALID_ARGUMENT naming the value and the choices.
absl::StatusOr<DataPlaneKind> ParseDataPlane(absl::string_view name);
std::string DataPlaneName(DataPlaneKind kind);

// OK when this build and machine can form `kind` on CUDA device `device`; FAILED_PRECONDITION
// saying why not (a build without NCCL, no CUDA device, the device out of range).
absl::Status CheckDataPlane(DataPlaneKind kind, int device);

struct DataPlaneOptions {
  std::string interface_address = "127.0.0.1";  // gloo-staged: where this rank listens.
  int device = 0;                               // nccl: this rank's CUDA device.
  std::chrono::milliseconds timeout{30000};     // Forming it, and gloo-staged's operations.
  int64_t chunk_bytes = int64_t{64} << 20;      // The staged plane's largest inner message.
};

// `inner` held to NCCL's terms: capabilities() says one thread at a time and no tags; every
// message goes on tag 0 (messages between two ranks match in issue order, as NCCL's do); a call
// made while another is in progress is refused with FAILED_PRECONDITION.
std::unique_ptr<Communicator> HoldToNcclTerms(std::unique_ptr<Communicator> inner);

// This rank's plane of `kind` (null for kNone), formed under the store keys of `prefix` (one per
// generation); every rank of the group calls it with the same kind and prefix.
absl::StatusOr<std::unique_ptr<Communicator>> FormDataPlane(DataPlaneKind kind,
                                                            KeyValueStore& store, int rank,
                                                            int size, const std::string& prefix,
                                                            const DataPlaneOptions& options);

}  // namespace da::dist
