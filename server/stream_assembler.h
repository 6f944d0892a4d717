// Assembles a stream's token blocks into chunks of whole segments, in a fixed ring of buffers.
//
// A chunk is a run of chunk_tokens tokens starting at a multiple of chunk_tokens (the last one may
// be shorter). The streaming server picks chunk_tokens as a multiple of every segment length, so
// no segment spans two chunks and each chunk is an attention problem of its own (DESIGN §3,
// Streaming). Blocks need not line up with chunks: one block may fill the end of one chunk and
// the start of the next, or several chunks.
//
//   auto assembler = StreamAssembler::Create(layout, /*slots=*/2);
//   DA_RETURN_IF_ERROR(assembler->CheckBlock(block));
//   int64_t taken = 0;
//   while (taken < block.token_count) {
//     int64_t n = assembler->Fill(block, taken);
//     if (n == 0) { /* every slot is full: compute, then ReleaseChunk, then Fill again */ }
//     taken += n;
//   }
//   while (std::optional<Chunk> chunk = assembler->TakeReadyChunk()) { ... ReleaseChunk(index); }
//
// Memory: slots * chunk_tokens * batch * (q_row_bytes + 2 * kv_row_bytes), allocated by Create
// and never grown, whatever seq_len is. When every slot holds a chunk that is not released, Fill
// takes nothing: the caller stops reading (flow control) until a slot is released.
//
// gRPC-free and protobuf-free so that it can be tested and fuzzed alone. Not thread safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/tensor.h"
#include "server/host_buffer.h"

namespace da::server {

struct StreamLayout {
  int64_t batch = 1;
  int64_t seq_len = 0;
  int64_t q_row_bytes = 0;    // Bytes of one token of q: heads * head_dim * dtype size.
  int64_t kv_row_bytes = 0;   // Bytes of one token of k (or v): kv_heads * head_dim * dtype size.
  int64_t out_row_bytes = 0;  // Bytes of one token of the output: heads * head_dim * its size.
  int64_t chunk_tokens = 0;   // Tokens per chunk; the last chunk may be shorter.

  int64_t chunk_count() const {
    return chunk_tokens > 0 ? (seq_len + chunk_tokens - 1) / chunk_tokens : 0;
  }
};

// One chunk's inputs, each laid out [batch, token_count, heads or kv_heads, head_dim].
struct Chunk {
  int64_t index = 0;
  int64_t token_start = 0;
  int64_t token_count = 0;
  char* q = nullptr;
  char* k = nullptr;
  char* v = nullptr;
};

// Bytes that may lie in several pieces: the slices gRPC received a message in, referenced where
// they are rather than copied into one string.
class ByteSpans {
 public:
  ByteSpans() = default;
  ByteSpans(std::string_view bytes) { Append(bytes); }  // NOLINT(runtime/explicit): one piece.
  ByteSpans(const std::string& bytes) : ByteSpans(std::string_view(bytes)) {}  // NOLINT

  void Append(std::string_view piece);
  int64_t size() const { return size_; }
  const std::vector<std::string_view>& pieces() const { return pieces_; }
  // Copies bytes [offset, offset + n) to dst; the range must lie within [0, size()).
  void CopyTo(int64_t offset, int64_t n, char* dst) const;

 private:
  std::vector<std::string_view> pieces_;
  std::vector<int64_t> starts_;  // Offset of each piece.
  int64_t size_ = 0;
};

// A token block as it arrived: bytes laid out [batch, token_count, heads or kv_heads, head_dim].
struct BlockView {
  int64_t token_start = 0;
  int64_t token_count = 0;
  ByteSpans q;
  ByteSpans k;
  ByteSpans v;
};

// Tokens per chunk for a request: the least common multiple of the segment lengths, times the
// smallest factor that makes it at least min_chunk_tokens, clipped to seq_len (also when the
// multiple would pass seq_len or overflow). No segment then spans two chunks.
int64_t ChooseChunkTokens(const engine::AttentionSpec& spec, int64_t seq_len,
                          int64_t min_chunk_tokens);

// The layout of a validated stream problem (its shape checked by engine::ValidateShape). Each
// chunk is one engine run and, like a unary request, must fit max_request_bytes (q, k, v and
// output; 0: unlimited): RESOURCE_EXHAUSTED naming the chunk otherwise.
absl::StatusOr<StreamLayout> MakeStreamLayout(const engine::ProblemShape& shape,
                                              engine::DType dtype, engine::DType out_dtype,
                                              const engine::AttentionSpec& spec,
                                              int64_t min_chunk_tokens, int64_t max_request_bytes);

class StreamAssembler {
 public:
  // slots: how many chunks' inputs may be held at once (the pipeline depth), >= 1. Errors:
  // INVALID_ARGUMENT for a malformed layout, RESOURCE_EXHAUSTED when the memory is not there.
  // pool: where the slots' buffer comes from and goes back to (null: allocated and freed).
  static absl::StatusOr<std::unique_ptr<StreamAssembler>> Create(const StreamLayout& layout,
                                                                 int slots,
                                                                 HostBufferPool* pool = nullptr);

  // Checks the next block against the layout and what arrived before it: order, overlap, gaps,
  // tokens past seq_len, byte counts. Messages name the block: "block 3 (tokens [96, 128))".
  // Every block must pass CheckBlock and then be filled completely before the next is checked.
  absl::Status CheckBlock(const BlockView& block);

  // Copies tokens [block.token_start + taken, ...) of the checked block into free slots and
  // returns how many it took: 0 when every slot is full (call again after ReleaseChunk).
  int64_t Fill(const BlockView& block, int64_t taken);

  // The next chunk whose tokens have all arrived and that has not been taken yet, in order.
  std::optional<Chunk> TakeReadyChunk();

  // The chunk's inputs are no longer needed and its slot can take new tokens. Chunks are taken
  // and released in order; releasing any other chunk is a programming error (checked).
  void ReleaseChunk(int64_t index);

  // OK when every token of [0, seq_len) has arrived; otherwise INVALID_ARGUMENT naming the gap.
  absl::Status CheckComplete() const;

  const StreamLayout& layout() const { return layout_; }
  int slots() const { return slots_; }
  int64_t tokens_received() const { return tokens_received_; }
  int64_t blocks_received() const { return blocks_received_; }
  int64_t buffer_bytes() const { return buffer_bytes_; }
  const char* ChunkBufferForTest() const { return buffer_.get(); }

 private:
  StreamAssembler(const StreamLayout& layout, int slots);

  int64_t ChunkStart(int64_t index) const { return index * layout_.chunk_tokens; }
  int64_t ChunkCount(int64_t index) const;
  Chunk ChunkAt(int64_t index) const;

  StreamLayout layout_;
  int slots_ = 1;
  int64_t slot_q_bytes_ = 0;   // Per slot: chunk_tokens * batch * q_row_bytes.
  int64_t slot_kv_bytes_ = 0;  // Per slot and tensor: chunk_tokens * batch * kv_row_bytes.
  int64_t buffer_bytes_ = 0;
  PooledBuffer buffer_;  // slots x (q, k, v).

  int64_t blocks_received_ = 0;  // Blocks that passed CheckBlock.
  int64_t tokens_received_ = 0;  // Tokens [0, tokens_received_) are in slots or were released.
  int64_t block_end_ = 0;        // End of the block being filled.
  int64_t next_take_ = 0;        // Chunks [0, next_take_) were taken.
  int64_t released_ = 0;         // Chunks [0, released_) were released.
};

}  // namespace da::server
