// AttendStream on the wire, driven by a raw stub so that malformed streams can be sent: the
// header and block rules, and the shape of the answer (header, bounded output blocks, trailer).
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/stream_blocks.h"
#include "da/v1/attention.grpc.pb.h"
#include "server/server.h"
#include "server/test_util.h"

namespace da::server {
namespace {

struct StreamResult {
  grpc::Status status;
  std::vector<v1::AttendStreamResponse> responses;
};

class StreamTest : public ::testing::Test {
 protected:
  void Start(const ServerOptions& options) {
    server_ = testing::StartServer(options);
    ASSERT_NE(server_, nullptr);
    stub_ = v1::AttentionService::NewStub(testing::ChannelTo(server_->port()));
  }
  void SetUp() override {
    Start(testing::LoopbackOptions());
    std::mt19937 rng(std::random_device{}());
    // fp32 [2, 40, 4, 16] with kv_heads 2, split into blocks of 8 tokens.
    request_ = testing::RandomRequest({.batch = 2, .seq_len = 40, .kv_heads = 2}, rng);
    ASSERT_TRUE(client::MakeStreamPlan(request_, 8, &plan_).ok());
  }

  // Sends messages, half-closes, and collects the answer.
  StreamResult Run(const std::vector<v1::AttendStreamRequest>& messages) {
    grpc::ClientContext context;
    auto stream = stub_->AttendStream(&context);
    for (const v1::AttendStreamRequest& message : messages) {
      if (!stream->Write(message)) break;  // The server has already answered.
    }
    stream->WritesDone();
    StreamResult result;
    v1::AttendStreamResponse response;
    while (stream->Read(&response)) result.responses.push_back(response);
    result.status = stream->Finish();
    return result;
  }

  v1::AttendStreamRequest Header() const {
    v1::AttendStreamRequest message;
    *message.mutable_header() = plan_.header;
    return message;
  }
  // A header of 2^57 tokens of one head of one element (16 bytes a token counted by the shape
  // check, with the output), whose segment lengths, 2^31 - 1 and 2^31 - 2 tokens (the longest
  // allowed), repeat together only past the sequence's end.
  v1::AttendStreamRequest CoprimeSegmentsHeader() const {
    v1::AttendStreamRequest message = Header();
    v1::StreamHeader* h = message.mutable_header();
    h->set_batch(1);
    h->set_heads(1);
    h->set_kv_heads(1);
    h->set_head_dim(1);
    h->set_seq_len(int64_t{1} << 57);
    h->mutable_spec()->clear_segment_lengths();
    h->mutable_spec()->clear_dilation_rates();
    h->mutable_spec()->add_segment_lengths((int64_t{1} << 31) - 1);
    h->mutable_spec()->add_segment_lengths((int64_t{1} << 31) - 2);
    h->mutable_spec()->add_dilation_rates(1);
    h->mutable_spec()->add_dilation_rates(1);
    return message;
  }
  v1::AttendStreamRequest Block(int64_t token_start) const {
    v1::AttendStreamRequest message;
    *message.mutable_block() = client::MakeTokenBlock(request_, plan_, token_start);
    return message;
  }

  void ExpectInvalid(const std::vector<v1::AttendStreamRequest>& messages,
                     const std::vector<std::string>& message_parts) {
    const StreamResult result = Run(messages);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << result.status.error_message();
    EXPECT_TRUE(result.responses.empty());
    for (const std::string& part : message_parts) {
      EXPECT_NE(result.status.error_message().find(part), std::string::npos)
          << "'" << part << "' missing from: " << result.status.error_message();
    }
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
  v1::AttendRequest request_;
  client::StreamPlan plan_;
};

TEST_F(StreamTest, WellFormedStreamIsAnsweredWithHeaderBlocksAndTrailer) {
  const StreamResult result = Run({Header(), Block(0), Block(8), Block(16), Block(24), Block(32)});
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ASSERT_GE(result.responses.size(), 3u);
  EXPECT_TRUE(result.responses.front().has_header());
  EXPECT_TRUE(result.responses.back().has_trailer());
  EXPECT_EQ(result.responses.back().trailer().info().backend(), "cpu");
}

// A client that cancels its stream before its input is complete (a parallel-streams client whose
// sibling part failed, a caller that gave up) is recorded as CANCELLED, never as invalid input:
// gRPC may report the failed read before the cancellation, and the record waits for the latter.
// Before, such streams were now and then counted as invalid_argument ("tokens missing", "ended
// before its header").
TEST_F(StreamTest, AStreamCancelledBeforeItsInputIsCompleteIsRecordedAsCancelled) {
  constexpr int kTries = 40;
  for (int i = 0; i < kTries; ++i) {
    grpc::ClientContext context;
    auto stream = stub_->AttendStream(&context);
    if (i % 2 == 1) {  // Half of them after the header and a block, half before anything.
      ASSERT_TRUE(stream->Write(Header()));
      ASSERT_TRUE(stream->Write(Block(0)));
    }
    context.TryCancel();
    v1::AttendStreamResponse response;
    while (stream->Read(&response)) {
    }
    const grpc::Status status = stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  }
  // A call cancelled before its first message may never reach the server; every one that did is
  // recorded once it is done.
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        return testing::MetricValue(server_->metrics().Scrape(), "da_in_flight_requests") == 0;
      },
      std::chrono::seconds(10)));
  const std::string scraped = server_->metrics().Scrape();
  EXPECT_GE(
      testing::MetricValue(scraped, "da_requests_total{code=\"CANCELLED\",method=\"AttendStream\"}")
          .value_or(0),
      kTries / 4)
      << scraped;
  EXPECT_EQ(testing::MetricValue(
                scraped, "da_requests_total{code=\"INVALID_ARGUMENT\",method=\"AttendStream\"}")
                .value_or(0),
            0)
      << scraped;
  EXPECT_EQ(
      testing::MetricValue(scraped, "da_requests_rejected_total{reason=\"invalid_argument\"}"), 0)
      << scraped;
}

TEST_F(StreamTest, BlockBeforeHeader) {
  ExpectInvalid({Block(0), Header()}, {"block 0", "header"});
}

TEST_F(StreamTest, NoHeaderAtAll) { ExpectInvalid({}, {"header"}); }

TEST_F(StreamTest, SecondHeader) {
  ExpectInvalid({Header(), Block(0), Header()}, {"second header"});
}

TEST_F(StreamTest, BlockOutOfOrder) {
  ExpectInvalid({Header(), Block(0), Block(16), Block(8)},
                {"block 1 (tokens [16, 24))", "out of order", "[8, 16) are missing"});
}

TEST_F(StreamTest, BlockOverlapping) {
  v1::AttendStreamRequest overlapping = Block(8);
  overlapping.mutable_block()->set_token_start(4);
  ExpectInvalid({Header(), Block(0), overlapping},
                {"block 1 (tokens [4, 12))", "overlaps", "expected token_start 8"});
}

TEST_F(StreamTest, BlockRepeated) {
  ExpectInvalid({Header(), Block(0), Block(0)}, {"block 1 (tokens [0, 8))", "overlaps"});
}

TEST_F(StreamTest, BlocksMissingAtTheEnd) {
  ExpectInvalid({Header(), Block(0), Block(8)}, {"after 2 blocks", "[16, 40) missing"});
}

TEST_F(StreamTest, BlockPastSeqLen) {
  v1::AttendStreamRequest last = Block(32);
  last.mutable_block()->set_token_count(16);
  ExpectInvalid({Header(), Block(0), Block(8), Block(16), Block(24), last},
                {"block 4 (tokens [32, 48))", "seq_len 40"});
}

TEST_F(StreamTest, BlockWithWrongByteCount) {
  v1::AttendStreamRequest bad = Block(8);
  bad.mutable_block()->mutable_key()->resize(100);
  // key: batch 2 x 8 tokens x 2 kv heads x 16 x 4 bytes = 2048.
  ExpectInvalid({Header(), Block(0), bad},
                {"block 1 (tokens [8, 16))", "key has 100 bytes", "2048"});
}

TEST_F(StreamTest, BlockWithZeroTokens) {
  v1::AttendStreamRequest empty = Block(0);
  empty.mutable_block()->set_token_count(0);
  ExpectInvalid({Header(), empty}, {"block 0", "token_count is 0"});
}

TEST_F(StreamTest, EmptyMessage) {
  ExpectInvalid({Header(), v1::AttendStreamRequest()}, {"neither a header nor a block"});
}

TEST_F(StreamTest, HeaderRules) {
  struct HeaderCase {
    std::function<void(v1::StreamHeader*)> break_header;
    std::string message_part;
  };
  const std::vector<HeaderCase> cases = {
      {[](v1::StreamHeader* h) { h->clear_dtype(); }, "header.dtype"},
      {[](v1::StreamHeader* h) { h->set_seq_len(0); }, "seq_len is 0"},
      {[](v1::StreamHeader* h) { h->set_batch(-1); }, "batch is -1"},
      {[](v1::StreamHeader* h) { h->set_kv_heads(3); }, "kv_heads (the key's heads) is 3"},
      {[](v1::StreamHeader* h) { h->mutable_spec()->clear_dilation_rates(); },
       "spec.dilation_rates"},
      {[](v1::StreamHeader* h) { h->mutable_spec()->set_dilation_rates(0, 0); },
       "spec.dilation_rates[0]"},
  };
  for (const HeaderCase& c : cases) {
    v1::AttendStreamRequest header = Header();
    c.break_header(header.mutable_header());
    ExpectInvalid({header, Block(0)}, {c.message_part});
  }
}

TEST_F(StreamTest, HeaderAboveMaxTokensIsRefusedBeforeAnyBlock) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_tokens = 1 << 20;
  Start(options);
  v1::AttendStreamRequest header = Header();
  header.mutable_header()->set_seq_len(int64_t{1} << 40);  // Petabytes: never allocated.
  const StreamResult result = Run({header});
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(result.status.error_message().find("1048576"), std::string::npos)
      << result.status.error_message();
  EXPECT_TRUE(result.responses.empty());
}

// Headers whose stream could never be held or sent are refused naming the numbers: a header
// message padded past 1 MiB (held, uncounted, until admitted), a token too wide for one message
// (no block could ever carry it), and, with no request limit, a window past the budget.
TEST_F(StreamTest, HeadersThatCannotBeHeldOrSentAreRefused) {
  v1::AttendStreamRequest padded = Header();
  padded.mutable_header()->set_request_id(std::string((1 << 20) + 1, 'x'));
  ExpectInvalid({padded, Block(0)},
                {"header: the stream's first message is ", "a header is at most 1048576"});
  // A first message of block size is refused before it is parsed, not after a whole copy.
  v1::AttendStreamRequest large_block = Block(0);
  large_block.mutable_block()->set_query(std::string((1 << 20) + 1, 'q'));
  ExpectInvalid({large_block}, {"header: the stream's first message is ", "at most 1048576"});

  ServerOptions options = testing::LoopbackOptions();
  options.max_message_bytes = 64 << 10;
  Start(options);
  v1::AttendStreamRequest wide = Header();
  wide.mutable_header()->set_batch(256);  // 256 x (4 + 2 x 2) heads x 16 x 4 bytes = 128 KiB.
  ExpectInvalid({wide},
                {"one token across batch 256 needs 131072 bytes", "--max-message-bytes 65536"});

  options = testing::LoopbackOptions();
  options.max_request_bytes = 0;  // No limit: only the budget bounds a stream's window.
  options.memory_budget_bytes = int64_t{1} << 30;
  Start(options);
  // The stream computes windows of 2^31 - 1 tokens, 4 of them held at 12 bytes a token (96 GiB)
  // with their gathered rows and outputs, far over the 1 GiB budget.
  const StreamResult result = Run({CoprimeSegmentsHeader()});
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << result.status.error_message();
  for (const char* said : {"window", "4 chunks of 2147483647 tokens", "1073741824"}) {
    EXPECT_NE(result.status.error_message().find(said), std::string::npos)
        << said << " in " << result.status.error_message();
  }
}

// A backend that computes whole problems only keeps common chunks, however long. With no request
// limit, the largest request the shape check lets through (2^61 bytes counted) whose segment
// lengths repeat together only past its end is one chunk, and three of them in the pipeline come
// to more bytes than any budget could count (half the int64 range): the header is refused naming
// the window rather than overflowing the budget's sums.
TEST_F(StreamTest, AStreamWhoseWindowIsBeyondAnyBudgetIsRefusedAtItsHeader) {
  ServerOptions options = testing::LoopbackOptions();
  options.backend = "reference";
  options.max_request_bytes = 0;
  options.memory_budget_bytes = int64_t{1} << 30;
  options.stream_pipeline_depth = 3;
  Start(options);
  // 2^57 x (12 + 4) bytes: the 2^61 the shape check allows.
  const StreamResult result = Run({CoprimeSegmentsHeader()});
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << result.status.error_message();
  // 3 x 2^57 tokens x 12 bytes of inputs (5.2e18) > 2^62 (4.6e18).
  for (const char* said : {"beyond any memory budget", "3 chunks of 144115188075855872 tokens",
                           "1729382256910270464 bytes of inputs each"}) {
    EXPECT_NE(result.status.error_message().find(said), std::string::npos)
        << said << " in " << result.status.error_message();
  }
  EXPECT_TRUE(result.responses.empty());
}

// max_request_bytes bounds what a unary request holds whole; a stream holds only its window.
TEST_F(StreamTest, StreamAboveMaxRequestBytesIsComputedInItsWindow) {
  ServerOptions options = testing::LoopbackOptions();
  // The request has 40 tokens x batch 2 x 768 bytes = 61440 bytes; a chunk of 32 tokens (lcm of
  // the segment lengths 16 and 32) has 49152.
  options.max_request_bytes = 56 << 10;
  options.stream_min_chunk_tokens = 1;
  Start(options);
  std::vector<v1::AttendStreamRequest> messages = {Header()};
  for (int64_t start = 0; start < 40; start += 8) messages.push_back(Block(start));
  const StreamResult result = Run(messages);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ASSERT_TRUE(result.responses.back().has_trailer());
  EXPECT_EQ(result.responses.back().trailer().info().stream_chunk_tokens(), 32);
  EXPECT_EQ(result.responses.back().trailer().info().stream_chunks(), 2);

  options.max_request_bytes = 40 << 10;  // Below one chunk: refused at the header.
  Start(options);
  const StreamResult refused = Run(messages);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status.error_message().find("chunk of 32 tokens"), std::string::npos)
      << refused.status.error_message();
}

// A value that is not finite in a later chunk fails the stream with INVALID_ARGUMENT naming its
// token in the whole sequence, not in the chunk.
TEST_F(StreamTest, ANonFiniteValueIsRefusedNamingItsTokenInTheWholeStream) {
  ServerOptions options = testing::LoopbackOptions();
  options.stream_min_chunk_tokens = 1;  // Chunks of 32 tokens: the second starts at token 32.
  Start(options);
  // v is fp32 [2, 40, 2, 16]: batch 1, token 35, kv head 1, dim 2.
  const float inf = std::numeric_limits<float>::infinity();
  std::memcpy(request_.mutable_value()->mutable_data()->data() +
                  (((1 * 40 + 35) * 2 + 1) * 16 + 2) * sizeof(float),
              &inf, sizeof(float));
  std::vector<v1::AttendStreamRequest> messages = {Header()};
  for (int64_t start = 0; start < 40; start += 8) messages.push_back(Block(start));
  const StreamResult result = Run(messages);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << result.status.error_message();
  EXPECT_NE(result.status.error_message().find(
                "v holds +inf at batch 1, token 35, head 1, dim 2; q, k and v must be finite"),
            std::string::npos)
      << result.status.error_message();
}

TEST_F(StreamTest, OutputBlocksStayWithinHalfTheMessageLimit) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_message_bytes = 64 << 10;
  Start(options);
  std::mt19937 rng(std::random_device{}());
  // Output 1 x 1000 x 4 x 16 fp32 = 256000 bytes: at least 8 blocks of at most 32 KiB.
  request_ = testing::RandomRequest({.seq_len = 1000}, rng);
  // Input blocks of 50 tokens: q + k + v = 38400 bytes, below the 64 KiB message limit.
  ASSERT_TRUE(client::MakeStreamPlan(request_, 50, &plan_).ok());
  std::vector<v1::AttendStreamRequest> messages = {Header()};
  for (int64_t start = 0; start < 1000; start += 50) messages.push_back(Block(start));
  const StreamResult result = Run(messages);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();

  ASSERT_TRUE(result.responses.front().has_header());
  EXPECT_EQ(result.responses.front().header().dtype(), v1::DTYPE_FP32);
  EXPECT_EQ(result.responses.front().header().shape_size(), 4);
  std::string output;
  int64_t next_token = 0;
  for (size_t i = 1; i + 1 < result.responses.size(); ++i) {
    ASSERT_TRUE(result.responses[i].has_block()) << "message " << i;
    const v1::OutputBlock& block = result.responses[i].block();
    EXPECT_EQ(block.token_start(), next_token);
    EXPECT_LE(block.output().size(), 32u << 10);
    EXPECT_EQ(static_cast<int64_t>(block.output().size()), block.token_count() * 4 * 16 * 4);
    next_token += block.token_count();
    output += block.output();
  }
  EXPECT_EQ(next_token, 1000);
  EXPECT_GE(result.responses.size(), 10u);
  ASSERT_TRUE(result.responses.back().has_trailer());
  EXPECT_TRUE(output == testing::InProcessOutput(request_, 2));
}

// A request of `config` in `precision`, fresh random inputs, streamed in blocks of a random size
// (so that blocks straddle chunks): its answer must be byte for byte the unary one, in the same
// precision. *streamed gets the streamed answer.
void StreamAndCompareWithUnary(client::AttentionClient& client,
                               const testing::ProblemConfig& config, v1::Precision precision,
                               std::mt19937& rng, v1::AttendResponse* streamed) {
  v1::AttendRequest request = testing::RandomRequest(config, rng);
  request.mutable_spec()->set_precision(precision);
  SCOPED_TRACE(testing::HeaderFor(request).DebugString());
  v1::AttendResponse unary;
  ASSERT_TRUE(client.Attend(request, &unary).ok());
  const int64_t block_tokens = 1 + static_cast<int64_t>(rng() % 70);
  const grpc::Status status =
      client.AttendStream(request, streamed, {}, {.block_tokens = block_tokens});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(streamed->output().data() == unary.output().data())
      << "block_tokens " << block_tokens;
  EXPECT_EQ(streamed->info().precision_used(), unary.info().precision_used());
}

// The pipelined stream computes chunk by chunk; its answer must be byte for byte the unary
// answer. Chunks here are the least common multiple of the segment lengths (min chunk 1), so
// every case runs several chunks, with block sizes drawn at random so that blocks straddle chunks.
TEST_F(StreamTest, StreamedBytesEqualUnaryBytesAcrossTheSweep) {
  ServerOptions options = testing::LoopbackOptions();
  options.stream_min_chunk_tokens = 1;
  Start(options);
  client::AttentionClient client(testing::ChannelTo(server_->port()));
  std::mt19937 rng(std::random_device{}());
  struct Case {
    testing::ProblemConfig config;
    v1::Precision precision;
  };
  std::vector<Case> cases;
  for (bool causal : {false, true}) {
    for (v1::CombineMode mode : {v1::COMBINE_MODE_LONGNET, v1::COMBINE_MODE_GROUPED}) {
      for (v1::Precision precision : {v1::PRECISION_FP32, v1::PRECISION_AUTO}) {
        testing::ProblemConfig config;
        config.batch = 1 + static_cast<int64_t>(rng() % 2);
        config.seq_len = 150 + static_cast<int64_t>(rng() % 200);  // Partial last segments.
        config.heads = 4;
        config.kv_heads = (rng() % 2 == 0) ? 4 : 2;     // With and without GQA.
        config.patterns = {{16, 1}, {24, 2}, {32, 4}};  // Chunks of lcm = 96 tokens.
        config.causal = causal;
        config.mode = mode;
        cases.push_back({config, precision});
      }
    }
  }
  testing::ProblemConfig half = cases.front().config;
  half.dtype = v1::DTYPE_FP16;
  cases.push_back({half, v1::PRECISION_AUTO});
  testing::ProblemConfig bf16 = cases.back().config;
  bf16.dtype = v1::DTYPE_BF16;
  bf16.patterns = {{40, 2}};
  cases.push_back({bf16, v1::PRECISION_AUTO});

  for (const Case& c : cases) {
    v1::AttendResponse streamed;
    ASSERT_NO_FATAL_FAILURE(
        StreamAndCompareWithUnary(client, c.config, c.precision, rng, &streamed));
    EXPECT_GE(streamed.info().stream_chunks(), 2);
    EXPECT_EQ(streamed.info().stream_chunks(),
              (c.config.seq_len + streamed.info().stream_chunk_tokens() - 1) /
                  streamed.info().stream_chunk_tokens());
  }
}

// Segment lengths whose least common multiple is far beyond the longest (48 and 80: 240; 30 and
// 77: 2310) stream in windows as long as the longest segment, each a share of the whole problem
// computed with the crossing segments' rows gathered from the chunks beside it: the answer is
// still byte for byte the unary one, and the window, not the sequence, sizes the stream.
TEST_F(StreamTest, WindowsOfSegmentLengthsWithoutACommonChunkGiveTheUnaryBytes) {
  ServerOptions options = testing::LoopbackOptions();
  options.stream_min_chunk_tokens = 1;
  Start(options);
  client::AttentionClient client(testing::ChannelTo(server_->port()));
  std::mt19937 rng(std::random_device{}());
  struct Case {
    testing::ProblemConfig config;
    v1::Precision precision;
    int64_t window;
  };
  std::vector<Case> cases;
  for (bool causal : {false, true}) {
    for (v1::CombineMode mode : {v1::COMBINE_MODE_LONGNET, v1::COMBINE_MODE_GROUPED}) {
      for (int p = 0; p < 2; ++p) {
        testing::ProblemConfig config;
        config.batch = 1 + static_cast<int64_t>(rng() % 2);
        config.seq_len = 250 + static_cast<int64_t>(rng() % 300);  // Partial last segments.
        config.heads = 4;
        config.kv_heads = (rng() % 2 == 0) ? 4 : 2;  // With and without GQA.
        config.patterns = p == 0 ? std::vector<std::pair<int64_t, int64_t>>{{48, 1}, {80, 2}}
                                 : std::vector<std::pair<int64_t, int64_t>>{{30, 1}, {77, 3}};
        config.causal = causal;
        config.mode = mode;
        cases.push_back(
            {config, p == 0 ? v1::PRECISION_FP32 : v1::PRECISION_AUTO, p == 0 ? 80 : 77});
      }
    }
  }
  testing::ProblemConfig bf16 = cases.front().config;
  bf16.dtype = v1::DTYPE_BF16;
  bf16.patterns = {{33, 1}, {50, 2}, {64, 4}};  // lcm 52800.
  cases.push_back({bf16, v1::PRECISION_AUTO, 64});

  for (const Case& c : cases) {
    v1::AttendResponse streamed;
    ASSERT_NO_FATAL_FAILURE(
        StreamAndCompareWithUnary(client, c.config, c.precision, rng, &streamed));
    EXPECT_EQ(streamed.info().stream_chunk_tokens(), c.window);
    EXPECT_EQ(streamed.info().stream_chunks(), (c.config.seq_len + c.window - 1) / c.window);
  }
}

// The reference backend computes whole problems only: its streams never cut windows (before,
// they were refused at the first window; EngineShareOfTest checks the engine's refusal).
TEST_F(StreamTest, TheReferenceBackendStreamsInCommonChunksOnly) {
  ServerOptions options = testing::LoopbackOptions();
  options.backend = "reference";
  options.stream_min_chunk_tokens = 1;
  Start(options);
  client::AttentionClient client(testing::ChannelTo(server_->port()));
  std::mt19937 rng(9);
  testing::ProblemConfig config;
  config.seq_len = 300;
  config.patterns = {{48, 1}, {80, 2}};
  const v1::AttendRequest request = testing::RandomRequest(config, rng);
  v1::AttendResponse unary, streamed;
  ASSERT_TRUE(client.Attend(request, &unary).ok());
  const grpc::Status status = client.AttendStream(request, &streamed, {}, {.block_tokens = 50});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(streamed.info().stream_chunk_tokens(), 240);  // lcm(48, 80).
  EXPECT_TRUE(streamed.output().data() == unary.output().data());
}

// A window computes with keys gathered from the chunk after it: a NaN there is refused before
// the window is computed, naming its token in the whole sequence, and nothing is answered (before
// the gathered rows were checked, the first window's output went out with NaN in it). Large keys
// there bound the scores with the window's own queries.
TEST_F(StreamTest, AWindowChecksTheKeysItGathersBeforeItComputes) {
  ServerOptions options = testing::LoopbackOptions();
  options.stream_min_chunk_tokens = 1;
  Start(options);
  std::mt19937 rng(3);
  testing::ProblemConfig config;
  config.seq_len = 400;
  config.heads = 2;
  config.kv_heads = 1;
  config.head_dim = 4;
  config.patterns = {{48, 1}, {80, 2}};  // Windows of 80: [0, 80) reads the segment [48, 96).
  for (const float poison : {std::numeric_limits<float>::quiet_NaN(), 1e20f}) {
    SCOPED_TRACE(::testing::Message() << "a key of " << poison << " at token 85");
    v1::AttendRequest request = testing::RandomRequest(config, rng);
    std::memcpy(request.mutable_key()->mutable_data()->data() + 85 * 4 * sizeof(float), &poison,
                sizeof(float));
    if (!std::isnan(poison)) {
      // And a query of the first window as large: their scores pass fp32's range, though each
      // window's own q and k alone would not.
      std::memcpy(request.mutable_query()->mutable_data()->data() + 5 * 8 * sizeof(float), &poison,
                  sizeof(float));
    }
    client::StreamPlan plan;
    ASSERT_TRUE(client::MakeStreamPlan(request, 40, &plan).ok());
    std::vector<v1::AttendStreamRequest> messages(1);
    *messages[0].mutable_header() = plan.header;
    for (int64_t start = 0; start < config.seq_len; start += 40) {
      messages.emplace_back();
      *messages.back().mutable_block() = client::MakeTokenBlock(request, plan, start);
    }
    const StreamResult result = Run(messages);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << result.status.error_message();
    const std::string said = std::isnan(poison) ? "token 85" : "too large for fp32 scores";
    EXPECT_NE(result.status.error_message().find(said), std::string::npos)
        << result.status.error_message();
    for (const v1::AttendStreamResponse& response : result.responses) {
      EXPECT_FALSE(response.has_block()) << "an output block went out before the refusal";
    }
  }
}

// A windowed stream holds the same window however long it is: 300 and 409 have a least common
// multiple of 122,700 tokens, so before windows each of these streams was one chunk holding its
// whole input.
TEST_F(StreamTest, AWindowedStreamsMemoryFollowsTheLongestSegmentNotTheSequence) {
  ServerOptions options = testing::LoopbackOptions();
  options.stream_min_chunk_tokens = 512;
  Start(options);
  client::AttentionClient client(testing::ChannelTo(server_->port()));
  std::mt19937 rng(5);
  int64_t window_bytes = -1;
  for (int64_t seq_len : {20000, 80000}) {
    SCOPED_TRACE(::testing::Message() << "seq_len " << seq_len);
    testing::ProblemConfig config;
    config.seq_len = seq_len;
    config.heads = 2;
    config.kv_heads = 1;
    config.patterns = {{300, 1}, {409, 2}};
    const v1::AttendRequest request = testing::RandomRequest(config, rng);
    v1::AttendResponse streamed;
    const grpc::Status status =
        client.AttendStream(request, &streamed, {.timeout_ms = 60000}, {.block_tokens = 1000});
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(streamed.info().stream_chunk_tokens(), 512);
    EXPECT_EQ(streamed.info().stream_chunks(), (seq_len + 511) / 512);
    if (window_bytes < 0) {
      window_bytes = streamed.info().stream_buffer_bytes();
    } else {
      EXPECT_EQ(streamed.info().stream_buffer_bytes(), window_bytes);
    }
    // Spot check against the unary answer: the windows' rows equal the whole problem's.
    v1::AttendResponse unary;
    ASSERT_TRUE(client.Attend(request, &unary, {.timeout_ms = 60000}).ok());
    EXPECT_TRUE(streamed.output().data() == unary.output().data());
  }
}

// The server's log lines while it runs (a sink on spdlog's default logger).
class CapturedLog {
 public:
  CapturedLog() : sink_(std::make_shared<spdlog::sinks::ostream_sink_mt>(text_)) {
    sink_->set_pattern("%v");
    spdlog::default_logger()->sinks().push_back(sink_);
  }
  ~CapturedLog() {
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::find(sinks.begin(), sinks.end(), sink_));
  }
  std::vector<std::string> LinesStartingWith(const std::string& prefix) {
    spdlog::default_logger()->flush();
    std::vector<std::string> lines;
    std::istringstream in(text_.str());
    for (std::string line; std::getline(in, line);) {
      if (line.rfind(prefix, 0) == 0) lines.push_back(line);
    }
    return lines;
  }

 private:
  std::ostringstream text_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> sink_;
};

TEST_F(StreamTest, ARunningStreamLogsItsProgressAndItsBytes) {
  for (const int64_t log_ms : {1, 0}) {
    SCOPED_TRACE(::testing::Message() << "progress every " << log_ms << " ms");
    ServerOptions options = testing::LoopbackOptions();
    options.stream_min_chunk_tokens = 1;  // Two chunks: tokens [0, 32) and [32, 40).
    options.stream_progress_log_ms = log_ms;
    Start(options);
    CapturedLog log;
    grpc::ClientContext context;
    context.AddMetadata("x-request-id", "progress-1");
    auto stream = stub_->AttendStream(&context);
    ASSERT_TRUE(stream->Write(Header()));
    // Chunk 0 completes more than log_ms after the stream started, and chunk 1 more than log_ms
    // after chunk 0's line: its last block goes only once chunk 0's answer is back, and 5 ms
    // later.
    for (int64_t start = 0; start < 32; start += 8) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      ASSERT_TRUE(stream->Write(Block(start)));
    }
    v1::AttendStreamResponse response;
    do {
      ASSERT_TRUE(stream->Read(&response));
    } while (!response.has_block());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_TRUE(stream->Write(Block(32)));
    stream->WritesDone();
    while (stream->Read(&response)) {
    }
    ASSERT_TRUE(stream->Finish().ok());
    server_.reset();  // Every line is logged.
    // q: 2 x 40 tokens x 4 heads x 16 x 4 bytes; k and v: 2 heads each.
    const int64_t q_bytes = 2 * 40 * 4 * 16 * 4, kv_bytes = 2 * 40 * 2 * 16 * 4;
    const std::vector<std::string> done = log.LinesStartingWith("request id=progress-1 ");
    ASSERT_EQ(done.size(), 1u);
    EXPECT_NE(
        done[0].find(absl::StrCat(" bytes_in=", q_bytes + 2 * kv_bytes, " bytes_out=", q_bytes)),
        std::string::npos)
        << done[0];
    const std::vector<std::string> progress = log.LinesStartingWith("progress id=progress-1 ");
    if (log_ms == 0) {
      EXPECT_TRUE(progress.empty()) << progress[0];
      continue;
    }
    ASSERT_EQ(progress.size(), 2u);
    EXPECT_NE(progress[0].find("method=AttendStream tokens_in="), std::string::npos) << progress[0];
    EXPECT_NE(progress[0].find(" chunks=1/2 bytes_in="), std::string::npos) << progress[0];
    EXPECT_NE(progress[1].find(absl::StrCat(
                  "tokens_in=40/40 chunks=2/2 bytes_in=", q_bytes + 2 * kv_bytes, " bytes_out=")),
              std::string::npos)
        << progress[1];
    EXPECT_NE(progress[1].find(" elapsed_ms="), std::string::npos) << progress[1];
  }
}

TEST(ChooseChunkTokensTest, LeastCommonMultipleRoundedUpAndClipped) {
  engine::AttentionSpec spec;
  spec.patterns = {{2048, 1}, {4096, 2}, {8192, 4}};
  EXPECT_EQ(ChooseChunkTokens(spec, 65536, 4096), 8192);
  EXPECT_EQ(ChooseChunkTokens(spec, 65536, 20000), 24576);
  EXPECT_EQ(ChooseChunkTokens(spec, 5000, 4096), 5000);
  spec.patterns = {{16, 1}, {24, 2}};
  EXPECT_EQ(ChooseChunkTokens(spec, 1000, 1), 48);
  EXPECT_EQ(ChooseChunkTokens(spec, 1000, 100), 144);
  // Coprime lengths whose multiple passes seq_len (or int64): one chunk of the whole stream.
  spec.patterns = {{1000003, 1}, {1000033, 1}, {1000037, 1}, {1000039, 1}};
  EXPECT_EQ(ChooseChunkTokens(spec, int64_t{1} << 40, 1), int64_t{1} << 40);
}

}  // namespace
}  // namespace da::server
