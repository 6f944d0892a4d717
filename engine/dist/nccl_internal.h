// Internals of the NCCL communicator shared by nccl_communicator.cc (one communicator) and
// nccl_local_group.cc (the communicators of one process). Not a public header: it includes
// nccl.h and the CUDA runtime, which users of engine/dist/nccl_communicator.h never see.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/dist/communicator.h"

namespace da::dist::nccl_internal {

using Clock = std::chrono::steady_clock;

// INTERNAL naming `call`, or OK.
absl::Status CudaStatus(cudaError_t error, absl::string_view call);
// INTERNAL naming `call` and NCCL's last error; ncclInProgress is not an error (nonblocking
// communicators return it while work is pending).
absl::Status NcclStatus(ncclResult_t result, absl::string_view call, ncclComm_t comm = nullptr);
// A config for nonblocking communicators (see nccl_communicator.cc for why).
ncclConfig_t NonblockingConfig();
// Waits until `comm` has left ncclInProgress; returns its state, or ncclInProgress at the deadline.
ncclResult_t WaitWhileInProgress(ncclComm_t comm, Clock::time_point deadline);
std::string Millis(std::chrono::milliseconds timeout);
// INVALID_ARGUMENT naming the operation and the value, or OK.
absl::Status CheckBytes(absl::string_view op, int64_t bytes);
absl::Status CheckRank(absl::string_view op, absl::string_view what, int value, int size);
absl::Status CheckDevice(int device);

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device)
      : comm_(comm), rank_(rank), size_(size), device_(device) {}
  ~NcclCommunicator() override;

  // Creates the stream and the barrier word; called once, right after construction.
  absl::Status Init();

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }
  Capabilities capabilities() const override {
    return {.concurrent_calls = false, .tagged_messages = false};
  }
  int device() const { return device_; }

  absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                         std::chrono::milliseconds timeout) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root,
                         std::chrono::milliseconds timeout) override;
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    std::chrono::milliseconds timeout) override;
  absl::Status Recv(void* data, int64_t bytes, int peer, int tag,
                    std::chrono::milliseconds timeout) override;
  absl::Status Barrier(std::chrono::milliseconds timeout) override;
  Counters counters() const override;
  // From any thread (the Communicator contract): the call in flight aborts the communicator at
  // its next poll (every 50 us) and returns UNAVAILABLE quoting why; with none in flight, the
  // next call does. ncclCommAbort itself always runs on the thread that uses the communicator.
  void Abort(const std::string& why) override;

  // Pieces of an operation, also used by the grouped local operations. Enqueue aborts the
  // communicator when the call failed, unless `in_group` (inside ncclGroupStart/End, where the
  // caller aborts every member once the group has ended).
  absl::Status Prepare(absl::string_view op);
  absl::Status Enqueue(absl::string_view op, ncclResult_t result, bool in_group = false);
  absl::Status Complete(absl::string_view op, Clock::time_point deadline,
                        std::chrono::milliseconds timeout);
  void Record(absl::Status status, Clock::time_point start, int64_t sent, int64_t received);
  // Ends the communicator (its kernels in flight stop) for `why`, which later calls quote as
  // they are refused (UNAVAILABLE, the communicator contract); returns why.
  absl::Status Abort(absl::Status why);

  // An Abort(why) asked for from another thread, carried out on this one: OK when none was.
  absl::Status TakeRequestedAbort(absl::string_view op);

  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }

 private:
  // Runs `launch` (one NCCL call on comm_ and stream_) and waits for it within `timeout`.
  template <typename Launch>
  absl::Status Run(absl::string_view op, std::chrono::milliseconds timeout, int64_t sent,
                   int64_t received, Launch launch);
  std::string Where() const {
    return absl::StrCat("rank ", rank_, " of ", size_, " (CUDA device ", device_, ")");
  }

  ncclComm_t comm_;
  const int rank_;
  const int size_;
  const int device_;
  absl::Status first_failure_;  // What aborted the communicator (OK while it is live).
  cudaStream_t stream_ = nullptr;
  float* barrier_word_ = nullptr;  // Device memory all-reduced by Barrier.
  mutable std::mutex counters_mutex_;
  Counters counters_;
  std::atomic<bool> abort_requested_{false};
  std::mutex abort_mutex_;
  std::optional<std::string> requested_why_;  // Guarded by abort_mutex_.
};

// Takes ownership of an initialised `comm` and gives it its stream and barrier word.
absl::StatusOr<std::unique_ptr<Communicator>> Wrap(ncclComm_t comm, int rank, int size, int device);

}  // namespace da::dist::nccl_internal
