// SIGTERM on the real da-server binary: the call in flight completes, new calls are refused, the
// process exits 0; and a drain deadline cancels what is still running.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <random>
#include <thread>

#include "client/attention_client.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// A da-server process that drains for up to drain_timeout_ms.
std::unique_ptr<testing::SpawnedServer> SpawnServer(int64_t drain_timeout_ms) {
  auto server = std::make_unique<testing::SpawnedServer>(
      DA_SERVER_BINARY,
      std::vector<std::string>{"--drain-timeout-ms", std::to_string(drain_timeout_ms),
                               "--max-message-bytes", "1073741824", "--log-level", "warn"});
  return server->WaitForPorts(seconds(30)) ? std::move(server) : nullptr;
}

// True once /metrics reports n attention calls in flight.
bool InFlight(const testing::SpawnedServer& server, int n) {
  std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
  return text.has_value() &&
         testing::MetricValue(*text, "da_in_flight_requests") == static_cast<double>(n);
}

bool ExitedWithZero(const std::optional<int>& wait_status) {
  return wait_status.has_value() && WIFEXITED(*wait_status) && WEXITSTATUS(*wait_status) == 0;
}

TEST(DrainTest, SigtermFinishesTheCallInFlightRefusesNewCallsAndExitsZero) {
  std::unique_ptr<testing::SpawnedServer> server = SpawnServer(/*drain_timeout_ms=*/120000);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  // Seconds of compute on two cores: long enough to be seen in flight.
  const v1::AttendRequest request = testing::LongRequest(40960);
  grpc::Status in_flight_status;
  v1::AttendResponse in_flight_response;
  std::thread call([&] {
    in_flight_status = client.Attend(request, &in_flight_response, testing::WithTimeout(300000));
  });
  ASSERT_TRUE(testing::WaitFor([&] { return InFlight(*server, 1); }, seconds(60)));
  ASSERT_EQ(kill(server->process().pid(), SIGTERM), 0);

  // Once the server stops accepting, a fresh channel's calls fail, health included.
  client::AttentionClient late_client(testing::ChannelTo(server->port()));
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        auto serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
        return !late_client.CheckHealth("", &serving, testing::WithTimeout(1000)).ok();
      },
      seconds(10)));
  v1::AttendResponse late_response;
  std::mt19937 rng(std::random_device{}());
  const grpc::Status late = late_client.Attend(testing::RandomRequest({}, rng), &late_response,
                                               testing::WithTimeout(5000));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE) << late.error_message();

  call.join();
  EXPECT_TRUE(in_flight_status.ok()) << in_flight_status.error_message();
  EXPECT_EQ(in_flight_response.output().data().size(), request.query().data().size());
  EXPECT_TRUE(ExitedWithZero(server->process().WaitForExit(seconds(60))));
}

TEST(DrainTest, DrainDeadlineCancelsWorkStillRunningAndExitsZero) {
  std::unique_ptr<testing::SpawnedServer> server = SpawnServer(/*drain_timeout_ms=*/200);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  // 2.2e12 FLOPs, over five seconds at two cores' fp32 peak: only cancellation can end it within
  // the bound below.
  const v1::AttendRequest request = testing::LongRequest(131072);
  grpc::Status in_flight_status;
  std::thread call([&] {
    v1::AttendResponse response;
    in_flight_status = client.Attend(request, &response, testing::WithTimeout(300000));
  });
  ASSERT_TRUE(testing::WaitFor([&] { return InFlight(*server, 1); }, seconds(60)));
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server->process().pid(), SIGTERM), 0);

  EXPECT_TRUE(ExitedWithZero(server->process().WaitForExit(seconds(5))));
  call.join();
  EXPECT_FALSE(in_flight_status.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, seconds(5));
}

}  // namespace
}  // namespace da::server
