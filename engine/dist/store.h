// A key-value store for rendezvous, served by rank 0 (the coordinator) over plain TCP.
//
// Ranks meet through it before they open their collective connections: Gloo's connectFullMesh
// publishes each rank's addresses here, and the NCCL backend publishes rank 0's ncclUniqueId.
// Rank 0 runs the server; every rank, rank 0 included, connects a client:
//
//   // rank 0
//   DA_ASSIGN_OR_RETURN(auto server, CoordinatorStoreServer::Start("0.0.0.0:29500"));
//   // every rank
//   DA_ASSIGN_OR_RETURN(auto store, ConnectCoordinatorStore("rank0-host:29500", 10s));
//   DA_RETURN_IF_ERROR(store->Set("nccl/id", id_bytes));
//   DA_ASSIGN_OR_RETURN(std::string id, store->Get("nccl/id", 30s));
//
// Protocol (no gRPC, no protobuf): every message is a frame `u32 length (little-endian) | body`.
//   SET request:  u8 1 | u32 key_len | key | u32 value_len | value    reply: u8 0
//   GET request:  u8 2 | u32 key_len | key | i64 timeout_ms           reply: u8 0 | u32 len | value
//                                                                     or     u8 1 (timed out)
// The server holds a GET until the key is set or timeout_ms passes. Keys are at most 4 KiB,
// values at most 64 MiB; a malformed frame closes that connection. Keys are never deleted: a
// group that re-forms uses a fresh key prefix.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace da::dist {

inline constexpr size_t kMaxStoreKeyBytes = 4096;
inline constexpr size_t kMaxStoreValueBytes = size_t{64} << 20;

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  // Sets (or overwrites) key. UNAVAILABLE when the coordinator cannot be reached.
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // Waits until key is set or timeout passes (DEADLINE_EXCEEDED naming the key and timeout).
  // UNAVAILABLE when the coordinator cannot be reached or goes away while waiting.
  virtual absl::StatusOr<std::string> Get(const std::string& key,
                                          std::chrono::milliseconds timeout) = 0;
};

// The coordinator's side. Serves any number of clients, each on its own thread; thread-safe.
// The destructor stops serving: clients waiting in Get see UNAVAILABLE.
class CoordinatorStoreServer {
 public:
  // Listens on host_port ("host:port", "[v6]:port"; port 0 picks a free one, see port()).
  // An empty host or "0.0.0.0" listens on every IPv4 interface.
  static absl::StatusOr<std::unique_ptr<CoordinatorStoreServer>> Start(
      const std::string& host_port);
  int port() const;
  ~CoordinatorStoreServer();

  CoordinatorStoreServer(const CoordinatorStoreServer&) = delete;
  CoordinatorStoreServer& operator=(const CoordinatorStoreServer&) = delete;

 private:
  class Impl;
  explicit CoordinatorStoreServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Connects to the coordinator at host_port, retrying until timeout (rank 0 may start after the
// workers); UNAVAILABLE naming host_port and timeout when it never answers. The client is
// thread-safe (requests are serialized on one connection) and reconnects after a lost
// connection on its next call. Set uses `timeout` as its I/O limit.
absl::StatusOr<std::unique_ptr<KeyValueStore>> ConnectCoordinatorStore(
    const std::string& host_port, std::chrono::milliseconds timeout);

}  // namespace da::dist
