// The fused-attention path's geometry (engine/cuda/sdpa_plan.h), checked element by element on
// the CPU: every view of every call is walked index by index and decoded back into (batch, token,
// head) of the share's tensors. Then: each (i0, head) of a call reads exactly the kept set of one
// segment, in order, from the matching kv head (GQA), and writes its log-sum-exps at the same
// (batch, token, head); every (batch, kept position, head, pattern) of the share is computed by
// exactly one call or listed exactly once as a spanning query; every stride and offset is a
// multiple of 16 bytes for 2-byte elements (cuDNN's alignment rule) when D is 32, 64 or 128.
// Sweep: whole problems, HEADS and SEQUENCE shares of 2-3, patterns with partial segments, w > N,
// r not dividing w or H, both combine modes, GQA.
#include "engine/cuda/sdpa_plan.h"

#include <gtest/gtest.h>

#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/dilation.h"
#include "engine/shard_plan.h"

namespace da::engine::cuda {
namespace {

// (batch, share token, share head) of a flat element index of a [B, T, H, row] tensor.
struct Place {
  int64_t batch, token, head;
  bool operator<(const Place& o) const {
    return std::tie(batch, token, head) < std::tie(o.batch, o.token, o.head);
  }
  bool operator==(const Place& o) const = default;
};

Place Decode(int64_t index, int64_t tokens, int64_t heads, int64_t row) {
  EXPECT_EQ(index % row, 0) << "index " << index << " is not the start of a row";
  const int64_t r = index / row;
  return {r / (tokens * heads), (r / heads) % tokens, r % heads};
}

int64_t At(const SdpaView& v, int64_t i0, int64_t i1, int64_t i2) {
  return v.offset + i0 * v.strides[0] + i1 * v.strides[1] + i2 * v.strides[2];
}

// max_call_flops: 0 leaves calls whole; 2e6 cuts them by segments and queries (kMaxSdpaCallFlops
// at a test's size).
using Param = std::tuple<int /*spec*/, bool /*grouped*/, std::pair<int, ShardPolicy> /*cut*/,
                         double /*max_call_flops*/>;
class SdpaPlanTest : public ::testing::TestWithParam<Param> {};

TEST_P(SdpaPlanTest, CallsCoverEveryKeptPositionOnceWithTheRightKeys) {
  const auto& [spec_index, grouped, cut_by, max_call_flops] = GetParam();
  const auto [shares, strategy] = cut_by;
  const std::vector<std::vector<Pattern>> specs = {
      {{64, 1}, {128, 2}, {256, 4}},  // Full segments; offsets per head run.
      {{100, 3}, {48, 5}},            // Partial last segments; r divides neither w nor H.
      {{32, 1}, {1000, 8}},           // w > N.
  };
  AttentionSpec spec;
  spec.patterns = specs[spec_index];
  spec.mode = grouped ? CombineMode::kGrouped : CombineMode::kLongNet;
  spec.causal = spec_index == 1;
  const ProblemShape shape{2, 640, 12, 4, 64};  // GQA: 3 query heads per kv head.
  std::vector<Share> cut = {WholeShare(shape)};
  if (shares > 1) {
    absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, strategy, shares);
    ASSERT_TRUE(layout.ok()) << layout.status();
    cut = layout->shares;
  }
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(shape.heads, spec);
  int spanning_seen = 0;
  int misaligned_lse = 0;  // Calls whose LSE starts off 16 bytes.
  for (const Share& share : cut) {
    SCOPED_TRACE(share.ToString());
    absl::StatusOr<SdpaPlan> plan = PlanSdpaCalls(shape, spec, share, max_call_flops);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int64_t T = share.tokens(), H = share.heads(), Hk = share.kv_heads(), D = shape.head_dim;
    std::map<std::tuple<Place, int>, int> covered;  // (place, pattern) -> times.
    for (const SdpaCall& call : plan->calls) {
      SCOPED_TRACE(call.Signature());
      const Pattern& pattern = spec.patterns[call.pattern_index];
      ASSERT_EQ(call.q.dims[3], D);
      ASSERT_EQ(call.q.strides[3], 1);
      if (max_call_flops > 0) {  // Within the bound, but for a causal segment (never cut).
        EXPECT_TRUE(SdpaCallFlops(call) <= max_call_flops || (call.causal && call.q.dims[0] == 1));
      }
      ASSERT_EQ(call.q.dims[1] % call.kv.dims[1], 0) << "GQA needs whole groups";
      const int64_t per_kv = call.q.dims[1] / call.kv.dims[1];
      for (const SdpaView* view : {&call.q, &call.kv}) {
        for (int k = 0; k < 3; ++k) EXPECT_EQ(view->strides[k] * 2 % 16, 0);
        EXPECT_EQ(view->offset * 2 % 16, 0);
      }
      // The LSE's first element is as aligned as the graph says, and no more is claimed.
      const int64_t lse_alignment = call.LseAlignment();
      EXPECT_EQ(call.lse.offset * 4 % lse_alignment, 0);
      EXPECT_TRUE(lse_alignment == 16 || call.lse.offset * 4 % 16 != 0);
      EXPECT_EQ(call.Signature().find("lse-align") != std::string::npos, lse_alignment < 16);
      misaligned_lse += lse_alignment < 16 ? 1 : 0;
      for (int64_t i0 = 0; i0 < call.q.dims[0]; ++i0) {
        for (int64_t h = 0; h < call.q.dims[1]; ++h) {
          // The kept set of one segment, in order, for a head that runs the pattern at the
          // call's offset.
          const Place first = Decode(At(call.q, i0, h, 0), T, H, D);
          const int64_t global_head = share.head_begin + first.head;
          const int64_t position = share.token_begin + first.token;
          const int64_t segment = position / pattern.segment_len;
          bool runs = false;
          for (const HeadWork& hw : work[global_head]) {
            runs = runs ||
                   (hw.pattern_index == call.pattern_index && hw.offset == call.dilation_offset);
          }
          ASSERT_TRUE(runs) << "head " << global_head << " does not run this pattern/offset";
          const KeptRange kept =
              KeptPositions(pattern, call.dilation_offset, shape.seq_len, segment);
          // Queries: a run of the kept set from kept index s0 (0 unless cut by queries, which a
          // causal call never is); keys: all of it, in order.
          const int64_t s0 = (position - kept.first) / kept.stride;
          ASSERT_LE(s0 + call.q.dims[2], kept.count);
          if (call.causal) {
            ASSERT_EQ(call.q.dims[2], kept.count);
          }
          ASSERT_EQ(call.kv.dims[2], kept.count);
          for (int64_t s = 0; s < call.q.dims[2]; ++s) {
            const Place q = Decode(At(call.q, i0, h, s), T, H, D);
            ASSERT_EQ(q.batch, first.batch);
            ASSERT_EQ(q.head, first.head);
            ASSERT_EQ(share.token_begin + q.token, kept.first + (s0 + s) * kept.stride);
            ASSERT_EQ(Decode(At(call.lse, i0, h, s), T, H, 1), q);
            ++covered[{q, call.pattern_index}];
          }
          for (int64_t s = 0; s < call.kv.dims[2]; ++s) {
            const Place kv = Decode(At(call.kv, i0, h / per_kv, s), T, Hk, D);
            ASSERT_EQ(kv.batch, first.batch);
            ASSERT_EQ(share.token_begin + kv.token, kept.first + s * kept.stride);
            ASSERT_EQ(share.kv_head_begin + kv.head,
                      KvHeadFor(global_head, shape.heads, shape.kv_heads));
          }
        }
      }
    }
    for (const SpanningQueries& sq : plan->spanning) {
      ++spanning_seen;
      const Pattern& pattern = spec.patterns[sq.pattern_index];
      const KeptRange kept = KeptPositions(pattern, sq.dilation_offset, shape.seq_len, sq.segment);
      for (int64_t b = 0; b < shape.batch; ++b) {
        for (int64_t h = sq.head_begin; h < sq.head_end; ++h) {
          EXPECT_EQ(KvHeadFor(share.head_begin + h, shape.heads, shape.kv_heads), sq.kv_head);
          for (int64_t i = sq.kept_begin; i < sq.kept_end; ++i) {
            const int64_t position = kept.first + i * kept.stride;
            ASSERT_GE(position, share.token_begin);
            ASSERT_LT(position, share.token_end);
            ++covered[{Place{b, position - share.token_begin, h}, sq.pattern_index}];
          }
        }
      }
    }
    // Every kept (batch, position, head, pattern) of the share exactly once.
    int64_t expected = 0;
    for (int64_t h = share.head_begin; h < share.head_end; ++h) {
      for (const HeadWork& hw : work[h]) {
        for (int64_t t = 0; t < NumSegments(shape.seq_len, hw.pattern.segment_len); ++t) {
          const KeptRange kept = KeptPositions(hw.pattern, hw.offset, shape.seq_len, t);
          for (int64_t i = 0; i < kept.count; ++i) {
            const int64_t position = kept.first + i * kept.stride;
            if (position < share.token_begin || position >= share.token_end) continue;
            for (int64_t b = 0; b < shape.batch; ++b) {
              const auto found = covered.find(
                  {Place{b, position - share.token_begin, h - share.head_begin}, hw.pattern_index});
              ASSERT_NE(found, covered.end())
                  << "batch " << b << " position " << position << " head " << h << " pattern "
                  << hw.pattern_index << " computed by no call";
              ASSERT_EQ(found->second, 1) << "position " << position << " head " << h;
              ++expected;
            }
          }
        }
      }
    }
    EXPECT_EQ(static_cast<int64_t>(covered.size()), expected) << "something extra was computed";
    EXPECT_GE(plan->distinct_signatures, 1);
    EXPECT_LE(plan->distinct_signatures, static_cast<int>(plan->calls.size()));
  }
  if (strategy == ShardPolicy::kSequence && shares > 1) {
    EXPECT_GT(spanning_seen, 0);
  }
  // Set 1's r = 3 and 5 over 12 heads start head groups off a multiple of 4 rows.
  if (spec_index == 1) {
    EXPECT_GT(misaligned_lse, 0);
  }
}

std::string Name(const ::testing::TestParamInfo<Param>& info) {
  const auto& [spec_index, grouped, cut_by, max_call_flops] = info.param;
  const auto [shares, strategy] = cut_by;
  return absl::StrCat(
      "spec", spec_index, grouped ? "_grouped" : "_longnet",
      shares == 1 ? std::string("_whole") : absl::StrCat("_", ShardPolicyName(strategy), shares),
      max_call_flops > 0 ? "_cut" : "");
}

INSTANTIATE_TEST_SUITE_P(Sweep, SdpaPlanTest,
                         ::testing::Combine(::testing::Values(0, 1, 2), ::testing::Bool(),
                                            ::testing::Values(std::pair{1, ShardPolicy::kNone},
                                                              std::pair{2, ShardPolicy::kHeads},
                                                              std::pair{3, ShardPolicy::kHeads},
                                                              std::pair{2, ShardPolicy::kSequence},
                                                              std::pair{3, ShardPolicy::kSequence}),
                                            ::testing::Values(0.0, 2e6)),
                         Name);

// A whole problem whose segments tile the sequence folds batch and segments into one dimension:
// one call per (pattern, offset head group), and calls of one geometry share a graph.
TEST(SdpaPlanTest, WholeSegmentsFoldIntoOneCallPerHeadGroup) {
  AttentionSpec spec;
  spec.patterns = {{2048, 1}, {4096, 2}};
  const ProblemShape shape{2, 16384, 16, 16, 128};
  absl::StatusOr<SdpaPlan> plan = PlanSdpaCalls(shape, spec, WholeShare(shape));
  ASSERT_TRUE(plan.ok()) << plan.status();
  // Pattern 0: one offset, all 16 heads; pattern 1: offsets 0 and 1, 8 heads each.
  ASSERT_EQ(plan->calls.size(), 3u);
  EXPECT_EQ(plan->calls[0].q.dims, (std::array<int64_t, 4>{2 * 8, 16, 2048, 128}));
  EXPECT_EQ(plan->calls[1].q.dims, (std::array<int64_t, 4>{2 * 4, 8, 2048, 128}));
  EXPECT_EQ(plan->calls[1].q.strides,
            (std::array<int64_t, 4>{4096 * 16 * 128, 128, 2 * 16 * 128, 1}));
  EXPECT_EQ(plan->calls[2].q.offset, 1 * 16 * 128 + 8 * 128);  // Offset 1, heads from 8.
  EXPECT_EQ(plan->distinct_signatures, 2);
  EXPECT_TRUE(plan->spanning.empty());
}

// At #15's benchmark size every call is cut to kMaxSdpaCallFlops, in pieces of whole segments
// that share the uncut calls' graphs and do the same work; a single segment as long as the
// sequence is cut by its queries, unless causal.
TEST(SdpaPlanTest, LargeCallsAreCutWithinTheBound) {
  AttentionSpec spec;
  spec.patterns = {{2048, 1}, {4096, 2}, {8192, 4}};
  const ProblemShape shape{1, 1 << 20, 16, 16, 128};
  absl::StatusOr<SdpaPlan> whole = PlanSdpaCalls(shape, spec, WholeShare(shape), 0);
  absl::StatusOr<SdpaPlan> cut = PlanSdpaCalls(shape, spec, WholeShare(shape));
  ASSERT_TRUE(whole.ok() && cut.ok());
  const auto total = [](const SdpaPlan& plan) {
    double flops = 0;
    for (const SdpaCall& call : plan.calls) flops += SdpaCallFlops(call);
    return flops;
  };
  EXPECT_DOUBLE_EQ(total(*cut), total(*whole));
  for (const SdpaCall& call : cut->calls) {
    EXPECT_LE(SdpaCallFlops(call), kMaxSdpaCallFlops);
    // Every head group and piece starts on 16 bytes of LSE: the benchmark's graphs keep cuDNN's
    // default alignment (SdpaCall::LseAlignment).
    EXPECT_EQ(call.LseAlignment(), 16) << call.Signature();
  }
  // Pattern 0: 512 segments in 8 pieces of 64; pattern 1: 2 offsets x 2 pieces of 128; pattern 2
  // (1.1e12 per call) as it was: 4 offsets.
  EXPECT_EQ(whole->calls.size(), 7u);
  EXPECT_EQ(cut->calls.size(), 16u);
  EXPECT_EQ(cut->distinct_signatures, whole->distinct_signatures);

  const ProblemShape long_shape{1, 262144, 16, 16, 128};
  spec.patterns = {{262144, 1}};
  cut = PlanSdpaCalls(long_shape, spec, WholeShare(long_shape));
  ASSERT_TRUE(cut.ok());
  ASSERT_GT(cut->calls.size(), 100u);
  int64_t queries = 0;
  for (const SdpaCall& call : cut->calls) {
    EXPECT_LE(SdpaCallFlops(call), kMaxSdpaCallFlops);
    EXPECT_EQ(call.kv.dims[2], 262144);
    EXPECT_EQ(call.q.offset, queries * 16 * 128);
    queries += call.q.dims[2];
  }
  EXPECT_EQ(queries, 262144);
  EXPECT_LE(cut->distinct_signatures, 2);  // Equal pieces and the last.
  spec.causal = true;
  cut = PlanSdpaCalls(long_shape, spec, WholeShare(long_shape));
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ(cut->calls.size(), 1u);
}

// Many short segments stay far under the FLOP bound but not under cuDNN's 65,535 in dimension 0:
// N = 1M with w = 16 and B = 2 folds into 131,072 segments, which are cut into pieces of at most
// kMaxSdpaSegments that cover every segment once, in order, with one graph for the equal pieces.
TEST(SdpaPlanTest, ManyShortSegmentsAreCutWithinCudnnsBatchLimit) {
  AttentionSpec spec;
  spec.patterns = {{16, 1}, {64, 4}};
  const ProblemShape shape{2, 1 << 20, 4, 4, 64};
  for (double max_call_flops : {kMaxSdpaCallFlops, 0.0}) {
    SCOPED_TRACE(max_call_flops);
    absl::StatusOr<SdpaPlan> plan = PlanSdpaCalls(shape, spec, WholeShare(shape), max_call_flops);
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::map<std::pair<int, int64_t>, int64_t> segments;  // (pattern, offset) -> segments seen.
    for (const SdpaCall& call : plan->calls) {
      SCOPED_TRACE(call.Signature());
      EXPECT_LE(call.q.dims[0], kMaxSdpaSegments);
      EXPECT_EQ(call.kv.dims[0], call.q.dims[0]);
      EXPECT_EQ(call.lse.dims[0], call.q.dims[0]);
      const int64_t w = spec.patterns[call.pattern_index].segment_len;
      int64_t& seen = segments[{call.pattern_index, call.dilation_offset}];
      // Pieces follow one another: this one starts at the first segment not yet covered.
      EXPECT_EQ(call.q.offset, (seen * w + call.dilation_offset) * 4 * 64 + call.head_begin * 64);
      seen += call.q.dims[0];
    }
    // Pattern 0: 2 * 65,536 segments, all heads; pattern 1: 2 * 16,384 per offset, one head each.
    ASSERT_EQ(segments.size(), 5u);
    EXPECT_EQ((segments[{0, 0}]), 2 << 16);
    for (int64_t o = 0; o < 4; ++o) EXPECT_EQ((segments[{1, o}]), 2 << 14);
    // One per pattern (the pieces are equal), and pattern 1's again for offsets 1 to 3, whose LSE
    // starts at rows 5, 10 and 15: off 16 bytes, unlike offset 0's.
    EXPECT_EQ(plan->distinct_signatures, 3);
  }
}

TEST(SdpaPlanTest, NotAShareIsRefused) {
  AttentionSpec spec;
  spec.patterns = {{8, 1}};
  const ProblemShape shape{1, 16, 2, 2, 32};
  Share share = WholeShare(shape);
  share.token_end = 17;
  EXPECT_EQ(PlanSdpaCalls(shape, spec, share).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace da::engine::cuda
