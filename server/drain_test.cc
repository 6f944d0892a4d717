// SIGTERM on the real da-server binary: the call in flight completes, new calls are refused, the
// process exits 0; and a drain deadline cancels what is still running.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <random>
#include <thread>

#include "client/attention_client.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// A da-server process on loopback ports chosen by the kernel.
class SpawnedServer {
 public:
  explicit SpawnedServer(int64_t drain_timeout_ms) : dir_(testing::MakeTempDir()) {
    child_ = testing::ChildProcess::Spawn(
        DA_SERVER_BINARY,
        {"--listen", "127.0.0.1:0", "--port-file", dir_ + "/port", "--metrics-listen",
         "127.0.0.1:0", "--metrics-port-file", dir_ + "/metrics_port", "--threads", "2",
         "--drain-timeout-ms", std::to_string(drain_timeout_ms), "--max-message-bytes",
         "1073741824", "--log-level", "warn"});
    if (child_ == nullptr) return;
    port_ = testing::ReadPortFile(dir_ + "/port", seconds(30));
    metrics_port_ = testing::ReadPortFile(dir_ + "/metrics_port", seconds(30));
  }
  ~SpawnedServer() {
    child_.reset();
    std::filesystem::remove_all(dir_);
  }

  bool started() const { return child_ != nullptr && port_ > 0 && metrics_port_ > 0; }
  int port() const { return port_; }
  testing::ChildProcess& process() { return *child_; }

  // True once /metrics reports n attention calls in flight.
  bool InFlight(int n) const {
    std::optional<std::string> text = testing::HttpGet(metrics_port_, "/metrics");
    return text.has_value() &&
           text->find("\nda_in_flight_requests " + std::to_string(n) + "\n") != std::string::npos;
  }

 private:
  std::string dir_;
  std::unique_ptr<testing::ChildProcess> child_;
  int port_ = 0;
  int metrics_port_ = 0;
};

bool ExitedWithZero(const std::optional<int>& wait_status) {
  return wait_status.has_value() && WIFEXITED(*wait_status) && WEXITSTATUS(*wait_status) == 0;
}

TEST(DrainTest, SigtermFinishesTheCallInFlightRefusesNewCallsAndExitsZero) {
  SpawnedServer server(/*drain_timeout_ms=*/120000);
  ASSERT_TRUE(server.started());
  client::AttentionClient client(testing::ChannelTo(server.port()));

  // Seconds of compute on two cores: long enough to be seen in flight.
  const v1::AttendRequest request = testing::LongRequest(40960);
  grpc::Status in_flight_status;
  v1::AttendResponse in_flight_response;
  std::thread call([&] {
    in_flight_status = client.Attend(request, &in_flight_response, testing::WithTimeout(300000));
  });
  ASSERT_TRUE(testing::WaitFor([&] { return server.InFlight(1); }, seconds(60)));
  ASSERT_EQ(kill(server.process().pid(), SIGTERM), 0);

  // Once the server stops accepting, a fresh channel's calls fail, health included.
  client::AttentionClient late_client(testing::ChannelTo(server.port()));
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
  EXPECT_TRUE(ExitedWithZero(server.process().WaitForExit(seconds(60))));
}

TEST(DrainTest, DrainDeadlineCancelsWorkStillRunningAndExitsZero) {
  SpawnedServer server(/*drain_timeout_ms=*/200);
  ASSERT_TRUE(server.started());
  client::AttentionClient client(testing::ChannelTo(server.port()));

  // 2.2e12 FLOPs, over five seconds at two cores' fp32 peak: only cancellation can end it within
  // the bound below.
  const v1::AttendRequest request = testing::LongRequest(131072);
  grpc::Status in_flight_status;
  std::thread call([&] {
    v1::AttendResponse response;
    in_flight_status = client.Attend(request, &response, testing::WithTimeout(300000));
  });
  ASSERT_TRUE(testing::WaitFor([&] { return server.InFlight(1); }, seconds(60)));
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server.process().pid(), SIGTERM), 0);

  EXPECT_TRUE(ExitedWithZero(server.process().WaitForExit(seconds(5))));
  call.join();
  EXPECT_FALSE(in_flight_status.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, seconds(5));
}

}  // namespace
}  // namespace da::server
