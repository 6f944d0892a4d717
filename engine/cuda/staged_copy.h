// Copies between pageable host memory and a GPU through a few pinned staging buffers (issue #15):
// on an H200 the CUDA backend's plain cudaMemcpyAsync from pageable memory moved the 16 GiB of a
// 1M-token request at about 7 GB/s (2.3 s against 88 ms of attention). Here the host side of
// each chunk (a memcpy into or out of a pinned buffer) is split across a thread pool, and it
// overlaps the device side (the DMA) of the neighbouring chunks.
//
//   StagedCopier copier({buffer0, buffer1, buffer2}, chunk_bytes, &pool);
//   copier.ToDevice(host_src, bytes, ops);   // returns with the DMAs queued (not finished)
//   copier.ToHost(host_dst, bytes, ops);     // returns with every byte in host_dst
//
// No CUDA here: the device side is two callbacks (Ops), so that the CPU tests drive the copier
// with a fake device that runs queued transfers late, and check every byte and every ordering.
// Not thread-safe: one copy at a time per copier (its buffers are shared between calls).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "engine/thread_pool.h"

namespace da::engine::cuda {

class StagedCopier {
 public:
  struct Ops {
    // Queues the device side of one chunk between staging buffer `buffer` (its first `bytes`)
    // and the device at byte `offset` of the copy: into the device for ToDevice, out of it for
    // ToHost. Asynchronous: done only once `wait(buffer)` has returned.
    std::function<absl::Status(int buffer, int64_t offset, int64_t bytes)> queue;
    // Blocks until everything queued on `buffer` so far is done.
    std::function<absl::Status(int buffer)> wait;
    // Polled before each chunk (may be empty): true stops the copy with CANCELLED, its queued
    // transfers left to finish (the buffers are waited for before their next use).
    std::function<bool()> stopped;
  };

  // buffers: at least 2, each `chunk` bytes (pinned host memory for a GPU); pool: the threads
  // that split each chunk's memcpy (null: the calling thread alone).
  StagedCopier(std::vector<uint8_t*> buffers, int64_t chunk, ThreadPool* pool);

  // Host src -> device: each chunk copied into a free buffer, then its transfer queued. Returns
  // with the last transfers possibly still in flight (src may be reused at once; the buffers are
  // waited for before their next use).
  absl::Status ToDevice(const uint8_t* src, int64_t bytes, const Ops& ops);

  // Device -> host dst: transfers queued up to one per buffer ahead, each chunk copied out once
  // its transfer is done. Returns with every byte in dst.
  absl::Status ToHost(uint8_t* dst, int64_t bytes, const Ops& ops);

  int64_t chunk() const { return chunk_; }
  int buffers() const { return static_cast<int>(buffers_.size()); }

 private:
  void Memcpy(uint8_t* dst, const uint8_t* src, int64_t bytes);
  // CANCELLED when ops.stopped says so, naming done of bytes.
  static absl::Status Poll(const Ops& ops, int64_t done, int64_t bytes);
  // Waits for `buffer` if a transfer was ever queued on it.
  absl::Status Free(int buffer, const Ops& ops);

  std::vector<uint8_t*> buffers_;
  int64_t chunk_;
  ThreadPool* pool_;
  std::vector<bool> used_;  // A transfer was queued on the buffer and not waited for since.
};

}  // namespace da::engine::cuda
