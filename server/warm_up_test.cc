// Warming plans ahead of requests on a real loopback server: the WarmUp RPC (builds once, then
// finds the plan; the next request of that shape is a hit; malformed shapes name shapes[i]) and
// ServerOptions::warmup (readiness waits for it).
#include <gtest/gtest.h>

#include <random>

#include "client/attention_client.h"
#include "server/server.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using grpc::health::v1::HealthCheckResponse;

// fp32 products, so that the plan does not depend on what AUTO picks on this CPU.
v1::AttendRequest Fp32Request(const testing::ProblemConfig& config) {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest(config, rng);
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  return request;
}

v1::GetServerInfoResponse Info(client::AttentionClient& client) {
  v1::GetServerInfoResponse info;
  const grpc::Status status = client.GetServerInfo(&info, testing::WithTimeout(10000));
  EXPECT_TRUE(status.ok()) << status.error_message();
  return info;
}

HealthCheckResponse::ServingStatus Health(client::AttentionClient& client,
                                          const std::string& service) {
  HealthCheckResponse::ServingStatus serving = HealthCheckResponse::UNKNOWN;
  const grpc::Status status = client.CheckHealth(service, &serving, testing::WithTimeout(10000));
  EXPECT_TRUE(status.ok()) << status.error_message();
  return serving;
}

TEST(WarmUpRpcTest, BuildsOnceThenFindsThePlanAndTheNextRequestIsAHit) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  const v1::AttendRequest request = Fp32Request({.seq_len = 256, .head_dim = 32});
  v1::WarmUpRequest warm_up;
  *warm_up.add_shapes() = testing::HeaderFor(request);

  v1::WarmUpResponse first;
  grpc::Status status = client.WarmUp(warm_up, &first, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(first.results_size(), 1);
  EXPECT_FALSE(first.results(0).already_warm());
  EXPECT_GT(first.results(0).plan_bytes(), 0);
  EXPECT_GT(first.results(0).build_time_us(), 0);
  EXPECT_EQ(first.results(0).precision(), v1::PRECISION_FP32);
  EXPECT_NE(first.results(0).plan_key().find("n256"), std::string::npos)
      << first.results(0).plan_key();
  EXPECT_EQ(first.plan_cache().entries(), 1);
  EXPECT_EQ(first.plan_cache().builds(), 1);
  EXPECT_EQ(first.plan_cache().bytes(), first.results(0).plan_bytes());
  EXPECT_EQ(first.plan_cache().capacity_bytes(), int64_t{1} << 30);

  v1::WarmUpResponse second;
  status = client.WarmUp(warm_up, &second, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(second.results_size(), 1);
  EXPECT_TRUE(second.results(0).already_warm());
  EXPECT_EQ(second.results(0).build_time_us(), 0);
  EXPECT_EQ(second.results(0).plan_key(), first.results(0).plan_key());
  EXPECT_EQ(second.plan_cache().builds(), 1);

  v1::AttendResponse response;
  status = client.Attend(request, &response, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.info().plan_cache_hit());
  EXPECT_EQ(response.info().plan_build_time_us(), 0);

  const v1::GetServerInfoResponse info = Info(client);
  EXPECT_EQ(info.plan_cache().hits(), 2);    // The second warm-up and the request.
  EXPECT_EQ(info.plan_cache().misses(), 1);  // The first warm-up.
  EXPECT_EQ(info.plan_cache().builds(), 1);
  EXPECT_EQ(info.plan_cache().entries(), 1);
}

// The plans of a shape: the whole sequence's where a unary call can carry it, and a stream's
// chunks', each once.
TEST(PlanShapesTest, TheWholeSequenceWhereItFitsAMessageThenTheStreamsChunks) {
  const auto lengths = [](const v1::AttendRequest& request, const WarmUpTransport& transport) {
    std::vector<int64_t> out;
    for (const engine::ProblemShape& shape :
         PlanShapes(*ProblemFromHeader(testing::HeaderFor(request)), transport)) {
      out.push_back(shape.seq_len);
    }
    return out;
  };
  // 10000 tokens, 2 heads of 32, fp32: q, k and v are 7,680,000 bytes.
  const v1::AttendRequest odd = Fp32Request({.seq_len = 10000,
                                             .heads = 2,
                                             .kv_heads = 2,
                                             .head_dim = 32,
                                             .patterns = {{512, 1}, {1024, 2}}});
  EXPECT_EQ(lengths(odd, {.max_message_bytes = 64 << 20, .stream_min_chunk_tokens = 4096}),
            (std::vector<int64_t>{10000, 4096, 10000 % 4096}));
  EXPECT_EQ(lengths(odd, {.max_message_bytes = 7680000, .stream_min_chunk_tokens = 4096}),
            (std::vector<int64_t>{10000, 4096, 10000 % 4096}));
  // One byte short of a message: streamed only.
  EXPECT_EQ(lengths(odd, {.max_message_bytes = 7679999, .stream_min_chunk_tokens = 4096}),
            (std::vector<int64_t>{4096, 10000 % 4096}));
  // Chunks of 5120 tokens (the first multiple of 1024 from 5000) and a last one of 4880.
  EXPECT_EQ(lengths(odd, {.max_message_bytes = 64 << 20, .stream_min_chunk_tokens = 5000}),
            (std::vector<int64_t>{10000, 5120, 10000 - 5120}));
  // One chunk holds the sequence (chunks of at least 16384 tokens; a segment as long as the
  // sequence): the stream runs the whole sequence's plan, warmed once.
  EXPECT_EQ(lengths(odd, {.max_message_bytes = 64 << 20, .stream_min_chunk_tokens = 16384}),
            (std::vector<int64_t>{10000}));
  const v1::AttendRequest one_segment = Fp32Request({.seq_len = 8192, .patterns = {{8192, 1}}});
  EXPECT_EQ(lengths(one_segment, {.max_message_bytes = 1, .stream_min_chunk_tokens = 4096}),
            (std::vector<int64_t>{8192}));
  // Chunks that divide the sequence: no shorter last chunk.
  const v1::AttendRequest even = Fp32Request({.seq_len = 8192, .patterns = {{1024, 1}}});
  EXPECT_EQ(lengths(even, {.max_message_bytes = 64 << 20, .stream_min_chunk_tokens = 4096}),
            (std::vector<int64_t>{8192, 4096}));
  // Segment lengths without a common chunk (lcm 1,536,000): a stream computes windows, each with
  // a plan of its own, so only the unary call's plan can be warmed.
  const v1::AttendRequest windows = Fp32Request({.seq_len = 10000,
                                                 .heads = 2,
                                                 .kv_heads = 2,
                                                 .head_dim = 32,
                                                 .patterns = {{3000, 1}, {4096, 2}}});
  EXPECT_EQ(lengths(windows, {.max_message_bytes = 64 << 20, .stream_min_chunk_tokens = 1024}),
            (std::vector<int64_t>{10000}));
  EXPECT_TRUE(lengths(windows, {.max_message_bytes = 1, .stream_min_chunk_tokens = 1024}).empty());
}

// A shape's first stream after a warm-up finds its chunks' plans, whether or not the shape also
// fits a unary call; without them its first chunks built them (the warm-up warmed only the whole
// sequence's plan, which a stream never runs).
TEST(WarmUpRpcTest, AStreamOfAWarmedShapeFindsItsChunkPlans) {
  for (const int64_t max_message_bytes : {int64_t{64} << 20, int64_t{1} << 20}) {
    SCOPED_TRACE(::testing::Message() << "max_message_bytes " << max_message_bytes);
    ServerOptions options = testing::LoopbackOptions();
    options.max_message_bytes = max_message_bytes;
    options.stream_min_chunk_tokens = 2048;
    std::unique_ptr<Server> server = testing::StartServer(options);
    ASSERT_NE(server, nullptr);
    client::AttentionClient client(testing::ChannelTo(server->port()));
    // Chunks of 2048 tokens and a last one of 808; q, k and v are 6,912,000 bytes.
    const v1::AttendRequest request = Fp32Request({.seq_len = 9000,
                                                   .heads = 2,
                                                   .kv_heads = 2,
                                                   .head_dim = 32,
                                                   .patterns = {{512, 1}, {1024, 2}}});
    const bool unary = max_message_bytes > 6912000;
    v1::WarmUpRequest warm_up;
    *warm_up.add_shapes() = testing::HeaderFor(request);
    v1::WarmUpResponse warmed;
    grpc::Status status = client.WarmUp(warm_up, &warmed, testing::WithTimeout(60000));
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(warmed.results_size(), 1);
    const v1::WarmUpResult& result = warmed.results(0);
    ASSERT_EQ(result.plan_keys_size(), unary ? 3 : 2) << warmed.DebugString();
    EXPECT_EQ(result.plan_key(), result.plan_keys(0));
    const int first = unary ? 1 : 0;
    EXPECT_NE(result.plan_keys(0).find(unary ? "n9000" : "n2048"), std::string::npos)
        << warmed.DebugString();
    EXPECT_NE(result.plan_keys(first).find("n2048"), std::string::npos) << warmed.DebugString();
    EXPECT_NE(result.plan_keys(first + 1).find("n808"), std::string::npos) << warmed.DebugString();
    EXPECT_FALSE(result.already_warm());
    EXPECT_EQ(warmed.plan_cache().entries(), result.plan_keys_size());
    EXPECT_EQ(warmed.plan_cache().bytes(), result.plan_bytes());

    v1::AttendResponse streamed;
    status =
        client.AttendStream(request, &streamed, testing::WithTimeout(60000), {.block_tokens = 500});
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(streamed.info().stream_chunk_tokens(), 2048);
    EXPECT_TRUE(streamed.info().plan_cache_hit());
    EXPECT_EQ(streamed.info().plan_build_time_us(), 0);
    if (unary) {
      v1::AttendResponse response;
      status = client.Attend(request, &response, testing::WithTimeout(60000));
      ASSERT_TRUE(status.ok()) << status.error_message();
      EXPECT_TRUE(response.info().plan_cache_hit());
      EXPECT_EQ(response.output().data(), streamed.output().data());
    }
    EXPECT_EQ(Info(client).plan_cache().builds(), result.plan_keys_size());
  }
}

// A plan is built for its output dtype: a warm-up naming one warms requests asking for it.
TEST(WarmUpRpcTest, AnOutputDtypeWarmsThePlansOfRequestsAskingForIt) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request =
      testing::RandomRequest({.seq_len = 256, .head_dim = 32, .dtype = v1::DTYPE_BF16}, rng);
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  request.set_output_dtype(v1::DTYPE_FP32);
  v1::WarmUpRequest warm_up;
  *warm_up.add_shapes() = testing::HeaderFor(request);
  v1::WarmUpResponse warmed;
  grpc::Status status = client.WarmUp(warm_up, &warmed, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_NE(warmed.results(0).plan_key().find("bf16->fp32"), std::string::npos)
      << warmed.DebugString();
  v1::AttendResponse response;
  status = client.Attend(request, &response, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.info().plan_cache_hit());
  request.clear_output_dtype();  // bf16 out: a plan of its own.
  status = client.Attend(request, &response, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(response.info().plan_cache_hit());
}

TEST(WarmUpRpcTest, MalformedShapesNameTheirIndexAndWarmNothing) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  const v1::StreamHeader good = testing::HeaderFor(Fp32Request({}));

  struct Case {
    std::string name;
    std::function<void(v1::StreamHeader*)> spoil;
    std::string expected;  // Part of the message, after "shapes[0]".
  };
  const Case cases[] = {
      {"seq_len 0", [](v1::StreamHeader* h) { h->set_seq_len(0); }, ": seq_len is 0"},
      {"no dtype", [](v1::StreamHeader* h) { h->set_dtype(v1::DTYPE_UNSPECIFIED); },
       ".dtype is DTYPE_UNSPECIFIED"},
      {"no patterns",
       [](v1::StreamHeader* h) {
         h->mutable_spec()->clear_segment_lengths();
         h->mutable_spec()->clear_dilation_rates();
       },
       ": spec.segment_lengths"},
      {"kv_heads not dividing heads", [](v1::StreamHeader* h) { h->set_kv_heads(3); },
       "kv_heads (the key's heads) is 3"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::WarmUpRequest request;
    v1::StreamHeader* bad = request.add_shapes();
    *bad = good;
    c.spoil(bad);
    *request.add_shapes() = good;  // Valid, and must not be warmed either.
    v1::WarmUpResponse response;
    const grpc::Status status = client.WarmUp(request, &response, testing::WithTimeout(60000));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_EQ(status.error_message().rfind("shapes[0]", 0), 0u) << status.error_message();
    EXPECT_NE(status.error_message().find(c.expected), std::string::npos) << status.error_message();
  }
  EXPECT_EQ(Info(client).plan_cache().builds(), 0);
}

TEST(WarmUpRpcTest, UnsupportedPrecisionNamesTheShapeAndWhatIsSupported) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  v1::WarmUpRequest request;
  *request.add_shapes() = testing::HeaderFor(Fp32Request({}));
  v1::StreamHeader* fp8 = request.add_shapes();
  *fp8 = request.shapes(0);
  fp8->mutable_spec()->set_precision(v1::PRECISION_FP8);  // No CPU computes in fp8.

  v1::WarmUpResponse response;
  const grpc::Status status = client.WarmUp(request, &response, testing::WithTimeout(60000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_EQ(status.error_message().rfind("shapes[1]: ", 0), 0u) << status.error_message();
  EXPECT_NE(status.error_message().find("supported:"), std::string::npos) << status.error_message();
  EXPECT_EQ(Info(client).plan_cache().entries(), 1);  // shapes[0] was warmed before.
}

// A plan whose workspace does not fit the memory budget is not built: the warm-up reserves it
// as a request would, and is refused naming both numbers.
TEST(WarmUpRpcTest, APlanOverTheMemoryBudgetIsRefusedNamingBoth) {
  ServerOptions options = testing::LoopbackOptions();
  options.memory_budget_bytes = int64_t{1} << 20;
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  v1::WarmUpRequest request;
  // One segment of 16384 tokens: each thread packs K and V of the whole segment (8 MiB).
  v1::StreamHeader* shape = request.add_shapes();
  *shape = testing::HeaderFor(Fp32Request(
      {.seq_len = 16384, .heads = 1, .kv_heads = 1, .head_dim = 64, .patterns = {{16384, 1}}}));
  v1::WarmUpResponse response;
  const grpc::Status status = client.WarmUp(request, &response, testing::WithTimeout(60000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_EQ(status.error_message().rfind("shapes[0]: ", 0), 0u) << status.error_message();
  EXPECT_NE(status.error_message().find("bytes of plan workspace to warm up"), std::string::npos)
      << status.error_message();
  EXPECT_NE(status.error_message().find("1048576"), std::string::npos) << status.error_message();
  EXPECT_EQ(Info(client).plan_cache().entries(), 0);
  const std::string metrics = server->metrics().Scrape();
  EXPECT_EQ(testing::MetricValue(metrics, "da_requests_rejected_total{reason=\"memory\"}"), 1.0)
      << metrics;
}

// A call whose deadline passes stops warming: the shapes after it are not built (the warm-up
// worker is free for the next call at once), and a call naming too many shapes is refused.
TEST(WarmUpRpcTest, ACancelledCallStopsBuildingAndTooManyShapesAreRefused) {
  ServerOptions options = testing::LoopbackOptions();
  options.plan_cache_bytes = int64_t{16} << 20;  // The plans built need not stay.
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  // 256 distinct shapes of 8 MiB or more of workspace each (one segment of 16384+ tokens): a
  // build allocates and touches it, some milliseconds each, so over a second in all.
  const v1::StreamHeader small = testing::HeaderFor(
      Fp32Request({.heads = 1, .kv_heads = 1, .head_dim = 64, .patterns = {{64, 1}}}));
  v1::WarmUpRequest many;
  for (int i = 0; i < 256; ++i) {
    v1::StreamHeader* shape = many.add_shapes();
    *shape = small;
    shape->set_seq_len(16384 + 64 * i);
    shape->mutable_spec()->set_segment_lengths(0, shape->seq_len());
  }
  v1::WarmUpResponse response;
  grpc::Status status = client.WarmUp(many, &response, testing::WithTimeout(100));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  // The next call runs after the first one's job on the one warm-up worker.
  v1::WarmUpRequest one;
  *one.add_shapes() = testing::HeaderFor(Fp32Request({}));
  status = client.WarmUp(one, &response, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  const int64_t builds = Info(client).plan_cache().builds();
  EXPECT_LT(builds, 128) << "the cancelled call went on building";

  *many.add_shapes() = many.shapes(0);  // 257.
  status = client.WarmUp(many, &response, testing::WithTimeout(60000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find("257 shapes; one WarmUp call takes at most 256"),
            std::string::npos)
      << status.error_message();
}

TEST(ServerWarmUpTest, ReadinessWaitsForTheWarmUpPlans) {
  ServerOptions options = testing::LoopbackOptions();
  const v1::AttendRequest small = Fp32Request({.seq_len = 128});
  const v1::AttendRequest grouped =
      Fp32Request({.seq_len = 512, .heads = 2, .kv_heads = 1, .mode = v1::COMBINE_MODE_GROUPED});
  for (const v1::AttendRequest* request : {&small, &grouped}) {
    options.warmup.push_back(*ProblemFromHeader(testing::HeaderFor(*request)));
  }
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));
  EXPECT_EQ(Health(client, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(client, kServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Info(client).plan_cache().entries(), 0);

  const absl::Status warmed = server->WarmUp();
  ASSERT_TRUE(warmed.ok()) << warmed;
  EXPECT_EQ(Health(client, kServiceName), HealthCheckResponse::SERVING);
  EXPECT_EQ(Info(client).plan_cache().entries(), 2);

  for (const v1::AttendRequest* request : {&small, &grouped}) {
    v1::AttendResponse response;
    const grpc::Status status = client.Attend(*request, &response, testing::WithTimeout(60000));
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(response.info().plan_cache_hit());
  }
}

TEST(ServerWarmUpTest, AShapeTheEngineRefusesNamesItsEntryAndKeepsReadinessDown) {
  ServerOptions options = testing::LoopbackOptions();
  WarmUpShape good = *ProblemFromHeader(testing::HeaderFor(Fp32Request({})));
  WarmUpShape bad = good;
  bad.shape.head_dim = 4096;  // Above the engine's head_dim limit.
  options.warmup = {good, bad};
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);

  const absl::Status warmed = server->WarmUp();
  EXPECT_EQ(warmed.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(warmed.message().rfind("entry 1 (", 0), 0u) << warmed;
  EXPECT_NE(warmed.message().find("head_dim is 4096"), std::string::npos) << warmed;
  client::AttentionClient client(testing::ChannelTo(server->port()));
  EXPECT_EQ(Health(client, kServiceName), HealthCheckResponse::NOT_SERVING);
}

}  // namespace
}  // namespace da::server
