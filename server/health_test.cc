// Health over real gRPC on loopback: Check and Watch on liveness and readiness through warm-up, a
// failed self-check and Shutdown; device state on /metrics agrees with readiness.
#include "server/health.h"

#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "client/attention_client.h"
#include "engine/self_check.h"
#include "server/conversion.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
using std::chrono::seconds;
using ServingStatus = HealthCheckResponse::ServingStatus;

constexpr int64_t kTimeoutMs = 30000;

ServingStatus Check(client::AttentionClient& client, const std::string& service) {
  ServingStatus serving = HealthCheckResponse::UNKNOWN;
  const grpc::Status status = client.CheckHealth(service, &serving, testing::WithTimeout(10000));
  EXPECT_TRUE(status.ok()) << "'" << service << "': " << status.error_message();
  return serving;
}

// Options with one warm-up shape, so readiness has a NOT_SERVING window until WarmUp.
ServerOptions WithOneWarmUpShape() {
  ServerOptions options = testing::LoopbackOptions();
  std::mt19937 rng(7);
  options.warmup.push_back(
      *ProblemFromHeader(testing::HeaderFor(testing::RandomRequest({.seq_len = 256}, rng))));
  return options;
}

// Shutdown on its own thread, so a test can watch what happens while it drains.
class ShutdownInBackground {
 public:
  ShutdownInBackground(Server& server, std::chrono::milliseconds drain_timeout)
      : started_(std::chrono::steady_clock::now()),
        thread_([&server, drain_timeout] { server.Shutdown(drain_timeout); }) {}
  // How long Shutdown took.
  std::chrono::steady_clock::duration Join() {
    thread_.join();
    return std::chrono::steady_clock::now() - started_;
  }

 private:
  std::chrono::steady_clock::time_point started_;
  std::thread thread_;
};

TEST(HealthTest, ReadinessWatchSeesWarmUpThenShutdownAndDoesNotHoldTheDrain) {
  std::unique_ptr<Server> server = testing::StartServer(WithOneWarmUpShape());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  testing::HealthWatch readiness(testing::ChannelTo(server->port()), kServiceName);
  ASSERT_TRUE(readiness.WaitForLatest(HealthCheckResponse::NOT_SERVING, seconds(30)));
  EXPECT_EQ(server->health().NotReadyReason(), "warming up");
  EXPECT_EQ(Check(client, kServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Check(client, ""), HealthCheckResponse::SERVING);

  const absl::Status warmed = server->WarmUp();
  ASSERT_TRUE(warmed.ok()) << warmed;
  ASSERT_TRUE(readiness.WaitForLatest(HealthCheckResponse::SERVING, seconds(30)));
  EXPECT_EQ(server->health().NotReadyReason(), "");
  EXPECT_EQ(Check(client, kServiceName), HealthCheckResponse::SERVING);

  // A drain timeout far above the bound below: only ending the Watch lets Shutdown return early.
  ShutdownInBackground shutdown(*server, std::chrono::minutes(2));
  EXPECT_TRUE(readiness.WaitForLatest(HealthCheckResponse::NOT_SERVING, seconds(30)));
  const std::optional<grpc::Status> ended = readiness.WaitForEnd(seconds(30));
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->error_code(), grpc::StatusCode::UNAVAILABLE) << ended->error_message();
  EXPECT_NE(ended->error_message().find("draining"), std::string::npos) << ended->error_message();
  EXPECT_LT(shutdown.Join(), seconds(30));
  EXPECT_EQ(readiness.statuses(), (std::vector<ServingStatus>{HealthCheckResponse::NOT_SERVING,
                                                              HealthCheckResponse::SERVING,
                                                              HealthCheckResponse::NOT_SERVING}));
  EXPECT_EQ(server->health().NotReadyReason(), "draining");
}

TEST(HealthTest, LivenessWatchStaysServingThroughWarmUpAndEndsAtTheDrain) {
  std::unique_ptr<Server> server = testing::StartServer(WithOneWarmUpShape());
  ASSERT_NE(server, nullptr);
  testing::HealthWatch liveness(testing::ChannelTo(server->port()), "");
  ASSERT_TRUE(liveness.WaitForLatest(HealthCheckResponse::SERVING, seconds(30)));
  ASSERT_TRUE(server->WarmUp().ok());
  ShutdownInBackground shutdown(*server, std::chrono::minutes(2));
  const std::optional<grpc::Status> ended = liveness.WaitForEnd(seconds(30));
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->error_code(), grpc::StatusCode::UNAVAILABLE) << ended->error_message();
  EXPECT_LT(shutdown.Join(), seconds(30));
  // One SERVING, sent once: warm-up and the drain are not liveness changes.
  EXPECT_EQ(liveness.statuses(), std::vector<ServingStatus>{HealthCheckResponse::SERVING});
}

TEST(HealthTest, AFailedSelfCheckKeepsReadinessDownAndTheDeviceDownOnMetrics) {
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  options.self_check = [](engine::Engine&) {
    return absl::InternalError("output[0, 3, 1, 2] is nan (injected)");
  };
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  EXPECT_EQ(Check(client, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Check(client, kServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(server->health().NotReadyReason(),
            "device cpu:0 down: self-check failed: output[0, 3, 1, 2] is nan (injected)");
  // Warm-up (none to do) does not make it ready either.
  ASSERT_TRUE(server->WarmUp().ok());
  EXPECT_EQ(Check(client, kServiceName), HealthCheckResponse::NOT_SERVING);

  const std::optional<std::string> text = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_device_up{device=\"cpu:0\"}"), 0) << *text;
  // The plaintext probes say the same.
  const std::optional<testing::HttpAnswer> ready =
      testing::HttpRequest(server->metrics_port(), "/readyz");
  ASSERT_TRUE(ready.has_value());
  EXPECT_EQ(ready->status, 503);
  EXPECT_EQ(ready->body,
            "device cpu:0 down: self-check failed: output[0, 3, 1, 2] is nan (injected)\n");
  EXPECT_EQ(testing::HttpRequest(server->metrics_port(), "/livez")->status, 200);
}

// /livez and /readyz on the metrics port, for probes that cannot speak TLS or gRPC: live and
// ready once warm, ready no more while draining (the metrics port stays up through the drain).
TEST(HealthTest, PlaintextProbesFollowReadinessThroughTheDrain) {
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(server->WarmUp().ok());
  const int port = server->metrics_port();
  std::optional<testing::HttpAnswer> answer = testing::HttpRequest(port, "/readyz");
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->status, 200);
  EXPECT_EQ(answer->body, "ok\n");
  answer = testing::HttpRequest(port, "/livez");
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->status, 200);
  EXPECT_EQ(testing::HttpRequest(port, "/nothing")->status, 404);
  // A drain with a grace: readiness goes at once, the process is still live.
  std::thread shutdown([&] { server->Shutdown(seconds(5), seconds(2)); });
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        std::optional<testing::HttpAnswer> now = testing::HttpRequest(port, "/readyz");
        return now.has_value() && now->status == 503 && now->body == "draining\n";
      },
      std::chrono::milliseconds(1500)));
  answer = testing::HttpRequest(port, "/livez");
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->status, 200);
  shutdown.join();
}

TEST(HealthTest, ThePassingSelfCheckRunsOnAnEngineLikeTheServingOneWithoutItsLimits) {
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  options.max_tokens = 16;  // Below the self-check's 80 tokens: it must not keep readiness off.
  int check_threads = 0;
  options.self_check = [&](engine::Engine& engine) -> absl::Status {
    check_threads = engine.threads();
    return engine::SelfCheck(engine).status();
  };
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(check_threads, options.threads);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  EXPECT_EQ(Check(client, kServiceName), HealthCheckResponse::SERVING);

  // The serving engine's statistics count client traffic only.
  const std::optional<std::string> text = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_device_up{device=\"cpu:0\"}"), 1) << *text;
  EXPECT_EQ(testing::MetricValue(*text, "da_device_busy_seconds_total{device=\"cpu:0\"}"), 0)
      << *text;
  EXPECT_EQ(testing::MetricValue(*text, "da_plan_cache_entries"), 0) << *text;
}

TEST(HealthTest, UnknownServicesAreNotFoundForCheckAndServiceUnknownForWatch) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  ServingStatus serving = HealthCheckResponse::UNKNOWN;
  const grpc::Status status =
      client.CheckHealth("da.v1.Nope", &serving, testing::WithTimeout(10000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(status.error_message().find("unknown service 'da.v1.Nope'"), std::string::npos)
      << status.error_message();
  testing::HealthWatch unknown(testing::ChannelTo(server->port()), "da.v1.Nope");
  EXPECT_TRUE(unknown.WaitForLatest(HealthCheckResponse::SERVICE_UNKNOWN, seconds(30)));
}

TEST(HealthTest, TheServerStillAnswersWhileNotReady) {
  // Readiness is for load balancers: a client that calls anyway is served.
  std::unique_ptr<Server> server = testing::StartServer(WithOneWarmUpShape());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  ASSERT_EQ(Check(client, kServiceName), HealthCheckResponse::NOT_SERVING);
  std::mt19937 rng(11);
  const v1::AttendRequest request = testing::RandomRequest({}, rng);
  v1::AttendResponse response;
  const grpc::Status status = client.Attend(request, &response, testing::WithTimeout(kTimeoutMs));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().data(), testing::InProcessOutput(request, 2));
}

}  // namespace
}  // namespace da::server
