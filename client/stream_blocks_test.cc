#include "client/stream_blocks.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "client/tensor_io.h"

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
  request.set_priority(-7);
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
  EXPECT_EQ(plan.header.priority(), -7);
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

// The client's choice where its caller leaves it open, the Python client's rule: a stream once q,
// k, v and the output come within a tenth of the message limit, in blocks of about 4 MiB and at
// most half a message.
TEST(StreamBlocksTest, AutoStreamsWhatDoesNotFitAMessageInBlocksOfAtMostHalfOne) {
  v1::AttendRequest request;  // q 1 MiB, k and v 256 KiB each (GQA): 2.5 MiB with the output.
  *request.mutable_query() = IndexedTensor({1, 1024, 8, 32}, 0);
  *request.mutable_key() = IndexedTensor({1, 1024, 2, 32}, 0);
  *request.mutable_value() = IndexedTensor({1, 1024, 2, 32}, 0);
  const int64_t bytes = (2 << 20) + (512 << 10);
  EXPECT_FALSE(NeedsStream(request, static_cast<int64_t>(bytes / 0.9) + 1));
  EXPECT_TRUE(NeedsStream(request, static_cast<int64_t>(bytes / 0.9) - 1));
  EXPECT_TRUE(NeedsStream(request, 1 << 20));
  EXPECT_FALSE(NeedsStream(request, 0));             // The server's default, 64 MiB.
  EXPECT_FALSE(NeedsStream(SampleRequest(), 2048));  // 1008 bytes.

  const int64_t token_bytes = (8 + 2 * 2) * 32 * 4;  // A token of q, k and v: 1536 bytes.
  EXPECT_EQ(BlockTokensFor(request, 64 << 20), kDefaultBlockBytes / token_bytes);
  EXPECT_EQ(BlockTokensFor(request, 0), kDefaultBlockBytes / token_bytes);
  EXPECT_EQ(BlockTokensFor(request, 1 << 20), (512 << 10) / token_bytes);
  EXPECT_EQ(BlockTokensFor(request, 100), 1);  // At least one token, however small the limit.
  request.mutable_key()->mutable_shape()->RemoveLast();
  EXPECT_EQ(BlockTokensFor(request, 1 << 20), 0);  // Not rank 4: refused later, named there.
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

  request = SampleRequest();
  request.mutable_value()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(MakeStreamPlan(request, 0, &plan).error_message(),
              HasSubstr("value: dtype must be fp32, fp16 or bf16, got DTYPE_UNSPECIFIED (0)"));
  request.mutable_value()->set_dtype(static_cast<v1::DType>(9));
  EXPECT_THAT(MakeStreamPlan(request, 0, &plan).error_message(),
              HasSubstr("got an unknown dtype (9)"));

  request = SampleRequest();
  request.mutable_query()->set_shape(0, -2);
  EXPECT_THAT(MakeStreamPlan(request, 0, &plan).error_message(),
              HasSubstr("query: every dimension must be >= 1, got shape [-2, 7, 2, 3]"));
}

// Dimensions whose product wraps (here to 0 bytes, which empty data would match) are refused
// before anything divides by them.
TEST(StreamBlocksTest, RejectsShapesWhoseByteCountOverflows) {
  for (const std::array<int64_t, 4>& shape :
       {std::array<int64_t, 4>{4294967296, 4294967296, 1, 1},
        std::array<int64_t, 4>{1, int64_t{1} << 62, 1, 2}, std::array<int64_t, 4>{3, 3, 3, 3}}) {
    for (int which = 0; which < 3; ++which) {
      v1::AttendRequest request = SampleRequest();
      v1::Tensor* tensors[3] = {request.mutable_query(), request.mutable_key(),
                                request.mutable_value()};
      const char* names[3] = {"query", "key", "value"};
      tensors[which]->clear_shape();
      tensors[which]->mutable_shape()->Add(shape.begin(), shape.end());
      tensors[which]->clear_data();
      SCOPED_TRACE(testing::Message() << names[which] << " " << ShapeString(*tensors[which]));
      StreamPlan plan;
      const grpc::Status status = MakeStreamPlan(request, 0, &plan);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      if (shape[0] == 3) {  // 81 elements of 4 bytes: in range, refused for its missing bytes.
        EXPECT_THAT(status.error_message(), HasSubstr("needs 324 bytes, data has 0"));
        continue;
      }
      EXPECT_THAT(status.error_message(),
                  HasSubstr(absl::StrCat(names[which], ": shape ", ShapeString(*tensors[which]),
                                         " of fp32 is too large")));
    }
  }
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

TEST(StreamBlocksTest, ReassemblesOneBatchElementInTokenOrder) {
  // With one batch element the output is appended block by block rather than zeroed first.
  v1::AttendRequest request = SampleRequest();
  *request.mutable_query() = IndexedTensor({1, 7, 2, 3}, 0);
  *request.mutable_key() = IndexedTensor({1, 7, 1, 3}, 1000);
  *request.mutable_value() = IndexedTensor({1, 7, 1, 3}, 2000);
  const StreamPlan plan = SamplePlan(request, 2);
  const v1::Tensor expected = IndexedTensor({1, 7, 2, 3}, 5000);
  OutputAssembler assembler(plan.header);
  ASSERT_TRUE(assembler.Add(Header({1, 7, 2, 3})).ok());
  for (auto [start, count] : {std::pair{0, 1}, {1, 5}, {6, 1}}) {
    const grpc::Status status = assembler.Add(Block(expected, start, count));
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  ASSERT_TRUE(assembler.Add(Trailer()).ok());
  v1::AttendResponse response;
  ASSERT_TRUE(assembler.Finish(&response).ok());
  EXPECT_THAT(response.output().shape(), testing::ElementsAre(1, 7, 2, 3));
  EXPECT_EQ(response.output().data(), expected.data());
}

#if defined(__linux__)
// The VmFlags line of the mapping of /proc/self/smaps that holds address.
std::string VmFlagsAt(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long first = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &first, &end) == 2 && line.find(' ') > 8 &&
        line.find('-') < line.find(' ')) {
      inside = first <= at && at < end;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

TEST(StreamBlocksTest, LargeOutputsAskForHugePages) {
  if (!std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled")) {
    GTEST_SKIP() << "this kernel has no transparent huge pages";
  }
  std::string large = "kept";
  ReserveOutput(&large, 64 << 20);
  EXPECT_EQ(large, "kept");
  EXPECT_GE(large.capacity(), size_t{64} << 20);
  // madvise(MADV_HUGEPAGE) marks the mapping "hg"; a middle byte lies in whole huge pages.
  EXPECT_THAT(VmFlagsAt(large.data() + (32 << 20)), HasSubstr(" hg"));
  std::string small;
  ReserveOutput(&small, 1 << 20);
  EXPECT_GE(small.capacity(), size_t{1} << 20);
}

// This process's minor page faults so far.
int64_t MinorFaults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

TEST(StreamBlocksTest, ResizeUninitializedKeepsTheTextAndTouchesNoNewPage) {
  std::string shrunk = "abcdef";
  ResizeUninitialized(&shrunk, 3);
  EXPECT_EQ(shrunk, "abc");
  // 64 MiB of fresh memory (malloc maps it anew): a resize writes every page, faulting each in
  // (16,384 small pages, or 32 huge ones); the uninitialized resize writes the kept text and the
  // terminating NUL only.
  constexpr size_t kBytes = size_t{64} << 20;
  std::string zeroed = "kept";
  zeroed.reserve(kBytes);
  const int64_t before_resize = MinorFaults();
  zeroed.resize(kBytes);
  const int64_t resize_faults = MinorFaults() - before_resize;
  std::string grown = "kept";
  const int64_t before = MinorFaults();
  ResizeUninitialized(&grown, kBytes);
  const int64_t faults = MinorFaults() - before;
  ASSERT_EQ(grown.size(), kBytes);
  EXPECT_GE(grown.capacity(), kBytes);
  EXPECT_EQ(grown.substr(0, 4), "kept");
  EXPECT_EQ(grown.c_str()[kBytes], '\0');
  EXPECT_GE(resize_faults, 16) << "resize itself did not touch the new memory";
#if defined(__GLIBCXX__)
  EXPECT_LE(faults, 4) << "the uninitialized resize touched " << faults << " pages; resize "
                       << resize_faults;
#endif
  // Every byte written, as a stream's parts do: the string reads them back.
  std::memset(grown.data(), 'x', kBytes);
  EXPECT_EQ(grown.find_first_not_of('x'), std::string::npos);
}
#endif

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

v1::AttentionSpec Spec(std::vector<int64_t> segments) {
  v1::AttentionSpec spec;
  for (int64_t w : segments) {
    spec.add_segment_lengths(w);
    spec.add_dilation_rates(1);
  }
  return spec;
}

TEST(ParallelPartsTest, ChunksAreTheLeastCommonMultipleBelowTheSequence) {
  EXPECT_EQ(ChunkTokens(Spec({2048, 4096, 8192}), 65536), 8192);
  EXPECT_EQ(ChunkTokens(Spec({12, 56, 24}), 200), 168);
  EXPECT_EQ(ChunkTokens(Spec({12, 56, 24}), 168), 168);  // One chunk exactly.
  EXPECT_EQ(ChunkTokens(Spec({16, 400}), 200), 200);     // w > N: no cut.
  EXPECT_EQ(ChunkTokens(Spec({200}), 200), 200);         // A segment as long as the sequence.
  EXPECT_EQ(ChunkTokens(Spec({3, 5, 7, 11, 13}), 10000), 10000);  // lcm 15015 > N.
  EXPECT_EQ(ChunkTokens(Spec({0, 4}), 16), 16);  // Invalid: left to the server, one part.
  // Pairwise coprime lengths whose product overflows int64 stop at the first multiple past N.
  EXPECT_EQ(ChunkTokens(Spec({1000003, 1000033, 1000037, 1000039}), int64_t{1} << 62),
            int64_t{1} << 62);
}

TEST(ParallelPartsTest, PartsAreEvenRunsOfWholeChunks) {
  auto ranges = [](std::vector<TokenRange> parts) {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (const TokenRange& part : parts) out.emplace_back(part.first, part.count);
    return out;
  };
  using R = std::vector<std::pair<int64_t, int64_t>>;
  // 200 tokens in chunks of 32: 6 whole chunks and 8 tokens.
  EXPECT_EQ(ranges(CutParts(Spec({16, 32}), 200, 1)), (R{{0, 200}}));
  EXPECT_EQ(ranges(CutParts(Spec({16, 32}), 200, 2)), (R{{0, 96}, {96, 104}}));
  EXPECT_EQ(ranges(CutParts(Spec({16, 32}), 200, 3)), (R{{0, 64}, {64, 64}, {128, 72}}));
  EXPECT_EQ(ranges(CutParts(Spec({16, 32}), 200, 7)).size(), 7u);
  EXPECT_EQ(ranges(CutParts(Spec({16, 32}), 200, 100)).size(), 7u);  // At most one per chunk.
  EXPECT_EQ(ranges(CutParts(Spec({16, 32}), 200, 0)), (R{{0, 200}}));
  EXPECT_EQ(ranges(CutParts(Spec({16, 400}), 200, 4)), (R{{0, 200}}));
  // Every cut at a multiple of every segment length, the parts covering the sequence.
  for (int parts = 1; parts <= 9; ++parts) {
    int64_t next = 0;
    for (const TokenRange& part : CutParts(Spec({12, 56, 24}), 1000, parts)) {
      EXPECT_EQ(part.first, next);
      EXPECT_EQ(part.first % 168, 0);
      EXPECT_GT(part.count, 0);
      next = part.first + part.count;
    }
    EXPECT_EQ(next, 1000);
  }
}

TEST(ParallelPartsTest, DefaultStreamsGrowWithTheRequestUpToFour) {
  EXPECT_EQ(DefaultParallelStreams(0), 1);
  EXPECT_EQ(DefaultParallelStreams((256LL << 20) - 1), 1);
  EXPECT_EQ(DefaultParallelStreams(512LL << 20), 2);
  EXPECT_EQ(DefaultParallelStreams(16LL << 30), 4);
}

TEST(ParallelPartsTest, PartPlanStreamsThePartsTokensNumberedFromZero) {
  const v1::AttendRequest request = SampleRequest();  // N = 7.
  StreamPlan plan;
  ASSERT_TRUE(MakePartPlan(request, 2, {4, 3}, &plan).ok());
  EXPECT_EQ(plan.header.seq_len(), 3);
  EXPECT_EQ(plan.first_token, 4);
  EXPECT_EQ(plan.block_count, 2);
  const v1::TokenBlock block = MakeTokenBlock(request, plan, 2);
  EXPECT_EQ(block.token_start(), 2);
  EXPECT_EQ(block.token_count(), 1);
  EXPECT_EQ(block.query(), GatherByHand(request.query(), 6, 1));
  EXPECT_EQ(block.key(), GatherByHand(request.key(), 6, 1));
  EXPECT_EQ(block.value(), GatherByHand(request.value(), 6, 1));
  for (TokenRange bad : {TokenRange{5, 3}, TokenRange{-1, 2}, TokenRange{2, 0}}) {
    const grpc::Status status = MakePartPlan(request, 2, bad, &plan);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("within the 7 tokens"));
  }
}

// A request's output_dtype goes in its stream header; the answer must come in it, and a dtype
// that is none is refused before anything is sent.
TEST(StreamBlocksTest, TheOutputDtypeIsAskedForAndChecked) {
  v1::AttendRequest request = SampleRequest();  // fp32 inputs.
  request.set_output_dtype(v1::DTYPE_BF16);
  EXPECT_EQ(OutputDType(request), v1::DTYPE_BF16);
  StreamPlan plan;
  ASSERT_TRUE(MakeStreamPlan(request, 0, &plan).ok());
  EXPECT_EQ(plan.header.dtype(), v1::DTYPE_FP32);
  EXPECT_EQ(plan.header.output_dtype(), v1::DTYPE_BF16);
  OutputAssembler assembler(plan.header);
  v1::AttendStreamResponse fp32 = Header({2, 7, 2, 3});
  EXPECT_THAT(assembler.Add(fp32).error_message(),
              HasSubstr("dtype fp32 differs from the bf16 asked for"));
  OutputAssembler bf16_assembler(plan.header);
  v1::AttendStreamResponse bf16 = Header({2, 7, 2, 3});
  bf16.mutable_header()->set_dtype(v1::DTYPE_BF16);
  v1::AttendStreamResponse block;
  block.mutable_block()->set_token_start(0);
  block.mutable_block()->set_token_count(7);
  block.mutable_block()->mutable_output()->assign(2 * 7 * 2 * 3 * 2, 'x');  // bf16: 2 bytes.
  ASSERT_TRUE(bf16_assembler.Add(bf16).ok());
  ASSERT_TRUE(bf16_assembler.Add(block).ok());
  ASSERT_TRUE(bf16_assembler.Add(Trailer()).ok());
  v1::AttendResponse response;
  ASSERT_TRUE(bf16_assembler.Finish(&response).ok());
  EXPECT_EQ(response.output().dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(response.output().data().size(), 2u * 7 * 2 * 3 * 2);

  request.set_output_dtype(static_cast<v1::DType>(9));
  const grpc::Status refused = MakeStreamPlan(request, 0, &plan);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.error_message(),
              HasSubstr("output_dtype must be fp32, fp16 or bf16 (or unspecified: the query's), "
                        "got an unknown dtype (9)"));
  request.set_output_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(OutputDType(request), v1::DTYPE_FP32);
}

TEST(ParallelPartsTest, PartAssemblersWriteTheirTokensIntoOneOutput) {
  const v1::AttendRequest request = SampleRequest();
  const v1::Tensor expected = IndexedTensor({2, 7, 2, 3}, 5000);
  v1::Tensor whole;
  whole.set_dtype(v1::DTYPE_FP32);
  whole.mutable_data()->resize(expected.data().size());
  // Parts [0, 4) and [4, 7), their blocks arriving interleaved.
  StreamPlan first, second;
  ASSERT_TRUE(MakePartPlan(request, 0, {0, 4}, &first).ok());
  ASSERT_TRUE(MakePartPlan(request, 0, {4, 3}, &second).ok());
  OutputAssembler a(first.header, &whole, 7, 0), b(second.header, &whole, 7, 4);
  v1::Tensor second_output = IndexedTensor({2, 3, 2, 3}, 0);  // The part's own view, by hand.
  *second_output.mutable_data() = GatherByHand(expected, 4, 3);
  ASSERT_TRUE(a.Add(Header({2, 4, 2, 3})).ok());
  ASSERT_TRUE(b.Add(Header({2, 3, 2, 3})).ok());
  ASSERT_TRUE(b.Add(Block(second_output, 0, 3)).ok());
  ASSERT_TRUE(a.Add(Block(expected, 0, 4)).ok());
  ASSERT_TRUE(a.Add(Trailer()).ok());
  ASSERT_TRUE(b.Add(Trailer()).ok());
  v1::AttendResponse ra, rb;
  ASSERT_TRUE(a.Finish(&ra).ok());
  ASSERT_TRUE(b.Finish(&rb).ok());
  EXPECT_EQ(whole.data(), expected.data());
  EXPECT_FALSE(ra.has_output());
  EXPECT_EQ(ra.info().compute_time_us(), 42);
  // A part answering in another dtype is refused.
  OutputAssembler c(second.header, &whole, 7, 4);
  v1::AttendStreamResponse half = Header({2, 3, 2, 3});
  half.mutable_header()->set_dtype(v1::DTYPE_FP16);
  EXPECT_THAT(c.Add(half).error_message(), HasSubstr("dtype fp16 differs from the fp32 asked for"));
}

TEST(ParallelPartsTest, MergedInfoSumsWorkAndKeepsTheLongestWait) {
  std::vector<v1::ExecutionInfo> parts(3);
  for (int i = 0; i < 3; ++i) {
    parts[i].set_request_id("r/" + std::to_string(i + 1));
    parts[i].set_precision_used(v1::PRECISION_BF16);
    parts[i].set_backend("cpu");
    parts[i].add_devices(i == 1 ? "cpu:1" : "cpu:0");
    parts[i].set_queue_time_us(10 * (i + 1));
    parts[i].set_total_time_us(100 * (3 - i));
    parts[i].set_compute_time_us(7);
    parts[i].set_plan_build_time_us(i == 0 ? 5 : 0);
    parts[i].set_plan_cache_hit(i != 0);
    parts[i].set_stream_chunk_tokens(i == 2 ? 8 : 32);
    parts[i].set_stream_chunks(3);
    parts[i].set_stream_buffer_bytes(1000);
    parts[i].add_fp8_scales()->set_query_amax(static_cast<float>(i + 1));  // fp8 parts' scales.
  }
  const v1::ExecutionInfo merged = MergePartInfos(parts);
  EXPECT_EQ(merged.request_id(), "r/1,r/2,r/3");
  EXPECT_EQ(merged.precision_used(), v1::PRECISION_BF16);
  EXPECT_EQ(merged.backend(), "cpu");
  EXPECT_THAT(merged.devices(), testing::ElementsAre("cpu:0", "cpu:1"));
  EXPECT_EQ(merged.queue_time_us(), 30);
  EXPECT_EQ(merged.total_time_us(), 300);
  EXPECT_EQ(merged.compute_time_us(), 21);
  EXPECT_EQ(merged.plan_build_time_us(), 5);
  EXPECT_FALSE(merged.plan_cache_hit());
  EXPECT_EQ(merged.stream_chunk_tokens(), 32);
  EXPECT_EQ(merged.stream_chunks(), 9);
  EXPECT_EQ(merged.stream_buffer_bytes(), 3000);
  ASSERT_EQ(merged.fp8_scales_size(), 3);  // Every part's, in order.
  for (int i = 0; i < 3; ++i) EXPECT_EQ(merged.fp8_scales(i).query_amax(), i + 1.0f);
}

}  // namespace
}  // namespace da::client
