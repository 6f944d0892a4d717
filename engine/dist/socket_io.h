// Blocking TCP helpers with deadlines, for the coordinator store (engine/dist) and
// da-stream-bench's plain-TCP measurement (library da_socket_io).
//
// Every call takes an absolute deadline and returns a Status: DEADLINE_EXCEEDED when it passes,
// UNAVAILABLE when the peer closes or resets the connection. Writes use MSG_NOSIGNAL, so a dead
// peer never raises SIGPIPE.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace da::dist::internal {

using Clock = std::chrono::steady_clock;

struct HostPort {
  std::string host;  // Without brackets; empty means any interface.
  int port = 0;
};

// Parses "host:port" or "[v6]:port"; INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<HostPort> ParseHostPort(const std::string& host_port);

// Connects once; UNAVAILABLE with the errno text when refused or unreachable by the deadline.
absl::StatusOr<int> ConnectTcp(const HostPort& address, Clock::time_point deadline);

// Turns on TCP keep-alive probes: after `idle` without traffic, one every `interval`, and the
// connection fails after `probes` unanswered (defaults: a vanished peer is found within 2 min).
absl::Status EnableKeepAlive(int fd, std::chrono::seconds idle = std::chrono::seconds(60),
                             std::chrono::seconds interval = std::chrono::seconds(10),
                             int probes = 6);

// Binds and listens; returns the socket. `port` 0 picks a free port (see LocalPort). An empty host
// is every interface: IPv6 and IPv4 on one dual-stack socket, IPv4 alone without IPv6.
absl::StatusOr<int> ListenTcp(const HostPort& address);
absl::StatusOr<int> LocalPort(int fd);

// Writes or reads exactly `bytes`. `wake_fd` (optional, -1 for none) aborts a read with
// CANCELLED when it becomes readable.
absl::Status WriteAll(int fd, const void* data, size_t bytes, Clock::time_point deadline);
absl::Status ReadAll(int fd, void* data, size_t bytes, Clock::time_point deadline,
                     int wake_fd = -1);

// Frames: u32 little-endian length, then the body.
absl::Status WriteFrame(int fd, const std::string& body, Clock::time_point deadline);
// Reads one frame of at most max_bytes (INVALID_ARGUMENT above). The header must come by
// `deadline`; the body by the earlier of `deadline` and the header's arrival + `body_timeout`.
// The body's buffer grows as its bytes arrive, kFrameReadStep at a time, so a header that
// announces a large frame commits no memory by itself.
inline constexpr size_t kFrameReadStep = size_t{1} << 20;
absl::StatusOr<std::string> ReadFrame(int fd, size_t max_bytes, Clock::time_point deadline,
                                      int wake_fd = -1,
                                      Clock::duration body_timeout = Clock::duration::max());

// Little-endian field encoding inside a frame body.
void PutU32(std::string& out, uint32_t value);
void PutI64(std::string& out, int64_t value);
void PutString(std::string& out, const std::string& value);
// Readers advance `pos`; false when the body is too short.
bool GetU8(const std::string& in, size_t& pos, uint8_t& value);
bool GetI64(const std::string& in, size_t& pos, int64_t& value);
bool GetString(const std::string& in, size_t& pos, size_t max_bytes, std::string& value);

}  // namespace da::dist::internal
