// The CUDA row kernel's arithmetic, run on the CPU (issue #15): the exact __host__ __device__
// functions the GPU runs (engine/cuda/row_attention.cuh), through the host tables the backend
// uploads (row_share.h). Conversions: every fp16 and bf16 bit pattern widens as the engine's
// LoadAsFloat, and narrowing rounds as StoreFromFloat (to nearest, ties to even) on specials,
// ties and a million random floats. Rows: every row of whole problems and of HEADS and SEQUENCE
// shares (2-3 shares, spanning segments with gathered rows) against the fp64 reference, over
// pattern sets (r not dividing w, w > N, partial segments), causal, both combine modes, GQA, the
// three dtypes and D = 32, 64, 128. Bound: the fp32 tolerance of the output dtype
// (testing::ToleranceFor), as for every backend.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend_registry.h"
#include "engine/cuda/row_share.h"
#include "engine/dilation.h"
#include "engine/shard_data.h"
#include "engine/test_tensors.h"
#include "engine/testing/reference_output.h"
#include "engine/testing/share_testing.h"

namespace da::engine::cuda {
namespace {

using engine::testing::OwnedTensor;

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// The engine's conversion of one value to a 16-bit dtype, as bits.
// (Four bytes of room: the compiler cannot see that only two are written.)
uint16_t EngineNarrow(DType dtype, float value) {
  uint32_t out = 0;
  StoreFromFloat(dtype, &out, 0, value);
  uint16_t low;
  std::memcpy(&low, &out, 2);
  return low;
}

TEST(RowConversionTest, EveryHalfAndBf16BitPatternWidensAsTheEngine) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    for (auto [dtype, ours] : {std::pair{DType::kFloat16, HalfToFloat(bits)},
                               std::pair{DType::kBFloat16, Bf16ToFloat(bits)}}) {
      uint32_t storage = 0;  // Four bytes of room, as in EngineNarrow.
      std::memcpy(&storage, &bits, 2);
      const float engine = LoadAsFloat(dtype, &storage, 0);
      if (std::isnan(engine)) {
        ASSERT_TRUE(std::isnan(ours)) << DTypeName(dtype) << " bits " << h;
      } else {
        ASSERT_EQ(Bits(ours), Bits(engine)) << DTypeName(dtype) << " bits " << h;
      }
    }
  }
}

void ExpectNarrowsAsTheEngine(float value) {
  for (auto [dtype, ours] : {std::pair{DType::kFloat16, FloatToHalf(value)},
                             std::pair{DType::kBFloat16, FloatToBf16(value)}}) {
    const uint16_t engine = EngineNarrow(dtype, value);
    if (std::isnan(value)) {
      const float widened = dtype == DType::kFloat16 ? HalfToFloat(ours) : Bf16ToFloat(ours);
      ASSERT_TRUE(std::isnan(widened)) << DTypeName(dtype);
    } else {
      ASSERT_EQ(ours, engine) << DTypeName(dtype) << " of " << value << " (bits " << std::hex
                              << Bits(value) << ")";
    }
  }
}

// fp8 E4M3: every byte decodes to the value its fields say (computed here with ldexp) and
// encodes back to itself; halfway between neighbours ties to the even one, a hair either side
// goes to the nearer; 448 and beyond (and infinities) saturate to 448; NaN stays NaN; below
// 2^-10 is zero.
TEST(RowConversionTest, Fp8E4M3DecodesEncodesRoundsAndSaturates) {
  std::vector<float> positives;  // Every finite non-negative value, ascending.
  for (int b = 0; b < 256; ++b) {
    const int exponent = (b >> 3) & 0xf, mantissa = b & 7;
    const float got = Fp8E4M3ToFloat(static_cast<uint8_t>(b));
    if (exponent == 15 && mantissa == 7) {
      EXPECT_TRUE(std::isnan(got)) << b;
      EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(FloatToFp8E4M3(got)))) << b;
      continue;
    }
    const double magnitude =
        exponent == 0 ? std::ldexp(mantissa, -9) : std::ldexp(8 + mantissa, exponent - 7 - 3);
    const double want = (b & 0x80) ? -magnitude : magnitude;
    EXPECT_EQ(got, static_cast<float>(want)) << "byte " << b;
    EXPECT_EQ(std::signbit(got), (b & 0x80) != 0) << "byte " << b;
    EXPECT_EQ(FloatToFp8E4M3(got), b) << "byte " << b;
    if (b < 0x80) positives.push_back(got);
  }
  ASSERT_EQ(positives.size(), 127u);
  EXPECT_EQ(positives.back(), kFp8E4M3Max);
  for (size_t i = 0; i + 1 < positives.size(); ++i) {
    const float lo = positives[i], hi = positives[i + 1];
    const float mid = (lo + hi) / 2;  // Exact in fp32.
    const uint8_t even = (i % 2 == 0) ? static_cast<uint8_t>(i) : static_cast<uint8_t>(i + 1);
    EXPECT_EQ(FloatToFp8E4M3(mid), even) << lo << " .. " << hi;
    EXPECT_EQ(FloatToFp8E4M3(-mid), 0x80 | even) << lo << " .. " << hi;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 0.0f)), i) << lo << " .. " << hi;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 1e9f)), i + 1) << lo << " .. " << hi;
  }
  for (float big : {448.0f, 449.0f, 464.0f, 470.0f, 1e6f, INFINITY}) {
    EXPECT_EQ(FloatToFp8E4M3(big), 0x7e) << big;
    EXPECT_EQ(FloatToFp8E4M3(-big), 0xfe) << big;
  }
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(FloatToFp8E4M3(NAN))));
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(1.0f, -10)), 0);  // Halfway to 2^-9: ties to even 0.
  EXPECT_EQ(FloatToFp8E4M3(1e-30f), 0);
  EXPECT_EQ(FloatToFp8E4M3(-1e-30f), 0x80);
  // Scales: amax onto 448; 1 for zero or non-finite amax.
  EXPECT_EQ(Fp8ScaleFor(2.0f), 224.0f);
  EXPECT_EQ(Fp8ScaleFor(0.0f), 1.0f);
  EXPECT_EQ(Fp8ScaleFor(INFINITY), 1.0f);
  EXPECT_EQ(Fp8ScaleFor(NAN), 1.0f);
  // Tiny but nonzero amax (bf16 holds values down to about 1e-38): 448 / amax would be infinite.
  for (const float amax : {1e-36f, 1e-38f, std::numeric_limits<float>::denorm_min()}) {
    const float scale = Fp8ScaleFor(amax);
    EXPECT_TRUE(std::isfinite(scale) && scale == kFp8MaxScale) << amax << " -> " << scale;
    EXPECT_EQ(0.0f * scale, 0.0f) << "a zero of the tensor must stay 0 after scaling";
    EXPECT_GT(1.0f / scale, 0.0f) << "the descale must not be 0";
  }
  EXPECT_FLOAT_EQ(Fp8ScaleFor(448.0f / 1e30f), 1e30f);  // Under the cap: 448 / amax.
  // Through LoadElem and StoreElem.
  uint8_t byte = 0;
  StoreElem(&byte, ElemType::kF8E4M3, 0, 1.0f);
  EXPECT_EQ(byte, 0x38);
  EXPECT_EQ(LoadElem(&byte, ElemType::kF8E4M3, 0), 1.0f);
}

TEST(RowConversionTest, NarrowingRoundsToNearestEvenAsTheEngine) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float special : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), 65504.0f,
                        65519.99f, 65520.0f, -65520.0f, 1e9f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f,
                        0x1.8p-24f, 0x1p-14f, 0x1.ffcp-15f, 0x1p-26f, 1e-45f, 3.4e38f}) {
    ExpectNarrowsAsTheEngine(special);
  }
  // Every half and its neighbours' midpoints: exact ties round to even.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float here = HalfToFloat(static_cast<uint16_t>(h));
    const float next = HalfToFloat(static_cast<uint16_t>(h + 1));
    for (float sign : {1.0f, -1.0f}) {
      ExpectNarrowsAsTheEngine(sign * here);
      ExpectNarrowsAsTheEngine(sign * (here + (next - here) / 2));
      ExpectNarrowsAsTheEngine(sign * std::nextafter(here + (next - here) / 2, inf));
    }
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t bits = any_bits(rng);
    float value;
    std::memcpy(&value, &bits, 4);
    ExpectNarrowsAsTheEngine(value);
  }
}

const std::vector<std::vector<Pattern>>& PatternSets() {
  static const auto* sets = new std::vector<std::vector<Pattern>>{
      {{16, 1}, {32, 2}, {64, 4}},  // Geometric; segments span shares.
      {{10, 3}, {100, 7}},          // r does not divide w; partial last segments.
      {{64, 1}, {5000, 40}},        // w > N.
  };
  return *sets;
}

struct Cut {
  int shares;
  ShardPolicy strategy;  // kNone: the whole problem.
};

void PrintTo(const Cut& cut, std::ostream* os) {
  *os << cut.shares << " " << ShardPolicyName(cut.strategy);
}

using Param =
    std::tuple<Cut, int /*set*/, bool /*causal*/, CombineMode, DType, int64_t /*head_dim*/>;

class RowAttentionTest : public ::testing::TestWithParam<Param> {};

TEST_P(RowAttentionTest, EveryRowOfEveryShareMatchesTheReference) {
  const auto& [cut, set, causal, mode, dtype, head_dim] = GetParam();
  AttentionSpec spec;
  spec.patterns = PatternSets()[set];
  spec.causal = causal;
  spec.mode = mode;
  spec.precision = Precision::kFloat32;
  const ProblemShape shape{2, 211, 6, 3, head_dim};
  std::mt19937 rng(static_cast<uint32_t>(set * 101 + causal * 7 + head_dim + cut.shares));
  const OwnedTensor q = engine::testing::RandomTensor(dtype, shape.QueryShape(), rng);
  const OwnedTensor k = engine::testing::RandomTensor(dtype, shape.KeyShape(), rng);
  const OwnedTensor v = engine::testing::RandomTensor(dtype, shape.KeyShape(), rng);

  const OwnedTensor expected = engine::testing::ReferenceOutput(q, k, v, spec, dtype);

  ShardLayout layout;
  if (cut.strategy == ShardPolicy::kNone) {
    layout.strategy = ShardPolicy::kNone;
    layout.shares = {WholeShare(shape)};
  } else {
    absl::StatusOr<ShardLayout> made = MakeShardLayout(shape, spec, cut.strategy, cut.shares);
    ASSERT_TRUE(made.ok()) << made.status();
    layout = *made;
  }
  const std::vector<SpanningKeys> sets = cut.strategy == ShardPolicy::kSequence
                                             ? SpanningKeySets(shape, spec, layout)
                                             : std::vector<SpanningKeys>();
  if (cut.strategy == ShardPolicy::kSequence) {
    EXPECT_FALSE(sets.empty());
  }
  const engine::testing::ShareInputs shares = engine::testing::CutShares(shape, layout, q, k, v);

  OwnedTensor assembled = engine::testing::PoisonedTensor(dtype, shape.QueryShape());
  for (const Share& share : layout.shares) {
    engine::testing::Gathered gathered =
        engine::testing::GatherFor(share.rank, shape, spec, layout, sets, shares.k, shares.v);
    OwnedTensor out = engine::testing::PoisonedTensor(dtype, share.QueryShape(shape));
    ShareProblem p;
    p.shape = shape;
    p.spec = spec;
    p.share = share;
    p.q = shares.q[share.rank].view();
    p.k = shares.k[share.rank].view();
    p.v = shares.v[share.rank].view();
    p.out = out.mutable_view();
    if (!sets.empty()) {
      p.spanning = &sets;
      p.gathered = &gathered.views;
    }
    absl::StatusOr<RowTables> tables = MakeRowTables(p);
    ASSERT_TRUE(tables.ok()) << tables.status();
    for (int64_t row = 0; row < RowCount(tables->share); ++row) {
      ASSERT_TRUE(ComputeRow(tables->share, row)) << share.ToString() << " row " << row;
    }
    CopyShareIn(out.bytes.data(), share, assembled.mutable_view());
  }
  EXPECT_EQ(engine::testing::Compare(assembled, expected, engine::testing::ToleranceFor(dtype)),
            "");
}

std::string Name(const ::testing::TestParamInfo<Param>& info) {
  const auto& [cut, set, causal, mode, dtype, head_dim] = info.param;
  return absl::StrCat(cut.strategy == ShardPolicy::kNone
                          ? "whole"
                          : absl::StrCat(ShardPolicyName(cut.strategy), cut.shares),
                      "_set", set, causal ? "_causal_" : "_full_", CombineModeName(mode), "_",
                      DTypeName(dtype), "_D", head_dim);
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, RowAttentionTest,
    ::testing::Combine(::testing::Values(Cut{1, ShardPolicy::kNone}, Cut{2, ShardPolicy::kHeads},
                                         Cut{3, ShardPolicy::kSequence}),
                       ::testing::Values(0, 1, 2), ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(int64_t{32})),
    Name);

INSTANTIATE_TEST_SUITE_P(HeadDims, RowAttentionTest,
                         ::testing::Combine(::testing::Values(Cut{1, ShardPolicy::kNone},
                                                              Cut{2, ShardPolicy::kSequence}),
                                            ::testing::Values(0), ::testing::Values(true),
                                            ::testing::Values(CombineMode::kLongNet),
                                            ::testing::Values(DType::kBFloat16),
                                            ::testing::Values(int64_t{64}, 128)),
                         Name);

// The fused path's combine: each pattern's normalised output (rounded to bf16, as cuDNN returns
// it) and natural-log LSE, computed here in fp64 per kept set, folded pattern by pattern with
// FoldRow and finished with FinishRow, and the same outputs kept side by side and combined in one
// pass with CombineRow, both equal the reference (bf16 relative L2 bound); rows no pattern keeps
// are exactly 0. Positions a pattern does not keep hold NaN, which neither may read.
// The outputs in bf16, or in fp8 E4M3 scaled onto fp8's range by v's amax (the fused path's fp8
// outputs, read back through RowShare::pattern_scale; bound: #15's fp8 8e-2).
using FoldParam = std::tuple<int /*set*/, bool /*causal*/, CombineMode, ElemType>;
class FoldRowTest : public ::testing::TestWithParam<FoldParam> {};

TEST_P(FoldRowTest, FoldedPatternsMatchTheReference) {
  const auto& [set, causal, mode, type] = GetParam();
  AttentionSpec spec;
  spec.patterns = PatternSets()[set];
  spec.causal = causal;
  spec.mode = mode;
  // 3 * 211 * 6 rows: not a multiple of 4, so the LSE blocks are padded (LseBlockStride).
  const ProblemShape shape{3, 211, 6, 3, 32};
  const int64_t element = type == ElemType::kF8E4M3 ? 1 : 2;
  std::mt19937 rng(static_cast<uint32_t>(set * 3 + causal));
  const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
  const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
  const OwnedTensor v = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
  const OwnedTensor expected = engine::testing::ReferenceOutput(q, k, v, spec, DType::kFloat32);

  OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  absl::StatusOr<RowTables> tables =
      MakeRowTables(WholeProblem(q.view(), k.view(), v.view(), spec, out.mutable_view()));
  ASSERT_TRUE(tables.ok()) << tables.status();
  RowShare s = tables->share;
  float v_amax = 0.0f;
  for (int64_t i = 0; i < v.elements(); ++i) v_amax = std::max(v_amax, std::fabs(v.at(i)));
  const float store_scale = type == ElemType::kF8E4M3 ? Fp8ScaleFor(v_amax) : 1.0f;
  s.pattern_scale = 1.0f / store_scale;
  const int64_t rows = RowCount(s), D = shape.head_dim;
  std::vector<float> acc(rows * D, 0.0f), max_lse(rows, 0.0f), weight(rows, 0.0f);
  const int64_t patterns = static_cast<int64_t>(spec.patterns.size());
  // The patterns' outputs as the one-pass combine reads them (OnePassBlocks): LONGNET's side by
  // side, GROUPED's in one block, each pattern's rows copied in (they must not meet).
  const bool grouped = mode == CombineMode::kGrouped;
  std::vector<uint8_t> all_outs;
  if (grouped) all_outs.assign(rows * D * element, 0xff);
  std::vector<float> all_lses;
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(shape.heads, spec);
  const double scale = spec.ScaleFor(D);
  for (int pi = 0; pi < static_cast<int>(spec.patterns.size()); ++pi) {
    // The pattern's output (in `type`, poisoned where it keeps nothing: 0xff bytes are NaN in
    // bf16 and fp8) and LSE, in fp64.
    std::vector<uint8_t> pattern_out(rows * D * element, 0xff);
    std::vector<float> lse(rows, NAN);
    for (int64_t b = 0; b < shape.batch; ++b) {
      for (int64_t h = 0; h < shape.heads; ++h) {
        const int64_t kvh = KvHeadFor(h, shape.heads, shape.kv_heads);
        for (const HeadWork& hw : work[h]) {
          if (hw.pattern_index != pi) continue;
          for (int64_t t = 0; t < NumSegments(shape.seq_len, hw.pattern.segment_len); ++t) {
            const KeptRange kept = KeptPositions(hw.pattern, hw.offset, shape.seq_len, t);
            for (int64_t qi = 0; qi < kept.count; ++qi) {
              const int64_t p = kept.first + qi * kept.stride;
              const int64_t row = (b * shape.seq_len + p) * shape.heads + h;
              const int64_t keys = causal ? qi + 1 : kept.count;
              std::vector<double> scores(keys);
              double m = -INFINITY;
              for (int64_t xi = 0; xi < keys; ++xi) {
                const int64_t x = kept.first + xi * kept.stride;
                double dot = 0;
                for (int64_t d = 0; d < D; ++d) {
                  dot += q.at(row * D + d) *
                         k.at(((b * shape.seq_len + x) * shape.kv_heads + kvh) * D + d);
                }
                scores[xi] = dot * scale;
                m = std::max(m, scores[xi]);
              }
              double sum = 0;
              for (double& e : scores) sum += (e = std::exp(e - m));
              for (int64_t d = 0; d < D; ++d) {
                double o = 0;
                for (int64_t xi = 0; xi < keys; ++xi) {
                  const int64_t x = kept.first + xi * kept.stride;
                  o += scores[xi] / sum *
                       v.at(((b * shape.seq_len + x) * shape.kv_heads + kvh) * D + d);
                }
                StoreElem(pattern_out.data(), type, row * D + d,
                          static_cast<float>(o) * store_scale);
              }
              lse[row] = static_cast<float>(m + std::log(sum));
            }
          }
        }
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      FoldRow(s, pi, pattern_out.data(), type, lse.data(), acc.data(), max_lse.data(),
              weight.data(), row);
    }
    if (grouped) {
      for (int64_t row = 0; row < rows; ++row) {
        if (std::isnan(lse[row])) continue;  // Not this pattern's row.
        const int64_t at = row * D * element;
        ASSERT_TRUE(std::all_of(all_outs.begin() + at, all_outs.begin() + at + D * element,
                                [](uint8_t byte) { return byte == 0xff; }))
            << "row " << row << " written by two GROUPED patterns";
        std::copy(pattern_out.begin() + at, pattern_out.begin() + at + D * element,
                  all_outs.begin() + at);
      }
    } else {
      all_outs.insert(all_outs.end(), pattern_out.begin(), pattern_out.end());
    }
    all_lses.insert(all_lses.end(), lse.begin(), lse.end());
    // Blocks LseBlockStride apart; the padding is never read (NaN would show if it were).
    all_lses.resize(static_cast<size_t>((pi + 1) * LseBlockStride(s)),
                    std::numeric_limits<float>::quiet_NaN());
  }
  ASSERT_EQ(static_cast<int64_t>(all_outs.size()),
            OnePassBlocks(grouped, static_cast<int>(patterns)) * rows * D * element);
  ASSERT_EQ(static_cast<int64_t>(all_lses.size()), patterns * LseBlockStride(s));
  ASSERT_EQ(LseBlockStride(s) % 4, 0);
  ASSERT_LT(LseBlockStride(s) - rows, 4);
  for (int64_t row = 0; row < rows; ++row) FinishRow(s, acc.data(), weight.data(), row);
  OwnedTensor combined = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  RowShare one_pass = s;
  one_pass.out = combined.bytes.data();
  for (int64_t row = 0; row < rows; ++row) {
    CombineRow(one_pass, all_outs.data(), type, all_lses.data(), row);
  }
  // GROUPED in bf16 with a bf16 output (GroupedInPlace): the patterns' block is the output
  // itself, scaled and zeroed in place.
  std::vector<const OwnedTensor*> results = {&out, &combined};
  std::optional<OwnedTensor> in_place;
  if (GroupedInPlace(grouped, false, ElemType::kBF16, type)) {
    in_place = OwnedTensor{DType::kBFloat16, shape.QueryShape(), all_outs};
    RowShare s_in_place = s;
    s_in_place.out = in_place->bytes.data();
    s_in_place.out_type = ElemType::kBF16;
    for (int64_t row = 0; row < rows; ++row) {
      CombineRow(s_in_place, in_place->bytes.data(), type, all_lses.data(), row);
    }
    results.push_back(&*in_place);
  }
  for (const OwnedTensor* got : results) {
    const char* name = got == &out        ? "fold"
                       : got == &combined ? "one-pass combine"
                                          : "one-pass combine in place";
    const double error = engine::testing::RelativeL2(*got, expected);
    EXPECT_LE(error, type == ElemType::kF8E4M3 ? 8e-2 : engine::testing::kBf16RelativeL2) << name;
    if (type == ElemType::kF8E4M3) {  // The descale was applied: fp8's own rounding remains.
      EXPECT_GE(error, 1e-3) << name << ": no fp8 rounding error at all?";
    }
    int64_t zeros = 0;
    for (int64_t i = 0; i < expected.elements(); ++i) {
      ASSERT_TRUE(std::isfinite(got->at(i))) << name << ", element " << i;
      if (expected.at(i) == 0.0f) {
        ASSERT_EQ(got->at(i), 0.0f) << name << ", element " << i;
        ++zeros;
      }
    }
    if (set == 1) {
      EXPECT_GT(zeros, 0) << "r > 1 everywhere leaves rows no pattern keeps";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, FoldRowTest,
                         ::testing::Combine(::testing::Values(0, 1, 2), ::testing::Bool(),
                                            ::testing::Values(CombineMode::kLongNet,
                                                              CombineMode::kGrouped),
                                            ::testing::Values(ElemType::kBF16, ElemType::kF8E4M3)));

TEST(RowAttentionTest, ASpanningSegmentWithoutItsRowsIsReportedNotComputed) {
  AttentionSpec spec;
  spec.patterns = {{64, 2}};
  const ProblemShape shape{1, 100, 2, 2, 16};
  absl::StatusOr<ShardLayout> layout = MakeShardLayout(shape, spec, ShardPolicy::kSequence, 2);
  ASSERT_TRUE(layout.ok());
  std::mt19937 rng(5);
  const Share& share = layout->shares[0];
  const OwnedTensor q =
      engine::testing::RandomTensor(DType::kFloat32, share.QueryShape(shape), rng);
  const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, share.KeyShape(shape), rng);
  OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, share.QueryShape(shape));
  ShareProblem p{shape,   spec,   share, q.view(), k.view(), k.view(), out.mutable_view(),
                 nullptr, nullptr};
  absl::StatusOr<RowTables> tables = MakeRowTables(p);
  ASSERT_TRUE(tables.ok()) << tables.status();
  int refused = 0;
  for (int64_t row = 0; row < RowCount(tables->share); ++row) {
    refused += ComputeRow(tables->share, row) ? 0 : 1;
  }
  EXPECT_GT(refused, 0);
}

// The stop flag (a cancelled run's): a row whose flag is set returns without writing its output;
// with the flag clear the same rows are computed.
TEST(RowAttentionTest, ASetStopFlagEndsARowUnwritten) {
  AttentionSpec spec;
  spec.patterns = {{1024, 1}, {512, 2}};
  const ProblemShape shape{1, 1024, 2, 2, 32};
  std::mt19937 rng(9);
  const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
  const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
  OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  const std::vector<uint8_t> poisoned = out.bytes;
  absl::StatusOr<RowTables> tables =
      MakeRowTables(WholeProblem(q.view(), k.view(), k.view(), spec, out.mutable_view()));
  ASSERT_TRUE(tables.ok()) << tables.status();
  int stop = 1;
  RowShare s = tables->share;
  s.stop = &stop;
  for (int64_t row = 0; row < RowCount(s); ++row) EXPECT_TRUE(ComputeRow(s, row));
  EXPECT_EQ(out.bytes, poisoned) << "a row was written after the stop";
  stop = 0;
  for (int64_t row = 0; row < RowCount(s); ++row) EXPECT_TRUE(ComputeRow(s, row));
  for (int64_t i = 0; i < shape.QueryShape().elements(); ++i) {
    ASSERT_TRUE(std::isfinite(LoadAsFloat(DType::kFloat32, out.bytes.data(), i))) << i;
  }
}

TEST(RowAttentionTest, AHeadDimensionPastTheRegistersIsRefused) {
  AttentionSpec spec;
  spec.patterns = {{8, 1}};
  const ProblemShape shape{1, 8, 1, 1, 256};
  std::mt19937 rng(3);
  const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
  OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  absl::StatusOr<RowTables> tables =
      MakeRowTables(WholeProblem(q.view(), q.view(), q.view(), spec, out.mutable_view()));
  ASSERT_EQ(tables.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tables.status().message().find("256"), std::string::npos) << tables.status();
}

}  // namespace
}  // namespace da::engine::cuda
