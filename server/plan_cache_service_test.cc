// The plan cache and the precision policy as a client sees them: ExecutionInfo, GetServerInfo and
// /metrics agree with each other; --plan-cache-bytes 0 never hits; an unsupported precision fails
// or, with fallback, is replaced and explained.
#include <gtest/gtest.h>

#include <random>

#include "client/attention_client.h"
#include "server/server.h"
#include "server/test_util.h"

namespace da::server {
namespace {

v1::AttendRequest Request(v1::Precision precision, int64_t seq_len = 128) {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest({.seq_len = seq_len}, rng);
  request.mutable_spec()->set_precision(precision);
  return request;
}

std::string Scrape(const Server& server) {
  std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
  EXPECT_TRUE(text.has_value());
  return text.value_or("");
}

TEST(PlanCacheServiceTest, SecondRequestIsAHitAndMetricsEqualServerInfo) {
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  const v1::AttendRequest request = Request(v1::PRECISION_FP32);
  // Another shape: another plan, whatever this CPU's auto precision is (fp32 without AVX512-BF16).
  const v1::AttendRequest other = Request(v1::PRECISION_AUTO, 192);
  bool hits[3];
  for (int i = 0; i < 3; ++i) {
    v1::AttendResponse response;
    const grpc::Status status = client.Attend(request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    hits[i] = response.info().plan_cache_hit();
    EXPECT_EQ(response.info().plan_build_time_us() > 0, i == 0) << "call " << i;
  }
  EXPECT_FALSE(hits[0]);
  EXPECT_TRUE(hits[1]);
  EXPECT_TRUE(hits[2]);
  v1::AttendResponse response;
  ASSERT_TRUE(client.AttendStream(other, &response).ok());
  EXPECT_FALSE(response.info().plan_cache_hit());

  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client.GetServerInfo(&info).ok());
  const v1::PlanCacheStats& cache = info.plan_cache();
  EXPECT_EQ(cache.hits(), 2);
  EXPECT_EQ(cache.misses(), 2);
  EXPECT_EQ(cache.builds(), 2);
  EXPECT_EQ(cache.entries(), 2);
  EXPECT_GT(cache.bytes(), 0);
  EXPECT_EQ(cache.capacity_bytes(), int64_t{1} << 30);

  const std::string text = Scrape(*server);
  using testing::MetricValue;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_hits_total"), cache.hits()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_misses_total"), cache.misses()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_builds_total"), cache.builds()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_evictions_total"), cache.evictions()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_bytes"), cache.bytes()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_entries"), cache.entries()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_cache_capacity_bytes"), cache.capacity_bytes()) << text;
  EXPECT_EQ(MetricValue(text, "da_plan_build_duration_seconds_count"), 2) << text;
}

TEST(PlanCacheServiceTest, ZeroBytesCachesNothingAndRequestsStillSucceed) {
  ServerOptions options = testing::LoopbackOptions();
  options.plan_cache_bytes = 0;
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  const v1::AttendRequest request = Request(v1::PRECISION_FP32);
  for (int i = 0; i < 3; ++i) {
    v1::AttendResponse response;
    const grpc::Status status =
        i == 1 ? client.AttendStream(request, &response) : client.Attend(request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_FALSE(response.info().plan_cache_hit()) << "call " << i;
    EXPECT_GT(response.info().plan_build_time_us(), 0) << "call " << i;
  }
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client.GetServerInfo(&info).ok());
  EXPECT_EQ(info.plan_cache().hits(), 0);
  EXPECT_EQ(info.plan_cache().builds(), 3);
  EXPECT_EQ(info.plan_cache().entries(), 0);
  EXPECT_EQ(info.plan_cache().bytes(), 0);
  EXPECT_EQ(info.plan_cache().capacity_bytes(), 0);
}

TEST(PrecisionPolicyServiceTest, UnsupportedPrecisionIsInvalidArgumentNamingWhatIsSupported) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  const v1::AttendRequest request = Request(v1::PRECISION_FP8);  // No CPU computes in fp8.
  v1::AttendResponse response;
  for (bool stream : {false, true}) {
    const grpc::Status status =
        stream ? client.AttendStream(request, &response) : client.Attend(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_NE(status.error_message().find("spec.precision fp8"), std::string::npos)
        << status.error_message();
    EXPECT_NE(status.error_message().find("supported: "), std::string::npos)
        << status.error_message();
  }
}

TEST(PrecisionPolicyServiceTest, FallbackUsesANearestSupportedPrecisionAndSaysSo) {
  ServerOptions options = testing::LoopbackOptions();
  options.precision_fallback = true;
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  v1::AttendResponse response;
  const grpc::Status status = client.Attend(Request(v1::PRECISION_FP8), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.info().precision_reason().rfind("fallback", 0), 0u)
      << response.info().precision_reason();
  EXPECT_NE(response.info().precision_used(), v1::PRECISION_FP8);
  EXPECT_NE(response.info().precision_used(), v1::PRECISION_AUTO);
}

}  // namespace
}  // namespace da::server
