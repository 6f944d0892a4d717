#include "client/attention_client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/connection_options.h"
#include "client/echo_server_test_util.h"
#include "client/retry.h"
#include "client/tensor_io.h"

namespace da::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

v1::AttendRequest RandomRequest(v1::DType dtype, int64_t batch, int64_t seq_len, int64_t heads,
                                int64_t kv_heads, int64_t head_dim) {
  v1::AttendRequest request;
  request.mutable_spec()->add_segment_lengths(64);
  request.mutable_spec()->add_dilation_rates(1);
  *request.mutable_query() = RandomTensor(dtype, {batch, seq_len, heads, head_dim}, 1, 0);
  *request.mutable_key() = RandomTensor(dtype, {batch, seq_len, kv_heads, head_dim}, 1, 1);
  *request.mutable_value() = RandomTensor(dtype, {batch, seq_len, kv_heads, head_dim}, 1, 2);
  return request;
}

class AttentionClientTest : public testing::Test {
 protected:
  EchoServer server_;
  AttentionClient client_{MakeChannel(server_.address())};
};

TEST_F(AttentionClientTest, AttendSendsRequestIdAndReceivesMoreThanFourMebibytes) {
  // 8 MiB of output: above gRPC's default 4 MiB receive limit, so MakeChannel's limit matters.
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 4096, 8, 8, 64);
  v1::AttendResponse response;
  const grpc::Status status = client_.Attend(request, &response, {.request_id = "abc"});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().data(), request.query().data());
  EXPECT_EQ(response.info().request_id(), "abc");
}

TEST_F(AttentionClientTest, AttendStreamGathersAndScattersEveryBatchElement) {
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP16, 3, 1000, 2, 1, 8);
  request.set_request_id("stream-1");
  v1::AttendResponse response;
  const grpc::Status status =
      client_.AttendStream(request, &response, {.timeout_ms = 20000}, {.block_tokens = 7});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().dtype(), v1::DTYPE_FP16);
  EXPECT_THAT(response.output().shape(), ElementsAre(3, 1000, 2, 8));
  EXPECT_EQ(response.output().data(), request.query().data());
  EXPECT_EQ(response.info().request_id(), "stream-1");
  EXPECT_EQ(response.info().backend(), "echo");
}

TEST_F(AttentionClientTest, AttendStreamMatchesUnaryWithDefaultBlocks) {
  // 48 MiB of q, k, v in blocks of about 4 MiB, answered block by block while still being sent.
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 2, 4096, 8, 8, 64);
  v1::AttendResponse unary, streamed;
  ASSERT_TRUE(client_.Attend(request, &unary).ok());
  const grpc::Status status = client_.AttendStream(request, &streamed);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(streamed.output().data(), unary.output().data());
  EXPECT_EQ(streamed.output().dtype(), unary.output().dtype());
  EXPECT_THAT(streamed.output().shape(), ElementsAre(2, 4096, 8, 64));
}

TEST_F(AttentionClientTest, AttendStreamCountsTheBytesItMoves) {
  // Batch 1 (rows sent where they lie) and 3 (gathered), one stream and parts; fp16 q of 2 heads,
  // k and v of 1.
  for (int64_t batch : {1, 3}) {
    for (int parts : {1, 3}) {
      SCOPED_TRACE(testing::Message() << "batch " << batch << ", " << parts << " parts");
      const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP16, batch, 1000, 2, 1, 8);
      StreamProgress progress;
      v1::AttendResponse response;
      const grpc::Status status = client_.AttendStream(
          request, &response, {},
          {.block_tokens = 7, .parallel_streams = parts, .progress = &progress});
      ASSERT_TRUE(status.ok()) << status.error_message();
      EXPECT_EQ(response.output().data(), request.query().data());
      EXPECT_EQ(progress.sent_bytes.load(), batch * 1000 * (2 + 1 + 1) * 8 * 2);
      EXPECT_EQ(progress.received_bytes.load(), batch * 1000 * 2 * 8 * 2);
    }
  }
}

TEST(AttentionClientAutoTest, SendsWhatFitsAMessageWholeAndStreamsTheRestWithinHalfAMessage) {
  constexpr int64_t kMessage = 1 << 20;
  EchoServer server(kMessage);
  AttentionClient client(MakeChannel(server.address()));
  // q, k, v and the output: 4 x 128 KiB fit the server's 1 MiB; 4 x 1 MiB do not.
  v1::AttendRequest small = RandomRequest(v1::DTYPE_FP32, 1, 64, 8, 8, 64);
  small.set_request_id("small");
  v1::AttendRequest large = RandomRequest(v1::DTYPE_FP32, 1, 512, 8, 8, 64);
  large.set_request_id("large");
  for (const v1::AttendRequest* request : {&small, &large, &small}) {
    v1::AttendResponse response;
    const grpc::Status status =
        client.AttendAuto(*request, &response, {.request_id = request->request_id()});
    ASSERT_TRUE(status.ok()) << request->request_id() << ": " << status.error_message();
    EXPECT_EQ(response.output().data(), request->query().data());
    EXPECT_THAT(response.output().shape(), ElementsAre(1, request->query().shape(1), 8, 64));
  }
  EXPECT_EQ(server.calls("small"), 2);
  EXPECT_EQ(server.streams("small"), 0) << "a request that fits a message was streamed";
  EXPECT_EQ(server.calls("large"), 1);
  EXPECT_EQ(server.streams("large"), 1) << "a request over the limit went in one message";
  EXPECT_GT(server.largest_block_bytes("large"), 0);
  EXPECT_LE(server.largest_block_bytes("large"), kMessage / 2);
  EXPECT_EQ(server.info_calls(), 1) << "the server's limit is asked once per client";

  // Parts when asked for: the echo's chunks are 64 tokens.
  large.set_request_id("large-parts");
  v1::AttendResponse response;
  const grpc::Status status =
      client.AttendAuto(large, &response, {.request_id = "large-parts"}, {.parallel_streams = 3});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().data(), large.query().data());
  for (const char* part : {"large-parts/1", "large-parts/2", "large-parts/3"}) {
    EXPECT_EQ(server.streams(part), 1) << part;
  }
}

TEST(AttentionClientAutoTest, TheClientsOwnLimitCountsWhereItIsTheSmaller) {
  EchoServer server;  // Reports no limit: the server's default, 64 MiB.
  AttentionClient client(MakeChannel(server.address(), 1 << 20));
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 512, 8, 8, 64);  // 4 MiB in all.
  request.set_request_id("unary");
  v1::AttendResponse response;
  // Sent whole, its 1 MiB answer is over what the channel takes.
  const grpc::Status refused = client.AttendAuto(request, &response, {.request_id = "unary"});
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_EQ(server.streams("unary"), 0);
  client.SetMessageLimit(1 << 20);  // What its channel was made with.
  request.set_request_id("streamed");
  const grpc::Status status = client.AttendAuto(request, &response, {.request_id = "streamed"});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().data(), request.query().data());
  EXPECT_EQ(server.streams("streamed"), 1);
  EXPECT_LE(server.largest_block_bytes("streamed"), (1 << 20) / 2);
}

TEST(AttentionClientAutoTest, AFailedAskForTheLimitFailsTheCall) {
  AttentionClient client(MakeChannel("127.0.0.1:1"));  // Nobody listens there.
  v1::AttendResponse response;
  const grpc::Status status = client.AttendAuto(RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8),
                                                &response, {.timeout_ms = 5000});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
}

// Quick backoffs, so that the retry tests take milliseconds.
constexpr RetryPolicy kQuickRetry{
    .max_attempts = 10, .initial_backoff_ms = 10, .max_backoff_ms = 20};

TEST_F(AttentionClientTest, CallsRefusedUnreadAreSentAgainUntilTheServerTakesThem) {
  // The echo refuses the first N calls of id "refuse-N..." as a draining server does.
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 1000, 2, 2, 8);
  v1::AttendResponse response;
  grpc::Status status =
      client_.Attend(request, &response, {.request_id = "refuse-3", .retry = kQuickRetry});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().data(), request.query().data());
  EXPECT_EQ(server_.calls("refuse-3"), 4);

  // A stream, and a request in three parts, each part refused twice and sent again on its own.
  // The bytes sent count once: a refused attempt's are taken back out of the progress.
  for (const auto& [parts, id] : {std::pair{1, "refuse-2s"}, {3, "refuse-2p"}}) {
    SCOPED_TRACE(testing::Message() << parts << " parts");
    v1::AttendRequest named = request;
    named.set_request_id(id);  // The stream's header carries it.
    StreamProgress progress;
    status = client_.AttendStream(
        named, &response, {.retry = kQuickRetry},
        {.block_tokens = 100, .parallel_streams = parts, .progress = &progress});
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.output().data(), request.query().data());
    EXPECT_EQ(progress.sent_bytes.load(), 1000 * (2 + 2 + 2) * 8 * 4);
    EXPECT_EQ(progress.received_bytes.load(), 1000 * 2 * 8 * 4);
    if (parts == 1) {
      EXPECT_EQ(server_.calls(id), 3);
    } else {
      for (int part = 1; part <= parts; ++part) {
        EXPECT_EQ(server_.calls(absl::StrCat(id, "/", part)), 3) << "part " << part;
      }
    }
  }
}

TEST_F(AttentionClientTest, RetriesEndAtTheirCountAndBeforeTheDeadline) {
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8);
  v1::AttendResponse response;
  RetryPolicy three = kQuickRetry;
  three.max_attempts = 3;
  grpc::Status status =
      client_.Attend(request, &response, {.request_id = "refuse-99", .retry = three});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("draining: refusal 3 (refused 3 times over "));
  EXPECT_EQ(server_.calls("refuse-99"), 3);

  // Backoffs of 50-100 ms within 400 ms, each attempt left at least as long as its backoff: the
  // refusal comes back before the deadline, not DEADLINE_EXCEEDED, after 3 to 8 attempts.
  v1::AttendRequest named = request;
  named.set_request_id("refuse-98");  // The stream's header carries it.
  const auto start = std::chrono::steady_clock::now();
  status = client_.AttendStream(
      named, &response,
      {.timeout_ms = 400,
       .retry = {.max_attempts = 1000, .initial_backoff_ms = 100, .max_backoff_ms = 100}});
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(400));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_GE(server_.calls("refuse-98"), 3);
  EXPECT_LE(server_.calls("refuse-98"), 8);
}

TEST_F(AttentionClientTest, OnlyRefusalsMarkedUnreadAreSentAgain) {
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8);
  v1::AttendResponse response;
  // UNAVAILABLE without "da-refused": the request may have brought the server down.
  EXPECT_EQ(client_.Attend(request, &response, {.request_id = "unavailable", .retry = kQuickRetry})
                .error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(server_.calls("unavailable"), 1);
  // Retries off.
  EXPECT_EQ(
      client_.Attend(request, &response, {.request_id = "refuse-1", .retry = {.max_attempts = 1}})
          .error_code(),
      grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(server_.calls("refuse-1"), 1);
  // Blocks the caller produces once are not produced again: the refusal comes back.
  v1::StreamHeader header;
  header.set_request_id("refuse-1b");
  header.set_batch(1);
  header.set_seq_len(64);
  header.set_heads(2);
  header.set_kv_heads(2);
  header.set_head_dim(8);
  header.set_dtype(v1::DTYPE_FP32);
  *header.mutable_spec() = request.spec();
  bool sent = false;
  const grpc::Status status = client_.AttendStreamBlocks(
      header,
      [&](v1::TokenBlock* block) {
        if (sent) return false;
        sent = true;
        block->set_token_count(64);
        block->set_query(request.query().data());
        block->set_key(request.key().data());
        block->set_value(request.value().data());
        return true;
      },
      [](const v1::AttendStreamResponse&) { return grpc::Status::OK; }, {.retry = kQuickRetry});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_EQ(server_.calls("refuse-1b"), 1);
}

// A draining server refuses new calls on every open connection while any call on it runs; a
// retry on a connection of its own reaches, through a load balancer, a replica that serves.
TEST(AttentionClientRetryTest, WithRetryChannelsEachRetryGoesOnAConnectionOfItsOwn) {
  EchoServer server;
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 300, 2, 2, 8);
  v1::AttendResponse response;
  AttentionClient same(MakeChannel(server.address()));
  ASSERT_TRUE(
      same.Attend(request, &response, {.request_id = "refuse-2a", .retry = kQuickRetry}).ok());
  EXPECT_EQ(server.calls("refuse-2a"), 3);
  EXPECT_EQ(server.peers("refuse-2a").size(), 1u);

  AttentionClient fresh({MakeChannel(server.address())},
                        FreshChannels(server.address(), ConnectionOptions{}));
  ASSERT_TRUE(
      fresh.Attend(request, &response, {.request_id = "refuse-2b", .retry = kQuickRetry}).ok());
  EXPECT_EQ(response.output().data(), request.query().data());
  EXPECT_EQ(server.calls("refuse-2b"), 3);
  EXPECT_EQ(server.peers("refuse-2b").size(), 3u);
  for (const auto& [parts, id] : {std::pair{1, "refuse-2c"}, {2, "refuse-2d"}}) {
    request.set_request_id(id);
    const grpc::Status status = fresh.AttendStream(request, &response, {.retry = kQuickRetry},
                                                   {.block_tokens = 50, .parallel_streams = parts});
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.output().data(), request.query().data());
    const std::string part = parts == 1 ? id : absl::StrCat(id, "/2");
    EXPECT_EQ(server.calls(part), 3) << part;
    EXPECT_EQ(server.peers(part).size(), 3u) << part;
  }
}

TEST(RetryBackoffTest, DoublesUpToItsCeilingEachDrawnFromItsUpperHalf) {
  std::mt19937_64 rng(7);
  const RetryPolicy policy;  // 250 ms doubling to 2 s.
  const int64_t expected[] = {250, 500, 1000, 2000, 2000, 2000};
  for (int attempt = 2; attempt < 8; ++attempt) {
    const int64_t full = expected[attempt - 2];
    int64_t low = full, high = 0;
    for (int i = 0; i < 200; ++i) {
      const int64_t drawn = RetryBackoff(policy, attempt, rng).count();
      low = std::min(low, drawn);
      high = std::max(high, drawn);
    }
    EXPECT_GE(low, full / 2) << "attempt " << attempt;
    EXPECT_LE(high, full) << "attempt " << attempt;
    EXPECT_GT(high - low, full / 4) << "attempt " << attempt << ": not spread";
  }
  EXPECT_EQ(RetryBackoff({.initial_backoff_ms = 0, .max_backoff_ms = 0}, 5, rng).count(), 0);
}

TEST_F(AttentionClientTest, MalformedStreamAnswerIsInternalNamingTheBlock) {
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 300, 2, 2, 8);
  request.set_request_id("bad-block");
  v1::AttendResponse response;
  const grpc::Status status =
      client_.AttendStream(request, &response, {.timeout_ms = 20000}, {.block_tokens = 10});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(status.error_message(), HasSubstr("output block 0 starts at token 1, expected 0"));
}

TEST_F(AttentionClientTest, DeadlinesEndUnaryAndStreamedCalls) {
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8);
  request.set_request_id("wait");
  for (bool stream : {false, true}) {
    SCOPED_TRACE(stream ? "stream" : "unary");
    v1::AttendResponse response;
    const auto start = std::chrono::steady_clock::now();
    const grpc::Status status = stream
                                    ? client_.AttendStream(request, &response, {.timeout_ms = 200})
                                    : client_.Attend(request, &response, {.timeout_ms = 200});
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  }
}

// This process's connections established to the server at address ("127.0.0.1:PORT"), counted
// on the client's side: /proc/net/tcp and tcp6 (where a dual-stack listener's are) lines whose
// remote port is the server's, in state 01 (ESTABLISHED), whose socket is one of this process's
// open files. Not the server's side: another test's process (ctest runs them side by side) may
// connect to a port it was told is free, as this server's may be by then.
int EstablishedConnections(const std::string& address) {
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  std::set<std::string> own;  // Socket inodes.
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code error;
    const std::string target = std::filesystem::read_symlink(entry.path(), error).string();
    if (!error && target.rfind("socket:[", 0) == 0) {
      own.insert(target.substr(8, target.size() - 9));
    }
  }
  int count = 0;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream tcp(table);
    std::string line;
    std::getline(tcp, line);  // The column names.
    while (std::getline(tcp, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >>
          timeout >> inode;
      if (std::stoi(remote.substr(remote.rfind(':') + 1), nullptr, 16) == port && state == "01" &&
          own.count(inode) != 0) {
        ++count;
      }
    }
  }
  return count;
}

// A client that calls without pause keeps its first connection, and so its first server, for
// as long as it lives; renewed by age, each new connection goes where a load balancer sends new
// ones: here a factory that reaches a second server, standing for a replica added by a scale-up.
TEST(AttentionClientAgeTest, ConnectionsPastTheirAgeAreReplacedAndReachAReplicaAddedSince) {
  EchoServer first, added;
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8);
  for (const int64_t age_ms : {0, 100}) {
    AttentionClient client({MakeChannel(first.address())},
                           FreshChannels(added.address(), ConnectionOptions{}), age_ms);
    const std::string id = absl::StrCat("age-", age_ms);
    // Without an age, 50 calls over 0.5 s at least; with one, until 3 connections were renewed
    // (at ages of 90-100 ms, each renewal made by the first call after it).
    const auto started = std::chrono::steady_clock::now();
    int calls = 0;
    while (age_ms == 0 ? calls < 50 || std::chrono::steady_clock::now() - started <
                                           std::chrono::milliseconds(500)
                       : client.connections_renewed() < 3) {
      ASSERT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(30));
      v1::AttendResponse response;
      const grpc::Status status = client.Attend(request, &response, {.request_id = id});
      ASSERT_TRUE(status.ok()) << status.error_message();
      ASSERT_EQ(response.output().data(), request.query().data());
      ++calls;
    }
    EXPECT_EQ(first.calls(id) + added.calls(id), calls);
    EXPECT_EQ(first.peers(id).size(), 1u);
    if (age_ms == 0) {
      EXPECT_EQ(added.calls(id), 0);
      EXPECT_EQ(client.connections_renewed(), 0);
    } else {
      EXPECT_GT(first.calls(id), 0);
      EXPECT_GT(added.calls(id), 0);
      // Each renewal on a connection of its own.
      EXPECT_EQ(static_cast<int64_t>(added.peers(id).size()), client.connections_renewed());
      // Not before its age: 3 renewals take at least 3 ages.
      EXPECT_GE(std::chrono::steady_clock::now() - started, std::chrono::milliseconds(270));
    }
  }
  EXPECT_THROW(AttentionClient({MakeChannel(first.address())}, {}, 1000), std::invalid_argument);
}

// The stream header of RandomRequest(DTYPE_FP32, 1, 256, 2, 2, 8).
v1::StreamHeader SmallStreamHeader(const v1::AttendRequest& request) {
  v1::StreamHeader header;
  *header.mutable_spec() = request.spec();
  header.set_dtype(v1::DTYPE_FP32);
  header.set_batch(1);
  header.set_seq_len(256);
  header.set_heads(2);
  header.set_kv_heads(2);
  header.set_head_dim(8);
  return header;
}

// That request's blocks of 64 tokens, *sent counting the tokens made; at token 128, `at_half`
// runs first (a test's way to throw from the block source).
std::function<bool(v1::TokenBlock*)> SmallStreamBlocks(const v1::AttendRequest& request, int* sent,
                                                       std::function<void()> at_half) {
  return [&request, sent, at_half = std::move(at_half)](v1::TokenBlock* block) {
    if (*sent == 256) return false;
    if (*sent == 128) at_half();
    const int64_t row = 2 * 8 * 4;
    block->set_token_start(*sent);
    block->set_token_count(64);
    block->set_query(request.query().data().substr(*sent * row, 64 * row));
    block->set_key(request.key().data().substr(*sent * row, 64 * row));
    block->set_value(request.value().data().substr(*sent * row, 64 * row));
    *sent += 64;
    return true;
  };
}

// A call still running on a connection past its age finishes there, while new calls go on a new
// connection; the old one closes once the call has ended, its answer read.
TEST(AttentionClientAgeTest, ACallOnAnAgedConnectionFinishesThereAndItsConnectionClosesAfter) {
  EchoServer server;
  AttentionClient client({MakeChannel(server.address())},
                         FreshChannels(server.address(), ConnectionOptions{}), 300);
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 256, 2, 2, 8);
  v1::StreamHeader header = SmallStreamHeader(request);
  header.set_request_id("long");
  std::promise<void> release;
  std::promise<void> halfway;
  std::string output;
  grpc::Status long_status;
  std::thread long_call([&] {
    int sent = 0;
    long_status = client.AttendStreamBlocks(header,
                                            SmallStreamBlocks(request, &sent,
                                                              [&] {
                                                                halfway.set_value();
                                                                release.get_future().wait();
                                                              }),
                                            [&](const v1::AttendStreamResponse& message) {
                                              if (message.has_block())
                                                output += message.block().output();
                                              return grpc::Status::OK;
                                            });
  });
  halfway.get_future().wait();
  EXPECT_EQ(EstablishedConnections(server.address()), 1);
  // 0 unless the long call itself came past the age (a slow thread start).
  const int64_t renewed = client.connections_renewed();
  std::this_thread::sleep_for(std::chrono::milliseconds(350));  // Past the age.
  v1::AttendResponse response;
  request.set_request_id("after");
  ASSERT_TRUE(client.Attend(request, &response).ok());
  EXPECT_EQ(client.connections_renewed(), renewed + 1);
  EXPECT_NE(server.peers("after"), server.peers("long"));
  EXPECT_EQ(EstablishedConnections(server.address()), 2);

  release.set_value();
  long_call.join();
  ASSERT_TRUE(long_status.ok()) << long_status.error_message();
  EXPECT_EQ(output, request.query().data());
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (EstablishedConnections(server.address()) > 1 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(EstablishedConnections(server.address()), 1) << "the aged connection is still open";
}

// Running out of memory while making a block or taking an answer (the whole output is reserved
// as the first block arrives) ends the call with RESOURCE_EXHAUSTED, not the process: the
// exception must not leave the writer thread or skip its join.
TEST_F(AttentionClientTest, OutOfMemoryOnEitherSideOfAStreamEndsTheCall) {
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 256, 2, 2, 8);
  const v1::StreamHeader header = SmallStreamHeader(request);
  const auto blocks = [&](int* sent, bool fail) {
    return SmallStreamBlocks(request, sent, [fail] {
      if (fail) throw std::bad_alloc();
    });
  };
  int sent = 0;
  grpc::Status status =
      client_.AttendStreamBlocks(header, blocks(&sent, false),
                                 [](const v1::AttendStreamResponse& message) -> grpc::Status {
                                   if (message.has_block()) throw std::bad_alloc();
                                   return grpc::Status::OK;
                                 },
                                 {.timeout_ms = 20000});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("out of memory on this client while taking"));
  sent = 0;
  status = client_.AttendStreamBlocks(
      header, blocks(&sent, true), [](const v1::AttendStreamResponse&) { return grpc::Status::OK; },
      {.timeout_ms = 20000});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("out of memory on this client while making"));
}

// A callback that throws anything else ends the call with INTERNAL naming the exception: it must
// not leave the writer thread, nor skip the writer's join on the reading thread.
TEST_F(AttentionClientTest, ACallbackThatThrowsEndsTheCallWithInternal) {
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 256, 2, 2, 8);
  const v1::StreamHeader header = SmallStreamHeader(request);
  int sent = 0;
  const auto blocks = [&](bool fail) {
    return SmallStreamBlocks(request, &sent, [fail] {
      if (fail) throw std::runtime_error("no more blocks today");
    });
  };
  grpc::Status status =
      client_.AttendStreamBlocks(header, blocks(false),
                                 [](const v1::AttendStreamResponse& message) -> grpc::Status {
                                   if (message.has_block()) {
                                     throw std::runtime_error("cannot take this block");
                                   }
                                   return grpc::Status::OK;
                                 },
                                 {.timeout_ms = 20000});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("callback threw: cannot take this block"));

  sent = 0;
  status = client_.AttendStreamBlocks(
      header, blocks(true), [](const v1::AttendStreamResponse&) { return grpc::Status::OK; },
      {.timeout_ms = 20000});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("callback threw: no more blocks today"));

  // Not a std::exception, thrown by the zero-copy interface's output block callback.
  sent = 0;
  const auto next_block = blocks(false);
  status = client_.AttendStreamShared(
      header,
      [&]() -> std::shared_ptr<const v1::TokenBlock> {
        auto block = std::make_shared<v1::TokenBlock>();
        if (!next_block(block.get())) return nullptr;
        return block;
      },
      {.on_block = [](const OutputBlockView&) -> grpc::Status { throw 42; },
       .on_message = [](const v1::AttendStreamResponse&) { return grpc::Status::OK; }},
      {.timeout_ms = 20000});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("callback threw: an exception that is not"));

  // The client still works.
  v1::AttendResponse response;
  EXPECT_TRUE(client_.AttendStream(request, &response, {.timeout_ms = 20000}).ok());
}

// A timeout past what the clock can hold (a year) is a year, not a deadline in the past.
TEST_F(AttentionClientTest, TimeoutsBeyondAYearAreAYear) {
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8);
  for (int64_t timeout_ms :
       {kMaxTimeoutMs, kMaxTimeoutMs + 1, int64_t{1} << 53, std::numeric_limits<int64_t>::max()}) {
    SCOPED_TRACE(timeout_ms);
    v1::AttendResponse response;
    grpc::Status status = client_.Attend(request, &response, {.timeout_ms = timeout_ms});
    EXPECT_TRUE(status.ok()) << status.error_message();
    status = client_.AttendStream(request, &response, {.timeout_ms = timeout_ms});
    EXPECT_TRUE(status.ok()) << status.error_message();
    v1::GetServerInfoResponse info;
    status = client_.GetServerInfo(&info, {.timeout_ms = timeout_ms});
    EXPECT_TRUE(status.ok()) << status.error_message();
  }
  std::shared_ptr<grpc::Channel> channel = MakeChannel(server_.address());
  EXPECT_TRUE(WaitForConnection(*channel, std::numeric_limits<int64_t>::max()).ok());
  EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
}

TEST_F(AttentionClientTest, AttendStreamRejectsAnUnsplittableRequestLocally) {
  v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 64, 2, 2, 8);
  request.mutable_value()->mutable_data()->resize(3);
  v1::AttendResponse response;
  const grpc::Status status = client_.AttendStream(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("value: shape [1, 64, 2, 8]"));
}

TEST_F(AttentionClientTest, GetsServerInfoAndHealth) {
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client_.GetServerInfo(&info, {.timeout_ms = 5000}).ok());
  EXPECT_EQ(info.version(), "echo-1");
  EXPECT_EQ(info.devices(0).id(), "cpu:0");

  grpc::health::v1::HealthCheckResponse::ServingStatus serving{};
  ASSERT_TRUE(client_.CheckHealth("", &serving).ok());
  EXPECT_EQ(serving, grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_TRUE(client_.CheckHealth("da.v1.AttentionService", &serving).ok());
  EXPECT_EQ(serving, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(client_.CheckHealth("nope", &serving).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST(AttentionClientUnreachableTest, FailsFastWithUnavailable) {
  std::shared_ptr<grpc::Channel> channel = MakeChannel("127.0.0.1:1");
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(WaitForConnection(*channel, 10000).ok());  // Refused: returns without waiting.
  AttentionClient client(channel);
  v1::AttendResponse response;
  const v1::AttendRequest request = RandomRequest(v1::DTYPE_FP32, 1, 16, 1, 1, 4);
  EXPECT_EQ(client.Attend(request, &response).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(client.AttendStream(request, &response).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

// Without keepalive a call with no deadline waits forever on a server whose host vanished
// without closing the connection. The values are read back as gRPC receives them.
TEST(DefaultChannelArgumentsTest, PingTheServerDuringCallsAndGiveUpOnSilence) {
  const grpc::ChannelArguments arguments = DefaultChannelArguments();
  grpc_channel_args args;
  arguments.SetChannelArgs(&args);
  std::map<std::string, int> ints;
  for (size_t i = 0; i < args.num_args; ++i) {
    if (args.args[i].type == GRPC_ARG_INTEGER) ints[args.args[i].key] = args.args[i].value.integer;
  }
  EXPECT_EQ(ints[GRPC_ARG_KEEPALIVE_TIME_MS], 30000);
  EXPECT_EQ(ints[GRPC_ARG_KEEPALIVE_TIMEOUT_MS], 10000);
  // Unlimited pings while a call sends nothing (a long computation); gRPC's default allows two.
  ASSERT_EQ(ints.count(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA), 1u);
  EXPECT_EQ(ints[GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA], 0);
  // Only while calls are open: an idle client does not ping.
  EXPECT_EQ(ints.count(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS), 0u);
}

TEST(AttentionClientConnectTest, WaitForConnectionReachesARunningServer) {
  EchoServer server;
  std::shared_ptr<grpc::Channel> channel = MakeChannel(server.address());
  EXPECT_TRUE(WaitForConnection(*channel, 10000).ok());
  EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
}

// The zero-copy block message must be byte for byte what protobuf writes for the same block.
TEST(TokenBlockBufferTest, SameBytesAsProtobufSerialization) {
  std::mt19937_64 rng(9);
  auto bytes = [&](size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    return s;
  };
  for (int i = 0; i < 200; ++i) {
    auto block = std::make_unique<v1::TokenBlock>();
    if (i % 5 != 0) block->set_token_start(static_cast<int64_t>(rng() % 1000000));
    if (i % 7 != 0) block->set_token_count(static_cast<int64_t>(rng() % 5000));
    if (i % 3 != 0) block->set_query(bytes(rng() % 3000));
    if (i % 4 != 0) block->set_key(bytes(rng() % 2000));
    if (i % 6 != 0) block->set_value(bytes(rng() % 2000));
    v1::AttendStreamRequest expected;
    *expected.mutable_block() = *block;
    grpc::ByteBuffer buffer = TokenBlockBuffer(std::move(block));
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(buffer.Dump(&slices).ok());
    std::string got;
    for (const grpc::Slice& slice : slices) {
      got.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
    EXPECT_TRUE(got == expected.SerializeAsString()) << "block " << i;
  }
}

// Slices over a caller's memory are counted until every holder lets go: a wait returns when
// they are all released, or at its timeout saying they were not (a streamed call waits so before
// it returns, at most BorrowedSlices::kReleaseWait); the count outlives the tracker.
TEST(BorrowedSlicesTest, AWaitEndsWhenEveryCopyIsReleasedOrAtItsTimeout) {
  const std::string bytes(4096, 'x');
  auto borrowed = std::make_unique<BorrowedSlices>();
  std::optional<grpc::ByteBuffer> held;
  {
    grpc::Slice slices[2] = {borrowed->Borrow(std::string_view(bytes).substr(0, 100)),
                             borrowed->Borrow(std::string_view(bytes).substr(100))};
    held.emplace(slices, 2);  // The buffer takes references of its own.
    EXPECT_EQ(borrowed->held(), 2);
  }
  EXPECT_EQ(borrowed->held(), 2);  // Our slices went; the buffer's remain.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(borrowed->WaitUntilReleased(std::chrono::milliseconds(100)));
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(100));
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    EXPECT_TRUE(borrowed->WaitUntilReleased(std::chrono::seconds(30)));
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(returned.load());
  held.reset();
  waiter.join();
  EXPECT_TRUE(returned.load());
  EXPECT_EQ(borrowed->held(), 0);

  // A slice still held when the tracker goes (its destructor waited kReleaseWait): released
  // later, safely.
  held.emplace(std::vector<grpc::Slice>{borrowed->Borrow(bytes)}.data(), 1);
  borrowed.reset();
  held.reset();
}

}  // namespace
}  // namespace da::client
