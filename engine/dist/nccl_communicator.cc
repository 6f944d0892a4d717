#include "engine/dist/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

using Clock = std::chrono::steady_clock;

// How long the wait loops sleep between polls: short against any collective worth timing out,
// long enough that a waiting thread does not take a core from the kernels' host threads.
constexpr auto kPollInterval = std::chrono::microseconds(50);

absl::Status CudaStatus(cudaError_t error, absl::string_view call) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(call, " failed: ", cudaGetErrorName(error), ": ", cudaGetErrorString(error)));
}

// ncclInProgress is not an error: nonblocking communicators return it while work is pending.
absl::Status NcclStatus(ncclResult_t result, absl::string_view call, ncclComm_t comm = nullptr) {
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

  // Pieces of an operation, also used by the grouped local operations.
  absl::Status Prepare(absl::string_view op) const;
  absl::Status Enqueue(absl::string_view op, ncclResult_t result);
  absl::Status Complete(absl::string_view op, Clock::time_point deadline,
                        std::chrono::milliseconds timeout);
  void Record(absl::Status status, Clock::time_point start, int64_t sent, int64_t received);

  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }

 private:
  // Runs `launch` (one NCCL call on comm_ and stream_) and waits for it within `timeout`.
  template <typename Launch>
  absl::Status Run(absl::string_view op, std::chrono::milliseconds timeout, int64_t sent,
                   int64_t received, Launch launch);
  void Abort();
  std::string Where() const {
    return absl::StrCat("rank ", rank_, " of ", size_, " (CUDA device ", device_, ")");
  }

  ncclComm_t comm_;
  const int rank_;
  const int size_;
  const int device_;
  cudaStream_t stream_ = nullptr;
  float* barrier_word_ = nullptr;  // Device memory all-reduced by Barrier.
  mutable std::mutex counters_mutex_;
  Counters counters_;
};

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

void NcclCommunicator::Abort() {
  if (comm_ == nullptr) return;
  ncclCommAbort(comm_);
  comm_ = nullptr;
}

absl::Status NcclCommunicator::Prepare(absl::string_view op) const {
  if (comm_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "NCCL ", op, " on ", Where(), ": the communicator was aborted by an earlier failure"));
  }
  return CudaStatus(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")"));
}

absl::Status NcclCommunicator::Enqueue(absl::string_view op, ncclResult_t result) {
  absl::Status status = NcclStatus(result, absl::StrCat("nccl", op, " on ", Where()), comm_);
  if (!status.ok()) Abort();
  return status;
}

absl::Status NcclCommunicator::Complete(absl::string_view op, Clock::time_point deadline,
                                        std::chrono::milliseconds timeout) {
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
    if (result != ncclSuccess) state = result;
    if (state != ncclSuccess && state != ncclInProgress) {
      std::string message =
          absl::StrCat("NCCL ", op, " on ", Where(), " failed: ", ncclGetErrorString(state), " (",
                       ncclGetLastError(comm_), "); a peer is probably lost; communicator aborted");
      Abort();
      return absl::UnavailableError(message);
    }
    // While the communicator is still in progress the kernel may not be on the stream yet, so an
    // idle stream means nothing.
    if (state == ncclSuccess) {
      cudaError_t query = cudaStreamQuery(stream_);
      if (query == cudaSuccess) return absl::OkStatus();
      if (query != cudaErrorNotReady) {
        Abort();
        return CudaStatus(query, absl::StrCat("cudaStreamQuery after NCCL ", op, " on ", Where()));
      }
    }
    if (Clock::now() >= deadline) {
      Abort();
      return absl::DeadlineExceededError(absl::StrCat("NCCL ", op, " on ", Where(),
                                                      " did not complete within ", Millis(timeout),
                                                      "; communicator aborted"));
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

absl::Status CheckBytes(absl::string_view op, int64_t bytes) {
  if (bytes >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("NCCL ", op, ": bytes must be >= 0, got ", bytes));
}

absl::Status CheckRank(absl::string_view op, absl::string_view what, int value, int size) {
  if (value >= 0 && value < size) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("NCCL ", op, ": ", what, " ", value, " is out of range [0, ", size, ")"));
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
absl::StatusOr<std::vector<NcclCommunicator*>> LocalGroup(absl::string_view op,
                                                          const std::vector<Communicator*>& comms,
                                                          size_t buffers) {
  std::vector<NcclCommunicator*> group;
  for (size_t i = 0; i < comms.size(); ++i) {
    auto* comm = dynamic_cast<NcclCommunicator*>(comms[i]);
    if (comm == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("NCCL local ", op, ": communicator ", i, " is not an NCCL communicator"));
    }
    if (comm->rank() != static_cast<int>(i) || comm->size() != static_cast<int>(comms.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "NCCL local ", op, ": communicator ", i, " is rank ", comm->rank(), " of ", comm->size(),
          "; pass all ", comm->size(), " communicators of the group in rank order"));
    }
    DA_RETURN_IF_ERROR(comm->Prepare(op));
    group.push_back(comm);
  }
  if (group.empty() || buffers != group.size()) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL local ", op, ": ", group.size(),
                                                   " communicators but ", buffers, " buffers"));
  }
  return group;
}

// Issues launch(i) for every communicator inside one ncclGroupStart/End, then waits for all.
template <typename Launch>
absl::Status RunGrouped(absl::string_view op, const std::vector<NcclCommunicator*>& group,
                        std::chrono::milliseconds timeout,
                        const std::vector<std::pair<int64_t, int64_t>>& moved, Launch launch) {
  const Clock::time_point start = Clock::now();
  absl::Status status = NcclStatus(ncclGroupStart(), "ncclGroupStart");
  for (size_t i = 0; status.ok() && i < group.size(); ++i) {
    status = CudaStatus(cudaSetDevice(group[i]->device()), "cudaSetDevice");
    if (status.ok()) status = group[i]->Enqueue(op, launch(i));
  }
  // A group that was started must be ended, whatever failed inside it.
  absl::Status end = NcclStatus(ncclGroupEnd(), absl::StrCat("ncclGroupEnd of local ", op));
  if (status.ok()) status = end;
  for (size_t i = 0; i < group.size(); ++i) {
    absl::Status done = status;
    if (done.ok()) done = group[i]->Prepare(op);
    if (done.ok()) done = group[i]->Complete(op, start + timeout, timeout);
    group[i]->Record(done, start, moved[i].first, moved[i].second);
    if (status.ok()) status = done;
  }
  return status;
}

}  // namespace

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

absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateLocalNcclCommunicators(
    const std::vector<int>& devices, std::chrono::milliseconds init_timeout) {
  if (devices.empty()) return absl::InvalidArgumentError("NCCL local group: no devices given");
  std::set<int> distinct;
  for (int device : devices) {
    DA_RETURN_IF_ERROR(CheckDevice(device));
    if (!distinct.insert(device).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("NCCL local group: CUDA device ", device, " is listed twice"));
    }
  }
  const Clock::time_point deadline = Clock::now() + init_timeout;
  const int size = static_cast<int>(devices.size());

  // What ncclCommInitAll does, with a nonblocking config so that no later call can hang.
  ncclUniqueId id;
  DA_RETURN_IF_ERROR(NcclStatus(ncclGetUniqueId(&id), "ncclGetUniqueId"));
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  ncclConfig_t config = NonblockingConfig();
  absl::Status status = NcclStatus(ncclGroupStart(), "ncclGroupStart");
  for (int i = 0; status.ok() && i < size; ++i) {
    status = CudaStatus(cudaSetDevice(devices[i]), "cudaSetDevice");
    if (status.ok()) {
      status = NcclStatus(ncclCommInitRankConfig(&comms[i], size, id, i, &config),
                          absl::StrCat("ncclCommInitRankConfig of local rank ", i));
    }
  }
  absl::Status end = NcclStatus(ncclGroupEnd(), "ncclGroupEnd of the local init");
  if (status.ok()) status = end;
  for (int i = 0; status.ok() && i < size; ++i) {
    ncclResult_t state = WaitWhileInProgress(comms[i], deadline);
    if (state == ncclInProgress) {
      status = absl::DeadlineExceededError(absl::StrCat("NCCL init of local rank ", i, " of ", size,
                                                        " did not complete within ",
                                                        Millis(init_timeout)));
    } else {
      status = NcclStatus(state, absl::StrCat("NCCL init of local rank ", i), comms[i]);
    }
  }
  if (!status.ok()) {
    for (ncclComm_t comm : comms) {
      if (comm != nullptr) ncclCommAbort(comm);
    }
    return status;
  }

  std::vector<std::unique_ptr<Communicator>> result;
  for (int i = 0; i < size; ++i) {
    auto wrapped = Wrap(comms[i], i, size, devices[i]);
    if (!wrapped.ok()) {
      // The failed one freed its own communicator; the ones not yet wrapped need aborting.
      for (int j = i + 1; j < size; ++j) ncclCommAbort(comms[j]);
      return wrapped.status();
    }
    result.push_back(std::move(wrapped).value());
  }
  return result;
}

absl::Status NcclLocalAllGather(const std::vector<Communicator*>& comms,
                                const std::vector<const void*>& send,
                                const std::vector<void*>& recv, int64_t bytes,
                                std::chrono::milliseconds timeout) {
  DA_RETURN_IF_ERROR(CheckBytes("local AllGather", bytes));
  if (send.size() != recv.size()) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL local AllGather: ", send.size(),
                                                   " send buffers but ", recv.size(), " recv"));
  }
  DA_ASSIGN_OR_RETURN(auto group, LocalGroup("AllGather", comms, send.size()));
  const int64_t moved = bytes * (static_cast<int64_t>(group.size()) - 1);
  std::vector<std::pair<int64_t, int64_t>> counted(group.size(), {moved, moved});
  return RunGrouped("AllGather", group, timeout, counted, [&](size_t i) {
    return ncclAllGather(send[i], recv[i], static_cast<size_t>(bytes), ncclUint8, group[i]->comm(),
                         group[i]->stream());
  });
}

absl::Status NcclLocalBroadcast(const std::vector<Communicator*>& comms,
                                const std::vector<void*>& data, int64_t bytes, int root,
                                std::chrono::milliseconds timeout) {
  DA_RETURN_IF_ERROR(CheckBytes("local Broadcast", bytes));
  DA_ASSIGN_OR_RETURN(auto group, LocalGroup("Broadcast", comms, data.size()));
  DA_RETURN_IF_ERROR(CheckRank("local Broadcast", "root", root, static_cast<int>(group.size())));
  std::vector<std::pair<int64_t, int64_t>> counted(group.size(), {0, bytes});
  counted[root] = {bytes * (static_cast<int64_t>(group.size()) - 1), 0};
  return RunGrouped("Broadcast", group, timeout, counted, [&](size_t i) {
    return ncclBroadcast(data[i], data[i], static_cast<size_t>(bytes), ncclUint8, root,
                         group[i]->comm(), group[i]->stream());
  });
}

}  // namespace da::dist
