// The streams gRPC's transport has open on this process's server connections on a port, read
// from channelz: per connection, the streams its client started less those that have ended.
// Unlike the service's own count of calls (LiveCalls), this includes the calls gRPC has not
// handed to the service yet, above all a unary request whose message is still arriving. The
// drain waits until each connection has shown none before gRPC's GOAWAY (Server::Shutdown): a
// call still arriving then is answered (refused, "draining") instead of having its connection
// closed under it with no status at all.
//
//   absl::StatusOr<std::vector<ConnectionStreams>> streams = OpenServerStreams(server.port());
#pragma once

#include <cstdint>
#include <set>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace da::server {

struct ConnectionStreams {
  int64_t socket_id = 0;  // channelz's id of the connection.
  int64_t started = 0;    // Streams its client has started,
  int64_t ended = 0;      // and those that have ended.
  int64_t open() const { return started - ended; }
};

// Every connection of this process's gRPC servers whose local port is `port` (channelz must be
// on, as it is by default), but those whose ids are in `skip` (may be null). FAILED_PRECONDITION
// when channelz lists no server at all (turned off); INTERNAL when its answer cannot be parsed.
absl::StatusOr<std::vector<ConnectionStreams>> OpenServerStreams(
    int port, const std::set<int64_t>* skip = nullptr);

// Channelz's JSON, parsed (for tests). A listing's ids ("server" entries' ref.serverId, or
// "socketRef" entries' socketId) and whether it is the last page ("end").
struct ChannelzPage {
  std::vector<int64_t> ids;
  bool end = false;
};
absl::StatusOr<ChannelzPage> ParseServerList(std::string_view json);
absl::StatusOr<ChannelzPage> ParseSocketList(std::string_view json);
// One socket's local port and streams: streamsStarted, and streamsSucceeded + streamsFailed as
// ended (absent counters are 0).
struct ChannelzSocket {
  int port = 0;
  int64_t started = 0;
  int64_t ended = 0;
};
absl::StatusOr<ChannelzSocket> ParseSocket(std::string_view json);

}  // namespace da::server
