// A share computed by the CPU backend's RunShare equals those rows of the whole problem computed
// by the same backend, for 1-4 simulated ranks in one process: the shares are cut out of the whole
// tensors and the spanning sets' rows are gathered with the same functions the multi-process
// protocol uses (shard_data.h), from every rank's share. Sweep: N not divisible by the world
// size, segments spanning two or more ranks (w up to > N), r not dividing w, causal, both combine
// modes, GQA, both strategies, fp32 and fp16 inputs. Bound: max |share - whole| <= 1e-6 * max
// |whole| (fp32 outputs). (On 2026-11-30 every case was bit-identical: the shares run the same
// kernel on the same packed rows; the bound leaves room for a kernel whose row chunking changes.)
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/shard_data.h"
#include "engine/share.h"
#include "engine/test_tensors.h"
#include "engine/testing/share_testing.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

struct Heads {
  int64_t heads;
  int64_t kv_heads;
};

const std::vector<std::vector<Pattern>>& PatternSets() {
  static const auto* sets = new std::vector<std::vector<Pattern>>{
      {{16, 1}, {32, 2}, {64, 4}},  // Geometric set; segments span ranks for small shares.
      {{10, 3}, {100, 7}},          // r does not divide w.
      {{64, 1}, {5000, 40}},        // w > N: one segment spans every rank.
  };
  return *sets;
}

using testing::CutShares;
using testing::Gathered;
using testing::GatherFor;
using testing::ShareInputs;

using SweepParam = std::tuple<int /*world*/, ShardPolicy, int64_t /*seq_len*/, int /*set*/, Heads,
                              bool /*causal*/, CombineMode, DType>;

class ShareRunSweepTest : public ::testing::TestWithParam<SweepParam> {};

TEST_P(ShareRunSweepTest, SharesEqualTheWholeProblemsRows) {
  const auto& [world, strategy, seq_len, set_index, heads, causal, mode, dtype] = GetParam();
  AttentionSpec spec;
  spec.patterns = PatternSets()[set_index];
  spec.causal = causal;
  spec.mode = mode;
  spec.precision = Precision::kFloat32;
  const ProblemShape shape{2, seq_len, heads.heads, heads.kv_heads, 24};
  std::mt19937 rng(static_cast<uint32_t>(seq_len * 131 + set_index * 17 + world));
  const OwnedTensor q = testing::RandomTensor(dtype, shape.QueryShape(), rng);
  const OwnedTensor k = testing::RandomTensor(dtype, shape.KeyShape(), rng);
  const OwnedTensor v = testing::RandomTensor(dtype, shape.KeyShape(), rng);
  OwnedTensor whole = testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  ThreadPool pool(2);
  CpuBackend backend;
  ASSERT_TRUE(backend.Run(q.view(), k.view(), v.view(), spec, whole.mutable_view(), {&pool}).ok());

  absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, strategy, world);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const std::vector<SpanningKeys> sets = SpanningKeySets(shape, spec, *layout);
  const ShareInputs shares = CutShares(shape, *layout, q, k, v);

  OwnedTensor assembled = testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  ThreadPool rank_pool(world % 2 == 0 ? 1 : 2);  // Both one- and two-thread shares.
  PlanCache plans(int64_t{1} << 30);
  for (const Share& share : layout->shares) {
    Gathered gathered = GatherFor(share.rank, shape, spec, *layout, sets, shares.k, shares.v);
    OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, share.QueryShape(shape));
    ShareProblem p;
    p.shape = shape;
    p.spec = spec;
    p.share = share;
    p.q = shares.q[share.rank].view();
    p.k = shares.k[share.rank].view();
    p.v = shares.v[share.rank].view();
    p.out = out.mutable_view();
    if (strategy == ShardPolicy::kSequence) {
      p.spanning = &sets;
      p.gathered = &gathered.views;
    }
    absl::Status status =
        RunShareWithPlan({&backend, &plans, &rank_pool}, p, Precision::kFloat32, nullptr);
    ASSERT_TRUE(status.ok()) << "rank " << share.rank << ": " << status;
    CopyShareIn(out.bytes.data(), share, assembled.mutable_view());
  }
  double max_abs = 0, max_diff = 0;
  for (int64_t i = 0; i < whole.elements(); ++i) {
    ASSERT_TRUE(std::isfinite(assembled.at(i))) << "element " << i << " not written";
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(whole.at(i))));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(assembled.at(i)) - whole.at(i)));
  }
  EXPECT_GT(max_abs, 0.0);
  EXPECT_LE(max_diff, 1e-6 * max_abs) << "max diff " << max_diff << " of max " << max_abs;
  if (strategy == ShardPolicy::kSequence && world > 1 && seq_len >= 100) {
    // Guard against a sweep that never exercises the exchange.
    EXPECT_FALSE(sets.empty());
  }
}

std::string SweepName(const ::testing::TestParamInfo<SweepParam>& info) {
  const auto& [world, strategy, seq_len, set_index, heads, causal, mode, dtype] = info.param;
  return absl::StrCat("W", world, "_", ShardPolicyName(strategy), "_N", seq_len, "_set", set_index,
                      "_H", heads.heads, "kv", heads.kv_heads, causal ? "_causal" : "", "_",
                      CombineModeName(mode), "_", DTypeName(dtype));
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, ShareRunSweepTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4),
                       ::testing::Values(ShardPolicy::kHeads, ShardPolicy::kSequence),
                       ::testing::Values(int64_t{97}, int64_t{500}), ::testing::Values(0, 1, 2),
                       ::testing::Values(Heads{8, 8}, Heads{8, 2}, Heads{6, 3}), ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat32)),
    SweepName);

INSTANTIATE_TEST_SUITE_P(
    Half, ShareRunSweepTest,
    ::testing::Combine(::testing::Values(3), ::testing::Values(ShardPolicy::kSequence),
                       ::testing::Values(int64_t{500}), ::testing::Values(0),
                       ::testing::Values(Heads{8, 2}), ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat16, DType::kBFloat16)),
    SweepName);

TEST(ShareRunTest, RefusesASpanningSegmentWithoutGatheredRows) {
  AttentionSpec spec;
  spec.patterns = {{64, 2}};
  const ProblemShape shape{1, 100, 2, 2, 16};
  absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, ShardPolicy::kSequence, 2);
  ASSERT_TRUE(layout.ok());
  std::mt19937 rng(5);
  const Share& share = layout->shares[0];
  const OwnedTensor q = testing::RandomTensor(DType::kFloat32, share.QueryShape(shape), rng);
  const OwnedTensor k = testing::RandomTensor(DType::kFloat32, share.KeyShape(shape), rng);
  OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, share.QueryShape(shape));
  ShareProblem p{shape,   spec,   share, q.view(), k.view(), k.view(), out.mutable_view(),
                 nullptr, nullptr};
  CpuBackend backend;
  absl::Status status = RunShareWithPlan({&backend}, p, Precision::kFloat32, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(std::string(status.message()).find("no gathered rows were given"), std::string::npos)
      << status;
}

// A share's plan is cached under its own key: a second run of the same share is a hit, another
// share of the same problem is not, and neither is the whole problem's plan.
TEST(ShareRunTest, SharesHaveTheirOwnPlans) {
  AttentionSpec spec;
  spec.patterns = {{32, 1}, {64, 2}};
  const ProblemShape shape{1, 128, 4, 4, 16};
  absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, ShardPolicy::kHeads, 2);
  ASSERT_TRUE(layout.ok());
  std::mt19937 rng(7);
  CpuBackend backend;
  PlanCache plans(int64_t{1} << 28);
  for (int pass = 0; pass < 2; ++pass) {
    for (const Share& share : layout->shares) {
      const OwnedTensor q = testing::RandomTensor(DType::kFloat32, share.QueryShape(shape), rng);
      const OwnedTensor k = testing::RandomTensor(DType::kFloat32, share.KeyShape(shape), rng);
      OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, share.QueryShape(shape));
      ShareProblem p{shape,   spec,   share, q.view(), k.view(), k.view(), out.mutable_view(),
                     nullptr, nullptr};
      bool hit = true;
      ASSERT_TRUE(RunShareWithPlan({&backend, &plans}, p, Precision::kFloat32, nullptr, &hit).ok());
      EXPECT_EQ(hit, pass == 1) << "pass " << pass << " " << share.ToString();
    }
  }
  EXPECT_EQ(plans.stats().entries, 2);
  ShareProblem part;
  part.shape = shape;
  part.spec = spec;
  part.share = layout->shares[0];
  ShareProblem whole = part;
  whole.share = WholeShare(shape);
  EXPECT_NE(MakeShareKey(part, Precision::kFloat32, "cpu:0", 1).ToString(),
            MakeShareKey(whole, Precision::kFloat32, "cpu:0", 1).ToString());
}

// The copies a cancelled run stops part-way (shard_data.h's *UnlessStopped) equal the plain
// copies when not stopped, at piece sizes that cut rows, batches and head groups anywhere, and
// touch nothing once the stop is up.
TEST(ShardDataTest, CopiesInPiecesEqualTheWholeCopiesAndStopAtOnce) {
  AttentionSpec spec;
  spec.patterns = {{48, 1}, {96, 3}};
  const ProblemShape shape{3, 200, 6, 3, 8};
  std::mt19937 rng(11);
  const OwnedTensor whole_q = testing::RandomTensor(DType::kFloat16, shape.QueryShape(), rng);
  const OwnedTensor whole_k = testing::RandomTensor(DType::kFloat16, shape.KeyShape(), rng);
  const std::atomic<bool> running{false};
  const std::atomic<bool> stopped{true};
  for (const ShardPolicy policy : {ShardPolicy::kSequence, ShardPolicy::kHeads}) {
    absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, policy, 3);
    ASSERT_TRUE(layout.ok()) << layout.status();
    for (const Share& share : layout->shares) {
      for (const auto& [whole, kv] : {std::pair{&whole_q, false}, std::pair{&whole_k, true}}) {
        const int64_t bytes = ShareBytes(whole->shape, share, whole->dtype, kv);
        std::vector<uint8_t> expected(bytes, 0xAB);
        CopyShareOut(whole->view(), share, kv, expected.data());
        for (const int64_t piece : {int64_t{1}, int64_t{40}, int64_t{1000}, kStopCheckBytes}) {
          std::vector<uint8_t> copied(bytes, 0xCD);
          EXPECT_TRUE(
              CopyShareOutUnlessStopped(whole->view(), share, kv, copied.data(), &running, piece));
          EXPECT_EQ(copied, expected) << share.ToString() << " kv " << kv << " piece " << piece;
          std::vector<uint8_t> untouched(bytes, 0xCD);
          EXPECT_FALSE(CopyShareOutUnlessStopped(whole->view(), share, kv, untouched.data(),
                                                 &stopped, piece));
          EXPECT_EQ(untouched, std::vector<uint8_t>(bytes, 0xCD));
        }
      }
    }
  }
  absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, ShardPolicy::kSequence, 3);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const std::vector<SpanningKeys> sets = SpanningKeySets(shape, spec, *layout);
  ASSERT_FALSE(sets.empty());
  const Share whole_share = WholeShare(shape);
  const int64_t row_bytes = shape.head_dim * DTypeSize(DType::kFloat16);
  for (const SpanningKeys& set : sets) {
    const int64_t bytes = shape.batch * set.kept.count * row_bytes;
    std::vector<uint8_t> expected(bytes, 0xAB);
    CopyKeptRows(whole_k.view(), whole_share, set, 0, set.kept.count, expected.data());
    for (const int64_t piece : {int64_t{1}, int64_t{3} * row_bytes, kStopCheckBytes}) {
      std::vector<uint8_t> copied(bytes, 0xCD);
      EXPECT_TRUE(CopyKeptRowsUnlessStopped(whole_k.view(), whole_share, set, copied.data(),
                                            &running, piece));
      EXPECT_EQ(copied, expected) << "kv head " << set.kv_head << " piece " << piece;
      std::vector<uint8_t> untouched(bytes, 0xCD);
      EXPECT_FALSE(CopyKeptRowsUnlessStopped(whole_k.view(), whole_share, set, untouched.data(),
                                             &stopped, piece));
      EXPECT_EQ(untouched, std::vector<uint8_t>(bytes, 0xCD));
    }
  }
}

// A share given to the engine as a request of its own (RunRequest::share_of, what a stream's
// window is) computes the whole problem's rows, bit for bit on the CPU, with a plan built for it
// alone; views that do not match the share are refused.
TEST(EngineShareOfTest, AShareRunByTheEngineEqualsThoseRowsOfTheWholeProblem) {
  EngineOptions options;
  options.threads = 2;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const ProblemShape shape{2, 301, 4, 2, 16};
  int cases = 0;
  for (bool causal : {false, true}) {
    for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
      for (Precision precision : {Precision::kFloat32, Precision::kAuto}) {
        SCOPED_TRACE(::testing::Message() << "causal " << causal << ", " << CombineModeName(mode)
                                          << ", " << PrecisionName(precision));
        testing::OwnedProblem whole = testing::RandomProblem(shape, 40 + cases++);
        whole.spec.patterns = {{48, 1}, {80, 2}};  // No common chunk below 240 tokens.
        whole.spec.causal = causal;
        whole.spec.mode = mode;
        whole.spec.precision = precision;
        const absl::StatusOr<ExecutionInfo> all = (*engine)->Run(whole.Request());
        ASSERT_TRUE(all.ok()) << all.status();
        std::unique_ptr<testing::ShareRequest> share =
            testing::MakeShareRequest(whole, shape, 100, 220);
        ASSERT_FALSE(share->sets.empty());
        const int64_t plans = (*engine)->plan_cache_stats().entries;
        const absl::StatusOr<ExecutionInfo> part = (*engine)->Run(share->Request(whole.spec));
        ASSERT_TRUE(part.ok()) << part.status();
        EXPECT_FALSE(part->plan_cache_hit);
        EXPECT_GT(part->plan_build_time_us, 0) << "the share's plan build was not timed apart";
        EXPECT_EQ(part->precision_used, all->precision_used);
        EXPECT_EQ(part->devices, std::vector<std::string>{"cpu:0"});
        EXPECT_EQ((*engine)->plan_cache_stats().entries, plans) << "a share's plan was cached";
        int64_t differ = 0;
        for (int64_t b = 0; b < shape.batch; ++b) {
          for (int64_t t = 100; t < 220; ++t) {
            for (int64_t i = 0; i < shape.heads * shape.head_dim; ++i) {
              differ += share->Mine(b, t, i) != share->Whole(whole.out, b, t, i);
            }
          }
        }
        EXPECT_EQ(differ, 0);
      }
    }
  }
  // The share's views must be the share's: here the tokens before it, consistent among
  // themselves.
  testing::OwnedProblem whole = testing::RandomProblem(shape, 7);
  whole.spec.patterns = {{48, 1}, {80, 2}};
  std::unique_ptr<testing::ShareRequest> share = testing::MakeShareRequest(whole, shape, 100, 220);
  RunRequest wrong = share->Request(whole.spec);
  wrong.q = share->inputs.q[0].view();
  wrong.k = share->inputs.k[0].view();
  wrong.v = share->inputs.v[0].view();
  testing::OwnedTensor out = testing::PoisonedTensor(DType::kFloat32, wrong.q.shape);
  wrong.out = out.mutable_view();
  const absl::Status refused = (*engine)->Run(wrong).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_NE(refused.message().find("share"), std::string::npos) << refused;

  // A backend that computes whole problems only is not given shares.
  EngineOptions reference = options;
  reference.backend = "reference";
  auto whole_only = Engine::Create(reference);
  ASSERT_TRUE(whole_only.ok()) << whole_only.status();
  EXPECT_FALSE((*whole_only)->ComputesShares());
  const absl::Status not_shares = (*whole_only)->Run(share->Request(whole.spec)).status();
  EXPECT_EQ(not_shares.code(), absl::StatusCode::kInvalidArgument) << not_shares;
  EXPECT_NE(not_shares.message().find("computes whole problems only"), std::string::npos)
      << not_shares;
}

}  // namespace
}  // namespace da::engine
