#include "engine/dist/data_plane.h"

#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/staged_plane.h"
#include "engine/status_macros.h"

#if DA_HAVE_NCCL
#include "engine/dist/nccl_communicator.h"
#endif

namespace da::dist {
namespace {

using std::chrono::milliseconds;

// A communicator held to NCCL's terms: it says it takes one thread at a time and no tags, and
// keeps to that: every message goes on one tag (messages between two ranks match in issue order,
// as NCCL's do), and a call made while another is in progress is refused (FAILED_PRECONDITION).
class NcclTerms final : public Communicator {
 public:
  explicit NcclTerms(std::unique_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend() + " held to nccl's terms"; }
  Capabilities capabilities() const override { return {}; }
  absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                         milliseconds timeout) override {
    return OneAtATime([&] { return inner_->AllGather(send, recv, bytes, timeout); });
  }
  absl::Status Broadcast(void* data, int64_t bytes, int root, milliseconds timeout) override {
    return OneAtATime([&] { return inner_->Broadcast(data, bytes, root, timeout); });
  }
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    if (tag < 0) return absl::InvalidArgumentError(absl::StrCat("tag is ", tag, "; must be >= 0"));
    return OneAtATime([&] { return inner_->Send(data, bytes, peer, 0, timeout); });
  }
  absl::Status Recv(void* data, int64_t bytes, int peer, int tag, milliseconds timeout) override {
    if (tag < 0) return absl::InvalidArgumentError(absl::StrCat("tag is ", tag, "; must be >= 0"));
    return OneAtATime([&] { return inner_->Recv(data, bytes, peer, 0, timeout); });
  }
  absl::Status Barrier(milliseconds timeout) override {
    return OneAtATime([&] { return inner_->Barrier(timeout); });
  }
  Counters counters() const override { return inner_->counters(); }
  void Abort(const std::string& why) override { inner_->Abort(why); }

 private:
  template <typename Call>
  absl::Status OneAtATime(Call&& call) {
    if (busy_.exchange(true)) {
      return absl::FailedPreconditionError(
          "a call on the data plane while another is in progress: it takes one thread at a time");
    }
    absl::Status status = call();
    busy_ = false;
    return status;
  }
  std::unique_ptr<Communicator> inner_;
  std::atomic<bool> busy_{false};
};

}  // namespace

std::unique_ptr<Communicator> HoldToNcclTerms(std::unique_ptr<Communicator> inner) {
  return std::make_unique<NcclTerms>(std::move(inner));
}

absl::StatusOr<DataPlaneKind> ParseDataPlane(absl::string_view name) {
  for (DataPlaneKind kind :
       {DataPlaneKind::kNone, DataPlaneKind::kNccl, DataPlaneKind::kGlooStaged}) {
    if (name == DataPlaneName(kind)) return kind;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("data plane is '", name, "'; must be none, nccl or gloo-staged"));
}

std::string DataPlaneName(DataPlaneKind kind) {
  switch (kind) {
    case DataPlaneKind::kNone:
      return "none";
    case DataPlaneKind::kNccl:
      return "nccl";
    case DataPlaneKind::kGlooStaged:
      return "gloo-staged";
  }
  return "unknown";
}

absl::Status CheckDataPlane(DataPlaneKind kind, int device) {
  if (kind != DataPlaneKind::kNccl) return absl::OkStatus();
#if DA_HAVE_NCCL
  const int devices = CudaDeviceCount();
  if (device < 0 || device >= devices) {
    return absl::FailedPreconditionError(absl::StrCat("the nccl data plane needs CUDA device ",
                                                      device, "; this process sees ", devices,
                                                      devices == 1 ? " device" : " devices"));
  }
  return absl::OkStatus();
#else
  (void)device;
  return absl::FailedPreconditionError(
      "the nccl data plane needs a build with CUDA and NCCL; this da-server has neither");
#endif
}

absl::StatusOr<std::unique_ptr<Communicator>> FormDataPlane(DataPlaneKind kind,
                                                            KeyValueStore& store, int rank,
                                                            int size, const std::string& prefix,
                                                            const DataPlaneOptions& options) {
  switch (kind) {
    case DataPlaneKind::kNone:
      return std::unique_ptr<Communicator>();
    case DataPlaneKind::kGlooStaged: {
      GlooOptions gloo{.rank = rank,
                       .size = size,
                       .interface_address = options.interface_address,
                       .prefix = prefix + "/gloo",
                       .timeout = options.timeout};
      DA_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> inner, MakeGlooCommunicator(store, gloo));
      std::unique_ptr<PlaneStaging> staging = MakeHostStaging();
      DA_RETURN_IF_ERROR(ReservePlaneStaging(*staging, options.chunk_bytes));
      return MakeStagedPlane(HoldToNcclTerms(std::move(inner)), std::move(staging),
                             options.chunk_bytes);
    }
    case DataPlaneKind::kNccl: {
#if DA_HAVE_NCCL
      DA_RETURN_IF_ERROR(CheckDataPlane(kind, options.device));
      NcclOptions nccl{.device = options.device,
                       .key_prefix = prefix + "/nccl",
                       .init_timeout = options.timeout};
      DA_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> inner,
                          CreateNcclCommunicator(store, rank, size, nccl));
      std::unique_ptr<PlaneStaging> staging = MakeCudaStaging(options.device);
      DA_RETURN_IF_ERROR(ReservePlaneStaging(*staging, options.chunk_bytes));
      return MakeStagedPlane(std::move(inner), std::move(staging), options.chunk_bytes);
#else
      return CheckDataPlane(kind, options.device);
#endif
    }
  }
  return absl::InvalidArgumentError("unknown data plane");
}

}  // namespace da::dist
