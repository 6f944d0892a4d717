// The zero-copy stream parser against protobuf's own: every message, in any split into pieces,
// must read exactly as protobuf reads it; and output blocks written by prefix + payload must be
// the messages protobuf would write.
#include "server/stream_wire.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace da::server {
namespace {

std::string RandomBytes(size_t n, std::mt19937_64& rng) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

// bytes cut at random points into views.
std::vector<std::string_view> Split(const std::string& bytes, std::mt19937_64& rng) {
  std::vector<std::string_view> pieces;
  size_t at = 0;
  while (at < bytes.size()) {
    const size_t n = 1 + rng() % std::max<size_t>(1, bytes.size() / 3);
    pieces.push_back(std::string_view(bytes).substr(at, n));
    at += std::min(n, bytes.size() - at);
  }
  if (rng() % 4 == 0) pieces.insert(pieces.begin() + rng() % (pieces.size() + 1), "");
  return pieces;
}

std::string Gather(const ByteSpans& spans) {
  std::string out(static_cast<size_t>(spans.size()), '\0');
  if (spans.size() > 0) spans.CopyTo(0, spans.size(), out.data());
  return out;
}

// Parses bytes both ways and compares.
void ExpectSameAsProtobuf(const std::string& bytes, std::mt19937_64& rng) {
  v1::AttendStreamRequest expected;
  const bool valid = expected.ParseFromString(bytes);
  const std::vector<std::string_view> pieces = Split(bytes, rng);
  v1::AttendStreamRequest fallback;
  StreamMessage message;
  const absl::Status status = ParseStreamMessage(pieces, &fallback, &message);
  ASSERT_EQ(status.ok(), valid) << status;
  if (!valid) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  if (expected.has_header()) {
    ASSERT_EQ(message.kind, StreamMessage::Kind::kHeader);
    EXPECT_EQ(message.header.SerializeAsString(), expected.header().SerializeAsString());
  } else if (expected.has_block()) {
    ASSERT_EQ(message.kind, StreamMessage::Kind::kBlock);
    const v1::TokenBlock& block = expected.block();
    EXPECT_EQ(message.block.token_start, block.token_start());
    EXPECT_EQ(message.block.token_count, block.token_count());
    EXPECT_TRUE(Gather(message.block.q) == block.query());
    EXPECT_TRUE(Gather(message.block.k) == block.key());
    EXPECT_TRUE(Gather(message.block.v) == block.value());
  } else {
    EXPECT_EQ(message.kind, StreamMessage::Kind::kNone);
  }
}

v1::AttendStreamRequest RandomBlock(std::mt19937_64& rng) {
  v1::AttendStreamRequest request;
  v1::TokenBlock* block = request.mutable_block();
  if (rng() % 5 != 0) block->set_token_start(static_cast<int64_t>(rng() % 100000) - 10);
  if (rng() % 5 != 0) block->set_token_count(static_cast<int64_t>(rng() % 5000));
  if (rng() % 7 != 0) block->set_query(RandomBytes(rng() % 700, rng));
  if (rng() % 7 != 0) block->set_key(RandomBytes(rng() % 300, rng));
  if (rng() % 7 != 0) block->set_value(RandomBytes(rng() % 300, rng));
  return request;
}

TEST(StreamWireTest, CanonicalBlocksTakeTheFastPathAndReadAsProtobufReadsThem) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 300; ++i) {
    const std::string bytes = RandomBlock(rng).SerializeAsString();
    ExpectSameAsProtobuf(bytes, rng);
    v1::AttendStreamRequest fallback;
    StreamMessage message;
    ASSERT_TRUE(ParseStreamMessage(Split(bytes, rng), &fallback, &message).ok());
    EXPECT_FALSE(message.parsed_by_protobuf) << "canonical block " << i << " fell back";
  }
}

TEST(StreamWireTest, OtherFormsFallBackToProtobufWithItsSemantics) {
  std::mt19937_64 rng(2);
  v1::AttendStreamRequest header;
  header.mutable_header()->set_seq_len(4096);
  header.mutable_header()->set_request_id("r1");
  const std::string unknown_varint("\x78\x05", 2);  // Field 15, varint 5.
  const std::vector<std::string> cases = {
      header.SerializeAsString(),
      // Two blocks: protobuf merges them (later fields win, bytes replaced).
      RandomBlock(rng).SerializeAsString() + RandomBlock(rng).SerializeAsString(),
      // A header then a block, and a block then a header: the oneof keeps the last.
      header.SerializeAsString() + RandomBlock(rng).SerializeAsString(),
      RandomBlock(rng).SerializeAsString() + header.SerializeAsString(),
      // Unknown fields around a block (fast path skips them).
      unknown_varint + RandomBlock(rng).SerializeAsString() + unknown_varint,
      // Empty message, truncated message, garbage.
      std::string(),
      RandomBlock(rng).SerializeAsString().substr(0, 7),
      RandomBytes(64, rng),
      std::string("\x12\x02\x0a\x05", 4),  // Block field whose TokenBlock has a bad wire type.
      std::string("\x12\x04\x08\x01\x08\x02", 6),  // token_start twice.
      // Tags past 32 bits (field numbers past 2^29 - 1), which protobuf refuses, at the top and
      // inside a block; found by the fuzzer.
      std::string("\xf8\xff\xff\xff\xff\x01\x00", 7) + RandomBlock(rng).SerializeAsString(),
      std::string("\x12\x09\x08\x60\xf0\xff\xff\xff\xff\x01\x00", 11),
      // A 64-bit varint whose tenth byte carries more than one bit.
      std::string("\x12\x0c\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 14),
  };
  for (const std::string& bytes : cases) {
    SCOPED_TRACE(testing::Message() << bytes.size() << " bytes");
    for (int split = 0; split < 5; ++split) ExpectSameAsProtobuf(bytes, rng);
  }
  for (int i = 0; i < 2000; ++i) ExpectSameAsProtobuf(RandomBytes(rng() % 40, rng), rng);
}

TEST(StreamWireTest, OutputBlockPrefixPlusPayloadIsTheProtobufMessage) {
  std::mt19937_64 rng(3);
  for (const auto& [start, count, size] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {0, 0, 0}, {0, 1, 4}, {8192, 1024, 1 << 20}, {1LL << 40, 300, 12345}, {5, 0, 7}}) {
    const std::string payload = RandomBytes(static_cast<size_t>(size), rng);
    const std::string bytes = EncodeOutputBlockPrefix(start, count, size) + payload;
    v1::AttendStreamResponse expected;
    expected.mutable_block()->set_token_start(start);
    expected.mutable_block()->set_token_count(count);
    expected.mutable_block()->set_output(payload);
    EXPECT_TRUE(bytes == expected.SerializeAsString()) << start << " " << count << " " << size;
    v1::AttendStreamResponse parsed;
    ASSERT_TRUE(parsed.ParseFromString(bytes));
    EXPECT_EQ(parsed.block().token_start(), start);
    EXPECT_TRUE(parsed.block().output() == payload);
  }
}

}  // namespace
}  // namespace da::server
