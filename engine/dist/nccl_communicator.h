// NCCL backend of dist::Communicator: GPUs in one process, or one GPU per process on one or many
// nodes.
//
// Several processes (one GPU each): rank 0 creates an ncclUniqueId and publishes it in the store
// under "<key_prefix>/nccl_id"; the other ranks read it from there.
//
//   DA_ASSIGN_OR_RETURN(auto comm, CreateNcclCommunicator(store, rank, world_size, {.device = 0}));
//   DA_RETURN_IF_ERROR(comm->AllGather(d_send, d_recv, bytes, std::chrono::seconds(30)));
//
// One process driving several local GPUs: one communicator per device, rank i on devices[i].
// Use each from its own thread (one thread per device), or drive them all from one thread with
// NcclLocalAllGather / NcclLocalBroadcast (ncclGroupStart/End under the hood).
//
//   DA_ASSIGN_OR_RETURN(auto comms, CreateLocalNcclCommunicators({0, 1, 2, 3}));
//
// Contract of every operation:
// - Buffers are DEVICE pointers on the communicator's device (cudaMalloc'd or managed memory);
//   AllGather's recv holds size() * bytes, rank r's block at offset r * bytes.
// - Each communicator owns one CUDA stream. An operation enqueues on it and returns only when the
//   transfer has completed (the data can be read on any stream), failed, or timed out. Work the
//   caller enqueued on other streams is NOT ordered before it: synchronise first.
// - Timeout: past it the communicator is aborted (ncclCommAbort) and the call returns
//   DEADLINE_EXCEEDED naming the operation and the timeout. An error NCCL reports asynchronously
//   (a lost peer, a network failure) aborts it too and returns UNAVAILABLE. After an abort every
//   call returns UNAVAILABLE quoting the first failure: build a new communicator (the group must
//   re-form). Abort(why) from another thread ends the call in flight the same way at its next
//   poll, with ncclCommAbort on the calling thread.
// - Bad arguments (negative bytes, a rank out of range, peer == rank) return INVALID_ARGUMENT.
// - Send/Recv: NCCL has no tags. Messages between one pair of ranks match in the order they were
//   issued; that order is the contract, and `tag` is only checked to be >= 0. A Send blocks until
//   the peer posts the matching Recv, so two ranks must not both Send to each other first.
// - Thread safety: one communicator is used by one thread at a time; different communicators
//   (one per device) may be used concurrently from different threads.
// - counters(): bytes this rank moved as if point to point, independent of NCCL's algorithm
//   (AllGather: (size-1)*bytes sent and received; Broadcast: the root sends (size-1)*bytes, the
//   others receive bytes; Send/Recv: bytes), one operation per call that reached NCCL (argument
//   errors are not counted), and the wall time of those calls.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/dist/communicator.h"
#include "engine/dist/staged_plane.h"
#include "engine/dist/store.h"

namespace da::dist {

struct NcclOptions {
  // The CUDA device this rank uses.
  int device = 0;
  // Store key of the id is key_prefix + "/nccl_id"; use a fresh prefix per group generation.
  std::string key_prefix = "da";
  // Bound on waiting for the id in the store and on ncclCommInitRank's rendezvous.
  std::chrono::milliseconds init_timeout{60000};
};

// Number of CUDA devices this process sees; 0 when there is no driver or no device.
int CudaDeviceCount();

// The multi-process communicator of `rank` in a group of `world_size`, rendezvous through `store`.
// Errors: INVALID_ARGUMENT (rank, size or device out of range), DEADLINE_EXCEEDED (id not in
// the store or peers not joined within init_timeout), INTERNAL (a CUDA or NCCL call failed).
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(KeyValueStore& store, int rank,
                                                                     int world_size,
                                                                     const NcclOptions& options);

// One communicator per entry of `devices` (distinct device ids), rank i on devices[i], all in this
// process. Errors as CreateNcclCommunicator.
absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateLocalNcclCommunicators(
    const std::vector<int>& devices,
    std::chrono::milliseconds init_timeout = std::chrono::milliseconds(60000));

// One AllGather over all `comms` (from CreateLocalNcclCommunicators, in rank order) issued from the
// calling thread in one NCCL group; send[i] / recv[i] are buffers on comms[i]'s device.
absl::Status NcclLocalAllGather(const std::vector<Communicator*>& comms,
                                const std::vector<const void*>& send,
                                const std::vector<void*>& recv, int64_t bytes,
                                std::chrono::milliseconds timeout);

// One Broadcast from rank `root` over all `comms`, issued from the calling thread in one group.
absl::Status NcclLocalBroadcast(const std::vector<Communicator*>& comms,
                                const std::vector<void*>& data, int64_t bytes, int root,
                                std::chrono::milliseconds timeout);

// Staging buffers on CUDA device `device` for MakeStagedPlane (staged_plane.h): a multi-process
// NCCL communicator fed from host shares. Copies are synchronous (cudaMemcpy); errors are
// INTERNAL naming the call.
std::unique_ptr<PlaneStaging> MakeCudaStaging(int device);

}  // namespace da::dist
