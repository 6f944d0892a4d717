#include "engine/shard_plan.h"

#include <gtest/gtest.h>

#include <random>
#include <tuple>
#include <utility>
#include <vector>

namespace da::engine {
namespace {

AttentionSpec Spec(std::vector<Pattern> patterns, ShardPolicy policy = ShardPolicy::kAuto) {
  AttentionSpec spec;
  spec.patterns = std::move(patterns);
  spec.shard_policy = policy;
  return spec;
}

TEST(ShardPlanTest, SequenceSharesAreNearEqualWithTheRemainderFirst) {
  const ProblemShape shape{1, 10, 4, 4, 8};
  absl::StatusOr<ShardLayout> layout =
      MakeShardLayout(shape, Spec({{4, 1}}), ShardPolicy::kSequence, 3);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_EQ(layout->shares.size(), 3u);
  EXPECT_EQ(layout->shares[0].token_begin, 0);
  EXPECT_EQ(layout->shares[0].token_end, 4);
  EXPECT_EQ(layout->shares[1].token_begin, 4);
  EXPECT_EQ(layout->shares[1].token_end, 7);
  EXPECT_EQ(layout->shares[2].token_end, 10);
  for (const Share& s : layout->shares) {
    EXPECT_EQ(s.heads(), 4);
    EXPECT_EQ(s.kv_heads(), 4);
  }
}

TEST(ShardPlanTest, HeadSharesCarryTheKvHeadsTheyRead) {
  const ProblemShape shape{1, 16, 8, 2, 8};  // Query heads 0-3 read kv head 0, 4-7 kv head 1.
  absl::StatusOr<ShardLayout> layout =
      MakeShardLayout(shape, Spec({{4, 1}}), ShardPolicy::kHeads, 3);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const std::vector<std::pair<int64_t, int64_t>> heads = {{0, 3}, {3, 6}, {6, 8}};
  const std::vector<std::pair<int64_t, int64_t>> kv = {{0, 1}, {0, 2}, {1, 2}};
  for (int r = 0; r < 3; ++r) {
    const Share& s = layout->shares[r];
    EXPECT_EQ(std::make_pair(s.head_begin, s.head_end), heads[r]) << "rank " << r;
    EXPECT_EQ(std::make_pair(s.kv_head_begin, s.kv_head_end), kv[r]) << "rank " << r;
    EXPECT_EQ(s.tokens(), 16);
  }
}

// HeadCosts sums segments in closed form; it equals the segment-by-segment sum, partial last
// segments, offsets, r not dividing w, w > N and causal included.
TEST(ShardPlanTest, HeadCostsEqualTheSumOverEverySegment) {
  for (bool causal : {false, true}) {
    for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
      const ProblemShape shape{1, 1001, 6, 3, 8};
      AttentionSpec spec = Spec({{7, 3}, {64, 1}, {100, 8}, {2048, 2}, {1, 1}});
      spec.mode = mode;
      spec.causal = causal;
      const std::vector<double> costs = HeadCosts(shape, spec);
      const auto work = AssignHeadPatterns(shape.heads, spec);
      for (int64_t head = 0; head < shape.heads; ++head) {
        double expected = 0;
        for (const HeadWork& hw : work[head]) {
          for (int64_t t = 0; t < NumSegments(shape.seq_len, hw.pattern.segment_len); ++t) {
            const double m =
                static_cast<double>(KeptPositions(hw.pattern, hw.offset, shape.seq_len, t).count);
            expected += causal ? m * (m + 1) / 2 : m * m;
          }
        }
        EXPECT_DOUBLE_EQ(costs[head], expected) << "head " << head << " causal " << causal;
      }
    }
  }
}

TEST(ShardPlanTest, HeadSharesBalanceCostNotHeadCount) {
  // GROUPED, 8 heads, 3 patterns: heads 0-2 run (2048, 1), 3-5 (4096, 2), 6-7 (8192, 4); per head
  // the costs are 4 : 2 : 1 (32 segments of 2048 rows, 16 of 2048, 8 of 2048).
  const ProblemShape shape{1, 65536, 8, 8, 64};
  AttentionSpec spec = Spec({{2048, 1}, {4096, 2}, {8192, 4}});
  spec.mode = CombineMode::kGrouped;
  const std::vector<double> costs = HeadCosts(shape, spec);
  ASSERT_EQ(costs.size(), 8u);
  EXPECT_DOUBLE_EQ(costs[0], 32.0 * 2048 * 2048);
  EXPECT_DOUBLE_EQ(costs[3], costs[0] / 2);
  EXPECT_DOUBLE_EQ(costs[7], costs[0] / 4);
  absl::StatusOr<ShardLayout> two = MakeShardLayout(shape, spec, ShardPolicy::kHeads, 2);
  ASSERT_TRUE(two.ok());
  // Costs 4 4 4 | 2 2 2 1 1: the largest block is 12 of 20 (by head count: 14 of 20).
  EXPECT_EQ(two->shares[0].head_end, 3);
  absl::StatusOr<ShardLayout> four = MakeShardLayout(shape, spec, ShardPolicy::kHeads, 4);
  ASSERT_TRUE(four.ok());
  // 4 | 4 | 4 | 2 2 2 1 1 would put 8 on the last rank; 4 | 4 | 4 2 | 2 2 1 1 is at most 6.
  std::vector<int64_t> ends;
  for (const Share& share : four->shares) ends.push_back(share.head_end);
  EXPECT_EQ(ends, (std::vector<int64_t>{1, 2, 4, 8}));
  // LONGNET heads all run every pattern: equal costs, equal blocks (first H % W one larger).
  spec.mode = CombineMode::kLongNet;
  for (int world = 2; world <= 8; ++world) {
    absl::StatusOr<ShardLayout> even = MakeShardLayout(shape, spec, ShardPolicy::kHeads, world);
    ASSERT_TRUE(even.ok());
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(even->shares[r].heads(), 8 / world + (r < 8 % world ? 1 : 0))
          << "rank " << r << " of " << world;
    }
  }
}

TEST(ShardPlanTest, AutoPicksHeadsWhenEveryRankGetsAHeadAndItFits) {
  const ProblemShape shape{1, 1024, 8, 8, 64};
  const AttentionSpec spec = Spec({{256, 1}});
  EXPECT_EQ(*ChooseShardStrategy(shape, DType::kFloat32, DType::kFloat32, spec, 4, 0),
            ShardPolicy::kHeads);
  // Fewer heads than ranks: SEQUENCE.
  EXPECT_EQ(*ChooseShardStrategy({1, 1024, 2, 2, 64}, DType::kFloat32, DType::kFloat32, spec, 4, 0),
            ShardPolicy::kSequence);
  // A HEADS share is 2 heads x 1024 tokens x 64 x 4 bytes x (q, k, v, out) = 2 MiB.
  EXPECT_EQ(*ChooseShardStrategy(shape, DType::kFloat32, DType::kFloat32, spec, 4, 2 << 20),
            ShardPolicy::kHeads);
  EXPECT_EQ(*ChooseShardStrategy(shape, DType::kFloat32, DType::kFloat32, spec, 4, (2 << 20) - 1),
            ShardPolicy::kSequence);
}

TEST(ShardPlanTest, ForcedPoliciesAreObeyedOrRefusedWithTheNumbers) {
  const ProblemShape shape{1, 3, 2, 2, 8};
  EXPECT_EQ(*ChooseShardStrategy(shape, DType::kFloat32, DType::kFloat32,
                                 Spec({{2, 1}}, ShardPolicy::kSequence), 2, 0),
            ShardPolicy::kSequence);
  absl::StatusOr<ShardPolicy> heads = ChooseShardStrategy(
      shape, DType::kFloat32, DType::kFloat32, Spec({{2, 1}}, ShardPolicy::kHeads), 3, 0);
  ASSERT_EQ(heads.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(heads.status().message().find("heads is 2, world size 3"), std::string::npos)
      << heads.status();
  absl::StatusOr<ShardPolicy> sequence = ChooseShardStrategy(
      shape, DType::kFloat32, DType::kFloat32, Spec({{2, 1}}, ShardPolicy::kSequence), 4, 0);
  ASSERT_EQ(sequence.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(sequence.status().message().find("seq_len is 3, world size 4"), std::string::npos)
      << sequence.status();
}

TEST(ShardPlanTest, KeptRowsInClampsToTheRange) {
  const KeptRange kept{3, 4, 5};  // Positions 3, 7, 11, 15, 19.
  EXPECT_EQ(KeptRowsIn(kept, 8, 16), std::make_pair(int64_t{2}, int64_t{4}));
  EXPECT_EQ(KeptRowsIn(kept, 0, 4), std::make_pair(int64_t{0}, int64_t{1}));
  EXPECT_EQ(KeptRowsIn(kept, 4, 7), std::make_pair(int64_t{1}, int64_t{1}));  // None.
  EXPECT_EQ(KeptRowsIn(kept, 19, 100), std::make_pair(int64_t{4}, int64_t{5}));
  EXPECT_EQ(KeptRowsIn(kept, 20, 100), std::make_pair(int64_t{5}, int64_t{5}));
}

TEST(ShardPlanTest, OnlySegmentsAcrossRanksExchangeAndOnlyTheirKeptRows) {
  // N = 100 on two ranks: [0, 50) and [50, 100). Pattern (64, 2), two heads: head 0 offset 0,
  // head 1 offset 1. Segment 0 ([0, 64)) spans both ranks, segment 1 ([64, 100)) is rank 1's.
  const ProblemShape shape{3, 100, 2, 2, 16};
  AttentionSpec spec = Spec({{64, 2}});
  absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, ShardPolicy::kSequence, 2);
  ASSERT_TRUE(layout.ok());
  const std::vector<SpanningKeys> sets = SpanningKeySets(shape, spec, *layout);
  ASSERT_EQ(sets.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(sets[i].segment, 0);
    EXPECT_EQ(sets[i].kv_head, i);
    EXPECT_EQ(sets[i].offset, i);
    EXPECT_EQ(sets[i].kept.count, 32);
    EXPECT_EQ(sets[i].first_rank, 0);
    EXPECT_EQ(sets[i].last_rank, 1);
    EXPECT_EQ(RowsOf(sets[i], *layout, 0), std::make_pair(int64_t{0}, int64_t{25}));
    EXPECT_EQ(RowsOf(sets[i], *layout, 1), std::make_pair(int64_t{25}, int64_t{32}));
  }
  const int64_t row_bytes = 2 * 16 * 4 * 3;  // K and V, head_dim 16, fp32, batch 3.
  EXPECT_EQ(ExchangeBytesReceived(shape, spec, *layout, DType::kFloat32, 0), 14 * row_bytes);
  EXPECT_EQ(ExchangeBytesReceived(shape, spec, *layout, DType::kFloat32, 1), 50 * row_bytes);
  spec.causal = true;  // Rank 0's queries never see rank 1's later keys.
  EXPECT_EQ(ExchangeBytesReceived(shape, spec, *layout, DType::kFloat32, 0), 0);
  EXPECT_EQ(ExchangeBytesReceived(shape, spec, *layout, DType::kFloat32, 1), 50 * row_bytes);
  // HEADS exchanges nothing.
  EXPECT_TRUE(
      SpanningKeySets(shape, spec, *MakeShardLayout(shape, spec, ShardPolicy::kHeads, 2)).empty());
}

TEST(ShardPlanTest, SpanningSetsPartitionTheirRowsAmongContiguousRanks) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int world = 2 + static_cast<int>(rng() % 3);
    const int64_t seq_len = world + static_cast<int64_t>(rng() % 400);
    const ProblemShape shape{1, seq_len, 6, 3, 8};
    AttentionSpec spec = Spec(
        {{1 + static_cast<int64_t>(rng() % 200), 1}, {8 + static_cast<int64_t>(rng() % 300), 0}});
    spec.patterns[1].dilation = 1 + static_cast<int64_t>(rng() % spec.patterns[1].segment_len);
    spec.mode = trial % 2 ? CombineMode::kLongNet : CombineMode::kGrouped;
    const ShardLayout layout = *MakeShardLayout(shape, spec, ShardPolicy::kSequence, world);
    for (const SpanningKeys& set : SpanningKeySets(shape, spec, layout)) {
      ASSERT_LT(set.first_rank, set.last_rank);
      int64_t next = 0;
      for (int r = set.first_rank; r <= set.last_rank; ++r) {
        const auto [b, e] = RowsOf(set, layout, r);
        ASSERT_EQ(b, next) << "rank " << r << " of trial " << trial;
        next = e;
      }
      ASSERT_EQ(next, set.kept.count) << "trial " << trial;
      ASSERT_LT(RowsOf(set, layout, set.first_rank).first,
                RowsOf(set, layout, set.first_rank).second);
      ASSERT_LT(RowsOf(set, layout, set.last_rank).first,
                RowsOf(set, layout, set.last_rank).second);
    }
  }
}

// One share's sets, found without a layout (a stream's window), are exactly the sets a layout
// that cuts the sequence at the share's ends has the share take part in.
TEST(ShardPlanTest, OneSharesSpanningSetsAreThoseItsLayoutWouldExchange) {
  std::mt19937 rng(11);
  int compared = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t seq_len = 3 + static_cast<int64_t>(rng() % 500);
    const ProblemShape shape{1, seq_len, 6, 3, 8};
    AttentionSpec spec = Spec(
        {{1 + static_cast<int64_t>(rng() % 200), 1}, {8 + static_cast<int64_t>(rng() % 300), 0}});
    spec.patterns[1].dilation = 1 + static_cast<int64_t>(rng() % spec.patterns[1].segment_len);
    spec.mode = trial % 2 ? CombineMode::kLongNet : CombineMode::kGrouped;
    const int64_t begin = 1 + static_cast<int64_t>(rng() % (seq_len - 2));
    const int64_t end = begin + 1 + static_cast<int64_t>(rng() % (seq_len - begin - 1));
    ShardLayout layout;
    for (const auto& [b, e] : {std::pair{int64_t{0}, begin}, {begin, end}, {end, seq_len}}) {
      Share share = WholeShare(shape);
      share.rank = static_cast<int>(layout.shares.size());
      share.token_begin = b;
      share.token_end = e;
      layout.shares.push_back(share);
    }
    std::vector<SpanningKeys> expected;
    for (const SpanningKeys& set : SpanningKeySets(shape, spec, layout)) {
      const auto [b, e] = RowsOf(set, layout, 1);
      if (b < e) expected.push_back(set);
    }
    const std::vector<SpanningKeys> found = SpanningKeySetsOf(shape, spec, layout.shares[1]);
    ASSERT_EQ(found.size(), expected.size()) << "trial " << trial;
    for (size_t i = 0; i < found.size(); ++i) {
      const SpanningKeys& f = found[i];
      const SpanningKeys& x = expected[i];
      ASSERT_EQ(std::tie(f.pattern_index, f.segment, f.kv_head, f.offset, f.kept.first,
                         f.kept.stride, f.kept.count),
                std::tie(x.pattern_index, x.segment, x.kv_head, x.offset, x.kept.first,
                         x.kept.stride, x.kept.count))
          << "trial " << trial << " set " << i;
    }
    compared += static_cast<int>(found.size());
  }
  EXPECT_GT(compared, 300);
}

}  // namespace
}  // namespace da::engine
