// The drain's view of calls gRPC has not handed to the service: channelz's open streams per
// connection.
#include "server/open_streams.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <random>
#include <set>

#include "da/v1/attention.grpc.pb.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using testing::ChannelTo;
using testing::HeaderFor;
using testing::LoopbackOptions;
using testing::RandomRequest;
using testing::StartServer;
using testing::WaitFor;

TEST(OpenStreamsTest, ParsesChannelzListingsAndSockets) {
  // As gRPC 1.51 prints them (a draining da-server's, 2026-12-07).
  absl::StatusOr<ChannelzPage> servers = ParseServerList(
      R"({"end":true,"server":[{"data":{"callsStarted":"1"},"listenSocket":[{"name":)"
      R"("chttp2 listener ipv4:127.0.0.1:0","socketId":"2"}],"ref":{"serverId":"1"}},)"
      R"({"ref":{"serverId":"7"}}]})");
  ASSERT_TRUE(servers.ok()) << servers.status();
  EXPECT_EQ(servers->ids, (std::vector<int64_t>{1, 7}));
  EXPECT_TRUE(servers->end);

  absl::StatusOr<ChannelzPage> sockets =
      ParseSocketList(R"({"socketRef":[{"name":"chttp2 ipv4:127.0.0.1:36020","socketId":"3"},)"
                      R"({"name":"chttp2 ipv4:127.0.0.1:36022","socketId":"12"}]})");
  ASSERT_TRUE(sockets.ok()) << sockets.status();
  EXPECT_EQ(sockets->ids, (std::vector<int64_t>{3, 12}));
  EXPECT_FALSE(sockets->end);  // More pages follow.
  absl::StatusOr<ChannelzPage> none = ParseSocketList(R"({"end":true})");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->ids.empty());

  // One stream started and none ended: a unary request still arriving.
  absl::StatusOr<ChannelzSocket> arriving = ParseSocket(
      R"({"socket":{"data":{"lastRemoteStreamCreatedTimestamp":"2026-12-07T07:50:04.308214530Z",)"
      R"("streamsStarted":"1"},"local":{"tcpip_address":{"ip_address":"fwAAAQ==","port":35587}},)"
      R"("ref":{"name":"chttp2 ipv4:127.0.0.1:36020","socketId":"3"},)"
      R"("remote":{"tcpip_address":{"ip_address":"fwAAAQ==","port":36020}}}})");
  ASSERT_TRUE(arriving.ok()) << arriving.status();
  EXPECT_EQ(arriving->port, 35587);
  EXPECT_EQ(arriving->started, 1);
  EXPECT_EQ(arriving->ended, 0);
  absl::StatusOr<ChannelzSocket> done = ParseSocket(
      R"({"socket":{"data":{"streamsStarted":"9","streamsSucceeded":"6","streamsFailed":"3"},)"
      R"("local":{"tcpip_address":{"port":50051}}}})");
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->started, 9);
  EXPECT_EQ(done->ended, 9);
  // A listener: no counters, port 0 when bound to port 0.
  absl::StatusOr<ChannelzSocket> listener =
      ParseSocket(R"({"socket":{"local":{"tcpip_address":{"ip_address":"fwAAAQ==","port":0}}}})");
  ASSERT_TRUE(listener.ok());
  EXPECT_EQ(listener->started, 0);
  EXPECT_EQ(listener->port, 0);

  EXPECT_FALSE(ParseServerList("{not json").ok());
  EXPECT_FALSE(ParseServerList("[1, 2]").ok());
  EXPECT_FALSE(ParseSocketList(R"({"socketRef":[{"name":"no id"}]})").ok());
  EXPECT_FALSE(ParseSocket(R"({"socket":{"data":{"streamsStarted":"many"}}})").ok());
  // Shapes gRPC does not print are errors or empty, never an exception.
  EXPECT_FALSE(ParseServerList(R"({"server":[1]})").ok());
  EXPECT_FALSE(ParseServerList(R"({"server":1e999})").ok());
  EXPECT_FALSE(ParseSocketList(R"({"socketRef":{"socketId":"3"}})").ok());
  absl::StatusOr<ChannelzPage> odd_end = ParseSocketList(R"({"end":"yes","socketRef":[]})");
  ASSERT_TRUE(odd_end.ok());
  EXPECT_FALSE(odd_end->end);
  absl::StatusOr<ChannelzSocket> null_socket = ParseSocket(R"({"socket":null})");
  ASSERT_TRUE(null_socket.ok());
  EXPECT_EQ(null_socket->started, 0);
  EXPECT_EQ(null_socket->port, 0);
  absl::StatusOr<ChannelzSocket> odd_local = ParseSocket(R"({"socket":{"local":[1]}})");
  ASSERT_TRUE(odd_local.ok());
  EXPECT_EQ(odd_local->port, 0);
}

int64_t OpenOn(int port) {
  absl::StatusOr<std::vector<ConnectionStreams>> streams = OpenServerStreams(port);
  if (!streams.ok()) return -1;
  int64_t open = 0;
  for (const ConnectionStreams& connection : *streams) open += connection.open();
  return open;
}

// A real server: a call the service has (a stream whose header it read) and a connection of
// another server in the same process.
TEST(OpenStreamsTest, CountsTheOpenCallsOfThePortsConnections) {
  std::unique_ptr<Server> server = StartServer(LoopbackOptions());
  std::unique_ptr<Server> other = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  ASSERT_NE(other, nullptr);
  auto stub = v1::AttentionService::NewStub(ChannelTo(server->port()));
  auto other_stub = v1::AttentionService::NewStub(ChannelTo(other->port()));
  grpc::ClientContext info_context;
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(other_stub->GetServerInfo(&info_context, {}, &info).ok());

  std::mt19937 rng(3);
  const v1::AttendRequest request = RandomRequest({}, rng);
  grpc::ClientContext context;
  auto stream = stub->AttendStream(&context);
  v1::AttendStreamRequest header;
  *header.mutable_header() = HeaderFor(request);
  ASSERT_TRUE(stream->Write(header));
  ASSERT_TRUE(WaitFor([&] { return OpenOn(server->port()) == 1; }, std::chrono::seconds(10)))
      << OpenOn(server->port());
  // The other server's connection has no open call, and is not this port's.
  absl::StatusOr<std::vector<ConnectionStreams>> mine = OpenServerStreams(server->port());
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(mine->size(), 1u);
  // (gRPC counts the other server's finished call as ended once it has dropped it, which may
  // come a moment after the client had its answer.)
  EXPECT_TRUE(WaitFor([&] { return OpenOn(other->port()) == 0; }, std::chrono::seconds(10)));
  absl::StatusOr<std::vector<ConnectionStreams>> theirs = OpenServerStreams(other->port());
  ASSERT_TRUE(theirs.ok()) << theirs.status();
  ASSERT_EQ(theirs->size(), 1u);
  EXPECT_EQ((*theirs)[0].started, 1);
  EXPECT_NE((*theirs)[0].socket_id, (*mine)[0].socket_id);
  // Skipped ids are left out.
  const std::set<int64_t> skip = {(*mine)[0].socket_id};
  absl::StatusOr<std::vector<ConnectionStreams>> skipped = OpenServerStreams(server->port(), &skip);
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  EXPECT_TRUE(skipped->empty());

  // Once the call has ended, nothing is open.
  context.TryCancel();
  stream->Finish().IgnoreError();
  EXPECT_TRUE(WaitFor([&] { return OpenOn(server->port()) == 0; }, std::chrono::seconds(10)))
      << OpenOn(server->port());
}

}  // namespace
}  // namespace da::server
