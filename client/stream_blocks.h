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
//
// Parallel streams: no segment crosses a multiple of every segment length (ChunkTokens), so a
// request cut there is several independent requests whose outputs, put side by side, are the
// whole output. CutParts chooses the cuts; a part is streamed with a plan from MakePartPlan and
// assembled straight into the whole output (OutputAssembler's part constructor):
//
//   for (const TokenRange& part : CutParts(request.spec(), seq_len, 4)) {
//     MakePartPlan(request, 0, part, &plan);  // header.seq_len() == part.count
//     OutputAssembler assembler(plan.header, &whole_output, seq_len, part.first);
//   }
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>
#include <vector>

#include "client/answer_wire.h"
#include "da/v1/attention.pb.h"

namespace da::client {

// Blocks of about this many bytes of q + k + v when the caller does not choose.
inline constexpr int64_t kDefaultBlockBytes = 4LL << 20;

struct StreamPlan {
  v1::StreamHeader header;
  int64_t block_tokens = 0;  // Tokens per block; the last block may be shorter.
  int64_t block_count = 0;
  int64_t first_token = 0;  // Where the streamed tokens start in the request (a part's first).
};

// Tokens [first, first + count) of a request.
struct TokenRange {
  int64_t first = 0;
  int64_t count = 0;
};

// The least common multiple of spec's segment lengths: every segment of every pattern starts at
// a multiple of it. seq_len when that is at least seq_len (or overflows), as then no cut is
// possible.
int64_t ChunkTokens(const v1::AttentionSpec& spec, int64_t seq_len);

// Cuts [0, seq_len) at chunk boundaries into at most `parts` ranges of whole chunks, as even as
// the chunks allow (sizes differ by at most one chunk, plus the shorter last chunk). One range
// when parts <= 1 or the sequence is one chunk.
std::vector<TokenRange> CutParts(const v1::AttentionSpec& spec, int64_t seq_len, int parts);

// The number of parallel streams chosen for a request of total_bytes (q, k, v and the output)
// when the caller does not choose: one per kParallelStreamBytes, from 1 to kMaxParallelStreams.
inline constexpr int64_t kParallelStreamBytes = 256LL << 20;
inline constexpr int kMaxParallelStreams = 4;
int DefaultParallelStreams(int64_t total_bytes);

// The dtype request's output comes in: its output_dtype, else the query's; and its bytes (the
// query's element count in that dtype; 0 for a query without a valid dtype).
v1::DType OutputDType(const v1::AttendRequest& request);
int64_t OutputBytes(const v1::AttendRequest& request);
// q, k and v's bytes and the output's: what a call moves both ways.
int64_t RequestAndAnswerBytes(const v1::AttendRequest& request);

// Whether a request goes as a stream when its caller leaves the choice open: when its q, k and v
// and its output, together, come within a tenth of message_limit (the smaller of the server's
// GetServerInfo limits.max_message_bytes and the client's own; 0 or less: the server's default,
// kDefaultMessageBytes). The Python client decides the same way.
inline constexpr int64_t kDefaultMessageBytes = 64LL << 20;
bool NeedsStream(const v1::AttendRequest& request, int64_t message_limit);

// The message limit a call lives within: the server's (GetServerInfo limits.max_message_bytes;
// 0 or less: kDefaultMessageBytes), or the client's own receive limit where that is smaller (0
// or less: none of its own).
int64_t MessageLimit(int64_t server_limit, int64_t client_limit);

// Tokens per streamed block of request under message_limit (as NeedsStream's): blocks of about
// kDefaultBlockBytes of q, k and v, and never more than half a message (at least one token), as
// the Python client picks them. 0 for a request whose q or k is not of rank 4 (refused later,
// naming the tensor).
int64_t BlockTokensFor(const v1::AttendRequest& request, int64_t message_limit);

// One execution info for a request streamed in parts, from the parts' (in token order):
// request_id the parts' ids joined by ','; precision, reason, strategy and backend the first
// part's; devices every part's, each once; compute and plan build time summed over the parts (the
// server's work on the request), queue and total time the longest part's (the parts run side by
// side); plan_cache_hit when every part hit; stream chunks and buffer bytes summed, chunk tokens
// the largest.
v1::ExecutionInfo MergePartInfos(const std::vector<v1::ExecutionInfo>& parts);

// Checks that request's tensors can be streamed (rank 4; one dtype; equal batch, seq_len and
// head_dim; key and value of one shape; byte counts matching the shapes) and fills plan.
// block_tokens 0 picks blocks of about kDefaultBlockBytes. Other checks (patterns, head counts)
// are the server's.
grpc::Status MakeStreamPlan(const v1::AttendRequest& request, int64_t block_tokens,
                            StreamPlan* plan);

// The plan for streaming tokens part of request as a request of its own: the header's seq_len is
// part.count, and blocks (MakeTokenBlock) carry the part's tokens numbered from 0.
// INVALID_ARGUMENT when part does not lie within the request.
grpc::Status MakePartPlan(const v1::AttendRequest& request, int64_t block_tokens,
                          const TokenRange& part, StreamPlan* plan);

// Block of tokens [token_start, token_start + plan.block_tokens) of the plan's tokens (those from
// plan.first_token on in request), clipped to the header's seq_len.
v1::TokenBlock MakeTokenBlock(const v1::AttendRequest& request, const StreamPlan& plan,
                              int64_t token_start);

// Reserves bytes of capacity in *data (its size unchanged) for an output about to be written, and
// on Linux asks for transparent huge pages over it (madvise MADV_HUGEPAGE, a no-op where the
// host's THP setting is "never"; outputs from 4 MiB on): a fresh 512 MiB output otherwise costs
// 131,072 page faults as it is first written. For an output sized at once and written where its
// rows lie (the parallel parts', and a batched stream's; ResizeUninitialized); for one appended
// block by block in one thread, huge pages cost that thread more CPU than they saved on the build
// machine.
void ReserveOutput(std::string* data, size_t bytes);

// Sets data's size to bytes without writing the new bytes (where the standard library allows it:
// libstdc++; elsewhere they are zeroed as by resize): an output about to be written whole, by
// several threads where their rows lie, is not zeroed first. Its new bytes hold whatever the
// memory held; the caller writes every one of them or discards the string. Capacity: at least
// bytes (reserved first, so data() does not move while it is written).
void ResizeUninitialized(std::string* data, size_t bytes);

// Collects a streamed answer: a header, output blocks covering [0, seq_len) in order, a trailer.
class OutputAssembler {
 public:
  // expected: the header that was sent; the answer must match its batch, seq_len, heads and
  // head_dim.
  explicit OutputAssembler(const v1::StreamHeader& expected);
  // A part's answer (expected.seq_len() tokens), written into whole_output, a [batch,
  // whole_seq_len, heads, head_dim] tensor whose dtype and size the caller has set, at tokens
  // from first_token on. Finish then moves only the execution info. Assemblers of disjoint parts
  // may write into one output from different threads.
  OutputAssembler(const v1::StreamHeader& expected, v1::Tensor* whole_output, int64_t whole_seq_len,
                  int64_t first_token);

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
  v1::Tensor* target_ = nullptr;  // The whole output a part is written into; null: response_'s.
  int64_t target_seq_len_ = 0;    // Its seq_len, and where the part's tokens start in it.
  int64_t target_first_token_ = 0;
  bool have_header_ = false;
  bool have_trailer_ = false;
  int64_t block_index_ = 0;  // Blocks received so far.
  int64_t next_token_ = 0;   // First token the next block must start at.
  int64_t token_bytes_ = 0;  // Bytes of one token of one batch element: heads * head_dim * dtype.
  v1::AttendResponse response_;
};

}  // namespace da::client
