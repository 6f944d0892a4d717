// The communicators of one process, one per local GPU: creation and operations grouped from one
// thread (ncclGroupStart/End).
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/dist/nccl_communicator.h"
#include "engine/dist/nccl_internal.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

using nccl_internal::CheckBytes;
using nccl_internal::CheckDevice;
using nccl_internal::CheckRank;
using nccl_internal::Clock;
using nccl_internal::CudaStatus;
using nccl_internal::Millis;
using nccl_internal::NcclCommunicator;
using nccl_internal::NcclStatus;

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
// When any of it fails, every communicator of the group is aborted: the others' kernels wait for
// the failed one's and would otherwise spin on their streams for ever (within one process NCCL
// reports no error for that), and the next cudaFree would wait for them.
template <typename Launch>
absl::Status RunGrouped(absl::string_view op, const std::vector<NcclCommunicator*>& group,
                        std::chrono::milliseconds timeout,
                        const std::vector<std::pair<int64_t, int64_t>>& moved, Launch launch) {
  const Clock::time_point start = Clock::now();
  absl::Status status = NcclStatus(ncclGroupStart(), "ncclGroupStart");
  for (size_t i = 0; status.ok() && i < group.size(); ++i) {
    status = CudaStatus(cudaSetDevice(group[i]->device()), "cudaSetDevice");
    if (status.ok()) status = group[i]->Enqueue(op, launch(i), /*in_group=*/true);
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
  if (!status.ok()) {
    for (NcclCommunicator* comm : group) {
      cudaSetDevice(comm->device());
      comm->Abort(status).IgnoreError();  // The group's failure, returned below.
    }
  }
  return status;
}

}  // namespace

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
  ncclConfig_t config = nccl_internal::NonblockingConfig();
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
    ncclResult_t state = nccl_internal::WaitWhileInProgress(comms[i], deadline);
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
    auto wrapped = nccl_internal::Wrap(comms[i], i, size, devices[i]);
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
