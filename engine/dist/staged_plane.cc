#include "engine/dist/staged_plane.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

class HostStaging final : public PlaneStaging {
 public:
  std::string name() const override { return "host"; }
  absl::StatusOr<void*> Buffer(int slot, int64_t bytes) override {
    std::vector<uint8_t>& buffer = buffers_[slot == kOutgoing ? 0 : 1];
    if (static_cast<int64_t>(buffer.size()) < bytes) buffer.resize(bytes);
    return buffer.data();
  }
  absl::Status ToDevice(void* device, const void* host, int64_t bytes) override {
    if (bytes > 0) std::memcpy(device, host, bytes);
    return absl::OkStatus();
  }
  absl::Status ToHost(void* host, const void* device, int64_t bytes) override {
    if (bytes > 0) std::memcpy(host, device, bytes);
    return absl::OkStatus();
  }

 private:
  std::vector<uint8_t> buffers_[2];
};

class StagedPlane final : public Communicator {
 public:
  StagedPlane(std::unique_ptr<Communicator> inner, std::unique_ptr<PlaneStaging> staging,
              int64_t chunk_bytes)
      : inner_(std::move(inner)),
        staging_(std::move(staging)),
        chunk_(std::max<int64_t>(1, chunk_bytes)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override {
    return absl::StrCat(inner_->backend(), " via ", staging_->name());
  }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  Counters counters() const override { return inner_->counters(); }
  void Abort(const std::string& why) override { inner_->Abort(why); }
  absl::Status Barrier(std::chrono::milliseconds timeout) override {
    return inner_->Barrier(timeout);
  }

  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    std::chrono::milliseconds timeout) override {
    if (bytes < 0) return Negative("Send", bytes);
    const auto* host = static_cast<const uint8_t*>(data);
    DA_ASSIGN_OR_RETURN(void* device, staging_->Buffer(PlaneStaging::kOutgoing, chunk_));
    return ForEachChunk(bytes, [&](int64_t done, int64_t n) -> absl::Status {
      DA_RETURN_IF_ERROR(staging_->ToDevice(device, host + done, n));
      return inner_->Send(device, n, peer, tag, timeout);
    });
  }

  absl::Status Recv(void* data, int64_t bytes, int peer, int tag,
                    std::chrono::milliseconds timeout) override {
    if (bytes < 0) return Negative("Recv", bytes);
    auto* host = static_cast<uint8_t*>(data);
    DA_ASSIGN_OR_RETURN(void* device, staging_->Buffer(PlaneStaging::kIncoming, chunk_));
    return ForEachChunk(bytes, [&](int64_t done, int64_t n) -> absl::Status {
      DA_RETURN_IF_ERROR(inner_->Recv(device, n, peer, tag, timeout));
      return staging_->ToHost(host + done, device, n);
    });
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root,
                         std::chrono::milliseconds timeout) override {
    if (bytes < 0) return Negative("Broadcast", bytes);
    auto* host = static_cast<uint8_t*>(data);
    DA_ASSIGN_OR_RETURN(void* device, staging_->Buffer(PlaneStaging::kIncoming, chunk_));
    return ForEachChunk(bytes, [&](int64_t done, int64_t n) -> absl::Status {
      if (rank() == root) DA_RETURN_IF_ERROR(staging_->ToDevice(device, host + done, n));
      DA_RETURN_IF_ERROR(inner_->Broadcast(device, n, root, timeout));
      return rank() == root ? absl::OkStatus() : staging_->ToHost(host + done, device, n);
    });
  }

  // Chunk by chunk of every rank's block: the inner gather of chunk [done, done + n) of each
  // block lands rank-major in the incoming buffer, and each rank's piece goes back to its place.
  absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                         std::chrono::milliseconds timeout) override {
    if (bytes < 0) return Negative("AllGather", bytes);
    const auto* host_send = static_cast<const uint8_t*>(send);
    auto* host_recv = static_cast<uint8_t*>(recv);
    const int64_t most = std::min(bytes, chunk_);
    DA_ASSIGN_OR_RETURN(void* out, staging_->Buffer(PlaneStaging::kOutgoing, most));
    DA_ASSIGN_OR_RETURN(void* in, staging_->Buffer(PlaneStaging::kIncoming, most * size()));
    return ForEachChunk(bytes, [&](int64_t done, int64_t n) -> absl::Status {
      DA_RETURN_IF_ERROR(staging_->ToDevice(out, host_send + done, n));
      DA_RETURN_IF_ERROR(inner_->AllGather(out, in, n, timeout));
      for (int r = 0; r < size(); ++r) {
        DA_RETURN_IF_ERROR(
            staging_->ToHost(host_recv + r * bytes + done, static_cast<uint8_t*>(in) + r * n, n));
      }
      return absl::OkStatus();
    });
  }

 private:
  // step(offset, size) for each chunk of a message of `bytes`, in order, stopping at the first
  // error: one chunk at least (an empty message is still one matched operation on both sides).
  template <typename Step>
  absl::Status ForEachChunk(int64_t bytes, Step&& step) const {
    const int64_t pieces = bytes == 0 ? 1 : (bytes + chunk_ - 1) / chunk_;
    for (int64_t i = 0; i < pieces; ++i) {
      const int64_t done = i * chunk_;
      DA_RETURN_IF_ERROR(step(done, std::min(chunk_, bytes - done)));
    }
    return absl::OkStatus();
  }

  static absl::Status Negative(const char* op, int64_t bytes) {
    return absl::InvalidArgumentError(absl::StrCat(op, " of ", bytes, " bytes"));
  }

  std::unique_ptr<Communicator> inner_;
  std::unique_ptr<PlaneStaging> staging_;
  const int64_t chunk_;
};

}  // namespace

std::unique_ptr<PlaneStaging> MakeHostStaging() { return std::make_unique<HostStaging>(); }

absl::Status ReservePlaneStaging(PlaneStaging& staging, int64_t chunk_bytes) {
  const int64_t chunk = std::max<int64_t>(1, chunk_bytes);
  for (int slot : {PlaneStaging::kOutgoing, PlaneStaging::kIncoming}) {
    DA_RETURN_IF_ERROR(staging.Buffer(slot, chunk).status());
  }
  return absl::OkStatus();
}

std::unique_ptr<Communicator> MakeStagedPlane(std::unique_ptr<Communicator> inner,
                                              std::unique_ptr<PlaneStaging> staging,
                                              int64_t chunk_bytes) {
  return std::make_unique<StagedPlane>(std::move(inner), std::move(staging), chunk_bytes);
}

}  // namespace da::dist
