#include "engine/dist/nccl_communicator.h"

#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/dist/nccl_internal.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace nccl_internal {
namespace {

// How long the wait loops sleep between polls: short against any collective worth timing out,
// long enough that a waiting thread does not take a core from the kernels' host threads.
constexpr auto kPollInterval = std::chrono::microseconds(50);

}  // namespace

absl::Status CudaStatus(cudaError_t error, absl::string_view call) {
  if (error == cudaSuccess) return absl::OkStatus();
  // The failure is reported here: not again to the thread's next unrelated check.
  (void)cudaGetLastError();
  return absl::InternalError(
      absl::StrCat(call, " failed: ", cudaGetErrorName(error), ": ", cudaGetErrorString(error)));
}

// ncclInProgress is not an error: nonblocking communicators return it while work is pending.
absl::Status NcclStatus(ncclResult_t result, absl::string_view call, ncclComm_t comm) {
  if (result == ncclSuccess || result == ncclInProgress) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(call, " failed: ", ncclGetErrorString(result), " (",
                                          ncclGetLastError(comm), ")"));
}

// Nonblocking communicators let every call, init included, return before its work is done, so
// that no call can hang past the caller's timeout (a blocking ncclCommInitRank or the first
// ncclSend to a peer waits for that peer without bound).
ncclConfig_t NonblockingConfig() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// Waits until `comm` has left the ncclInProgress state (init, or an enqueue that is connecting).
// Returns the communicator's state, or ncclInProgress when the deadline passed first.
ncclResult_t WaitWhileInProgress(ncclComm_t comm, Clock::time_point deadline) {
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t result = ncclCommGetAsyncError(comm, &state);
    if (result != ncclSuccess) return result;
    if (state != ncclInProgress) return state;
    if (Clock::now() >= deadline) return ncclInProgress;
    std::this_thread::sleep_for(kPollInterval);
  }
}

std::string Millis(std::chrono::milliseconds timeout) {
  return absl::StrCat(timeout.count(), " ms");
}

absl::Status CheckBytes(absl::string_view op, int64_t bytes) {
  if (bytes >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("NCCL ", op, ": bytes must be >= 0, got ", bytes));
}

absl::Status CheckRank(absl::string_view op, absl::string_view what, int value, int size) {
  if (value >= 0 && value < size) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("NCCL ", op, ": ", what, " ", value, " is out of range [0, ", size, ")"));
}

absl::StatusOr<std::unique_ptr<Communicator>> Wrap(ncclComm_t comm, int rank, int size,
                                                   int device) {
  auto communicator = std::make_unique<NcclCommunicator>(comm, rank, size, device);
  DA_RETURN_IF_ERROR(communicator->Init());
  return communicator;
}

absl::Status CheckDevice(int device) {
  const int count = CudaDeviceCount();
  if (device >= 0 && device < count) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "NCCL: CUDA device ", device, " is out of range: this process sees ", count, " device(s)"));
}

// Grouped local operations: all communicators of one process, from one thread.

NcclCommunicator::~NcclCommunicator() {
  cudaSetDevice(device_);
  // Every operation completed (or aborted) before it returned, so there is nothing left to flush:
  // abort only frees. ncclCommDestroy would finalize first, which for the communicators of one
  // process must be grouped across them and may wait on peers that are gone.
  if (comm_ != nullptr) ncclCommAbort(comm_);
  if (barrier_word_ != nullptr) cudaFree(barrier_word_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status NcclCommunicator::Init() {
  DA_RETURN_IF_ERROR(
      CudaStatus(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")")));
  DA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                "cudaStreamCreateWithFlags"));
  DA_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&barrier_word_, sizeof(float)), "cudaMalloc(4 bytes)"));
  return CudaStatus(cudaMemset(barrier_word_, 0, sizeof(float)), "cudaMemset");
}

absl::Status NcclCommunicator::Abort(absl::Status why) {
  if (first_failure_.ok()) first_failure_ = why;
  if (comm_ != nullptr) ncclCommAbort(comm_);
  comm_ = nullptr;
  return why;
}

void NcclCommunicator::Abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    if (!requested_why_.has_value()) requested_why_ = why;
  }
  abort_requested_.store(true);
}

absl::Status NcclCommunicator::TakeRequestedAbort(absl::string_view op) {
  if (!abort_requested_.load() || comm_ == nullptr) return absl::OkStatus();
  std::string why;
  {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    why = requested_why_.value_or("aborted");
  }
  return Abort(absl::UnavailableError(
      absl::StrCat("NCCL ", op, " on ", Where(), " ended: ", why, "; communicator aborted")));
}

absl::Status NcclCommunicator::Prepare(absl::string_view op) {
  (void)TakeRequestedAbort(op);  // Then refused below, quoting it.
  if (comm_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("NCCL ", op, " on ", Where(),
                                               " refused: the communicator was aborted after an "
                                               "earlier failure (",
                                               first_failure_.message(), ")"));
  }
  return CudaStatus(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")"));
}

absl::Status NcclCommunicator::Enqueue(absl::string_view op, ncclResult_t result, bool in_group) {
  absl::Status status = NcclStatus(result, absl::StrCat("nccl", op, " on ", Where()), comm_);
  if (!status.ok() && !in_group) return Abort(status);
  return status;
}

absl::Status NcclCommunicator::Complete(absl::string_view op, Clock::time_point deadline,
                                        std::chrono::milliseconds timeout) {
  while (true) {
    DA_RETURN_IF_ERROR(TakeRequestedAbort(op));
    ncclResult_t state = ncclSuccess;
    ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
    if (result != ncclSuccess) state = result;
    if (state != ncclSuccess && state != ncclInProgress) {
      std::string message =
          absl::StrCat("NCCL ", op, " on ", Where(), " failed: ", ncclGetErrorString(state), " (",
                       ncclGetLastError(comm_), "); a peer is probably lost; communicator aborted");
      return Abort(absl::UnavailableError(message));
    }
    // While the communicator is still in progress the kernel may not be on the stream yet, so an
    // idle stream means nothing.
    if (state == ncclSuccess) {
      cudaError_t query = cudaStreamQuery(stream_);
      if (query == cudaSuccess) return absl::OkStatus();
      if (query != cudaErrorNotReady) {
        return Abort(
            CudaStatus(query, absl::StrCat("cudaStreamQuery after NCCL ", op, " on ", Where())));
      }
      // Not ready is no error, but the runtime may keep it as the thread's last one, where a
      // later launch's check on this thread would find it.
      (void)cudaGetLastError();
    }
    if (Clock::now() >= deadline) {
      return Abort(absl::DeadlineExceededError(
          absl::StrCat("NCCL ", op, " on ", Where(), " did not complete within ", Millis(timeout),
                       "; communicator aborted")));
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

void NcclCommunicator::Record(absl::Status status, Clock::time_point start, int64_t sent,
                              int64_t received) {
  std::lock_guard<std::mutex> lock(counters_mutex_);
  ++counters_.operations;
  counters_.seconds += std::chrono::duration<double>(Clock::now() - start).count();
  if (status.ok()) {
    counters_.bytes_sent += sent;
    counters_.bytes_received += received;
  }
}

Communicator::Counters NcclCommunicator::counters() const {
  std::lock_guard<std::mutex> lock(counters_mutex_);
  return counters_;
}

template <typename Launch>
absl::Status NcclCommunicator::Run(absl::string_view op, std::chrono::milliseconds timeout,
                                   int64_t sent, int64_t received, Launch launch) {
  const Clock::time_point start = Clock::now();
  absl::Status status = Prepare(op);
  if (status.ok()) status = Enqueue(op, launch());
  if (status.ok()) status = Complete(op, start + timeout, timeout);
  Record(status, start, sent, received);
  return status;
}

absl::Status NcclCommunicator::AllGather(const void* send, void* recv, int64_t bytes,
                                         std::chrono::milliseconds timeout) {
  DA_RETURN_IF_ERROR(CheckBytes("AllGather", bytes));
  const int64_t moved = bytes * (size_ - 1);
  return Run("AllGather", timeout, moved, moved, [&] {
    return ncclAllGather(send, recv, static_cast<size_t>(bytes), ncclUint8, comm_, stream_);
  });
}

absl::Status NcclCommunicator::Broadcast(void* data, int64_t bytes, int root,
                                         std::chrono::milliseconds timeout) {
  DA_RETURN_IF_ERROR(CheckBytes("Broadcast", bytes));
  DA_RETURN_IF_ERROR(CheckRank("Broadcast", "root", root, size_));
  const int64_t sent = rank_ == root ? bytes * (size_ - 1) : 0;
  const int64_t received = rank_ == root ? 0 : bytes;
  return Run("Broadcast", timeout, sent, received, [&] {
    return ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_);
  });
}

namespace {

absl::Status CheckPeer(absl::string_view op, int peer, int tag, int rank, int size) {
  DA_RETURN_IF_ERROR(CheckRank(op, "peer", peer, size));
  if (peer == rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL ", op, ": peer ", peer, " is this rank; copy locally instead"));
  }
  if (tag < 0) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL ", op, ": tag must be >= 0, got ", tag));
  }
  return absl::OkStatus();
}

}  // namespace

// NCCL has no tags: messages between two ranks match in issue order (see the header).
absl::Status NcclCommunicator::Send(const void* data, int64_t bytes, int peer, int tag,
                                    std::chrono::milliseconds timeout) {
  DA_RETURN_IF_ERROR(CheckBytes("Send", bytes));
  DA_RETURN_IF_ERROR(CheckPeer("Send", peer, tag, rank_, size_));
  return Run("Send", timeout, bytes, 0, [&] {
    return ncclSend(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, stream_);
  });
}

absl::Status NcclCommunicator::Recv(void* data, int64_t bytes, int peer, int tag,
                                    std::chrono::milliseconds timeout) {
  DA_RETURN_IF_ERROR(CheckBytes("Recv", bytes));
  DA_RETURN_IF_ERROR(CheckPeer("Recv", peer, tag, rank_, size_));
  return Run("Recv", timeout, 0, bytes, [&] {
    return ncclRecv(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, stream_);
  });
}

// NCCL has no barrier: an all-reduce of one word completes only once every rank has joined it.
absl::Status NcclCommunicator::Barrier(std::chrono::milliseconds timeout) {
  return Run("Barrier", timeout, 0, 0, [&] {
    return ncclAllReduce(barrier_word_, barrier_word_, 1, ncclFloat32, ncclSum, comm_, stream_);
  });
}

}  // namespace nccl_internal

using nccl_internal::CheckDevice;
using nccl_internal::CheckRank;
using nccl_internal::Clock;
using nccl_internal::CudaStatus;
using nccl_internal::Millis;
using nccl_internal::NcclStatus;
using nccl_internal::NonblockingConfig;
using nccl_internal::WaitWhileInProgress;
using nccl_internal::Wrap;

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // Clears the sticky "no driver" / "no device" error.
    return 0;
  }
  return count;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(KeyValueStore& store, int rank,
                                                                     int world_size,
                                                                     const NcclOptions& options) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL: world size must be >= 1, got ", world_size));
  }
  DA_RETURN_IF_ERROR(CheckRank("init", "rank", rank, world_size));
  DA_RETURN_IF_ERROR(CheckDevice(options.device));
  const Clock::time_point deadline = Clock::now() + options.init_timeout;
  const std::string key = options.key_prefix + "/nccl_id";

  ncclUniqueId id;
  if (rank == 0) {
    DA_RETURN_IF_ERROR(NcclStatus(ncclGetUniqueId(&id), "ncclGetUniqueId"));
    DA_RETURN_IF_ERROR(store.Set(key, std::string(id.internal, sizeof(id.internal))));
  } else {
    absl::StatusOr<std::string> value = store.Get(key, options.init_timeout);
    if (!value.ok()) {
      return absl::Status(
          value.status().code(),
          absl::StrCat("NCCL init of rank ", rank, ": reading the id from store key '", key,
                       "': ", value.status().message()));
    }
    if (value->size() != sizeof(id.internal)) {
      return absl::InvalidArgumentError(
          absl::StrCat("NCCL init of rank ", rank, ": store key '", key, "' holds ", value->size(),
                       " bytes, an ncclUniqueId has ", sizeof(id.internal)));
    }
    std::memcpy(id.internal, value->data(), sizeof(id.internal));
  }

  DA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device),
                                absl::StrCat("cudaSetDevice(", options.device, ")")));
  ncclConfig_t config = NonblockingConfig();
  ncclComm_t comm = nullptr;
  ncclResult_t result = ncclCommInitRankConfig(&comm, world_size, id, rank, &config);
  if (result == ncclSuccess || result == ncclInProgress)
    result = WaitWhileInProgress(comm, deadline);
  if (result != ncclSuccess) {
    if (comm != nullptr) ncclCommAbort(comm);
    if (result == ncclInProgress) {
      return absl::DeadlineExceededError(absl::StrCat(
          "NCCL init of rank ", rank, " of ", world_size, " did not complete within ",
          Millis(options.init_timeout), " (have all ranks started with the same id?)"));
    }
    return NcclStatus(result,
                      absl::StrCat("ncclCommInitRankConfig of rank ", rank, " of ", world_size));
  }
  return Wrap(comm, rank, world_size, options.device);
}

}  // namespace da::dist
