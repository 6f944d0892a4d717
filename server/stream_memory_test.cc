// A long stream through a real da-server process in bounded memory: 524,288 tokens (H=8, D=64,
// fp32: 3 GiB of q, k and v in and 1 GiB of output out) while the server's peak RSS stays within
// a bound derived from its pipeline window, not from the request. Three chunks of the answer are
// checked byte for byte against the in-process engine.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <string>

#include "client/attention_client.h"
#include "server/proc_stats.h"
#include "server/synthetic_stream.h"
#include "server/test_util.h"

namespace da::server {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

TEST(StreamMemoryTest, HalfAMillionTokensInABoundedWindow) {
  constexpr int64_t kSeqLen = 524288, kHeads = 8, kHeadDim = 64;
  constexpr int64_t kChunk = 8192;       // lcm(2048, 4096, 8192) >= --stream-min-chunk-tokens.
  constexpr int64_t kBlockTokens = 512;  // 3 MiB of q, k and v per message.
  testing::SpawnedServer server(
      DA_SERVER_BINARY, {"--stream-pipeline-depth", "2", "--stream-min-chunk-tokens", "4096"});
  ASSERT_TRUE(server.WaitForPorts(std::chrono::seconds(30))) << server.Log();
  client::AttentionClient client(client::MakeChannel("127.0.0.1:" + std::to_string(server.port())));
  ASSERT_TRUE(client::WaitForConnection(
                  *client::MakeChannel("127.0.0.1:" + std::to_string(server.port())), 10000)
                  .ok());
  const int64_t baseline = ProcStatusBytes(server.process().pid(), "VmRSS");
  ASSERT_GT(baseline, 0);

  v1::StreamHeader header;
  header.set_request_id("stream-memory-test");
  header.set_dtype(v1::DTYPE_FP32);
  header.set_batch(1);
  header.set_seq_len(kSeqLen);
  header.set_heads(kHeads);
  header.set_head_dim(kHeadDim);
  for (auto [w, r] : {std::pair<int64_t, int64_t>{2048, 1}, {4096, 2}, {8192, 4}}) {
    header.mutable_spec()->add_segment_lengths(w);
    header.mutable_spec()->add_dilation_rates(r);
  }
  header.mutable_spec()->set_combine_mode(v1::COMBINE_MODE_GROUPED);
  header.mutable_spec()->set_precision(v1::PRECISION_FP32);
  const testing::SyntheticStream stream(header, /*seed=*/20261125, kBlockTokens);

  // Output rows of three chunks, kept for the check; the rest is only counted.
  const int64_t row_bytes = kHeads * kHeadDim * 4;
  const int64_t checked[] = {0, kSeqLen / 2 - kChunk, kSeqLen - kChunk};
  std::map<int64_t, std::string> kept;
  int64_t next_token = 0;
  bool trailer = false;
  v1::ExecutionInfo info;
  const auto start = std::chrono::steady_clock::now();
  const grpc::Status status = client.AttendStreamBlocks(
      header, stream.Source(), [&](const v1::AttendStreamResponse& message) {
        if (message.has_trailer()) {
          trailer = true;
          info = message.trailer().info();
        }
        if (!message.has_block()) return grpc::Status::OK;
        const v1::OutputBlock& block = message.block();
        if (block.token_start() != next_token ||
            static_cast<int64_t>(block.output().size()) != block.token_count() * row_bytes) {
          return grpc::Status(grpc::StatusCode::INTERNAL, "output block out of order or size");
        }
        for (int64_t chunk_start : checked) {
          const int64_t from = std::max(chunk_start, block.token_start());
          const int64_t to =
              std::min(chunk_start + kChunk, block.token_start() + block.token_count());
          if (from < to) {
            kept[chunk_start].append(block.output(), (from - block.token_start()) * row_bytes,
                                     (to - from) * row_bytes);
          }
        }
        next_token += block.token_count();
        return grpc::Status::OK;
      });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << server.Log();
  ASSERT_TRUE(trailer);
  EXPECT_EQ(next_token, kSeqLen);
  EXPECT_EQ(info.stream_chunk_tokens(), kChunk);
  EXPECT_EQ(info.stream_chunks(), kSeqLen / kChunk);

  // The bound, from the window (see attend_stream_reactor.h):
  //   inputs   depth 2 x 8192 tokens x (q + k + v = 6 KiB)                  =  96 MiB
  //   outputs  2 x 8192 tokens x 2 KiB                                       =  32 MiB
  //   plan     workspace of an 8192-token chunk plan                         <  16 MiB
  //   messages incoming: the HTTP/2 window (kStreamLookaheadBytes, 8 MiB) plus one 3 MiB block
  //            as wire bytes and parsed; outgoing: one 4 MiB block, parsed and serialized  =  22
  //            MiB
  //   slack    allocator rounding and retention across gRPC's threads       =  42 MiB
  // = 208 MiB above the idle server, against 4 GiB moved through the stream.
  const int64_t peak = ProcStatusBytes(server.process().pid(), "VmHWM");
  const int64_t bound = baseline + 208 * kMiB;
  RecordProperty("peak_rss_mib", std::to_string(peak / kMiB));
  RecordProperty("seconds", std::to_string(seconds));
  std::printf(
      "stream of %lld tokens: %.1f s, server RSS idle %lld MiB, peak %lld MiB, bound %lld MiB\n",
      static_cast<long long>(kSeqLen), seconds, static_cast<long long>(baseline / kMiB),
      static_cast<long long>(peak / kMiB), static_cast<long long>(bound / kMiB));
  EXPECT_LT(peak, bound);

  engine::EngineOptions engine_options;
  engine_options.threads = 2;
  auto engine = engine::Engine::Create(engine_options);
  ASSERT_TRUE(engine.ok());
  for (int64_t chunk_start : checked) {
    const std::string expected = stream.EngineOutput(**engine, chunk_start, kChunk);
    ASSERT_EQ(static_cast<int64_t>(expected.size()), kChunk * row_bytes);
    EXPECT_TRUE(kept[chunk_start] == expected) << "chunk at token " << chunk_start;
  }
}

}  // namespace
}  // namespace da::server
