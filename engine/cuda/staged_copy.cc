#include "engine/cuda/staged_copy.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace da::engine::cuda {

StagedCopier::StagedCopier(std::vector<uint8_t*> buffers, int64_t chunk, ThreadPool* pool)
    : buffers_(std::move(buffers)),
      chunk_(std::max<int64_t>(chunk, 1)),
      pool_(pool),
      used_(buffers_.size(), false) {}

void StagedCopier::Memcpy(uint8_t* dst, const uint8_t* src, int64_t bytes) {
  // Pieces of at least 1 MiB, one or more per pool thread.
  constexpr int64_t kMinPiece = int64_t{1} << 20;
  const int64_t threads = pool_ == nullptr ? 1 : pool_->size();
  const int64_t pieces = std::clamp<int64_t>(bytes / kMinPiece, 1, threads);
  if (pieces == 1) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
  const int64_t piece = (bytes + pieces - 1) / pieces;
  pool_->ParallelFor(pieces, [&](int64_t p, int) {
    const int64_t begin = p * piece;
    const int64_t end = std::min(bytes, begin + piece);
    if (begin < end) std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin));
  });
}

absl::Status StagedCopier::Free(int buffer, const Ops& ops) {
  if (!used_[buffer]) return absl::OkStatus();
  DA_RETURN_IF_ERROR(ops.wait(buffer));
  used_[buffer] = false;
  return absl::OkStatus();
}

absl::Status StagedCopier::Poll(const Ops& ops, int64_t done, int64_t bytes) {
  if (!ops.stopped || !ops.stopped()) return absl::OkStatus();
  return absl::CancelledError(
      absl::StrCat("staged copy cancelled after ", done, " of ", bytes, " bytes"));
}

absl::Status StagedCopier::ToDevice(const uint8_t* src, int64_t bytes, const Ops& ops) {
  if (buffers_.size() < 2) return absl::InternalError("staged copy needs two buffers or more");
  const int count = buffers();
  for (int64_t offset = 0, i = 0; offset < bytes; offset += chunk_, ++i) {
    const int b = static_cast<int>(i % count);
    const int64_t n = std::min(chunk_, bytes - offset);
    DA_RETURN_IF_ERROR(Poll(ops, offset, bytes));
    DA_RETURN_IF_ERROR(Free(b, ops));  // Its previous transfer has read it.
    Memcpy(buffers_[b], src + offset, n);
    DA_RETURN_IF_ERROR(ops.queue(b, offset, n));
    used_[b] = true;
  }
  return absl::OkStatus();
}

absl::Status StagedCopier::ToHost(uint8_t* dst, int64_t bytes, const Ops& ops) {
  if (buffers_.size() < 2) return absl::InternalError("staged copy needs two buffers or more");
  const int count = buffers();
  const int64_t chunks = (bytes + chunk_ - 1) / chunk_;
  const auto queue = [&](int64_t i) -> absl::Status {
    const int b = static_cast<int>(i % count);
    DA_RETURN_IF_ERROR(Free(b, ops));  // A ToDevice before may still be reading it.
    DA_RETURN_IF_ERROR(ops.queue(b, i * chunk_, std::min(chunk_, bytes - i * chunk_)));
    used_[b] = true;
    return absl::OkStatus();
  };
  for (int64_t i = 0; i < std::min<int64_t>(count, chunks); ++i) DA_RETURN_IF_ERROR(queue(i));
  for (int64_t i = 0; i < chunks; ++i) {
    const int b = static_cast<int>(i % count);
    DA_RETURN_IF_ERROR(Poll(ops, i * chunk_, bytes));
    DA_RETURN_IF_ERROR(Free(b, ops));  // Chunk i has arrived in buffer b.
    Memcpy(dst + i * chunk_, buffers_[b], std::min(chunk_, bytes - i * chunk_));
    if (i + count < chunks) DA_RETURN_IF_ERROR(queue(i + count));
  }
  return absl::OkStatus();
}

}  // namespace da::engine::cuda
