// Admission through a real server on loopback: the client's deadline reaches the engine and stops
// compute, --memory-budget-bytes and --max-queue refuse with RESOURCE_EXHAUSTED and the numbers,
// and da_requests_rejected_total counts each refusal by reason.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "engine/engine.h"
#include "server/server.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using std::chrono::milliseconds;

double Metric(const Server& server, const std::string& series) {
  return testing::MetricValue(server.metrics().Scrape(), series).value_or(-1);
}

double Rejected(const Server& server, const std::string& reason) {
  return Metric(server, absl::StrCat("da_requests_rejected_total{reason=\"", reason, "\"}"));
}

TEST(AdmissionServerTest, TightDeadlineIsDeadlineExceededAndStopsTheEngine) {
  // Without a throughput nothing is refused up front: the run starts and its deadline falls
  // during compute.
  std::unique_ptr<Server> server =
      testing::StartServer(testing::WithoutStartupThroughput(testing::LoopbackOptions()));
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  // About 2.2 TFLOP: many seconds of compute unless the deadline stops it.
  const v1::AttendRequest request = testing::LongRequest(131072);
  // Warm: building this plan touches about 128 MiB of workspace (a few hundred milliseconds), and
  // a plan build is not interrupted; the deadline must fall in the kernel, which is.
  v1::WarmUpRequest warm_up;
  *warm_up.add_shapes() = testing::HeaderFor(request);
  v1::WarmUpResponse warmed;
  ASSERT_TRUE(client.WarmUp(warm_up, &warmed).ok());
  v1::AttendResponse response;
  // On a loaded machine the 48 MiB request can take the whole 300 ms to arrive; the deadline then
  // passes before it is queued, the engine never runs, and nothing here is tested: send it again
  // (at most 3 times), each refusal logged.
  grpc::Status status;
  bool engine_stopped = false;
  double stopped_ms = 0;
  for (int attempt = 0; attempt < 3 && !engine_stopped; ++attempt) {
    const auto start = std::chrono::steady_clock::now();
    status = client.Attend(request, &response, testing::WithTimeout(300));
    // The engine saw the deadline itself (not only the client): it stopped the run within 100 ms
    // of it, on top of the polling of this check.
    engine_stopped = testing::WaitFor(
        [&] { return Metric(*server, "da_engine_runs_deadline_exceeded_total") == 1; },
        milliseconds(2000));
    stopped_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!engine_stopped) {
      std::fprintf(stderr, "attempt %d never ran in the engine: %s\n", attempt,
                   status.error_message().c_str());
    }
  }
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_TRUE(engine_stopped);
  EXPECT_LT(stopped_ms, 300 + 100 + 50);
  EXPECT_EQ(Metric(*server, "da_engine_running_requests"), 0);
  EXPECT_EQ(Metric(*server, "da_memory_reserved_bytes"), 0);
  EXPECT_EQ(Metric(*server, "da_engine_stop_latency_seconds_count"), 1);
  EXPECT_EQ(Metric(*server, "da_engine_stop_latency_seconds_bucket{le=\"0.1\"}"), 1);
}

TEST(AdmissionServerTest, OverTheMemoryBudgetIsResourceExhaustedWithTheNumbers) {
  std::mt19937 rng(std::random_device{}());
  const v1::AttendRequest request = testing::RandomRequest(
      {.seq_len = 4096, .heads = 4, .kv_heads = 2, .head_dim = 32, .patterns = {{1024, 1}}}, rng);
  // What the server's engine (2 threads, AUTO precision) estimates for this request.
  engine::EngineOptions engine_options;
  engine_options.threads = 2;
  auto engine = engine::Engine::Create(engine_options);
  ASSERT_TRUE(engine.ok());
  engine::AttentionSpec spec;
  spec.patterns = {{1024, 1}};
  absl::StatusOr<engine::MemoryEstimate> estimate = (*engine)->EstimateMemory(
      {1, 4096, 4, 2, 32}, engine::DType::kFloat32, engine::DType::kFloat32, spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();

  ServerOptions options = testing::LoopbackOptions();
  options.memory_budget_bytes = estimate->total - 1;
  options.stream_buffer_pool_bytes = 0;  // Nothing kept: the whole budget is the request's.
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  v1::AttendResponse response;
  const grpc::Status status = client.Attend(request, &response, testing::WithTimeout(10000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(status.error_message(), absl::StrCat("request needs an estimated ",
                                                 estimate->ToString(), " but the memory budget is ",
                                                 estimate->total - 1, " bytes with 0 in use"));
  EXPECT_EQ(Rejected(*server, "memory"), 1);
  EXPECT_EQ(Rejected(*server, "queue_full"), 0);
  EXPECT_EQ(Metric(*server, "da_memory_budget_bytes"), estimate->total - 1);

  // A malformed request is a rejection too, with its own reason.
  v1::AttendRequest invalid = request;
  invalid.mutable_spec()->clear_segment_lengths();
  invalid.mutable_spec()->clear_dilation_rates();
  EXPECT_EQ(client.Attend(invalid, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Rejected(*server, "invalid_argument"), 1);
  EXPECT_EQ(Rejected(*server, "memory"), 1);
}

TEST(AdmissionServerTest, FullQueueIsResourceExhaustedAndCounted) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_queue = 0;  // Only what the engine can start at once.
  // No start-up throughput: the long request with its 3 s deadline is not refused up front but
  // occupies the engine.
  std::unique_ptr<Server> server = testing::StartServer(testing::WithoutStartupThroughput(options));
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(Metric(*server, "da_queue_capacity"), 0);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  const v1::AttendRequest long_request = testing::LongRequest(131072);
  grpc::Status long_status;
  std::thread long_call([&] {
    v1::AttendResponse response;
    long_status = client.Attend(long_request, &response, testing::WithTimeout(3000));
  });
  ASSERT_TRUE(testing::WaitFor([&] { return Metric(*server, "da_engine_running_requests") == 1; },
                               milliseconds(3000)));

  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest small = testing::RandomRequest({}, rng);
  small.set_priority(100);  // Priority orders the queue; it does not jump a full one.
  v1::AttendResponse response;
  const grpc::Status status = client.Attend(small, &response, testing::WithTimeout(10000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(status.error_message(),
            "queue full: 0 requests wait for 1 busy dispatcher(s) and max_queue is 0");
  EXPECT_EQ(Rejected(*server, "queue_full"), 1);

  long_call.join();
  EXPECT_EQ(long_status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // With the engine idle again the same request runs.
  EXPECT_TRUE(testing::WaitFor([&] { return Metric(*server, "da_engine_running_requests") == 0; },
                               milliseconds(2000)));
  EXPECT_TRUE(client.Attend(small, &response, testing::WithTimeout(10000)).ok());
  EXPECT_EQ(Rejected(*server, "queue_full"), 1);
}

}  // namespace
}  // namespace da::server
