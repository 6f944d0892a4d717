#include "client/answer_wire.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace da::client {
namespace {

v1::AttendStreamResponse BlockMessage(int64_t token_start, int64_t token_count, std::string rows) {
  v1::AttendStreamResponse message;
  message.mutable_block()->set_token_start(token_start);
  message.mutable_block()->set_token_count(token_count);
  message.mutable_block()->set_output(std::move(rows));
  return message;
}

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string bytes(n, '\0');
  for (char& c : bytes) c = static_cast<char>(rng());
  return bytes;
}

// bytes cut into pieces at random places (some empty), as gRPC's slices may cut a message.
std::vector<std::string_view> CutAtRandom(std::mt19937_64& rng, const std::string& bytes) {
  std::vector<std::string_view> pieces;
  size_t at = 0;
  while (at < bytes.size()) {
    const size_t n = std::min<size_t>(bytes.size() - at, rng() % 24);
    pieces.push_back(std::string_view(bytes).substr(at, n));
    at += n;
  }
  return pieces;
}

std::string Rows(const OutputBlockView& block) {
  std::string rows(static_cast<size_t>(block.output_bytes()), '\0');
  block.CopyTo(0, block.output_bytes(), rows.data());
  return rows;
}

// What protobuf reads from bytes, next to what ParseAnswer reads, field by field.
void ExpectSameAsProtobuf(const std::string& bytes, const std::vector<std::string_view>& pieces) {
  v1::AttendStreamResponse expected;
  const bool protobuf_ok = expected.ParseFromString(bytes);
  v1::AttendStreamResponse message;
  OutputBlockView block;
  const absl::Status status = ParseAnswer(pieces, &message, &block);
  ASSERT_EQ(status.ok(), protobuf_ok) << status;
  if (!protobuf_ok) return;
  ASSERT_EQ(message.kind_case(), expected.kind_case());
  if (!expected.has_block()) {
    EXPECT_EQ(message.SerializeAsString(), expected.SerializeAsString());
    return;
  }
  EXPECT_EQ(block.token_start(), expected.block().token_start());
  EXPECT_EQ(block.token_count(), expected.block().token_count());
  EXPECT_EQ(message.block().token_start(), expected.block().token_start());
  EXPECT_EQ(message.block().token_count(), expected.block().token_count());
  EXPECT_EQ(Rows(block), expected.block().output());
  EXPECT_TRUE(block.Equals(expected.block().output()));
  std::string appended = "prefix";
  block.AppendTo(&appended);
  EXPECT_EQ(appended, "prefix" + expected.block().output());
}

TEST(AnswerWireTest, ServerBlocksAreReadInPlaceAsProtobufReadsThem) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t token_start = trial % 3 == 0 ? 0 : static_cast<int64_t>(rng() >> (rng() % 64));
    const int64_t token_count = trial % 5 == 0 ? 0 : static_cast<int64_t>(rng() % 100000);
    const std::string bytes =
        BlockMessage(token_start, token_count, RandomBytes(rng, rng() % 300)).SerializeAsString();
    std::vector<std::string_view> pieces = CutAtRandom(rng, bytes);
    ExpectSameAsProtobuf(bytes, pieces);
    // In place: the rows point into the caller's bytes, not into a copy.
    v1::AttendStreamResponse message;
    OutputBlockView block;
    ASSERT_TRUE(ParseAnswer(pieces, &message, &block).ok());
    EXPECT_TRUE(message.block().output().empty());
    for (std::string_view piece : block.output()) {
      EXPECT_GE(piece.data(), bytes.data());
      EXPECT_LE(piece.data() + piece.size(), bytes.data() + bytes.size());
    }
  }
}

TEST(AnswerWireTest, HeadersTrailersAndOtherEncodingsAreProtobufs) {
  v1::AttendStreamResponse header;
  header.mutable_header()->set_request_id("r-1");
  header.mutable_header()->add_shape(1);
  v1::AttendStreamResponse trailer;
  trailer.mutable_trailer()->mutable_info()->set_compute_time_us(12);
  const std::string block = BlockMessage(7, 3, "abcdef").SerializeAsString();
  std::vector<std::string> cases = {
      header.SerializeAsString(), trailer.SerializeAsString(), "",
      // A block message twice: protobuf merges them (last token_start wins, rows of the last).
      block + BlockMessage(9, 0, "xy").SerializeAsString(),
      // Fields out of order: the rows first.
      std::string("\x12\x0a\x1a\x04wxyz\x08\x05\x10\x02", 12),
      // The block followed by a header: the header wins the oneof.
      block + header.SerializeAsString(),
      // An unknown field after the block.
      block + std::string("\x28\x01", 2),
      // Truncated and malformed bytes.
      block.substr(0, block.size() - 1), std::string("\x12\xff", 2), std::string("\x12", 1)};
  std::mt19937_64 rng(11);
  for (const std::string& bytes : cases) {
    SCOPED_TRACE(testing::PrintToString(bytes));
    ExpectSameAsProtobuf(bytes, {bytes});
    ExpectSameAsProtobuf(bytes, CutAtRandom(rng, bytes));
  }
}

TEST(AnswerWireTest, RandomMutationsOfABlockReadAsProtobufReadsThem) {
  std::mt19937_64 rng(17);
  const std::string block = BlockMessage(123456, 789, RandomBytes(rng, 64)).SerializeAsString();
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bytes = block;
    for (int flips = 1 + static_cast<int>(rng() % 3); flips > 0; --flips) {
      bytes[rng() % 12] = static_cast<char>(rng());  // The tags and lengths live up front.
    }
    SCOPED_TRACE(trial);
    ExpectSameAsProtobuf(bytes, CutAtRandom(rng, bytes));
  }
}

}  // namespace
}  // namespace da::client
