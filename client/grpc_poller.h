// Which of gRPC's pollers this process uses: poll(2) rather than gRPC 1.51's Linux default,
// epoll1, unless the operator chose one.
//
//   int main(int argc, char** argv) {
//     const std::string poller = da::client::PreferPollPoller();  // Before any gRPC object.
//
// Why (docs/PERFORMANCE.md, "gRPC's poller"): with epoll1 one thread at a time waits in
// epoll_wait and hands each event to another through a futex; a large stream's bytes then move
// at the pace of those hand-offs. With poll, the threads that wait for a completion poll
// themselves. Measured on the 2-core build machine, one bare gRPC bidi stream of 4 MiB messages
// (`da-grpc-floor-bench`) moved 1.2-1.4 GB/s with epoll1 and 1.5 GB/s with poll, four streams on
// four connections 1.8 GB/s and 2.55 GB/s, and AttendStream with almost no compute 14-20% more
// per second at K = 1, 2 and 4; a compute-bound stream did not change. The cost: poll(2) is
// linear in a poller's file descriptors, so a server with many thousands of connections should
// set GRPC_POLL_STRATEGY=epoll1.
//
// gRPC reads GRPC_POLL_STRATEGY when it initializes, that is when the process creates its first
// channel, server or completion queue: call this before. An operator's GRPC_POLL_STRATEGY is
// left as it is.
#pragma once

#include <cstdlib>
#include <string>

namespace da::client {

inline constexpr char kPollStrategyVariable[] = "GRPC_POLL_STRATEGY";

// Sets GRPC_POLL_STRATEGY to "poll" where it is unset; returns the strategy gRPC will use (the
// variable's value: one name or a comma-separated list of preferences).
inline std::string PreferPollPoller() {
  setenv(kPollStrategyVariable, "poll", /*overwrite=*/0);
  const char* value = std::getenv(kPollStrategyVariable);
  return value == nullptr ? std::string() : std::string(value);
}

}  // namespace da::client
