// End to end on a real loopback server, through the client library: answers equal the in-process
// engine's bytes, request ids, health, server info and the size limits.
#include "server/server.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <future>
#include <random>
#include <thread>

#include "client/attention_client.h"
#include "da/v1/attention.grpc.pb.h"
#include "engine/tensor.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using testing::ProblemConfig;

constexpr int kThreads = 2;

struct Case {
  std::string name;
  ProblemConfig config;
  v1::DType output_dtype = v1::DTYPE_UNSPECIFIED;  // The request's output_dtype.
};

// Keeps test listings (and so ctest's names) readable and stable.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class ServerAnswerTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    server_ = testing::StartServer(testing::LoopbackOptions());
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<client::AttentionClient>(testing::ChannelTo(server_->port()));
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<client::AttentionClient> client_;
};

TEST_P(ServerAnswerTest, UnaryAndStreamEqualInProcessEngineBytes) {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest(GetParam().config, rng);
  request.set_output_dtype(GetParam().output_dtype);
  const std::string expected = testing::InProcessOutput(request, kThreads);
  ASSERT_FALSE(expected.empty());

  v1::AttendResponse unary;
  grpc::Status status = client_->Attend(request, &unary);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(unary.output().dtype(), GetParam().output_dtype == v1::DTYPE_UNSPECIFIED
                                        ? request.query().dtype()
                                        : GetParam().output_dtype);
  EXPECT_EQ(unary.output().shape().size(), 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(unary.output().shape(i), request.query().shape(i));
  EXPECT_TRUE(unary.output().data() == expected) << "unary output differs from the engine's";
  EXPECT_EQ(unary.info().backend(), "cpu");
  ASSERT_EQ(unary.info().devices_size(), 1);
  EXPECT_EQ(unary.info().devices(0), "cpu:0");
  EXPECT_NE(unary.info().precision_used(), v1::PRECISION_AUTO);  // The engine names its choice.
  EXPECT_FALSE(unary.info().precision_reason().empty());
  EXPECT_FALSE(unary.info().plan_cache_hit());
  EXPECT_GE(unary.info().total_time_us(), unary.info().compute_time_us());

  // Small blocks so that the stream has many of them, the last one partial.
  for (int64_t block_tokens : {int64_t{7}, int64_t{0}}) {
    v1::AttendResponse streamed;
    status = client_->AttendStream(request, &streamed, {}, {.block_tokens = block_tokens});
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(streamed.output().data() == expected)
        << "stream output (block_tokens " << block_tokens << ") differs from the engine's";
    EXPECT_EQ(streamed.output().dtype(), unary.output().dtype());
    EXPECT_EQ(streamed.info().backend(), "cpu");
    EXPECT_EQ(streamed.info().request_id().size(), 16u);
  }
  // In two parts where the patterns allow a cut (each part's answer written into one output of
  // the dtype asked for).
  {
    v1::AttendResponse parts;
    status = client_->AttendStream(request, &parts, {}, {.block_tokens = 7, .parallel_streams = 2});
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(parts.output().data() == expected) << "parallel parts differ from the engine's";
    EXPECT_EQ(parts.output().dtype(), unary.output().dtype());
  }
}

ProblemConfig Config(int64_t batch, int64_t seq_len, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, std::vector<std::pair<int64_t, int64_t>> patterns,
                     bool causal, v1::CombineMode mode, v1::DType dtype) {
  return {batch, seq_len, heads, kv_heads, head_dim, std::move(patterns), causal, mode, dtype};
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ServerAnswerTest,
    ::testing::Values(
        Case{"fp32_longnet", Config(1, 100, 4, 4, 16, {{32, 1}, {64, 2}}, false,
                                    v1::COMBINE_MODE_LONGNET, v1::DTYPE_FP32)},
        Case{"fp16_gqa_causal_grouped", Config(2, 77, 6, 2, 8, {{16, 1}, {32, 4}, {80, 3}}, true,
                                               v1::COMBINE_MODE_GROUPED, v1::DTYPE_FP16)},
        Case{"fp32_gqa_causal_longnet", Config(1, 300, 8, 2, 32, {{128, 2}, {300, 3}}, true,
                                               v1::COMBINE_MODE_LONGNET, v1::DTYPE_FP32)},
        Case{"bf16_mqa_grouped",
             Config(3, 50, 3, 1, 24, {{20, 1}}, false, v1::COMBINE_MODE_GROUPED, v1::DTYPE_BF16)},
        // An output dtype other than the inputs' (output_dtype).
        Case{"bf16_in_fp32_out",
             Config(1, 300, 4, 2, 32, {{64, 1}, {128, 2}}, false, v1::COMBINE_MODE_LONGNET,
                    v1::DTYPE_BF16),
             v1::DTYPE_FP32},
        Case{"fp32_in_bf16_out_causal",
             Config(2, 90, 4, 4, 16, {{32, 1}, {64, 4}}, true, v1::COMBINE_MODE_LONGNET,
                    v1::DTYPE_FP32),
             v1::DTYPE_BF16},
        Case{"fp16_in_fp32_out_grouped",
             Config(1, 130, 6, 3, 8, {{40, 1}, {130, 2}}, false, v1::COMBINE_MODE_GROUPED,
                    v1::DTYPE_FP16),
             v1::DTYPE_FP32}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

class ServerTest : public ::testing::Test {
 protected:
  void Start(const ServerOptions& options) {
    server_ = testing::StartServer(options);
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<client::AttentionClient>(testing::ChannelTo(server_->port()));
  }
  void SetUp() override { Start(testing::LoopbackOptions()); }

  v1::AttendRequest SmallRequest() {
    std::mt19937 rng(std::random_device{}());
    return testing::RandomRequest({}, rng);
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<client::AttentionClient> client_;
};

// bf16 inputs answered in fp32 carry the fp32 compute unrounded: they equal the same inputs sent
// as fp32 (bf16 widens exactly), and their bf16 answer is that rounded. An output dtype that is
// none is refused naming the field.
TEST_F(ServerTest, AnFp32OutputOfBf16InputsIsTheComputeUnrounded) {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest({.seq_len = 256,
                                                      .heads = 4,
                                                      .kv_heads = 2,
                                                      .head_dim = 32,
                                                      .patterns = {{64, 1}, {128, 2}},
                                                      .dtype = v1::DTYPE_BF16},
                                                     rng);
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  v1::AttendRequest widened = request;
  for (v1::Tensor* tensor :
       {widened.mutable_query(), widened.mutable_key(), widened.mutable_value()}) {
    const std::string bits = tensor->data();
    std::string wide(bits.size() * 2, '\0');
    for (size_t i = 0; i < bits.size() / 2; ++i) {
      uint16_t b;
      std::memcpy(&b, bits.data() + 2 * i, 2);
      const float f = engine::BFloat16ToFloat(b);
      std::memcpy(wide.data() + 4 * i, &f, 4);
    }
    tensor->set_dtype(v1::DTYPE_FP32);
    *tensor->mutable_data() = std::move(wide);
  }
  v1::AttendResponse reference;
  ASSERT_TRUE(client_->Attend(widened, &reference, testing::WithTimeout(30000)).ok());
  const auto* want = reinterpret_cast<const float*>(reference.output().data().data());
  const size_t n = reference.output().data().size() / 4;

  request.set_output_dtype(v1::DTYPE_FP32);
  v1::AttendResponse fp32;
  grpc::Status status = client_->Attend(request, &fp32, testing::WithTimeout(30000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(fp32.output().dtype(), v1::DTYPE_FP32);
  ASSERT_EQ(fp32.output().data().size(), n * 4);
  const auto* got = reinterpret_cast<const float*>(fp32.output().data().data());
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    worst = std::max(worst, std::abs(double{got[i]} - want[i]) / (1e-3 + std::abs(want[i])));
  }
  EXPECT_LE(worst, 1e-5);

  request.set_output_dtype(v1::DTYPE_BF16);
  v1::AttendResponse bf16;
  status = client_->AttendStream(request, &bf16, testing::WithTimeout(30000), {.block_tokens = 50});
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(bf16.output().dtype(), v1::DTYPE_BF16);
  ASSERT_EQ(bf16.output().data().size(), n * 2);
  worst = 0;
  for (size_t i = 0; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, bf16.output().data().data() + 2 * i, 2);
    worst = std::max(
        worst, std::abs(double{engine::BFloat16ToFloat(b)} - want[i]) / (1e-3 + std::abs(want[i])));
  }
  EXPECT_LE(worst, 1.0 / 256);  // Half a bf16 ulp from rounding, and the compute's 1e-5.

  request.set_output_dtype(static_cast<v1::DType>(7));
  status = client_->Attend(request, &bf16, testing::WithTimeout(30000));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("output_dtype has unknown value 7"), std::string::npos)
      << status.error_message();
}

// A token of a wider output than its inputs must fit an answer message too: refused at the
// header, before anything is computed.
TEST_F(ServerTest, AnOutputTokenOverTheMessageLimitIsRefusedAtTheHeader) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_message_bytes = 2048;
  Start(options);
  std::mt19937 rng(std::random_device{}());
  // A token: 1280 bytes of bf16 q, k and v (8 heads, 1 kv head, 64 dims); 2048 of fp32 output.
  v1::AttendRequest request = testing::RandomRequest({.seq_len = 16,
                                                      .heads = 8,
                                                      .kv_heads = 1,
                                                      .head_dim = 64,
                                                      .patterns = {{16, 1}},
                                                      .dtype = v1::DTYPE_BF16},
                                                     rng);
  v1::AttendResponse response;
  grpc::Status status =
      client_->AttendStream(request, &response, testing::WithTimeout(30000), {.block_tokens = 1});
  ASSERT_TRUE(status.ok()) << status.error_message();  // bf16 out: the answer fits.
  request.set_output_dtype(v1::DTYPE_FP32);
  status =
      client_->AttendStream(request, &response, testing::WithTimeout(30000), {.block_tokens = 1});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("one token of output across batch 1 needs 2048 bytes in "
                                        "an answer message, over --max-message-bytes 2048"),
            std::string::npos)
      << status.error_message();
}

TEST_F(ServerTest, RequestIdComesFromMetadataThenFieldThenIsGenerated) {
  v1::AttendRequest request = SmallRequest();
  request.set_request_id("from-field");
  v1::AttendResponse response;
  ASSERT_TRUE(client_->Attend(request, &response, {.request_id = "from-metadata"}).ok());
  EXPECT_EQ(response.info().request_id(), "from-metadata");

  ASSERT_TRUE(client_->Attend(request, &response).ok());
  EXPECT_EQ(response.info().request_id(), "from-field");

  request.clear_request_id();
  ASSERT_TRUE(client_->Attend(request, &response).ok());
  EXPECT_EQ(response.info().request_id().size(), 16u);
  EXPECT_EQ(response.info().request_id().find_first_not_of("0123456789abcdef"), std::string::npos);
}

TEST_F(ServerTest, HealthIsServingForLivenessAndReadiness) {
  for (const std::string service : {"", "da.v1.AttentionService"}) {
    auto status = grpc::health::v1::HealthCheckResponse::UNKNOWN;
    grpc::Status call = client_->CheckHealth(service, &status);
    ASSERT_TRUE(call.ok()) << "'" << service << "': " << call.error_message();
    EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::SERVING) << "'" << service << "'";
  }
}

// Server reflection, spoken without its generated stubs (Debian ships no reflection.proto): a
// ServerReflectionRequest{list_services: "*"} is the three bytes 0x3a 0x01 '*', and the answer
// holds the service names as plain strings.
TEST_F(ServerTest, ReflectionListsTheServices) {
  std::shared_ptr<grpc::Channel> channel = testing::ChannelTo(server_->port());
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING);
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &context));
  const grpc::Slice list_services(std::string("\x3a\x01*", 3));
  ASSERT_TRUE(stream->Write(grpc::ByteBuffer(&list_services, 1)));
  stream->WritesDone();
  grpc::ByteBuffer answer;
  ASSERT_TRUE(stream->Read(&answer));
  EXPECT_TRUE(stream->Finish().ok());
  grpc::Slice bytes;
  ASSERT_TRUE(answer.DumpToSingleSlice(&bytes).ok());
  const std::string text(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
  EXPECT_NE(text.find("da.v1.AttentionService"), std::string::npos);
  EXPECT_NE(text.find("grpc.health.v1.Health"), std::string::npos);
}

TEST_F(ServerTest, ServerInfoListsTheCpuDeviceAndLimits) {
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client_->GetServerInfo(&info).ok());
  EXPECT_FALSE(info.version().empty());
  ASSERT_GE(info.devices_size(), 1);
  EXPECT_EQ(info.devices(0).id(), "cpu:0");
  EXPECT_EQ(info.devices(0).kind(), "cpu");
  EXPECT_EQ(info.devices(0).compute_units(), kThreads);
  EXPECT_GE(info.devices(0).precisions_size(), 1);
  EXPECT_EQ(info.limits().max_message_bytes(), 64 << 20);
  EXPECT_EQ(info.limits().max_request_bytes(), 16LL << 30);
  EXPECT_EQ(info.limits().max_tokens(), 0);
  EXPECT_EQ(info.plan_cache().hits(), 0);
}

// --cpu-devices 2: GetServerInfo lists both devices, a SEQUENCE request runs across both and
// equals the one-device output, a NONE request takes one, and /metrics counts runs per device.
TEST_F(ServerTest, TwoCpuDevicesAreListedShardAcrossAndCountedPerDevice) {
  ServerOptions options = testing::LoopbackOptions();
  options.threads = 2;
  options.cpu_devices = 2;
  options.metrics_address = "127.0.0.1:0";
  Start(options);
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client_->GetServerInfo(&info).ok());
  ASSERT_EQ(info.devices_size(), 2);
  EXPECT_EQ(info.devices(0).id(), "cpu:0");
  EXPECT_EQ(info.devices(1).id(), "cpu:1");
  EXPECT_EQ(info.devices(1).compute_units(), 1);

  std::mt19937 rng(42);
  v1::AttendRequest request = testing::RandomRequest(
      {.seq_len = 300, .heads = 4, .kv_heads = 2, .head_dim = 16, .patterns = {{64, 1}, {256, 4}}},
      rng);
  request.mutable_spec()->set_shard_policy(v1::SHARD_POLICY_SEQUENCE);
  v1::AttendResponse response;
  grpc::Status status = client_->Attend(request, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.info().shard_strategy(), v1::SHARD_POLICY_SEQUENCE);
  ASSERT_EQ(response.info().devices_size(), 2);
  EXPECT_EQ(response.info().devices(1), "cpu:1");
  EXPECT_EQ(response.output().data(), testing::InProcessOutput(request, 1));

  request.mutable_spec()->set_shard_policy(v1::SHARD_POLICY_NONE);
  status = client_->Attend(request, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.info().devices_size(), 1);

  const std::optional<std::string> text = testing::HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  const double runs0 =
      testing::MetricValue(*text, "da_device_runs_total{device=\"cpu:0\"}").value_or(-1);
  const double runs1 =
      testing::MetricValue(*text, "da_device_runs_total{device=\"cpu:1\"}").value_or(-1);
  // The self-check's runs are on its own engine: only the two requests count, the sharded one
  // on both devices, the other on one.
  EXPECT_EQ(runs0 + runs1, 3) << *text;
  EXPECT_GE(runs0, 1);
  EXPECT_GE(runs1, 1);
  EXPECT_GT(testing::MetricValue(*text, "da_device_plan_cache_bytes{device=\"cpu:1\"}").value_or(0),
            0)
      << *text;
  // CPU devices share the host memory account: its budget, nothing held between requests. A
  // unary answer stays counted until gRPC is done with it (Engine::HoldMemory), which may be a
  // moment after the client has it: wait for that.
  EXPECT_EQ(testing::MetricValue(*text,
                                 "da_device_memory_budget_bytes{account=\"host\",device=\"cpu:1\"}")
                .value_or(-1),
            testing::MetricValue(*text, "da_memory_budget_bytes").value_or(-2))
      << *text;
  const std::string reserved = "da_device_memory_reserved_bytes{account=\"host\",device=\"cpu:0\"}";
  std::optional<std::string> later;
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        later = testing::HttpGet(server_->metrics_port(), "/metrics");
        return later.has_value() && testing::MetricValue(*later, reserved).value_or(-1) == 0;
      },
      std::chrono::seconds(5)))
      << later.value_or("no /metrics");
}

// --keepalive-timeout-ms 0 turns keepalive off, as the flag says, rather than closing every
// connection at its first ping (gRPC starts the ping's watchdog at now + 0): a call whose client
// waits 2.5 s in silence, past a 1 s keepalive time, is answered.
TEST_F(ServerTest, AKeepaliveTimeoutOfZeroTurnsKeepaliveOff) {
  ServerOptions options = testing::LoopbackOptions();
  options.keepalive_time_ms = 1000;
  options.keepalive_timeout_ms = 0;
  options.before_unary_answer = [](grpc::CallbackServerContext&) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // Nothing moves meanwhile.
  };
  Start(options);
  std::mt19937 rng(9);
  const v1::AttendRequest request = testing::RandomRequest({}, rng);
  client::AttentionClient client(testing::ChannelTo(server_->port()));
  v1::AttendResponse response;
  const grpc::Status status = client.Attend(request, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  EXPECT_EQ(response.output().data(), testing::InProcessOutput(request, kThreads));
}

// An answer computed OK whose call is cancelled before it is sent (the client went away) is
// counted as undelivered and logged with CANCELLED, not counted as delivered. The test hook holds
// the answer until the server has seen the client's cancellation.
TEST_F(ServerTest, AnAnswerWhoseCallIsCancelledBeforeItIsSentIsCountedUndelivered) {
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  std::promise<void> computed;
  std::promise<bool> saw_cancel;
  options.before_unary_answer = [&](grpc::CallbackServerContext& context) {
    computed.set_value();
    saw_cancel.set_value(
        testing::WaitFor([&] { return context.IsCancelled(); }, std::chrono::seconds(10)));
  };
  Start(options);
  auto stub = v1::AttentionService::NewStub(testing::ChannelTo(server_->port()));
  std::mt19937 rng(8);
  const v1::AttendRequest request = testing::RandomRequest({}, rng);
  grpc::ClientContext context;
  v1::AttendResponse response;
  grpc::Status status;
  std::thread call([&] { status = stub->Attend(&context, request, &response); });
  computed.get_future().wait();
  context.TryCancel();
  call.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  EXPECT_TRUE(saw_cancel.get_future().get()) << "the server never saw the cancellation";
  const auto undelivered = [&] {
    const std::string text = testing::HttpGet(server_->metrics_port(), "/metrics").value_or("");
    return testing::MetricValue(text, "da_answers_undelivered_total{method=\"Attend\"}")
        .value_or(-1);
  };
  EXPECT_TRUE(testing::WaitFor([&] { return undelivered() == 1; }, std::chrono::seconds(10)))
      << undelivered();
}

// A client that asks for a unary answer and never reads it (a raw HTTP/2 client that grants no
// flow-control window): the answer waits in the server. It stays counted against the memory
// budget while it waits, and the idle limit ends the call, as for a stream.
TEST_F(ServerTest, AnAnswerNobodyReadsIsCountedThenEndedAfterTheIdleLimit) {
  ServerOptions options = testing::LoopbackOptions();
  options.stream_idle_timeout_ms = 1000;
  options.metrics_address = "127.0.0.1:0";
  Start(options);
  std::mt19937 rng(std::random_device{}());
  // 8192 x 8 x 64 fp32: a request of 48 MiB and an answer of 16 MiB, far above any flow-control
  // window.
  const v1::AttendRequest request = testing::RandomRequest(
      {.seq_len = 8192, .heads = 8, .kv_heads = 8, .head_dim = 64, .patterns = {{1024, 1}}}, rng);
  const int64_t output_bytes = int64_t{8192} * 8 * 64 * 4;
  // The unary method called as a stream: the request goes out, and no read is ever started.
  std::shared_ptr<grpc::Channel> channel = testing::ChannelTo(server_->port());
  const grpc::internal::RpcMethod method("/da.v1.AttentionService/Attend",
                                         grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AttendRequest, v1::AttendResponse>> call(
      grpc::internal::ClientReaderWriterFactory<v1::AttendRequest, v1::AttendResponse>::Create(
          channel.get(), method, &context));
  ASSERT_TRUE(call->Write(request));
  ASSERT_TRUE(call->WritesDone());
  const auto metric = [&](const std::string& series) {
    const std::string text = testing::HttpGet(server_->metrics_port(), "/metrics").value_or("");
    return testing::MetricValue(text, series).value_or(-1);
  };
  ASSERT_TRUE(testing::WaitFor([&] { return metric("da_engine_runs_completed_total") == 1; },
                               std::chrono::seconds(60)));
  const auto computed = std::chrono::steady_clock::now();
  // Computed and waiting on the client: the answer is held, and counted.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_GE(metric("da_memory_reserved_bytes"), output_bytes);
  // Then ended by the idle limit: the call is cancelled, the memory returns, and the lost
  // answer is counted.
  ASSERT_TRUE(testing::WaitFor([&] { return metric("da_memory_reserved_bytes") == 0; },
                               std::chrono::seconds(10)))
      << metric("da_memory_reserved_bytes");
  const double ended_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - computed).count();
  // Not at once (held until the limit), nor long after it (a loaded machine may be slow to look).
  EXPECT_GT(ended_s, 0.5);
  EXPECT_LT(ended_s, 1.0 + 2.0);
  EXPECT_TRUE(testing::WaitFor(
      [&] { return metric("da_answers_undelivered_total{method=\"Attend\"}") == 1; },
      std::chrono::seconds(5)));
  // The client sees the server's cancel: no message arrives whole, and the call ends CANCELLED
  // (had the server kept the call, the answer would arrive now and the call end OK).
  v1::AttendResponse response;
  EXPECT_FALSE(call->Read(&response));
  EXPECT_EQ(call->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// The default budgets leave the process room of its own: an 8 GiB pod with every budget full
// stays 512 MiB under its limit (plan cache 1 GiB, admission 4.5 GiB, gRPC 2 GiB), where the sum
// was the whole limit before. Also in a pod under 1 GiB, where gRPC's 256 MiB is more than a
// quarter (a 512 MiB pod: 64 + 160 + 256 + 32 MiB), and beside a plan cache of half the memory.
TEST(ServerOptionsTest, DefaultBudgetsLeaveTheProcessRoomOfItsOwn) {
  for (const int64_t m :
       {int64_t{512} << 20, int64_t{1} << 30, int64_t{8} << 30, int64_t{64} << 30}) {
    const int64_t cache = DefaultPlanCacheBytes(m);
    const int64_t grpc = DefaultGrpcMemoryBytes(m);
    const int64_t budget = DefaultMemoryBudgetBytes(m, cache, grpc);
    EXPECT_EQ(m - cache - budget - grpc, DefaultProcessReserveBytes(m)) << m;
    EXPECT_GE(DefaultProcessReserveBytes(m), std::min<int64_t>(m / 16, int64_t{512} << 20));
    // An unbounded gRPC is counted at its default.
    EXPECT_EQ(DefaultMemoryBudgetBytes(m, cache, 0), budget) << m;
  }
  EXPECT_EQ(DefaultMemoryBudgetBytes(int64_t{8} << 30, int64_t{1} << 30, int64_t{2} << 30),
            int64_t{9} << 29);
  EXPECT_EQ(DefaultMemoryBudgetBytes(int64_t{512} << 20, int64_t{64} << 20, int64_t{256} << 20),
            int64_t{160} << 20);
  // 8 GiB with a 4 GiB plan cache: 8 - 4 - 2 - 0.5 GiB (a quarter would have passed the limit).
  EXPECT_EQ(DefaultMemoryBudgetBytes(int64_t{8} << 30, int64_t{4} << 30, int64_t{2} << 30),
            int64_t{3} << 29);
  // Only the floor, an eighth, passes the memory.
  EXPECT_EQ(DefaultMemoryBudgetBytes(int64_t{256} << 20, int64_t{32} << 20, int64_t{256} << 20),
            int64_t{32} << 20);
}

// gRPC's own buffers: bounded by default from the process's memory, refused when negative.
TEST(ServerOptionsTest, GrpcMemoryIsAQuarterOfMemoryAtLeast256MiBAndNeverNegative) {
  EXPECT_EQ(DefaultGrpcMemoryBytes(int64_t{64} << 30), int64_t{16} << 30);
  EXPECT_EQ(DefaultGrpcMemoryBytes(int64_t{512} << 20), int64_t{256} << 20);
  ServerOptions options = testing::LoopbackOptions();
  options.grpc_memory_bytes = -1;
  const absl::StatusOr<std::unique_ptr<Server>> refused = Server::Start(options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().message(), "grpc_memory_bytes is -1; must be >= 0 (0: unbounded)");
}

TEST_F(ServerTest, UnaryAboveMaxMessageBytesIsResourceExhausted) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_message_bytes = 1 << 20;
  Start(options);
  std::mt19937 rng(std::random_device{}());
  // q + k + v = 3 x 512 KiB: above the 1 MiB message limit.
  const v1::AttendRequest request =
      testing::RandomRequest({.seq_len = 2048, .heads = 4, .kv_heads = 4, .head_dim = 16}, rng);
  v1::AttendResponse response;
  grpc::Status status = client_->Attend(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
}

TEST_F(ServerTest, AboveMaxRequestBytesIsResourceExhaustedNamingValueAndLimit) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_request_bytes = 100000;
  Start(options);
  std::mt19937 rng(std::random_device{}());
  // q, k, v and output of 64 x 4 x 32 fp32 each: 4 x 32768 = 131072 bytes.
  const v1::AttendRequest request =
      testing::RandomRequest({.seq_len = 64, .heads = 4, .kv_heads = 4, .head_dim = 32}, rng);
  v1::AttendResponse response;
  grpc::Status unary = client_->Attend(request, &response);
  EXPECT_EQ(unary.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(unary.error_message().find("131072"), std::string::npos) << unary.error_message();
  EXPECT_NE(unary.error_message().find("100000"), std::string::npos) << unary.error_message();

  grpc::Status stream = client_->AttendStream(request, &response);
  EXPECT_EQ(stream.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(stream.error_message().find("131072"), std::string::npos) << stream.error_message();
  EXPECT_NE(stream.error_message().find("100000"), std::string::npos) << stream.error_message();
}

TEST_F(ServerTest, AboveMaxTokensIsResourceExhausted) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_tokens = 100;
  Start(options);
  std::mt19937 rng(std::random_device{}());
  const v1::AttendRequest request = testing::RandomRequest({.batch = 2, .seq_len = 64}, rng);
  v1::AttendResponse response;
  grpc::Status status = client_->Attend(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(status.error_message().find("128"), std::string::npos) << status.error_message();
}

TEST_F(ServerTest, ExpiredDeadlineStopsTheRunAndTheServerStaysUsable) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_message_bytes = 1 << 30;
  Start(options);
  // 2.2e12 FLOPs: over five seconds uncancelled at two cores' fp32 peak; the kernel checks for
  // cancellation per panel of queries, so it takes effect quickly.
  const v1::AttendRequest long_request = testing::LongRequest(131072);
  v1::AttendResponse response;
  grpc::Status status = client_->Attend(long_request, &response, testing::WithTimeout(1500));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();

  // The cancelled run gives the engine back promptly: a small request is answered well within
  // the time the long one would have taken.
  const auto start = std::chrono::steady_clock::now();
  status = client_->Attend(SmallRequest(), &response, testing::WithTimeout(20000));
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST_F(ServerTest, ShutdownTurnsHealthOffAndRefusesCalls) {
  server_->Shutdown(std::chrono::milliseconds(1000));
  auto serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
  grpc::Status health = client_->CheckHealth("da.v1.AttentionService", &serving);
  EXPECT_TRUE(!health.ok() || serving != grpc::health::v1::HealthCheckResponse::SERVING);
  v1::AttendResponse response;
  grpc::Status status = client_->Attend(SmallRequest(), &response, testing::WithTimeout(5000));
  EXPECT_FALSE(status.ok());
}

}  // namespace
}  // namespace da::server
