// Communicator: all-gather, broadcast, send/recv and barrier over a group of ranks (DESIGN §3).
//
// OWNED BY THE GLOO BRANCH (issue #6): this copy carries exactly the declaration agreed for the
// parallel work so that the NCCL backend builds on its own; the lead reconciles it when merging.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace da::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "gloo", "nccl"
  virtual absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                                 std::chrono::milliseconds timeout) = 0;
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root,
                                 std::chrono::milliseconds timeout) = 0;
  virtual absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                            std::chrono::milliseconds timeout) = 0;
  virtual absl::Status Recv(void* data, int64_t bytes, int peer, int tag,
                            std::chrono::milliseconds timeout) = 0;
  virtual absl::Status Barrier(std::chrono::milliseconds timeout) = 0;
  struct Counters {
    int64_t bytes_sent = 0, bytes_received = 0, operations = 0;
    double seconds = 0;
  };
  virtual Counters counters() const = 0;
};

}  // namespace da::dist
