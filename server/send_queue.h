// The bytes the kernel still holds for the peers of this process's connections on a TCP port:
// written and not yet acknowledged by the peer (the tx_queue column of /proc/self/net/tcp and
// tcp6). The drain waits until each connection has shown none before gRPC closes them
// (Server::Shutdown): the answers of the calls just finished are then with their clients,
// whatever a reset of the connection does.
//
//   absl::StatusOr<std::vector<SocketQueue>> queues = ServerSocketQueues(server.port());
#pragma once

#include <cstdint>
#include <set>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace da::server {

struct SocketQueue {
  uint64_t inode = 0;  // The socket's inode: one connection.
  int64_t unacknowledged = 0;
};

// Every socket of this process (its inode among /proc/self/fd's "socket:[N]") whose local port is
// `port` and that is not listening: the server's side of its connections. Sockets of other
// processes in the network namespace (a client on this host has the port as its remote port; a
// second server may share it through SO_REUSEPORT) and sockets already closed (inode 0) do not
// count. Errors: UNAVAILABLE when neither table can be read (no /proc).
absl::StatusOr<std::vector<SocketQueue>> ServerSocketQueues(int port);

// The same over one table's text (a /proc/net/tcp or tcp6 file) and a set of inodes (null: any
// inode but 0), for tests. INTERNAL when a line cannot be parsed.
absl::StatusOr<std::vector<SocketQueue>> SocketQueuesInTable(std::string_view table, int port,
                                                             const std::set<uint64_t>* own);

}  // namespace da::server
