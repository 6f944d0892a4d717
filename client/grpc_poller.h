// Which of gRPC's pollers this process uses: gRPC 1.51's own choice (epoll1 on Linux) unless the
// operator sets GRPC_POLL_STRATEGY. da does not choose one.
//
//   spdlog::info("gRPC poller: {}", da::client::GrpcPollerName());
//
// Why not poll(2), which da preferred from 0757cd9 until the next change (docs/PERFORMANCE.md,
// "gRPC's poller, back to epoll1"): poll moved a near-zero-compute stream's bytes 14-20% faster
// on the 2-core build machine, but with it gRPC 1.51 now and then lost the event that completes a
// server write after the client cancelled. The write then returned only when the client
// channel's backup poller next ran (GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS, 5 s), and a
// cancelled stream held its memory until then: 5 of 120 cancel trials under load with poll, none
// of 120 with epoll1. A server that is boringly reliable comes before one that is 15% faster on a
// stream with nothing to compute.
//
// gRPC reads GRPC_POLL_STRATEGY when it initializes, that is when the process creates its first
// channel, server or completion queue.
#pragma once

#include <cstdlib>
#include <string>

namespace da::client {

inline constexpr char kPollStrategyVariable[] = "GRPC_POLL_STRATEGY";

// The operator's GRPC_POLL_STRATEGY (one name or a comma-separated list of preferences), or
// "epoll1 (gRPC's default)" where it is unset.
inline std::string GrpcPollerName() {
  const char* value = std::getenv(kPollStrategyVariable);
  return value == nullptr || *value == '\0' ? std::string("epoll1 (gRPC's default)")
                                            : std::string(value) + " (GRPC_POLL_STRATEGY)";
}

}  // namespace da::client
