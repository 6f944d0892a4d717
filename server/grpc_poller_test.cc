// da's processes make gRPC poll with poll(2) unless the operator chose otherwise
// (client/grpc_poller.h), and gRPC does take it up.
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
TEST(GrpcPollerTest, ServersAndClientsStartedAfterItPollWithPoll) {
  unsetenv(client::kPollStrategyVariable);
  EXPECT_EQ(client::PreferPollPoller(), "poll");
  std::unique_ptr<Server> server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(ChannelTo(server->port()));
  v1::GetServerInfoResponse info;
  const grpc::Status status = client.GetServerInfo(&info, WithTimeout(10000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_STREQ(grpc_get_poll_strategy_name(), "poll");
}

TEST(GrpcPollerTest, AnOperatorsChoiceStands) {
  setenv(client::kPollStrategyVariable, "epoll1", /*overwrite=*/1);
  EXPECT_EQ(client::PreferPollPoller(), "epoll1");
  EXPECT_STREQ(std::getenv(client::kPollStrategyVariable), "epoll1");
  unsetenv(client::kPollStrategyVariable);
  EXPECT_EQ(client::PreferPollPoller(), "poll");
  EXPECT_STREQ(std::getenv(client::kPollStrategyVariable), "poll");
}

}  // namespace
}  // namespace da::server
