// PlaneStaging in CUDA device memory (nccl_communicator.h: MakeCudaStaging).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/dist/nccl_communicator.h"
#include "engine/dist/nccl_internal.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

using nccl_internal::CudaStatus;

class CudaStaging final : public PlaneStaging {
 public:
  explicit CudaStaging(int device) : device_(device) {}
  ~CudaStaging() override {
    cudaSetDevice(device_);
    for (Block& block : blocks_) cudaFree(block.data);
  }

  std::string name() const override { return absl::StrCat("cuda:", device_); }

  absl::StatusOr<void*> Buffer(int slot, int64_t bytes) override {
    Block& block = blocks_[slot == kOutgoing ? 0 : 1];
    if (block.bytes >= bytes && block.data != nullptr) return block.data;
    DA_RETURN_IF_ERROR(SetDevice());
    cudaFree(block.data);
    block = {};
    const int64_t want = std::max<int64_t>(bytes, 1);
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaMalloc(&block.data, want),
                   absl::StrCat("cudaMalloc(", want, ") for the data plane's staging")));
    block.bytes = want;
    return block.data;
  }

  absl::Status ToDevice(void* device, const void* host, int64_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    DA_RETURN_IF_ERROR(SetDevice());
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice),
                   absl::StrCat("cudaMemcpy of ", bytes, " bytes to the data plane's staging")));
    // From pageable memory cudaMemcpy may return before its DMA has landed (CUDA's API
    // synchronisation notes), and NCCL reads the buffer next on its own non-blocking stream,
    // which does not wait for the legacy stream: wait for the copy here.
    return CudaStatus(cudaStreamSynchronize(cudaStreamLegacy),
                      "waiting for the copy to the data plane's staging");
  }

  absl::Status ToHost(void* host, const void* device, int64_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    DA_RETURN_IF_ERROR(SetDevice());
    return CudaStatus(
        cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost),
        absl::StrCat("cudaMemcpy of ", bytes, " bytes from the data plane's staging"));
  }

 private:
  struct Block {
    void* data = nullptr;
    int64_t bytes = 0;
  };
  absl::Status SetDevice() {
    return CudaStatus(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")"));
  }

  const int device_;
  Block blocks_[2];
};

}  // namespace

std::unique_ptr<PlaneStaging> MakeCudaStaging(int device) {
  return std::make_unique<CudaStaging>(device);
}

}  // namespace da::dist
