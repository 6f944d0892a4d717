// A data plane whose communicator moves device memory (NCCL), fed from host buffers: the shares of
// a sharded run live in host memory (sharded_run.h), so each message is copied to a device
// staging buffer, moved by the inner communicator, and copied back to host memory on arrival.
//
//   auto nccl = CreateNcclCommunicator(store, rank, size, {.device = 0, .key_prefix = prefix});
//   std::unique_ptr<Communicator> plane =
//       MakeStagedPlane(*std::move(nccl), MakeCudaStaging(0));   // nccl_communicator.h
//   ShardRunOptions options;  options.data_plane = plane.get();
//
// Messages larger than `chunk_bytes` go as several inner operations of at most that size, the
// same cut on both sides (both know the message's size), so the device holds two chunks per rank
// (one out, one in; AllGather's incoming chunk is size() chunks) whatever the share's size. Send,
// Recv and Broadcast ask the staging for whole chunks, however small the message, so that after
// ReservePlaneStaging no run allocates device memory (cudaFree, when a buffer grows, waits for
// the whole device). AllGather's incoming buffer, world-size chunks, is not reserved and grows on
// first use: no sharded run calls it on the plane.
// Contract: the inner communicator's, on host pointers. Counters are the inner communicator's.
// A failed copy returns the staging's error (INTERNAL, naming the copy); a failed inner operation
// its own, after which the plane is unusable like the inner one.
//
// Staging for tests and CPU ranks: MakeHostStaging, whose "device" buffers are host memory, so
// that the whole path (chunking, copies both ways, the inner calls' order) runs on CPU ranks with
// Gloo in NCCL's place.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/dist/communicator.h"

namespace da::dist {

// Device buffers for a staged plane and the copies into and out of them.
class PlaneStaging {
 public:
  virtual ~PlaneStaging() = default;
  // Where the buffers live, for messages ("cuda:0", "host").
  virtual std::string name() const = 0;
  // A device buffer of at least `bytes` for `slot` (kOutgoing or kIncoming), kept and grown.
  static constexpr int kOutgoing = 0;
  static constexpr int kIncoming = 1;
  virtual absl::StatusOr<void*> Buffer(int slot, int64_t bytes) = 0;
  // Synchronous copies: done when they return.
  virtual absl::Status ToDevice(void* device, const void* host, int64_t bytes) = 0;
  virtual absl::Status ToHost(void* host, const void* device, int64_t bytes) = 0;
};

// Staging in host memory (memcpy): the staged path on machines without a device.
std::unique_ptr<PlaneStaging> MakeHostStaging();

inline constexpr int64_t kDefaultPlaneChunkBytes = int64_t{64} << 20;

// Takes both of `staging`'s buffers at `chunk_bytes` now: a device without room for them fails
// here, when the group forms, not in the middle of a run. FormDataPlane calls it.
absl::Status ReservePlaneStaging(PlaneStaging& staging, int64_t chunk_bytes);

// `inner` (one group, device buffers) fed from host buffers through `staging`.
std::unique_ptr<Communicator> MakeStagedPlane(std::unique_ptr<Communicator> inner,
                                              std::unique_ptr<PlaneStaging> staging,
                                              int64_t chunk_bytes = kDefaultPlaneChunkBytes);

}  // namespace da::dist
