#include "client/answer_wire.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace da::client {
namespace {

// AttendStreamResponse.block = 2 and OutputBlock's fields (proto/da/v1/attention.proto), as tags.
constexpr uint8_t kBlockTag = 2 << 3 | 2;
constexpr uint8_t kTokenStartTag = 1 << 3 | 0;
constexpr uint8_t kTokenCountTag = 2 << 3 | 0;
constexpr uint8_t kOutputTag = 3 << 3 | 2;

// Tags and lengths before the rows: at most 4 one-byte tags and 4 ten-byte varints.
constexpr int64_t kMaxPrefixBytes = 44;

// Reads a varint from bytes[*at, end); false (protobuf decides) past end or past 64 bits.
bool Varint(const uint8_t* bytes, int64_t end, int64_t* at, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *at < end; shift += 7) {
    const uint8_t byte = bytes[(*at)++];
    if (shift == 63 && byte > 1) return false;
    *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// The canonical output block (see the header): token range into *block, and the offset of the
// rows, which run to the end of the message. False sends the message to protobuf.
bool ParseCanonicalBlock(const uint8_t* prefix, int64_t prefix_bytes, int64_t total_bytes,
                         int64_t* token_start, int64_t* token_count, int64_t* rows_at) {
  int64_t at = 0;
  uint64_t block_bytes = 0;
  if (prefix_bytes < 1 || prefix[at++] != kBlockTag) return false;
  if (!Varint(prefix, prefix_bytes, &at, &block_bytes)) return false;
  if (block_bytes != static_cast<uint64_t>(total_bytes - at)) return false;
  uint64_t value = 0;
  *token_start = 0;
  *token_count = 0;
  if (at < prefix_bytes && prefix[at] == kTokenStartTag) {
    ++at;
    if (!Varint(prefix, prefix_bytes, &at, &value)) return false;
    *token_start = static_cast<int64_t>(value);
  }
  if (at < prefix_bytes && prefix[at] == kTokenCountTag) {
    ++at;
    if (!Varint(prefix, prefix_bytes, &at, &value)) return false;
    *token_count = static_cast<int64_t>(value);
  }
  uint64_t rows = 0;
  if (at >= prefix_bytes || prefix[at++] != kOutputTag) return false;
  if (!Varint(prefix, prefix_bytes, &at, &rows)) return false;
  if (rows != static_cast<uint64_t>(total_bytes - at)) return false;
  *rows_at = at;
  return true;
}

}  // namespace

OutputBlockView OutputBlockView::Over(const v1::OutputBlock& block) {
  OutputBlockView view;
  view.Reset(block.token_start(), block.token_count());
  view.Append(block.output());
  return view;
}

void OutputBlockView::Reset(int64_t token_start, int64_t token_count) {
  token_start_ = token_start;
  token_count_ = token_count;
  output_bytes_ = 0;
  output_.clear();
}

void OutputBlockView::Append(std::string_view piece) {
  if (piece.empty()) return;
  output_.push_back(piece);
  output_bytes_ += static_cast<int64_t>(piece.size());
}

void OutputBlockView::CopyTo(int64_t offset, int64_t n, char* dst) const {
  for (const std::string_view piece : output_) {
    const int64_t size = static_cast<int64_t>(piece.size());
    if (offset >= size) {
      offset -= size;
      continue;
    }
    const int64_t take = std::min(n, size - offset);
    std::memcpy(dst, piece.data() + offset, static_cast<size_t>(take));
    dst += take;
    n -= take;
    offset = 0;
    if (n == 0) return;
  }
}

void OutputBlockView::AppendTo(std::string* dst) const {
  for (const std::string_view piece : output_) dst->append(piece);
}

bool OutputBlockView::Equals(std::string_view bytes) const {
  if (static_cast<int64_t>(bytes.size()) != output_bytes_) return false;
  for (const std::string_view piece : output_) {
    if (bytes.substr(0, piece.size()) != piece) return false;
    bytes.remove_prefix(piece.size());
  }
  return true;
}

absl::Status ParseAnswer(const std::vector<std::string_view>& pieces,
                         v1::AttendStreamResponse* message, OutputBlockView* block) {
  message->Clear();
  block->Reset(0, 0);
  int64_t total_bytes = 0;
  for (const std::string_view piece : pieces) total_bytes += static_cast<int64_t>(piece.size());
  // The prefix may straddle slices: gather its bytes first.
  uint8_t prefix[kMaxPrefixBytes];
  int64_t prefix_bytes = 0;
  for (const std::string_view piece : pieces) {
    const int64_t take = std::min<int64_t>(kMaxPrefixBytes - prefix_bytes, piece.size());
    std::memcpy(prefix + prefix_bytes, piece.data(), static_cast<size_t>(take));
    prefix_bytes += take;
    if (prefix_bytes == kMaxPrefixBytes) break;
  }
  int64_t token_start = 0, token_count = 0, rows_at = 0;
  if (ParseCanonicalBlock(prefix, prefix_bytes, total_bytes, &token_start, &token_count,
                          &rows_at)) {
    message->mutable_block()->set_token_start(token_start);
    message->mutable_block()->set_token_count(token_count);
    block->Reset(token_start, token_count);
    for (std::string_view piece : pieces) {
      const int64_t skip = std::min<int64_t>(rows_at, piece.size());
      rows_at -= skip;
      block->Append(piece.substr(static_cast<size_t>(skip)));
    }
    return absl::OkStatus();
  }
  std::string bytes;
  bytes.reserve(static_cast<size_t>(total_bytes));
  for (const std::string_view piece : pieces) bytes.append(piece);
  if (!message->ParseFromString(bytes)) {
    return absl::InvalidArgumentError("the bytes are not an AttendStreamResponse (" +
                                      std::to_string(total_bytes) + " bytes)");
  }
  if (message->has_block()) *block = OutputBlockView::Over(message->block());
  return absl::OkStatus();
}

}  // namespace da::client
