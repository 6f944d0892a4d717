#include "client/cli_args.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

#include "client/cli_format.h"

namespace da::client {
namespace {

using ::testing::ElementsAre;

std::string ErrorOf(const absl::Status& status) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  return std::string(status.message());
}

SpecFlags Spec(std::string segments, std::string dilations) {
  SpecFlags flags;
  flags.segments = std::move(segments);
  flags.dilations = std::move(dilations);
  return flags;
}

TEST(CliArgsTest, ParsesIntegerLists) {
  absl::StatusOr<std::vector<int64_t>> values = ParseIntList("2048, 4096,8", "--segments");
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_THAT(*values, ElementsAre(2048, 4096, 8));
  EXPECT_EQ(ErrorOf(ParseIntList("2048,x", "--segments").status()),
            "--segments: 'x' is not an integer");
  EXPECT_EQ(ErrorOf(ParseIntList("", "--segments").status()), "--segments: '' is not an integer");
  EXPECT_EQ(ErrorOf(ParseIntList("4,0", "--dilations").status()),
            "--dilations: values must be >= 1, got 0");
  EXPECT_EQ(ErrorOf(ParseIntList("99999999999999999999", "--segments").status()),
            "--segments: '99999999999999999999' is not an integer");
}

TEST(CliArgsTest, BuildsSpecFromFlags) {
  SpecFlags flags = Spec("2048,4096", "1,2");
  flags.causal = true;
  flags.mode = "grouped";
  flags.has_scale = true;
  flags.scale = 0.125;
  flags.precision = "bf16";
  absl::StatusOr<v1::AttentionSpec> spec = BuildSpec(flags);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->segment_lengths(), ElementsAre(2048, 4096));
  EXPECT_THAT(spec->dilation_rates(), ElementsAre(1, 2));
  EXPECT_TRUE(spec->causal());
  EXPECT_EQ(spec->combine_mode(), v1::COMBINE_MODE_GROUPED);
  ASSERT_TRUE(spec->has_softmax_scale());
  EXPECT_EQ(spec->softmax_scale(), 0.125);
  EXPECT_EQ(spec->precision(), v1::PRECISION_BF16);

  spec = BuildSpec(Spec("16", "1"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->combine_mode(), v1::COMBINE_MODE_LONGNET);
  EXPECT_FALSE(spec->has_softmax_scale());
  EXPECT_EQ(spec->precision(), v1::PRECISION_AUTO);
}

TEST(CliArgsTest, RejectsBadSpecFlags) {
  EXPECT_EQ(ErrorOf(BuildSpec(Spec("16,32", "1")).status()),
            "--segments has 2 values but --dilations has 1; give one dilation per segment length");
  SpecFlags flags = Spec("16", "1");
  flags.mode = "dense";
  EXPECT_EQ(ErrorOf(BuildSpec(flags).status()), "--mode: 'dense' is not longnet or grouped");
  flags = Spec("16", "1");
  flags.precision = "int8";
  EXPECT_EQ(ErrorOf(BuildSpec(flags).status()),
            "--precision: 'int8' is not auto, fp32, bf16, fp16 or fp8");
  flags = Spec("16", "1");
  flags.has_scale = true;
  flags.scale = -1;
  EXPECT_EQ(ErrorOf(BuildSpec(flags).status()), "--scale must be a positive finite number, got -1");
}

TEST(CliArgsTest, ParsesDtypes) {
  EXPECT_EQ(*ParseDType("fp32"), v1::DTYPE_FP32);
  EXPECT_EQ(*ParseDType("fp16"), v1::DTYPE_FP16);
  EXPECT_EQ(*ParseDType("bf16"), v1::DTYPE_BF16);
  EXPECT_EQ(ErrorOf(ParseDType("fp64").status()), "--dtype: 'fp64' is not fp32, fp16 or bf16");
}

TEST(CliArgsTest, ChecksRandomFlags) {
  RandomFlags flags;
  flags.seq_len = 128;
  flags.heads = 4;
  flags.head_dim = 16;
  EXPECT_TRUE(flags.Check().ok());
  flags.heads = 0;
  EXPECT_EQ(ErrorOf(flags.Check()), "--heads must be >= 1, got 0");
  flags.heads = 4;
  flags.repeat = 0;
  EXPECT_EQ(ErrorOf(flags.Check()), "--repeat must be >= 1, got 0");
  flags.repeat = 1;
  flags.call.timeout_ms = -5;
  EXPECT_EQ(ErrorOf(flags.Check()), "--timeout-ms must be >= 0, got -5");
  flags.call.timeout_ms = 0;
  flags.seq_len = int64_t{1} << 40;
  flags.head_dim = int64_t{1} << 20;
  EXPECT_THAT(ErrorOf(flags.Check()), testing::HasSubstr("is too large"));
}

TEST(CliArgsTest, SummarizesLatencies) {
  const LatencySummary summary = Summarize({4, 1, 3, 2});
  EXPECT_EQ(summary.min_ms, 1);
  EXPECT_EQ(summary.max_ms, 4);
  EXPECT_EQ(summary.median_ms, 2.5);
  EXPECT_EQ(summary.mean_ms, 2.5);
  EXPECT_EQ(Summarize({7}).median_ms, 7);
}

// An fp8 run's scales reach the printed and the JSON form (one line or entry per device and
// chunk); a run in another precision shows none.
TEST(CliFormatTest, Fp8ScalesArePrintedOnlyForFp8Runs) {
  v1::ExecutionInfo info;
  info.set_precision_used(v1::PRECISION_FP8);
  v1::Fp8Scales* scales = info.add_fp8_scales();
  scales->set_device("cuda:0");
  scales->set_query_amax(2);
  scales->set_key_amax(0.5);
  scales->set_value_amax(4);
  scales->set_query_scale(224);
  scales->set_key_scale(896);
  scales->set_value_scale(112);
  std::ostringstream printed;
  PrintExecutionInfo(info, printed);
  EXPECT_THAT(printed.str(), testing::HasSubstr("fp8_scales          cuda:0: q 224 (amax 2), k 896 "
                                                "(amax 0.5), v 112 (amax 4)\n"));
  const nlohmann::json json = ExecutionInfoJson(info);
  ASSERT_TRUE(json.contains("fp8_scales"));
  EXPECT_EQ(json["fp8_scales"][0]["device"], "cuda:0");
  EXPECT_EQ(json["fp8_scales"][0]["scale"][1], 896.0);
  EXPECT_EQ(json["fp8_scales"][0]["amax"][2], 4.0);

  info.clear_fp8_scales();
  info.set_precision_used(v1::PRECISION_BF16);
  printed.str("");
  PrintExecutionInfo(info, printed);
  EXPECT_THAT(printed.str(), testing::Not(testing::HasSubstr("fp8")));
  EXPECT_FALSE(ExecutionInfoJson(info).contains("fp8_scales"));
}

// A streamed request's chunking reaches both forms; a unary one shows none.
TEST(CliFormatTest, StreamChunksArePrintedOnlyForStreams) {
  v1::ExecutionInfo info;
  std::ostringstream printed;
  PrintExecutionInfo(info, printed);
  EXPECT_THAT(printed.str(), testing::Not(testing::HasSubstr("stream_chunks")));
  EXPECT_FALSE(ExecutionInfoJson(info).contains("stream_chunks"));
  info.set_stream_chunk_tokens(8192);
  info.set_stream_chunks(64);
  info.set_stream_buffer_bytes(201326592);
  PrintExecutionInfo(info, printed);
  EXPECT_THAT(printed.str(), testing::HasSubstr("stream_chunks       64 of 8192 tokens, 201326592 "
                                                "bytes of stream buffers\n"));
  const nlohmann::json json = ExecutionInfoJson(info);
  EXPECT_EQ(json["stream_chunk_tokens"], 8192);
  EXPECT_EQ(json["stream_chunks"], 64);
  EXPECT_EQ(json["stream_buffer_bytes"], 201326592);
}

TEST(CliFormatTest, ProgressLineSaysHowMuchOfEachDirectionMovedAndHowFast) {
  // 1.5 of 2 GiB sent, 0.25 of 0.5 GiB received, in 2 s: 1.75 GiB (1.88 GB) at 0.94 GB/s.
  EXPECT_EQ(ProgressLine(3LL << 29, 2LL << 30, 1LL << 28, 1LL << 29, 2.0),
            "sent 1.50 of 2.00 GiB (75%), received 0.25 of 0.50 GiB (50%), 0.94 GB/s, 2.0 s");
  // Nothing to receive yet counts as done; no time yet is no rate.
  EXPECT_EQ(ProgressLine(0, 1LL << 30, 0, 0, 0.0),
            "sent 0.00 of 1.00 GiB (0%), received 0.00 of 0.00 GiB (100%), 0.00 GB/s, 0.0 s");
}

TEST(CallFlagsTest, ProgressIsOnOffOrLeftToTheTerminal) {
  for (auto [args, expected] : {std::pair<std::vector<std::string>, int>{{}, 0},
                                {{"--progress"}, 1},
                                {{"--no-progress"}, -1}}) {
    CLI::App app;
    CallFlags flags;
    AddCallFlags(&app, &flags, /*attend=*/true);
    std::vector<std::string> argv = {"da-client"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> pointers;
    for (std::string& arg : argv) pointers.push_back(arg.data());
    app.parse(static_cast<int>(pointers.size()), pointers.data());
    EXPECT_EQ(flags.progress, expected) << (args.empty() ? "(none)" : args[0]);
  }
}

TEST(CallFlagsTest, RetriesAreSentAgainAfterTheFirstAttemptUpToAHundred) {
  CallFlags flags;
  EXPECT_EQ(flags.Retry().max_attempts, RetryPolicy{}.max_attempts);  // The library's default.
  flags.retries = 0;
  EXPECT_TRUE(flags.Check().ok());
  EXPECT_EQ(flags.Retry().max_attempts, 1);
  flags.retries = 100;
  EXPECT_EQ(flags.Retry().max_attempts, 101);
  flags.retries = 101;
  EXPECT_EQ(ErrorOf(flags.Check()), "--retries: 101 is above the limit of 100");
  flags.retries = -1;
  EXPECT_EQ(ErrorOf(flags.Check()), "--retries must be >= 0, got -1");
}

// A unary call would ignore them; any --parallel-streams from 1 streams (1 is one stream).
TEST(CallFlagsTest, StreamingFlagsNeedStreaming) {
  CallFlags flags;
  flags.block_tokens = 64;
  EXPECT_EQ(ErrorOf(flags.Check()),
            "--block-tokens 64 needs --stream or --parallel-streams (a unary call sends the "
            "request in one message)");
  flags.block_tokens = 0;
  flags.progress = 1;
  EXPECT_EQ(ErrorOf(flags.Check()),
            "--progress needs --stream or --parallel-streams (only a streamed request reports it)");
  flags.progress = -1;  // --no-progress says nothing to a unary call.
  EXPECT_TRUE(flags.Check().ok());

  for (auto [stream, parallel_streams] : {std::pair{true, 0}, {false, 1}, {true, 3}}) {
    flags.stream = stream;
    flags.parallel_streams = parallel_streams;
    flags.block_tokens = 64;
    flags.progress = 1;
    EXPECT_TRUE(flags.Check().ok()) << stream << " " << parallel_streams;
  }

  RandomFlags random;
  random.seq_len = 128;
  random.heads = 4;
  random.head_dim = 16;
  random.call.progress = 1;
  EXPECT_THAT(ErrorOf(random.Check()), testing::StartsWith("--progress needs --stream"));
}

}  // namespace
}  // namespace da::client
