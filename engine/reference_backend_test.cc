// The reference backend against hand-computed cases and invariants of docs/MATH.md.
#include "engine/reference/reference_backend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "engine/dilation.h"
#include "engine/test_tensors.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;
using testing::PoisonedTensor;
using testing::RandomTensor;

OwnedTensor FromValues(Shape4 shape, const std::vector<float>& values) {
  OwnedTensor t{DType::kFloat32, shape, std::vector<uint8_t>(values.size() * 4)};
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

OwnedTensor RunReference(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v,
                         const AttentionSpec& spec) {
  OwnedTensor out = PoisonedTensor(DType::kFloat32, q.shape);
  ReferenceBackend backend;
  EXPECT_TRUE(backend.Run(q.view(), k.view(), v.view(), spec, out.mutable_view(), {}).ok());
  return out;
}

AttentionSpec Spec(std::vector<Pattern> patterns, CombineMode mode = CombineMode::kLongNet,
                   bool causal = false) {
  AttentionSpec spec;
  spec.patterns = std::move(patterns);
  spec.mode = mode;
  spec.causal = causal;
  return spec;
}

// Dense softmax attention over all positions for one head, written independently of the backend.
std::vector<double> DenseAttention(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v,
                                   int64_t head, int64_t kv_head, bool causal) {
  const int64_t n = q.shape.seq_len;
  const int64_t d = q.shape.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(n * d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t keys = causal ? i + 1 : n;
    std::vector<double> s(keys);
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < keys; ++j) {
      double dot = 0;
      for (int64_t x = 0; x < d; ++x) {
        dot += double(q.at((i * q.shape.heads + head) * d + x)) *
               k.at((j * k.shape.heads + kv_head) * d + x);
      }
      s[j] = dot * scale;
      m = std::max(m, s[j]);
    }
    double sum = 0;
    for (double& e : s) sum += (e = std::exp(e - m));
    for (int64_t j = 0; j < keys; ++j) {
      for (int64_t x = 0; x < d; ++x)
        out[i * d + x] += s[j] / sum * v.at((j * v.shape.heads + kv_head) * d + x);
    }
  }
  return out;
}

TEST(ReferenceBackendTest, TwoTokensByHand) {
  // D = 1, scale 1: out_0 = (10e + 20)/(e + 1), out_1 = (10e^2 + 20)/(e^2 + 1).
  OwnedTensor q = FromValues({1, 2, 1, 1}, {1.0f, 2.0f});
  OwnedTensor k = FromValues({1, 2, 1, 1}, {1.0f, 0.0f});
  OwnedTensor v = FromValues({1, 2, 1, 1}, {10.0f, 20.0f});
  OwnedTensor out = RunReference(q, k, v, Spec({{2, 1}}));
  const double e = std::exp(1.0);
  EXPECT_NEAR(out.at(0), (10 * e + 20) / (e + 1), 1e-5);
  EXPECT_NEAR(out.at(1), (10 * e * e + 20) / (e * e + 1), 1e-5);
}

TEST(ReferenceBackendTest, CausalFirstTokenSeesOnlyItself) {
  OwnedTensor q = FromValues({1, 2, 1, 1}, {1.0f, 2.0f});
  OwnedTensor k = FromValues({1, 2, 1, 1}, {1.0f, 0.0f});
  OwnedTensor v = FromValues({1, 2, 1, 1}, {10.0f, 20.0f});
  OwnedTensor out = RunReference(q, k, v, Spec({{2, 1}}, CombineMode::kLongNet, true));
  const double e2 = std::exp(2.0);
  EXPECT_NEAR(out.at(0), 10.0, 1e-6);
  EXPECT_NEAR(out.at(1), (10 * e2 + 20) / (e2 + 1), 1e-5);
}

TEST(ReferenceBackendTest, DilationKeepsEveryRthTokenAndZeroesTheRest) {
  // N = 5, w = 4, r = 2, one head: offset 0 keeps {0, 2} and, in the partial segment, {4}.
  OwnedTensor q = FromValues({1, 5, 1, 1}, {1, 2, 3, 4, 5});
  OwnedTensor k = FromValues({1, 5, 1, 1}, {0.5f, 1, -1, 2, 3});
  OwnedTensor v = FromValues({1, 5, 1, 1}, {1, 2, 3, 4, 5});
  OwnedTensor out = RunReference(q, k, v, Spec({{4, 2}}));
  EXPECT_EQ(out.at(1), 0.0f);
  EXPECT_EQ(out.at(3), 0.0f);
  EXPECT_NEAR(out.at(4), 5.0, 1e-6);  // Alone in its kept set.
  // Position 0 attends to {0, 2}: scores 1*0.5 and 1*(-1).
  const double w0 = std::exp(0.5), w2 = std::exp(-1.0);
  EXPECT_NEAR(out.at(0), (w0 * 1 + w2 * 3) / (w0 + w2), 1e-6);
}

TEST(ReferenceBackendTest, GroupedDividesByPatternCount) {
  // Two heads, two patterns: head 0 runs (2, 1), head 1 runs (2, 2) with offset 1 % 2 = 1.
  OwnedTensor q = FromValues({1, 2, 2, 1}, {1, 1, 1, 1});
  OwnedTensor k = FromValues({1, 2, 2, 1}, {0, 0, 0, 0});
  OwnedTensor v = FromValues({1, 2, 2, 1}, {2, 4, 6, 8});
  OwnedTensor out = RunReference(q, k, v, Spec({{2, 1}, {2, 2}}, CombineMode::kGrouped));
  // Head 0: equal scores, mean of v over tokens = (2 + 6) / 2 = 4, halved: 2 for both tokens.
  EXPECT_NEAR(out.at(0), 2.0, 1e-6);
  EXPECT_NEAR(out.at(2), 2.0, 1e-6);
  // Head 1 keeps only token 1 (offset 1): out = v = 8, halved; token 0 unkept: 0.
  EXPECT_EQ(out.at(1), 0.0f);
  EXPECT_NEAR(out.at(3), 4.0, 1e-6);
}

TEST(ReferenceBackendTest, OnePatternCoveringEverythingIsDenseAttention) {
  std::mt19937 rng(1);
  for (bool causal : {false, true}) {
    const Shape4 shape{1, 37, 2, 8};
    OwnedTensor q = RandomTensor(DType::kFloat32, shape, rng);
    OwnedTensor k = RandomTensor(DType::kFloat32, shape, rng);
    OwnedTensor v = RandomTensor(DType::kFloat32, shape, rng);
    OwnedTensor out = RunReference(q, k, v, Spec({{64, 1}}, CombineMode::kLongNet, causal));
    for (int64_t h = 0; h < shape.heads; ++h) {
      const std::vector<double> dense = DenseAttention(q, k, v, h, h, causal);
      for (int64_t n = 0; n < shape.seq_len; ++n) {
        for (int64_t d = 0; d < shape.head_dim; ++d) {
          ASSERT_NEAR(out.at((n * shape.heads + h) * shape.head_dim + d), dense[n * 8 + d], 1e-6);
        }
      }
    }
  }
}

TEST(ReferenceBackendTest, GroupedAndLongNetAgreeForOnePatternOnOneHead) {
  std::mt19937 rng(2);
  const Shape4 shape{2, 50, 1, 4};
  OwnedTensor q = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor k = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor v = RandomTensor(DType::kFloat32, shape, rng);
  for (Pattern p : {Pattern{16, 1}, Pattern{16, 3}, Pattern{7, 7}}) {
    OwnedTensor longnet = RunReference(q, k, v, Spec({p}, CombineMode::kLongNet));
    OwnedTensor grouped = RunReference(q, k, v, Spec({p}, CombineMode::kGrouped));
    EXPECT_EQ(longnet.bytes, grouped.bytes);
  }
}

TEST(ReferenceBackendTest, LongNetOfTwoEqualPatternsEqualsOne) {
  // Equal LSEs give weights 1/2 each, so the combination is the pattern's own output.
  std::mt19937 rng(3);
  const Shape4 shape{1, 40, 3, 4};
  OwnedTensor q = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor k = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor v = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor one = RunReference(q, k, v, Spec({{8, 2}}));
  OwnedTensor two = RunReference(q, k, v, Spec({{8, 2}, {8, 2}}));
  EXPECT_EQ(testing::Compare(two, one, {1e-6, 1e-6}), "");
}

TEST(ReferenceBackendTest, GqaEqualsRepeatedKeyValueHeads) {
  std::mt19937 rng(4);
  const Shape4 q_shape{1, 30, 6, 4};
  const Shape4 kv_shape{1, 30, 2, 4};
  OwnedTensor q = RandomTensor(DType::kFloat32, q_shape, rng);
  OwnedTensor k = RandomTensor(DType::kFloat32, kv_shape, rng);
  OwnedTensor v = RandomTensor(DType::kFloat32, kv_shape, rng);
  // Repeat each kv head 3 times: query head j reads kv head j / 3.
  OwnedTensor k_full = PoisonedTensor(DType::kFloat32, q_shape);
  OwnedTensor v_full = PoisonedTensor(DType::kFloat32, q_shape);
  for (int64_t n = 0; n < 30; ++n) {
    for (int64_t h = 0; h < 6; ++h) {
      std::memcpy(&k_full.bytes[((n * 6 + h) * 4) * 4], &k.bytes[((n * 2 + h / 3) * 4) * 4], 16);
      std::memcpy(&v_full.bytes[((n * 6 + h) * 4) * 4], &v.bytes[((n * 2 + h / 3) * 4) * 4], 16);
    }
  }
  for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
    const AttentionSpec spec = Spec({{8, 1}, {16, 2}}, mode);
    EXPECT_EQ(RunReference(q, k, v, spec).bytes, RunReference(q, k_full, v_full, spec).bytes);
  }
}

TEST(ReferenceBackendTest, PartialSegmentsNeverReadPastN) {
  // The tensors are followed by NaN tokens that the views exclude; reading them would make NaN.
  std::mt19937 rng(5);
  const Shape4 shape{1, 13, 2, 4};
  const Shape4 padded{1, 16, 2, 4};
  OwnedTensor q = RandomTensor(DType::kFloat32, padded, rng);
  OwnedTensor k = RandomTensor(DType::kFloat32, padded, rng);
  OwnedTensor v = RandomTensor(DType::kFloat32, padded, rng);
  for (OwnedTensor* t : {&q, &k, &v}) {
    for (int64_t i = shape.elements(); i < padded.elements(); ++i) {
      StoreFromFloat(DType::kFloat32, t->bytes.data(), i, std::nanf(""));
    }
    t->shape = shape;  // The view covers 13 tokens; the NaN tokens follow in memory.
  }
  auto view = [&](const OwnedTensor& t) {
    return TensorView{DType::kFloat32, shape, t.bytes.data(), shape.elements() * 4};
  };
  for (bool causal : {false, true}) {
    OwnedTensor out = PoisonedTensor(DType::kFloat32, shape);
    ReferenceBackend backend;
    const AttentionSpec spec = Spec({{5, 1}, {8, 3}, {32, 2}}, CombineMode::kLongNet, causal);
    ASSERT_TRUE(backend.Run(view(q), view(k), view(v), spec, out.mutable_view(), {}).ok());
    for (int64_t i = 0; i < shape.elements(); ++i) ASSERT_TRUE(std::isfinite(out.at(i))) << i;
  }
}

TEST(ReferenceBackendTest, CustomScaleMultipliesScores) {
  // Scale 0 makes all scores equal: the output is the mean of v over the kept set.
  std::mt19937 rng(6);
  const Shape4 shape{1, 4, 1, 2};
  OwnedTensor q = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor k = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor v = RandomTensor(DType::kFloat32, shape, rng);
  AttentionSpec spec = Spec({{4, 1}});
  spec.softmax_scale = 0.0;
  OwnedTensor out = RunReference(q, k, v, spec);
  for (int64_t d = 0; d < 2; ++d) {
    const double mean = (v.at(d) + v.at(2 + d) + v.at(4 + d) + v.at(6 + d)) / 4;
    EXPECT_NEAR(out.at(d), mean, 1e-6);
  }
}

TEST(ReferenceBackendTest, ReferenceRowEqualsTheFullRun) {
  std::mt19937 rng(9);
  const Shape4 shape{2, 45, 4, 8};
  const Shape4 kv_shape{2, 45, 2, 8};
  OwnedTensor q = RandomTensor(DType::kFloat32, shape, rng);
  OwnedTensor k = RandomTensor(DType::kFloat32, kv_shape, rng);
  OwnedTensor v = RandomTensor(DType::kFloat32, kv_shape, rng);
  for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
    const AttentionSpec spec = Spec({{8, 1}, {16, 3}, {64, 4}}, mode, true);
    OwnedTensor out = RunReference(q, k, v, spec);
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t n = 0; n < 45; ++n) {
        for (int64_t h = 0; h < 4; ++h) {
          const std::vector<double> row = ReferenceRow(q.view(), k.view(), v.view(), spec, b, n, h);
          for (int64_t d = 0; d < 8; ++d) {
            ASSERT_NEAR(row[d], out.at(((b * 45 + n) * 4 + h) * 8 + d), 1e-6);
          }
        }
      }
    }
  }
}

TEST(DilationTest, LongNetOffsetsFollowHeadBlocks) {
  AttentionSpec spec = Spec({{8, 1}, {8, 2}, {9, 3}});
  const auto work = AssignHeadPatterns(8, spec);
  // r = 2: ceil(8/2) = 4 heads per offset; r = 3: ceil(8/3) = 3 heads per offset.
  const int64_t expected_r2[] = {0, 0, 0, 0, 1, 1, 1, 1};
  const int64_t expected_r3[] = {0, 0, 0, 1, 1, 1, 2, 2};
  for (int j = 0; j < 8; ++j) {
    ASSERT_EQ(work[j].size(), 3u);
    EXPECT_EQ(work[j][0].offset, 0);
    EXPECT_EQ(work[j][1].offset, expected_r2[j]);
    EXPECT_EQ(work[j][2].offset, expected_r3[j]);
  }
}

TEST(DilationTest, GroupedGivesFirstGroupsTheExtraHeads) {
  AttentionSpec spec = Spec({{8, 1}, {8, 2}, {8, 4}}, CombineMode::kGrouped);
  const auto work = AssignHeadPatterns(8, spec);  // Sizes 3, 3, 2.
  const int expected_pattern[] = {0, 0, 0, 1, 1, 1, 2, 2};
  const int64_t expected_offset[] = {0, 0, 0, 1, 1, 1, 2, 2};
  for (int j = 0; j < 8; ++j) {
    ASSERT_EQ(work[j].size(), 1u);
    EXPECT_EQ(work[j][0].pattern_index, expected_pattern[j]);
    EXPECT_EQ(work[j][0].offset, expected_offset[j]);
  }
  // Fewer heads than patterns: heads 0 and 1 run patterns 0 and 1; pattern 2 has no heads.
  const auto few = AssignHeadPatterns(2, spec);
  EXPECT_EQ(few[0][0].pattern_index, 0);
  EXPECT_EQ(few[1][0].pattern_index, 1);
}

TEST(DilationTest, KeptPositionsOfPartialAndOversizeSegments) {
  // N = 10, w = 4, r = 3, offset 2: segments [0,4) keeps {2}, [4,8) keeps {6}, [8,10) keeps none.
  EXPECT_EQ(KeptPositions({4, 3}, 2, 10, 0).count, 1);
  EXPECT_EQ(KeptPositions({4, 3}, 2, 10, 1).first, 6);
  EXPECT_EQ(KeptPositions({4, 3}, 2, 10, 2).count, 0);
  // w > N: one segment, kept positions limited by N.
  EXPECT_EQ(NumSegments(10, 100), 1);
  EXPECT_EQ(KeptPositions({100, 4}, 1, 10, 0).count, 3);  // 1, 5, 9.
}

}  // namespace
}  // namespace da::engine
