#include "client/stream_blocks.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

namespace da::client {
namespace {

using ::testing::HasSubstr;

// An fp32 tensor whose element i holds offset + i, so every misplaced byte shows.
v1::Tensor IndexedTensor(std::array<int64_t, 4> shape, float offset) {
  v1::Tensor tensor;
  tensor.set_dtype(v1::DTYPE_FP32);
  int64_t elements = 1;
  for (int64_t dim : shape) {
    tensor.add_shape(dim);
    elements *= dim;
  }
  std::string* data = tensor.mutable_data();
  data->resize(elements * 4);
  for (int64_t i = 0; i < elements; ++i) {
    const float value = offset + static_cast<float>(i);
    std::memcpy(data->data() + 4 * i, &value, 4);
  }
  return tensor;
}

float At(const std::string& bytes, int64_t index) {
  float value;
  std::memcpy(&value, bytes.data() + 4 * index, 4);
  return value;
}

// B=2, N=7, H=2, Hkv=1, D=3, fp32.
v1::AttendRequest SampleRequest() {
  v1::AttendRequest request;
  request.set_request_id("req-1");
  request.mutable_spec()->add_segment_lengths(4);
  request.mutable_spec()->add_dilation_rates(2);
  *request.mutable_query() = IndexedTensor({2, 7, 2, 3}, 0);
  *request.mutable_key() = IndexedTensor({2, 7, 1, 3}, 1000);
  *request.mutable_value() = IndexedTensor({2, 7, 1, 3}, 2000);
  return request;
}

// Tokens [start, start + count) of every batch element of an fp32 [B, N, H, D] tensor, gathered
// by element index rather than by the code under test.
std::string GatherByHand(const v1::Tensor& tensor, int64_t start, int64_t count) {
  const int64_t batch = tensor.shape(0), seq_len = tensor.shape(1);
  const int64_t row = tensor.shape(2) * tensor.shape(3);
  std::string bytes;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = start; t < start + count; ++t) {
      for (int64_t e = 0; e < row; ++e) {
        const float value = At(tensor.data(), (b * seq_len + t) * row + e);
        bytes.append(reinterpret_cast<const char*>(&value), 4);
      }
    }
  }
  return bytes;
}

v1::AttendStreamResponse Header(std::vector<int64_t> shape) {
  v1::AttendStreamResponse message;
  message.mutable_header()->set_request_id("req-1");
  message.mutable_header()->set_dtype(v1::DTYPE_FP32);
  message.mutable_header()->mutable_shape()->Add(shape.begin(), shape.end());
  return message;
}

v1::AttendStreamResponse Block(const v1::Tensor& output, int64_t start, int64_t count) {
  v1::AttendStreamResponse message;
  message.mutable_block()->set_token_start(start);
  message.mutable_block()->set_token_count(count);
  message.mutable_block()->set_output(GatherByHand(output, start, count));
  return message;
}

v1::AttendStreamResponse Trailer() {
  v1::AttendStreamResponse message;
  message.mutable_trailer()->mutable_info()->set_backend("cpu");
  message.mutable_trailer()->mutable_info()->set_compute_time_us(42);
  return message;
}

StreamPlan SamplePlan(const v1::AttendRequest& request, int64_t block_tokens) {
  StreamPlan plan;
  grpc::Status status = MakeStreamPlan(request, block_tokens, &plan);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return plan;
}

TEST(StreamBlocksTest, HeaderDescribesTheRequest) {
  const v1::AttendRequest request = SampleRequest();
  const StreamPlan plan = SamplePlan(request, 3);
  EXPECT_EQ(plan.header.request_id(), "req-1");
  EXPECT_EQ(plan.header.spec().segment_lengths(0), 4);
  EXPECT_EQ(plan.header.dtype(), v1::DTYPE_FP32);
  EXPECT_EQ(plan.header.batch(), 2);
  EXPECT_EQ(plan.header.seq_len(), 7);
  EXPECT_EQ(plan.header.heads(), 2);
  EXPECT_EQ(plan.header.kv_heads(), 1);
  EXPECT_EQ(plan.header.head_dim(), 3);
  EXPECT_EQ(plan.block_tokens, 3);
  EXPECT_EQ(plan.block_count, 3);
}

TEST(StreamBlocksTest, BlocksGatherTokenRowsOfEveryBatchElement) {
  const v1::AttendRequest request = SampleRequest();
  const StreamPlan plan = SamplePlan(request, 3);
  for (int64_t start : {0, 3, 6}) {
    SCOPED_TRACE(start);
    const v1::TokenBlock block = MakeTokenBlock(request, plan, start);
    const int64_t count = std::min<int64_t>(3, 7 - start);
    EXPECT_EQ(block.token_start(), start);
    EXPECT_EQ(block.token_count(), count);
    EXPECT_EQ(block.query(), GatherByHand(request.query(), start, count));
    EXPECT_EQ(block.key(), GatherByHand(request.key(), start, count));
    EXPECT_EQ(block.value(), GatherByHand(request.value(), start, count));
  }
  // Spot check one element against the layout: batch 1, token 4, head 1, dim 2 of the query.
  const v1::TokenBlock block = MakeTokenBlock(request, plan, 3);
  EXPECT_EQ(At(block.query(), ((1 * 3 + 1) * 2 + 1) * 3 + 2), ((1 * 7 + 4) * 2 + 1) * 3 + 2);
}

TEST(StreamBlocksTest, DefaultBlocksHoldAboutFourMebibytes) {
  v1::AttendRequest request;
  *request.mutable_query() = IndexedTensor({1, 4096, 8, 64}, 0);
  *request.mutable_key() = IndexedTensor({1, 4096, 8, 64}, 0);
  *request.mutable_value() = IndexedTensor({1, 4096, 8, 64}, 0);
  const StreamPlan plan = SamplePlan(request, 0);
  EXPECT_EQ(plan.block_tokens, kDefaultBlockBytes / (3 * 8 * 64 * 4));
  EXPECT_EQ(plan.block_count, (4096 + plan.block_tokens - 1) / plan.block_tokens);
  // A small request is one block.
  EXPECT_EQ(SamplePlan(SampleRequest(), 0).block_count, 1);
}

TEST(StreamBlocksTest, RejectsRequestsThatCannotBeSplit) {
  StreamPlan plan;
  v1::AttendRequest request = SampleRequest();
  request.mutable_query()->mutable_shape()->RemoveLast();
  EXPECT_THAT(MakeStreamPlan(request, 0, &plan).error_message(),
              HasSubstr("query: expected rank 4"));

  request = SampleRequest();
  request.mutable_key()->set_dtype(v1::DTYPE_FP16);
  request.mutable_key()->mutable_data()->resize(2 * 7 * 1 * 3 * 2);
  EXPECT_THAT(MakeStreamPlan(request, 0, &plan).error_message(),
              HasSubstr("key dtype fp16 differs from query dtype fp32"));

  request = SampleRequest();
  *request.mutable_value() = IndexedTensor({1, 7, 1, 3}, 0);
  EXPECT_THAT(MakeStreamPlan(request, 0, &plan).error_message(),
              HasSubstr("value shape [1, 7, 1, 3]"));

  request = SampleRequest();
  request.mutable_query()->mutable_data()->pop_back();
  const grpc::Status status = MakeStreamPlan(request, 0, &plan);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("needs 336 bytes, data has 335"));
}

TEST(StreamBlocksTest, ReassemblesOutputFromBlocksOfAnySize) {
  const v1::AttendRequest request = SampleRequest();
  const StreamPlan plan = SamplePlan(request, 3);
  const v1::Tensor expected = IndexedTensor({2, 7, 2, 3}, 5000);
  OutputAssembler assembler(plan.header);
  ASSERT_TRUE(assembler.Add(Header({2, 7, 2, 3})).ok());
  for (auto [start, count] : {std::pair{0, 2}, {2, 4}, {6, 1}}) {
    const grpc::Status status = assembler.Add(Block(expected, start, count));
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  ASSERT_TRUE(assembler.Add(Trailer()).ok());
  v1::AttendResponse response;
  ASSERT_TRUE(assembler.Finish(&response).ok());
  EXPECT_EQ(response.output().dtype(), v1::DTYPE_FP32);
  EXPECT_THAT(response.output().shape(), testing::ElementsAre(2, 7, 2, 3));
  EXPECT_EQ(response.output().data(), expected.data());
  EXPECT_EQ(response.info().backend(), "cpu");
  EXPECT_EQ(response.info().compute_time_us(), 42);
  EXPECT_EQ(response.info().request_id(), "req-1");  // From the header; the trailer has none.
}

// Feeds messages until one fails, and returns that failure (or Finish's).
grpc::Status Feed(const std::vector<v1::AttendStreamResponse>& messages) {
  const StreamPlan plan = SamplePlan(SampleRequest(), 3);
  OutputAssembler assembler(plan.header);
  for (const v1::AttendStreamResponse& message : messages) {
    if (grpc::Status status = assembler.Add(message); !status.ok()) return status;
  }
  v1::AttendResponse response;
  return assembler.Finish(&response);
}

TEST(StreamBlocksTest, RejectsMalformedAnswersNamingTheBlock) {
  const v1::Tensor out = IndexedTensor({2, 7, 2, 3}, 0);
  const auto header = Header({2, 7, 2, 3});
  v1::AttendStreamResponse short_block = Block(out, 2, 2);
  short_block.mutable_block()->mutable_output()->resize(10);
  struct Case {
    std::vector<v1::AttendStreamResponse> messages;
    std::string error;
  } cases[] = {
      {{Block(out, 0, 7)}, "output block 0 arrived before the response header"},
      {{header, Block(out, 0, 2), Block(out, 3, 4)},
       "output block 1 starts at token 3, expected 2"},
      {{header, Block(out, 0, 3), Block(out, 2, 5)},
       "output block 1 starts at token 2, expected 3"},
      {{header, Block(out, 0, 2), short_block}, "output block 1 has 10 bytes, expected 96"},
      {{header, Block(out, 0, 7), Block(out, 7, 0)}, "output block 1 has token_count 0"},
      {{header, Block(out, 0, 3)}, "stream ended after 1 output blocks covering 3 of 7 tokens"},
      {{header, Block(out, 0, 7)}, "stream ended without a trailer"},
      {{header, Block(out, 0, 7), Trailer(), Block(out, 6, 1)}, "arrived after the stream trailer"},
      {{header, header}, "second stream response header"},
      {{Header({2, 7, 1, 3})}, "header shape [2, 7, 1, 3] differs from the request's [2, 7, 2, 3]"},
      {{v1::AttendStreamResponse()}, "empty stream response message"},
      {{}, "stream ended without a response header"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.error);
    const grpc::Status status = Feed(c.messages);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL);
    EXPECT_THAT(status.error_message(), HasSubstr(c.error));
  }
}

}  // namespace
}  // namespace da::client
