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
// A new connection begins with the coordinator's hello; with a shared secret, a handshake
// follows and every later frame carries a tag (store_auth.h). Then requests and replies:
//   SET request:    u8 1 | u32 key_len | key | u32 value_len | value  reply: u8 0
//                                                                     or u8 2 | i64 held_bytes |
//                                                                        i64 max_bytes (full)
//   GET request:    u8 2 | u32 key_len | key | i64 timeout_ms         reply: u8 0 | u32 len | value
//                                                                     or u8 1 (timed out)
//   DELETE_PREFIX:  u8 3 | u32 prefix_len | prefix                    reply: u8 0
// The server holds a GET until the key is set or timeout_ms passes (at most kMaxGetTimeout).
// Keys are at most 4 KiB, values at most 64 MiB; a malformed frame closes that connection.
//
// Limits against buggy or hostile peers (CoordinatorStoreOptions): a cap on open connections
// (more are closed as soon as they are accepted), a deadline for the rest of a frame once its
// header has come, and a budget for the bytes held (keys plus values), over which a SET is
// refused. Accepted connections (and clients') send TCP keep-alive probes, so a peer whose host
// vanished is dropped within minutes. Without a secret nothing is authenticated, and the port
// must be reachable by the ranks only; with one, a peer must know it to use the store.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace da::dist {

inline constexpr size_t kMaxStoreKeyBytes = 4096;
inline constexpr size_t kMaxStoreValueBytes = size_t{64} << 20;
// Longest wait a GET may ask for; longer ones are cut to it. The longest a caller in this project
// asks is a rendezvous within da-server's --collective-timeout-ms, at most an hour.
inline constexpr std::chrono::milliseconds kMaxGetTimeout = std::chrono::hours(1);

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  // Sets (or overwrites) key. UNAVAILABLE when the coordinator cannot be reached.
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // Waits until key is set or timeout passes (DEADLINE_EXCEEDED naming the key and timeout).
  // UNAVAILABLE when the coordinator cannot be reached or goes away while waiting.
  virtual absl::StatusOr<std::string> Get(const std::string& key,
                                          std::chrono::milliseconds timeout) = 0;
  // Deletes every key that starts with prefix (none: OK). Waiting Gets are not woken.
  // UNAVAILABLE when the coordinator cannot be reached.
  virtual absl::Status DeletePrefix(const std::string& prefix) = 0;
};

// The coordinator's limits; the defaults suit a group of up to 1024 ranks.
struct CoordinatorStoreOptions {
  // Client connections served at once; one more is closed as soon as it is accepted.
  int max_connections = 256;
  // Bytes of keys and values held; a SET that would pass it is refused (RESOURCE_EXHAUSTED at
  // the client) until DeletePrefix frees room.
  int64_t max_bytes = int64_t{1} << 30;
  // How long a client may take to send the rest of a frame once its header has come, and to
  // take a reply; past it the connection is closed. An idle connection may stay open.
  std::chrono::milliseconds io_timeout{30000};
  // Shared with every rank (empty: no authentication); 16 to 4096 bytes (store_auth.h). A client
  // with another secret, or none, is refused at its handshake.
  std::string secret = "";
  // How long a new connection may take to answer the hello (a few small frames): a peer that
  // does not (it lacks the secret, or speaks another protocol) gives its place back then.
  std::chrono::milliseconds handshake_timeout{5000};
};

// The coordinator's side. Serves up to options.max_connections clients, each on its own
// thread; thread-safe. The destructor stops serving: clients waiting in Get see UNAVAILABLE.
class CoordinatorStoreServer {
 public:
  // Listens on host_port ("host:port", "[v6]:port"; port 0 picks a free one, see port()).
  // An empty host or "0.0.0.0" listens on every interface, IPv6 and IPv4 (IPv4 only on a host
  // without IPv6). INVALID_ARGUMENT naming the
  // field for a limit below 1 (max_bytes: below 0).
  static absl::StatusOr<std::unique_ptr<CoordinatorStoreServer>> Start(
      const std::string& host_port, const CoordinatorStoreOptions& options = {});
  int port() const;
  // Clients refused at the handshake for a secret that did not match; each refusal is also
  // logged (to stderr, naming the peer, at most every 30 s).
  int64_t refused_clients() const;
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
// connection on its next call. Set and DeletePrefix use `timeout` as their I/O limit; a Set the
// coordinator's byte budget refuses is RESOURCE_EXHAUSTED naming the bytes held and the limit.
// `secret` must be the coordinator's (empty: none); UNAUTHENTICATED at once, saying which side
// lacks it or that they differ, otherwise.
absl::StatusOr<std::unique_ptr<KeyValueStore>> ConnectCoordinatorStore(
    const std::string& host_port, std::chrono::milliseconds timeout,
    const std::string& secret = "");

}  // namespace da::dist
