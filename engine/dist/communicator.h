// dist::Communicator: collectives and point-to-point messages over a fixed group of ranks.
//
// Backends: Gloo (CPU processes over TCP, gloo_communicator.h) and NCCL (GPUs). Ranks meet
// through the coordinator's KeyValueStore (store.h), then talk directly to each other.
//
//   DA_ASSIGN_OR_RETURN(auto comm, MakeGlooCommunicator(*store, {.rank = r, .size = w}));
//   std::vector<float> all(w * n);
//   DA_RETURN_IF_ERROR(comm->AllGather(mine.data(), all.data(), n * sizeof(float), 10s));
//
// Contract shared by every backend:
// - Every call returns a Status; none throws, none blocks much past its timeout (Gloo applies the
//   timeout to each step of an algorithm, so a stuck peer is noticed within one timeout).
// - A lost peer gives UNAVAILABLE, a timeout DEADLINE_EXCEEDED; the message names the
//   operation, the byte count, this rank, the peer when known and the timeout.
// - After any failed operation the group is unusable (like an aborted NCCL communicator):
//   every later call returns UNAVAILABLE quoting the first failure. Re-form the group with a
//   new communicator (a fresh store prefix) to recover. Gloo also ends its calls in flight on
//   other threads that way and closes its connections, so that every peer's calls with this
//   rank fail at once: a failure anywhere reaches every rank, not only the two it was between.
// - Collectives must be called in the same order with the same sizes on every rank. Send
//   completes when the peer has received the message (a synchronous send). Messages between two
//   ranks arrive in the order they were sent.
// - What differs between backends is stated by capabilities(), and callers keep to it:
//   - concurrent_calls: any method may be called from several threads at once (Gloo: yes,
//     collectives serialized; NCCL: no, one thread at a time per communicator). Ring exchanges
//     on a communicator without it alternate Send and Recv by rank parity.
//   - tagged_messages: Recv matches a Send by (peer, tag), so several streams of messages
//     between two ranks can interleave (Gloo: yes; NCCL: no, messages match in issue order and
//     the tag is only checked to be >= 0).
//   The multi-process sharded protocol (sharded_run.h) needs both and refuses a communicator
//   without them; NCCL is for data planes driven from one thread in a fixed order.
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
  // What this backend allows beyond the shared contract (see above).
  struct Capabilities {
    bool concurrent_calls = false;
    bool tagged_messages = false;
  };
  virtual Capabilities capabilities() const = 0;
  // Each rank contributes `bytes` from send; recv gets size()*bytes, rank r's at offset r*bytes.
  virtual absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                                 std::chrono::milliseconds timeout) = 0;
  // Copies root's `bytes` at data into every other rank's data.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root,
                                 std::chrono::milliseconds timeout) = 0;
  // Point-to-point; the receiver's (peer, tag, bytes) must match the sender's. tag >= 0.
  virtual absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                            std::chrono::milliseconds timeout) = 0;
  virtual absl::Status Recv(void* data, int64_t bytes, int peer, int tag,
                            std::chrono::milliseconds timeout) = 0;
  virtual absl::Status Barrier(std::chrono::milliseconds timeout) = 0;
  // Payload bytes this rank put on and took off the wire (what the algorithm really moves, e.g.
  // (size-1)*bytes each way for a ring all-gather; a barrier moves none), operations that
  // succeeded, and seconds spent inside operations (failed ones too).
  struct Counters {
    int64_t bytes_sent = 0, bytes_received = 0, operations = 0;
    double seconds = 0;
  };
  virtual Counters counters() const = 0;  // Thread safe; for metrics and the volume test.
  // Fails the group from outside its calls, as a failure of its own would (its owner gave up on
  // them: a rank does not answer a stop): every call in flight on any thread and every later one
  // returns UNAVAILABLE quoting `why`. Thread safe. The default does nothing (a call in flight
  // then ends at its timeout). NCCL's call in flight carries it out (ncclCommAbort) on its own
  // thread at its next poll.
  virtual void Abort(const std::string& why) { (void)why; }
};

}  // namespace da::dist
