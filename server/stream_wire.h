// AttendStream messages on the wire without the copies protobuf makes of a block's tensors.
//
// Receiving: gRPC hands the server a message as slices. ParseStreamMessage reads the message
// where it lies: a block's q, k and v become ByteSpans over the slices, and the StreamAssembler
// copies them once, straight into the chunk (instead of protobuf copying them into strings first).
// Only messages in the canonical form protobuf writers produce (one block field, each TokenBlock
// field at most once, unknown fields allowed) take that path; anything else (a header, repeated
// or mistyped fields) is parsed by protobuf itself, so the semantics are protobuf's in every case.
//
// Sending: an output block is written as the serialized AttendStreamResponse it is, the
// prefix (tags and lengths) from EncodeOutputBlockPrefix followed by the payload, which the
// server copies once from its output buffer into the message's slice.
//
// gRPC-free (protobuf only), so the parser is fuzzed against protobuf's own.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "da/v1/attention.pb.h"
#include "server/stream_assembler.h"

namespace da::server {

struct StreamMessage {
  enum class Kind { kNone, kHeader, kBlock };  // kNone: neither field was set.
  Kind kind = Kind::kNone;
  v1::StreamHeader header;  // kHeader.
  BlockView block;          // kBlock: q, k and v point into the pieces or into *fallback.
  bool parsed_by_protobuf = false;
};

// Parses one serialized AttendStreamRequest held in pieces (which must outlive out->block).
// Messages the fast path does not take are parsed into *fallback, whose strings then back
// out->block. INVALID_ARGUMENT when the bytes are not an AttendStreamRequest.
absl::Status ParseStreamMessage(const std::vector<std::string_view>& pieces,
                                v1::AttendStreamRequest* fallback, StreamMessage* out);

// The bytes of a serialized AttendStreamResponse{block: OutputBlock{token_start, token_count,
// output}} that precede the output_bytes payload.
std::string EncodeOutputBlockPrefix(int64_t token_start, int64_t token_count, int64_t output_bytes);

}  // namespace da::server
