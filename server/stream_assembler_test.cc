#include "server/stream_assembler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace da::server {
namespace {

using ::testing::HasSubstr;

// Whole tensors [batch, seq_len, row] of random bytes, and blocks cut from them.
struct Stream {
  StreamLayout layout;
  std::string q, k, v;

  Stream(const StreamLayout& l, std::mt19937_64& rng) : layout(l) {
    auto fill = [&](std::string& s, int64_t row) {
      s.resize(static_cast<size_t>(l.batch * l.seq_len * row));
      for (char& c : s) c = static_cast<char>(rng());
    };
    fill(q, l.q_row_bytes);
    fill(k, l.kv_row_bytes);
    fill(v, l.kv_row_bytes);
  }

  // Tokens [start, start + count) of every batch element of a tensor, laid out [batch, count, row].
  std::string Gather(const std::string& t, int64_t row, int64_t start, int64_t count) const {
    std::string out;
    for (int64_t b = 0; b < layout.batch; ++b) {
      out.append(t, static_cast<size_t>((b * layout.seq_len + start) * row),
                 static_cast<size_t>(count * row));
    }
    return out;
  }

  struct Block {
    int64_t start, count;
    std::string q, k, v;
    BlockView view() const { return {start, count, q, k, v}; }
  };
  Block MakeBlock(int64_t start, int64_t count) const {
    return {start, count, Gather(q, layout.q_row_bytes, start, count),
            Gather(k, layout.kv_row_bytes, start, count),
            Gather(v, layout.kv_row_bytes, start, count)};
  }
};

// Feeds random-sized blocks, taking and releasing chunks at random moments, and checks every
// chunk's bytes against the whole tensors and that held chunks never exceed the slots.
void RoundTrip(const StreamLayout& layout, int slots, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Stream stream(layout, rng);
  auto assembler = StreamAssembler::Create(layout, slots);
  ASSERT_TRUE(assembler.ok()) << assembler.status();
  StreamAssembler& a = **assembler;
  EXPECT_EQ(a.buffer_bytes(), slots * layout.chunk_tokens * layout.batch *
                                  (layout.q_row_bytes + 2 * layout.kv_row_bytes));
  std::vector<Chunk> held;
  int64_t next_chunk = 0;
  auto check_and_release = [&](bool all) {
    while (!held.empty() && (all || rng() % 2 == 0)) {
      const Chunk& c = held.front();
      ASSERT_EQ(c.index, next_chunk);
      ASSERT_EQ(c.token_start, c.index * layout.chunk_tokens);
      ASSERT_EQ(c.token_count, std::min(layout.chunk_tokens, layout.seq_len - c.token_start));
      const Stream::Block expect = stream.MakeBlock(c.token_start, c.token_count);
      ASSERT_EQ(0, std::memcmp(c.q, expect.q.data(), expect.q.size())) << "chunk " << c.index;
      ASSERT_EQ(0, std::memcmp(c.k, expect.k.data(), expect.k.size())) << "chunk " << c.index;
      ASSERT_EQ(0, std::memcmp(c.v, expect.v.data(), expect.v.size())) << "chunk " << c.index;
      a.ReleaseChunk(c.index);
      ++next_chunk;
      held.erase(held.begin());
    }
  };
  int64_t start = 0;
  while (start < layout.seq_len) {
    const int64_t max_count = std::max<int64_t>(1, 3 * layout.chunk_tokens / 2);
    const int64_t count = std::min<int64_t>(1 + rng() % max_count, layout.seq_len - start);
    const Stream::Block block = stream.MakeBlock(start, count);
    ASSERT_TRUE(a.CheckBlock(block.view()).ok());
    int64_t taken = 0;
    while (taken < count) {
      const int64_t n = a.Fill(block.view(), taken);
      taken += n;
      while (std::optional<Chunk> c = a.TakeReadyChunk()) held.push_back(*c);
      ASSERT_LE(static_cast<int>(held.size()), slots);
      if (n == 0) {
        ASSERT_EQ(static_cast<int>(held.size()), slots) << "Fill took nothing with a slot free";
        check_and_release(/*all=*/false);
        if (static_cast<int>(held.size()) == slots) check_and_release(/*all=*/true);
      } else {
        check_and_release(/*all=*/false);
      }
    }
    start += count;
  }
  check_and_release(/*all=*/true);
  EXPECT_TRUE(a.CheckComplete().ok());
  EXPECT_EQ(next_chunk, layout.chunk_count());
  EXPECT_FALSE(a.TakeReadyChunk().has_value());
}

TEST(StreamAssemblerTest, RandomBlocksRandomReleases) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    StreamLayout layout;
    layout.batch = 1 + rng() % 3;
    layout.seq_len = 1 + rng() % 300;
    layout.q_row_bytes = 4 * (1 + rng() % 8);
    layout.kv_row_bytes = 4 * (1 + rng() % 4);
    layout.chunk_tokens = 1 + rng() % 64;
    const int slots = 1 + rng() % 3;
    SCOPED_TRACE(testing::Message()
                 << "trial " << trial << " batch " << layout.batch << " seq_len " << layout.seq_len
                 << " chunk " << layout.chunk_tokens << " slots " << slots);
    RoundTrip(layout, slots, rng());
    if (HasFatalFailure()) return;
  }
}

TEST(StreamAssemblerTest, OneChunkLargerThanTheStream) {
  RoundTrip({.batch = 2, .seq_len = 10, .q_row_bytes = 8, .kv_row_bytes = 4, .chunk_tokens = 64}, 1,
            3);
}

class StreamAssemblerErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    layout_ = {
        .batch = 2, .seq_len = 100, .q_row_bytes = 16, .kv_row_bytes = 8, .chunk_tokens = 32};
    std::mt19937_64 rng(11);
    stream_ = std::make_unique<Stream>(layout_, rng);
    assembler_ = *StreamAssembler::Create(layout_, 2);
  }
  // Checks and fills a valid block.
  void Accept(int64_t start, int64_t count) {
    const Stream::Block block = stream_->MakeBlock(start, count);
    ASSERT_TRUE(assembler_->CheckBlock(block.view()).ok());
    ASSERT_EQ(assembler_->Fill(block.view(), 0), count);
  }
  absl::Status Check(int64_t start, int64_t count) {
    return assembler_->CheckBlock(stream_->MakeBlock(start, count).view());
  }

  StreamLayout layout_;
  std::unique_ptr<Stream> stream_;
  std::unique_ptr<StreamAssembler> assembler_;
};

TEST_F(StreamAssemblerErrorTest, OutOfOrderOverlappingAndPastTheEndNameTheBlock) {
  Accept(0, 10);
  absl::Status gap = Check(12, 5);
  EXPECT_EQ(gap.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(gap.message()), HasSubstr("block 1 (tokens [12, 17))"));
  EXPECT_THAT(std::string(gap.message()), HasSubstr("tokens [10, 12) are missing"));
  absl::Status overlap = Check(5, 10);
  EXPECT_THAT(std::string(overlap.message()), HasSubstr("block 1 (tokens [5, 15)) overlaps"));
  EXPECT_THAT(std::string(overlap.message()), HasSubstr("expected token_start 10"));
  absl::Status past = Check(10, 91);
  EXPECT_THAT(std::string(past.message()), HasSubstr("extends past seq_len 100"));
  absl::Status empty = Check(10, 0);
  EXPECT_THAT(std::string(empty.message()), HasSubstr("token_count is 0"));
  Accept(10, 5);  // The errors did not advance the stream.
  EXPECT_EQ(assembler_->blocks_received(), 2);
}

TEST_F(StreamAssemblerErrorTest, WrongByteCountsNameTheTensor) {
  Stream::Block block = stream_->MakeBlock(0, 4);
  block.k.pop_back();
  absl::Status status = assembler_->CheckBlock(block.view());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("block 0 (tokens [0, 4)): key has 63 bytes; expected 64"));
  block = stream_->MakeBlock(0, 4);
  block.q.append("x");
  EXPECT_THAT(std::string(assembler_->CheckBlock(block.view()).message()),
              HasSubstr("query has 129 bytes; expected 128"));
}

TEST_F(StreamAssemblerErrorTest, FillStopsWhenSlotsAreFullAndIncompleteStreamIsReported) {
  const Stream::Block block = stream_->MakeBlock(0, 80);
  ASSERT_TRUE(assembler_->CheckBlock(block.view()).ok());
  EXPECT_EQ(assembler_->Fill(block.view(), 0), 64);  // Two slots of 32 tokens.
  EXPECT_EQ(assembler_->Fill(block.view(), 64), 0);
  std::optional<Chunk> first = assembler_->TakeReadyChunk();
  ASSERT_TRUE(first.has_value());
  assembler_->ReleaseChunk(first->index);
  EXPECT_EQ(assembler_->Fill(block.view(), 64), 16);
  absl::Status incomplete = assembler_->CheckComplete();
  EXPECT_EQ(incomplete.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(incomplete.message()), HasSubstr("tokens [80, 100) missing"));
}

TEST(StreamAssemblerCreateTest, RejectsBadLayouts) {
  StreamLayout layout{
      .batch = 1, .seq_len = 8, .q_row_bytes = 4, .kv_row_bytes = 4, .chunk_tokens = 0};
  absl::StatusOr<std::unique_ptr<StreamAssembler>> bad = StreamAssembler::Create(layout, 1);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("chunk_tokens is 0"));
  layout.chunk_tokens = 4;
  EXPECT_THAT(std::string(StreamAssembler::Create(layout, 0).status().message()),
              HasSubstr("slots is 0"));
  layout.chunk_tokens = int64_t{1} << 40;
  layout.q_row_bytes = int64_t{1} << 30;
  EXPECT_THAT(std::string(StreamAssembler::Create(layout, 2).status().message()),
              HasSubstr("overflow"));
}

TEST(HostBufferPoolTest, ReusesIdleBuffersOfTheSameSizeWithinItsCapacity) {
  HostBufferPool pool(/*capacity_bytes=*/3 << 20);
  char* first = nullptr;
  {
    PooledBuffer a = pool.Take(1 << 20);
    ASSERT_TRUE(a);
    first = a.get();
    EXPECT_EQ(pool.idle_bytes(), 0);
  }
  EXPECT_EQ(pool.idle_bytes(), 1 << 20);
  PooledBuffer again = pool.Take(1 << 20);
  EXPECT_EQ(again.get(), first) << "an idle buffer of the same size is reused";
  EXPECT_EQ(pool.idle_bytes(), 0);
  PooledBuffer other = pool.Take(2 << 20);  // Another size: fresh.
  EXPECT_NE(other.get(), first);
  again.Reset();
  other.Reset();
  EXPECT_EQ(pool.idle_bytes(), 3 << 20);
  // Keeping 1.5 MiB more would pass the 3 MiB capacity: idle buffers go oldest first (the 1 MiB
  // one, then the 2 MiB one) until it fits.
  { PooledBuffer third = pool.Take(1536 << 10); }
  EXPECT_EQ(pool.idle_bytes(), 1536 << 10);
  { PooledBuffer huge = pool.Take(4 << 20); }  // Larger than the capacity: freed, not kept.
  EXPECT_LE(pool.idle_bytes(), 3 << 20);
}

TEST(HostBufferPoolTest, AssemblersReturnTheirSlotsToThePool) {
  HostBufferPool pool(64 << 20);
  const StreamLayout layout{
      .batch = 1, .seq_len = 100, .q_row_bytes = 64, .kv_row_bytes = 32, .chunk_tokens = 32};
  char* slot = nullptr;
  {
    auto a = StreamAssembler::Create(layout, 2, &pool);
    ASSERT_TRUE(a.ok());
    slot = const_cast<char*>((*a)->ChunkBufferForTest());
  }
  EXPECT_EQ(pool.idle_bytes(), 2 * 32 * (64 + 2 * 32));
  auto b = StreamAssembler::Create(layout, 2, &pool);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->ChunkBufferForTest(), slot);
  EXPECT_EQ(pool.idle_bytes(), 0);
}

// Windows (segments of 10 and 7 tokens, lcm 70, over 100 tokens): chunks of 10, each taken once
// the segments holding its last token have arrived, with the rows of the segments crossing its
// ends gathered from the slots beside it, and a slot freed only once the next window is taken.
TEST(StreamAssemblerWindowsTest, AWindowWaitsForItsSegmentsAndGathersTheirCrossingRows) {
  engine::AttentionSpec spec;
  spec.patterns = {{10, 1}, {7, 1}};
  const engine::ProblemShape shape{2, 100, 1, 1, 1};  // One fp32 per head: k[p] = p.
  const absl::StatusOr<StreamLayout> layout =
      MakeStreamLayout(shape, engine::DType::kFloat32, engine::DType::kFloat32, spec, 1, 0);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_TRUE(layout->windowed);
  ASSERT_EQ(layout->chunk_tokens, 10);
  EXPECT_EQ(InputSlots(*layout, 1), 3);
  // Per pattern, two ends' crossing segments of (at most) 10 and 7 rows, K and V, 2 batches.
  EXPECT_EQ(GatheredBytesBound(*layout), 2 * (10 + 7) * 2 * 2 * 4);
  auto made = StreamAssembler::Create(*layout, /*slots=*/1);
  ASSERT_TRUE(made.ok()) << made.status();
  StreamAssembler& assembler = **made;
  EXPECT_EQ(assembler.slots(), 3);

  // Batch b holds k = v = 1000 b + p and q = -p at position p.
  std::string q, k;
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t p = 0; p < 100; ++p) {
      const float key = static_cast<float>(1000 * b + p);
      const float query = static_cast<float>(-p);
      k.append(reinterpret_cast<const char*>(&key), 4);
      q.append(reinterpret_cast<const char*>(&query), 4);
    }
  }
  const BlockView all{0, 100, q, k, k};
  ASSERT_TRUE(assembler.CheckBlock(all).ok());
  int64_t taken = assembler.Fill(all, 0);
  EXPECT_EQ(taken, 30) << "three slots of 10 tokens";
  EXPECT_EQ(assembler.Fill(all, taken), 0);

  const std::optional<Chunk> first = assembler.TakeReadyChunk();
  ASSERT_TRUE(first.has_value());
  ASSERT_NE(first->share_of, nullptr);
  EXPECT_EQ(first->share_of->share.token_begin, 0);
  EXPECT_EQ(first->share_of->share.token_end, 10);
  // Tokens [0, 10) cross only the 7-token segment [7, 14): its rows 7..13, gathered.
  ASSERT_EQ(first->share_of->spanning->size(), 1u);
  const engine::SpanningKeys& set = first->share_of->spanning->front();
  EXPECT_EQ(set.kept.first, 7);
  EXPECT_EQ(set.kept.count, 7);
  const auto* rows = static_cast<const float*>(first->share_of->gathered->front().k);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t r = 0; r < 7; ++r) EXPECT_EQ(rows[b * 7 + r], 1000 * b + 7 + r) << b << " " << r;
  }
  // The window's own q is its slot, [batch, 10, 1, 1].
  EXPECT_EQ(reinterpret_cast<const float*>(first->q)[10 + 3], -3);

  // [10, 20) reaches 21 (the segment [14, 21)): in; [20, 30) reaches 35: not yet.
  const std::optional<Chunk> second = assembler.TakeReadyChunk();
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->share_of->spanning->size(), 2u);  // The 7-token [7, 14) and [14, 21).
  EXPECT_FALSE(assembler.TakeReadyChunk().has_value());
  EXPECT_EQ(assembler.Fill(all, taken), 0) << "every slot is still read";

  // Both released: window 0's slot is free (window 1, taken, read it), window 1's is not (window
  // 2, not yet taken, reads its tail [14, 20)).
  assembler.ReleaseChunk(0);
  assembler.ReleaseChunk(1);
  int64_t more = assembler.Fill(all, taken);
  EXPECT_EQ(more, 10);
  taken += more;
  EXPECT_EQ(assembler.Fill(all, taken), 0) << "window 1's slot was freed before window 2 read it";
  // [20, 30) reaches 35, and 40 tokens arrived: taken, and window 1's slot is free.
  const std::optional<Chunk> third = assembler.TakeReadyChunk();
  ASSERT_TRUE(third.has_value());
  EXPECT_EQ(third->token_start, 20);
  more = assembler.Fill(all, taken);
  EXPECT_EQ(more, 10);
  taken += more;
  EXPECT_EQ(assembler.Fill(all, taken), 0);
}

// A causal window reads no key after its last token: it is taken as soon as its own tokens are
// in, and the crossing segment's rows after it are not gathered (zeros, never read).
TEST(StreamAssemblerWindowsTest, ACausalWindowIsTakenWithItsOwnTokens) {
  engine::AttentionSpec spec;
  spec.patterns = {{10, 1}, {7, 1}};
  spec.causal = true;
  const engine::ProblemShape shape{1, 100, 1, 1, 1};
  const absl::StatusOr<StreamLayout> layout =
      MakeStreamLayout(shape, engine::DType::kFloat32, engine::DType::kFloat32, spec, 1, 0);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_TRUE(layout->windowed);
  auto made = StreamAssembler::Create(*layout, /*slots=*/1);
  ASSERT_TRUE(made.ok()) << made.status();
  StreamAssembler& assembler = **made;
  std::string k;
  for (int64_t p = 0; p < 100; ++p) {
    const float key = static_cast<float>(p + 1);
    k.append(reinterpret_cast<const char*>(&key), 4);
  }
  const BlockView first_ten{0, 10, k.substr(0, 40), k.substr(0, 40), k.substr(0, 40)};
  ASSERT_TRUE(assembler.CheckBlock(first_ten).ok());
  ASSERT_EQ(assembler.Fill(first_ten, 0), 10);
  const std::optional<Chunk> first = assembler.TakeReadyChunk();
  ASSERT_TRUE(first.has_value()) << "a causal window waited for tokens after it";
  ASSERT_EQ(first->share_of->spanning->size(), 1u);  // The 7-token segment [7, 14).
  const auto* rows = static_cast<const float*>(first->share_of->gathered->front().k);
  EXPECT_EQ(std::vector<float>(rows, rows + 7), (std::vector<float>{8, 9, 10, 0, 0, 0, 0}));
}

}  // namespace
}  // namespace da::server
