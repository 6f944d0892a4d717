// Every validation rule of issue #2: the code and a message naming the field, value and limit.
#include "engine/attention_spec.h"

#include <gtest/gtest.h>

#include <limits>
#include <vector>

namespace da::engine {
namespace {

struct Buffers {
  std::vector<float> q, k, v;
};

// Valid problem: B=1, N=8, H=4, Hkv=2, D=4, one pattern (4, 2).
struct Problem {
  Shape4 q_shape{1, 8, 4, 4};
  Shape4 kv_shape{1, 8, 2, 4};
  AttentionSpec spec;
  Limits limits;
  Buffers buffers;
  int64_t q_bytes = -1;  // -1: exact.

  Problem() { spec.patterns = {{4, 2}}; }

  absl::Status Validate() {
    buffers.q.assign(q_shape.elements() > 0 ? q_shape.elements() : 1, 0.5f);
    buffers.k.assign(kv_shape.elements() > 0 ? kv_shape.elements() : 1, 0.5f);
    buffers.v = buffers.k;
    TensorView q{DType::kFloat32, q_shape, buffers.q.data(),
                 q_bytes >= 0 ? q_bytes : q_shape.elements() * 4};
    TensorView k{DType::kFloat32, kv_shape, buffers.k.data(), kv_shape.elements() * 4};
    TensorView v{DType::kFloat32, kv_shape, buffers.v.data(), kv_shape.elements() * 4};
    return ValidateProblem(q, k, v, spec, limits);
  }
};

void ExpectInvalid(Problem p, const std::string& needle,
                   absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  const absl::Status status = p.Validate();
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_NE(status.message().find(needle), std::string::npos)
      << "message '" << status.message() << "' lacks '" << needle << "'";
}

TEST(AttentionSpecTest, ValidProblemPasses) { EXPECT_TRUE(Problem().Validate().ok()); }

TEST(AttentionSpecTest, NeedsAtLeastOnePattern) {
  Problem p;
  p.spec.patterns.clear();
  ExpectInvalid(p, "spec.segment_lengths is empty");
}

TEST(AttentionSpecTest, SegmentLengthAtLeastOne) {
  Problem p;
  p.spec.patterns = {{4, 1}, {0, 1}};
  ExpectInvalid(p, "spec.segment_lengths[1] is 0; must be >= 1");
}

// Unbounded, w = r = 2^63 - 1 made the LONGNET head offsets divide by zero and stopped the server.
TEST(AttentionSpecTest, SegmentLengthAtMost2To31) {
  Problem p;
  p.spec.patterns = {{4, 1}, {int64_t{1} << 31, int64_t{1} << 31}};
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
  p.spec.patterns = {{4, 1}, {(int64_t{1} << 31) + 1, 1}};
  ExpectInvalid(p, "spec.segment_lengths[1] is 2147483649; must be at most 2147483648");
  p.spec.patterns = {{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max()}};
  ExpectInvalid(p, "spec.segment_lengths[0] is 9223372036854775807; must be at most");
}

TEST(AttentionSpecTest, DilationBetweenOneAndSegmentLength) {
  Problem p;
  p.spec.patterns = {{4, 5}};
  ExpectInvalid(p, "spec.dilation_rates[0] is 5; must be in [1, segment_lengths[0] = 4]");
  p.spec.patterns = {{4, 0}};
  ExpectInvalid(p, "spec.dilation_rates[0] is 0");
}

TEST(AttentionSpecTest, ScaleMustBeFinite) {
  Problem p;
  p.spec.softmax_scale = std::numeric_limits<double>::infinity();
  ExpectInvalid(p, "spec.softmax_scale is inf");
}

// Scales folded into fp32 scores overflow to inf (then NaN) past about 1e37: refused up front.
TEST(AttentionSpecTest, ScaleMagnitudeIsBounded) {
  Problem p;
  for (double scale : {1e37, 3e38, -1e7}) {
    p.spec.softmax_scale = scale;
    ExpectInvalid(p, "its magnitude must be at most 1e+06");
  }
  for (double scale : {1e6, -1e6, 0.0, 1e-30}) {
    p.spec.softmax_scale = scale;
    EXPECT_TRUE(p.spec.Validate().ok()) << scale;
  }
}

TEST(AttentionSpecTest, EveryDimensionAtLeastOne) {
  Problem p;
  p.q_shape.seq_len = 0;
  p.kv_shape.seq_len = 0;
  ExpectInvalid(p, "query.shape seq is 0; must be >= 1");
  Problem h;
  h.kv_shape.heads = 0;
  ExpectInvalid(h, "key.shape heads is 0; must be >= 1");
}

TEST(AttentionSpecTest, BatchAndSeqMustMatch) {
  Problem p;
  p.kv_shape.batch = 2;
  ExpectInvalid(p, "key.shape batch is 2; must equal query batch 1");
  Problem s;
  s.kv_shape.seq_len = 9;
  ExpectInvalid(s, "key.shape seq is 9; must equal query seq 8");
}

TEST(AttentionSpecTest, HeadDimMustMatch) {
  Problem p;
  p.kv_shape.head_dim = 8;
  ExpectInvalid(p, "key.shape head_dim is 8; must equal query head_dim 4");
}

TEST(AttentionSpecTest, KeyHeadsMustDivideQueryHeads) {
  Problem p;
  p.kv_shape.heads = 3;
  ExpectInvalid(p, "kv_heads (the key's heads) is 3; must divide query heads 4");
}

TEST(AttentionSpecTest, ByteCountMustMatchShape) {
  Problem p;
  p.q_bytes = 100;
  ExpectInvalid(p, "query.data has 100 bytes; shape [1, 8, 4, 4] of fp32 needs 512");
}

TEST(AttentionSpecTest, TokenLimit) {
  Problem p;
  p.limits.max_tokens = 4;
  ExpectInvalid(p, "request has 8 tokens (batch x seq); limit is 4",
                absl::StatusCode::kResourceExhausted);
}

TEST(AttentionSpecTest, ByteLimit) {
  Problem p;
  p.limits.max_request_bytes = 1000;
  // q 512 + k 256 + v 256 + out 512 = 1536 bytes.
  ExpectInvalid(p, "request needs 1536 bytes for query, key, value and output; limit is 1000",
                absl::StatusCode::kResourceExhausted);
}

// The output counts in its own dtype: bf16 inputs with an fp32 output take more room than bf16
// throughout, and less than fp32 throughout.
TEST(AttentionSpecTest, TheByteLimitCountsTheOutputInItsDtype) {
  const ProblemShape shape{1, 100, 8, 2, 16};
  const int64_t rows = 100 * 16;
  EXPECT_EQ(RequestBytes(shape, DType::kBFloat16), rows * (8 + 2 * 2 + 8) * 2);
  EXPECT_EQ(RequestBytes(shape, DType::kBFloat16, DType::kFloat32),
            rows * ((8 + 2 * 2) * 2 + 8 * 4));
  AttentionSpec spec;
  spec.patterns = {{16, 1}};
  Limits limits;
  limits.max_request_bytes = rows * ((8 + 2 * 2) * 2 + 8 * 4);
  EXPECT_TRUE(ValidateShape(shape, DType::kBFloat16, spec, limits, DType::kFloat32).ok());
  limits.max_request_bytes -= 1;
  const absl::Status refused =
      ValidateShape(shape, DType::kBFloat16, spec, limits, DType::kFloat32);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("request needs 89600 bytes"), std::string::npos) << refused;
  EXPECT_TRUE(ValidateShape(shape, DType::kBFloat16, spec, limits).ok());  // bf16 out: 64000.
}

TEST(AttentionSpecTest, HeadDimLimit) {
  Problem p;
  p.limits.max_head_dim = 2;
  ExpectInvalid(p, "head_dim is 4; at most 2");
}

// The review's header: 33,554,398 heads of one token and one dim fit one message, and the
// memory estimate's per-head tables then took tens of GB before any memory was reserved.
TEST(AttentionSpecTest, HeadsAboveTheLimitAreRefusedByDefault) {
  AttentionSpec spec;
  spec.patterns = {{1, 1}};
  const absl::Status refused =
      ValidateShape({1, 1, 33554398, 1, 1}, DType::kFloat16, spec, Limits{});
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_NE(refused.message().find("heads is 33554398; at most 65536"), std::string::npos)
      << refused;
  EXPECT_TRUE(ValidateShape({1, 1, 65536, 1, 1}, DType::kFloat16, spec, Limits{}).ok());
}

TEST(AttentionSpecTest, ShapeOverflowIsRefused) {
  AttentionSpec spec;
  spec.patterns = {{4, 1}};
  const ProblemShape huge{1LL << 40, 1LL << 40, 8, 8, 64};
  EXPECT_EQ(ValidateShape(huge, DType::kFloat32, spec, {}).code(),
            absl::StatusCode::kResourceExhausted);
  // fp16 q, k, v and output of 2^61 bytes: within int64, but with an fp32 output and the
  // estimates' workspace and copies added, not.
  const ProblemShape near{1LL << 20, 1LL << 20, 256, 256, 1024};
  EXPECT_EQ(ValidateShape(near, DType::kFloat16, spec, {}).code(),
            absl::StatusCode::kResourceExhausted);
  const ProblemShape large{1LL << 20, 1LL << 20, 1, 1, 1024};  // About 2^53 bytes: allowed.
  EXPECT_TRUE(ValidateShape(large, DType::kFloat16, spec, {}).ok());
}

// A client may claim any shape: the byte count must not overflow before it is compared (found by
// tests/fuzz/fuzz_request_validation).
TEST(AttentionSpecTest, TensorShapeOverflowIsRefused) {
  AttentionSpec spec;
  spec.patterns = {{4, 1}};
  const std::vector<float> data(4, 0.5f);
  const TensorView huge{DType::kFloat32, {1LL << 40, 1LL << 40, 1, 1}, data.data(), 16};
  const absl::Status status = ValidateProblem(huge, huge, huge, spec, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("query.shape [1099511627776, 1099511627776, 1, 1] of fp32 needs "
                                  "more than 2^63 bytes; query.data has 16"),
            std::string::npos)
      << status;
}

}  // namespace
}  // namespace da::engine
