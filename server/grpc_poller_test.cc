// da's processes leave gRPC's poller to gRPC (epoll1 on Linux) unless the operator sets
// GRPC_POLL_STRATEGY (client/grpc_poller.h): nothing of ours switches it to poll(2), whose lost
// write events held a cancelled stream for 5 s (docs/PERFORMANCE.md, "gRPC's poller, back to
// epoll1").
#include "client/grpc_poller.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "server/test_util.h"

// gRPC's own name for the polling engine it initialized (src/core/lib/iomgr/ev_posix.h; exported
// by libgrpc, not in its public headers).
const char* grpc_get_poll_strategy_name();

namespace da::server {
namespace {

using testing::ChannelTo;
using testing::LoopbackOptions;
using testing::StartServer;
using testing::WithTimeout;

// First in this file: gRPC reads the variable once, when the process's first gRPC object
// initializes it.
TEST(GrpcPollerTest, ServersAndClientsPollWithGrpcsDefault) {
  unsetenv(client::kPollStrategyVariable);
  std::unique_ptr<Server> server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(ChannelTo(server->port()));
  v1::GetServerInfoResponse info;
  const grpc::Status status = client.GetServerInfo(&info, WithTimeout(10000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_STREQ(grpc_get_poll_strategy_name(), "epoll1");
  EXPECT_EQ(std::getenv(client::kPollStrategyVariable), nullptr)
      << "something set GRPC_POLL_STRATEGY in the process";
  EXPECT_EQ(client::GrpcPollerName(), "epoll1 (gRPC's default)");
}

TEST(GrpcPollerTest, TheNameSaysWhatTheOperatorChose) {
  setenv(client::kPollStrategyVariable, "poll", /*overwrite=*/1);
  EXPECT_EQ(client::GrpcPollerName(), "poll (GRPC_POLL_STRATEGY)");
  setenv(client::kPollStrategyVariable, "", /*overwrite=*/1);
  EXPECT_EQ(client::GrpcPollerName(), "epoll1 (gRPC's default)");
  unsetenv(client::kPollStrategyVariable);
}

}  // namespace
}  // namespace da::server
