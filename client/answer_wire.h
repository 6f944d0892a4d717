// AttendStream answers read where gRPC received them, without protobuf copying an output block's
// rows into a string first.
//
//   std::vector<std::string_view> pieces = ...;  // The message's slices, in order.
//   v1::AttendStreamResponse message;
//   OutputBlockView block;
//   grpc::Status status = ParseAnswer(pieces, &message, &block);
//   if (status.ok() && message.has_block()) { /* block.output() lies in pieces or in message */ }
//
// The server writes an output block as AttendStreamResponse{block: OutputBlock{token_start,
// token_count, output}} with each field once, in field order, zero varints left out, the rows
// last (server/stream_wire.h). A message in exactly that form is read in place: *block's
// output pieces point into pieces, and *message holds the block's token range with an empty
// output. Every other message (headers, trailers, any other encoding of a block) is parsed by
// protobuf into *message, and a block in it is viewed in message's own string, so the result is
// protobuf's in every case. gRPC-free, so it is tested against protobuf's parser alone.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "da/v1/attention.pb.h"

namespace da::client {

// One output block's rows, [batch, token_count, heads, head_dim], in pieces that stay valid only
// as long as what they point into (the received message).
class OutputBlockView {
 public:
  // A view over block's own output string.
  static OutputBlockView Over(const v1::OutputBlock& block);

  int64_t token_start() const { return token_start_; }
  int64_t token_count() const { return token_count_; }
  int64_t output_bytes() const { return output_bytes_; }
  const std::vector<std::string_view>& output() const { return output_; }

  // Copies output bytes [offset, offset + n) to dst; the range must lie within output_bytes().
  void CopyTo(int64_t offset, int64_t n, char* dst) const;
  // Appends all output bytes to *dst.
  void AppendTo(std::string* dst) const;
  // True when the output bytes equal bytes.
  bool Equals(std::string_view bytes) const;

 private:
  friend absl::Status ParseAnswer(const std::vector<std::string_view>& pieces,
                                  v1::AttendStreamResponse* message, OutputBlockView* block);
  void Reset(int64_t token_start, int64_t token_count);
  void Append(std::string_view piece);

  int64_t token_start_ = 0;
  int64_t token_count_ = 0;
  int64_t output_bytes_ = 0;
  std::vector<std::string_view> output_;
};

// Parses one serialized AttendStreamResponse held in pieces into *message and, when it carries an
// output block, *block (see above). INVALID_ARGUMENT when the bytes are not an
// AttendStreamResponse.
absl::Status ParseAnswer(const std::vector<std::string_view>& pieces,
                         v1::AttendStreamResponse* message, OutputBlockView* block);

}  // namespace da::client
