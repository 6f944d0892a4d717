#include "server/stream_wire.h"

#include <google/protobuf/io/zero_copy_stream.h>

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"

namespace da::server {
namespace {

// Protobuf wire types.
constexpr int kVarint = 0;
constexpr int kFixed64 = 1;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

// AttendStreamRequest and TokenBlock field numbers (proto/da/v1/attention.proto).
constexpr uint64_t kRequestHeader = 1;
constexpr uint64_t kRequestBlock = 2;
constexpr uint64_t kBlockTokenStart = 1;
constexpr uint64_t kBlockTokenCount = 2;
constexpr uint64_t kBlockQuery = 3;
constexpr uint64_t kBlockKey = 4;
constexpr uint64_t kBlockValue = 5;

// Reads forward through pieces without copying. Every read fails (returns false) rather than
// passing the end; the fast path then gives the message to protobuf.
class Reader {
 public:
  Reader(const std::vector<std::string_view>& pieces, int64_t limit)
      : pieces_(pieces), left_(limit) {}

  bool done() const { return left_ == 0; }
  int64_t left() const { return left_; }

  bool Varint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t byte;
      if (!Byte(&byte)) return false;
      if (shift == 63 && byte > 1) return false;  // Past 64 bits: protobuf decides.
      *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;  // More than ten bytes.
  }

  // A field tag as protobuf reads it: a 32-bit varint with a field number >= 1.
  bool Tag(uint64_t* field, int* wire_type) {
    uint64_t tag;
    if (!Varint(&tag) || tag > 0xffffffffu || (tag >> 3) == 0) return false;
    *field = tag >> 3;
    *wire_type = static_cast<int>(tag & 7);
    return true;
  }

  // The next n bytes as spans over the pieces.
  bool Spans(int64_t n, ByteSpans* spans) {
    if (n < 0 || n > left_) return false;
    while (n > 0) {
      Settle();
      const std::string_view piece = pieces_[index_];
      const int64_t take = std::min<int64_t>(n, static_cast<int64_t>(piece.size()) - offset_);
      if (spans != nullptr) spans->Append(piece.substr(static_cast<size_t>(offset_), take));
      offset_ += take;
      left_ -= take;
      n -= take;
    }
    return true;
  }

  bool Skip(int wire_type) {
    uint64_t value;
    switch (wire_type) {
      case kVarint:
        return Varint(&value);
      case kFixed64:
        return Spans(8, nullptr);
      case kFixed32:
        return Spans(4, nullptr);
      case kLengthDelimited:
        return Varint(&value) && value <= static_cast<uint64_t>(left_) &&
               Spans(static_cast<int64_t>(value), nullptr);
      default:
        return false;  // Groups and invalid wire types: protobuf decides.
    }
  }

  // A reader over the next n bytes; this one moves past them.
  std::optional<Reader> Sub(int64_t n) {
    if (n < 0 || n > left_) return std::nullopt;
    if (left_ > 0) Settle();
    Reader sub = *this;
    sub.left_ = n;
    if (!Spans(n, nullptr)) return std::nullopt;
    return sub;
  }

 private:
  // Moves past exhausted pieces (there is a byte left when called with left_ > 0).
  void Settle() {
    while (offset_ == static_cast<int64_t>(pieces_[index_].size())) {
      ++index_;
      offset_ = 0;
    }
  }
  bool Byte(uint8_t* byte) {
    if (left_ == 0) return false;
    Settle();
    *byte = static_cast<uint8_t>(pieces_[index_][static_cast<size_t>(offset_)]);
    ++offset_;
    --left_;
    return true;
  }

  const std::vector<std::string_view>& pieces_;
  size_t index_ = 0;
  int64_t offset_ = 0;
  int64_t left_;
};

// A TokenBlock in canonical form; false sends the message to protobuf.
bool ParseBlock(Reader reader, BlockView* block) {
  bool seen[6] = {};
  while (!reader.done()) {
    uint64_t field;
    int wire_type;
    if (!reader.Tag(&field, &wire_type)) return false;
    if (field >= kBlockTokenStart && field <= kBlockValue) {
      if (seen[field]) return false;  // Repeated: protobuf's last-one-wins.
      seen[field] = true;
      const bool is_count = field == kBlockTokenStart || field == kBlockTokenCount;
      if (wire_type != (is_count ? kVarint : kLengthDelimited)) return false;
      if (is_count) {
        uint64_t value;
        if (!reader.Varint(&value)) return false;
        (field == kBlockTokenStart ? block->token_start : block->token_count) =
            static_cast<int64_t>(value);
        continue;
      }
      uint64_t length;
      if (!reader.Varint(&length) || length > static_cast<uint64_t>(reader.left())) return false;
      ByteSpans* spans = field == kBlockQuery ? &block->q
                         : field == kBlockKey ? &block->k
                                              : &block->v;
      if (!reader.Spans(static_cast<int64_t>(length), spans)) return false;
      continue;
    }
    if (!reader.Skip(wire_type)) return false;
  }
  return true;
}

// The fast path: one block field, nothing else but unknown fields. False: use protobuf.
bool ParseCanonical(const std::vector<std::string_view>& pieces, int64_t size, StreamMessage* out) {
  Reader reader(pieces, size);
  bool have_block = false;
  while (!reader.done()) {
    uint64_t field;
    int wire_type;
    if (!reader.Tag(&field, &wire_type)) return false;
    if (field == kRequestHeader) return false;  // Small: protobuf parses headers.
    if (field == kRequestBlock) {
      if (have_block || wire_type != kLengthDelimited) return false;
      uint64_t length;
      if (!reader.Varint(&length)) return false;
      std::optional<Reader> sub = reader.Sub(static_cast<int64_t>(
          std::min<uint64_t>(length, static_cast<uint64_t>(reader.left()) + 1)));
      if (!sub || !ParseBlock(*sub, &out->block)) return false;
      have_block = true;
      continue;
    }
    if (!reader.Skip(wire_type)) return false;
  }
  if (!have_block) return false;
  out->kind = StreamMessage::Kind::kBlock;
  return true;
}

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

int VarintSize(uint64_t value) {
  int size = 1;
  while (value >= 0x80) {
    value >>= 7;
    ++size;
  }
  return size;
}

// The message's pieces as one stream for protobuf's parser, so that the fallback parse makes no
// contiguous copy of a message of up to the message limit.
class PiecesInputStream final : public google::protobuf::io::ZeroCopyInputStream {
 public:
  explicit PiecesInputStream(const std::vector<std::string_view>& pieces) : pieces_(pieces) {}

  bool Next(const void** data, int* size) override {
    while (piece_ < pieces_.size() && offset_ == pieces_[piece_].size()) {
      ++piece_;
      offset_ = 0;
    }
    if (piece_ == pieces_.size()) return false;
    const std::string_view piece = pieces_[piece_];
    *data = piece.data() + offset_;
    *size = static_cast<int>(piece.size() - offset_);
    count_ += *size;
    offset_ = piece.size();
    return true;
  }
  void BackUp(int count) override {  // Only into the piece Next returned last.
    offset_ -= static_cast<size_t>(count);
    count_ -= count;
  }
  bool Skip(int count) override {
    const void* data = nullptr;
    int size = 0;
    while (count > 0 && Next(&data, &size)) {
      if (size > count) BackUp(size - count);
      count -= std::min(size, count);
    }
    return count == 0;
  }
  int64_t ByteCount() const override { return count_; }

 private:
  const std::vector<std::string_view>& pieces_;
  size_t piece_ = 0;
  size_t offset_ = 0;  // Into pieces_[piece_].
  int64_t count_ = 0;
};

}  // namespace

absl::Status ParseStreamMessage(const std::vector<std::string_view>& pieces,
                                v1::AttendStreamRequest* fallback, StreamMessage* out) {
  *out = StreamMessage();
  int64_t size = 0;
  for (std::string_view piece : pieces) size += static_cast<int64_t>(piece.size());
  if (ParseCanonical(pieces, size, out)) return absl::OkStatus();

  *out = StreamMessage();
  out->parsed_by_protobuf = true;
  PiecesInputStream input(pieces);
  if (!fallback->ParseFromZeroCopyStream(&input)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a stream message of ", size,
        " bytes is not a valid da.v1.AttendStreamRequest (malformed, or a string field such as "
        "header.request_id that is not UTF-8)"));
  }
  if (fallback->has_header()) {
    out->kind = StreamMessage::Kind::kHeader;
    out->header = fallback->header();
  } else if (fallback->has_block()) {
    const v1::TokenBlock& block = fallback->block();
    out->kind = StreamMessage::Kind::kBlock;
    out->block = {block.token_start(), block.token_count(), block.query(), block.key(),
                  block.value()};
  }
  return absl::OkStatus();
}

std::string EncodeOutputBlockPrefix(int64_t token_start, int64_t token_count,
                                    int64_t output_bytes) {
  // OutputBlock: token_start = 1, token_count = 2 (varints, omitted when 0 as proto3 does),
  // output = 3 (bytes). AttendStreamResponse: block = 2.
  std::string inner;
  if (token_start != 0) {
    AppendVarint(uint64_t{1} << 3 | kVarint, &inner);
    AppendVarint(static_cast<uint64_t>(token_start), &inner);
  }
  if (token_count != 0) {
    AppendVarint(uint64_t{2} << 3 | kVarint, &inner);
    AppendVarint(static_cast<uint64_t>(token_count), &inner);
  }
  if (output_bytes != 0) {
    AppendVarint(uint64_t{3} << 3 | kLengthDelimited, &inner);
    AppendVarint(static_cast<uint64_t>(output_bytes), &inner);
  }
  const uint64_t block_size = inner.size() + static_cast<uint64_t>(output_bytes);
  std::string prefix;
  prefix.reserve(inner.size() + 1 + VarintSize(block_size));
  AppendVarint(uint64_t{2} << 3 | kLengthDelimited, &prefix);
  AppendVarint(block_size, &prefix);
  prefix += inner;
  return prefix;
}

}  // namespace da::server
