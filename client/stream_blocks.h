// The pure part of AttendStream: splitting a whole-tensor AttendRequest into a StreamHeader and
// token blocks, and reassembling streamed output blocks into an AttendResponse. No I/O here, so it
// is tested without a server.
//
//   StreamPlan plan;
//   grpc::Status status = MakeStreamPlan(request, /*block_tokens=*/0, &plan);
//   for (int64_t start = 0; start < plan.header.seq_len(); start += plan.block_tokens)
//     Send(MakeTokenBlock(request, plan, start));
//
//   OutputAssembler assembler(plan.header);
//   for (const v1::AttendStreamResponse& message : received) status = assembler.Add(message);
//   // or, for blocks read in place: status = assembler.AddBlock(block_view);
//   status = assembler.Finish(&response);
//
// A block's bytes are laid out [batch, token_count, heads, head_dim]: for batch > 1 it gathers
// (and the assembler scatters) rows of every batch element. Errors: INVALID_ARGUMENT for a request
// that cannot be split, INTERNAL (naming the message or block) for a malformed answer.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>

#include "client/answer_wire.h"
#include "da/v1/attention.pb.h"

namespace da::client {

// Blocks of about this many bytes of q + k + v when the caller does not choose.
inline constexpr int64_t kDefaultBlockBytes = 4LL << 20;

struct StreamPlan {
  v1::StreamHeader header;
  int64_t block_tokens = 0;  // Tokens per block; the last block may be shorter.
  int64_t block_count = 0;
};

// Checks that request's tensors can be streamed (rank 4; one dtype; equal batch, seq_len and
// head_dim; key and value of one shape; byte counts matching the shapes) and fills plan.
// block_tokens 0 picks blocks of about kDefaultBlockBytes. Other checks (patterns, head counts)
// are the server's.
grpc::Status MakeStreamPlan(const v1::AttendRequest& request, int64_t block_tokens,
                            StreamPlan* plan);

// Block of tokens [token_start, token_start + plan.block_tokens) clipped to seq_len.
v1::TokenBlock MakeTokenBlock(const v1::AttendRequest& request, const StreamPlan& plan,
                              int64_t token_start);

// Collects a streamed answer: a header, output blocks covering [0, seq_len) in order, a trailer.
class OutputAssembler {
 public:
  // expected: the header that was sent; the answer must match its batch, seq_len, heads and
  // head_dim.
  explicit OutputAssembler(const v1::StreamHeader& expected);

  grpc::Status Add(const v1::AttendStreamResponse& message);
  // An output block read in place (client/answer_wire.h): its rows are copied once, straight
  // into the response.
  grpc::Status AddBlock(const OutputBlockView& block);

  // Moves the output and the trailer's execution info into response; fails unless the header,
  // every block and the trailer have arrived.
  grpc::Status Finish(v1::AttendResponse* response);

 private:
  grpc::Status AddHeader(const v1::StreamResponseHeader& header);
  void MergeTrailerInfo(const v1::ExecutionInfo& info);

  v1::StreamHeader expected_;
  bool have_header_ = false;
  bool have_trailer_ = false;
  int64_t block_index_ = 0;  // Blocks received so far.
  int64_t next_token_ = 0;   // First token the next block must start at.
  int64_t token_bytes_ = 0;  // Bytes of one token of one batch element: heads * head_dim * dtype.
  v1::AttendResponse response_;
};

}  // namespace da::client
