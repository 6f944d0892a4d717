// A stand-in da.v1.AttentionService for the client's tests: it answers with the query as the
// output ("echo"), so the tests check framing, block order, batch gather/scatter, metadata and
// deadlines without an engine. Streams are answered block by block as they arrive, like a
// pipelined server. Runs on a loopback port chosen by the system.
//
//   EchoServer server;
//   AttentionClient client(MakeChannel(server.address()));
//
// Request ids steer misbehaviour: "bad-block" answers with a block at the wrong token, "wait"
// holds the call until the client's deadline or cancellation (at most 10 s), "refuse-N..." (N
// digits) refuses the first N calls with that id as a draining da-server does (UNAVAILABLE with
// "da-refused: draining"), "unavailable" refuses every call with UNAVAILABLE and no such
// metadata; calls(id) counts the calls made with an id, peers(id) the client addresses (one per
// connection) they came from. A priority above
// kEchoMaxPriority is refused with PERMISSION_DENIED, as the server refuses one above its cap, and
// GetServerInfo reports it as limits.max_priority. A server made with max_message_bytes receives
// and sends messages up to that size and reports it as limits.max_message_bytes (default: 1 GiB,
// reported as 0, the server's default); streams(id) counts the AttendStream calls among calls(id),
// largest_block_bytes(id) the largest q + k + v of their blocks, info_calls() the GetServerInfo
// calls.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

namespace da::client {

inline constexpr int32_t kEchoMaxPriority = 3;

class EchoServer {
 public:
  explicit EchoServer(int64_t max_message_bytes = 0);
  ~EchoServer();

  const std::string& address() const { return address_; }  // "127.0.0.1:PORT".
  int calls(const std::string& request_id) const;
  int streams(const std::string& request_id) const;
  int64_t largest_block_bytes(const std::string& request_id) const;
  int info_calls() const;
  std::set<std::string> peers(const std::string& request_id) const;

 private:
  class AttentionService;
  class HealthService;
  std::unique_ptr<AttentionService> attention_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

}  // namespace da::client
