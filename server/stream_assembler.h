// Assembles a stream's token blocks into chunks, in a fixed ring of buffers.
//
// A chunk is a run of chunk_tokens tokens starting at a multiple of chunk_tokens (the last one may
// be shorter). The streaming server picks chunk_tokens as a multiple of every segment length
// where one is within reach, so no segment spans two chunks and each chunk is an attention
// problem of its own (DESIGN §3, Streaming). Where the segment lengths' least common multiple is
// far larger than the longest segment (3000 and 4096: 1,536,000 tokens), a chunk is instead a
// *window*: a share of the whole problem (engine::ShareOfRequest), at least as long as the longest
// segment, computed with the kept K/V rows of the segments that cross its ends gathered from the
// chunks beside it. A window is taken once the segments holding its last token have arrived
// (with causal attention, once its own tokens have: it reads no key after them), so
// the ring holds two chunks beyond the pipeline depth (the one before, whose tail it reads, and
// the one after), and memory still follows the longest segment, not the sequence.
// Blocks need not line up with chunks: one block may fill the end of one chunk and the start of
// the next, or several chunks.
//
//   auto assembler = StreamAssembler::Create(layout, /*slots=*/2);
//   DA_RETURN_IF_ERROR(assembler->CheckBlock(block));
//   int64_t taken = 0;
//   while (taken < block.token_count) {
//     int64_t n = assembler->Fill(block, taken);
//     if (n == 0) { /* every slot is full: compute, ReleaseChunk and TakeReadyChunk, Fill again */
//     } taken += n;
//   }
//   while (std::optional<Chunk> chunk = assembler->TakeReadyChunk()) { ... ReleaseChunk(index); }
//
// Memory: slots * chunk_tokens * batch * (q_row_bytes + 2 * kv_row_bytes), allocated by Create
// and never grown, whatever seq_len is (windows: InputSlots slots, and each taken window's
// gathered rows, at most GatheredBytesBound). When every slot holds a chunk that is not released
// (or, windows, still read by the next window), Fill takes nothing: the caller stops reading
// (flow control) until a slot is freed.
//
// gRPC-free and protobuf-free so that it can be tested and fuzzed alone. Not thread safe.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/engine.h"
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
  // Chunks are windows (see the file comment) of the whole problem `shape` under `spec`; one kv
  // head's row of k or v has head_bytes (head_dim * the input dtype's size).
  bool windowed = false;
  engine::ProblemShape shape = {};
  engine::AttentionSpec spec = {};
  int64_t head_bytes = 0;

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
  // A window: its share of the whole problem and the rows gathered for it, valid until the chunk
  // is released. Null for a chunk that is a problem of its own.
  const engine::ShareOfRequest* share_of = nullptr;
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

// How a stream is cut: ChooseChunkTokens' chunks, or, where those are more than twice as long as
// a window and `windows` allows them (an engine whose backend computes shares), windows of the
// larger of min_chunk_tokens and the longest segment (clipped to seq_len), which need no common
// multiple of the segment lengths.
struct StreamChunking {
  int64_t chunk_tokens = 0;
  bool windowed = false;
};
StreamChunking ChooseStreamChunking(const engine::AttentionSpec& spec, int64_t seq_len,
                                    int64_t min_chunk_tokens, bool windows = true);

// The input slots a stream of `layout` holds for a pipeline depth: the depth, and two more for
// windows (the chunks before and after the one taken).
int InputSlots(const StreamLayout& layout, int pipeline_depth);

// The most bytes of K and V rows one window gathers (0 for chunks that are problems of their
// own): per pattern, both ends' crossing segments' kept rows for every (kv head, offset) its
// query heads read.
int64_t GatheredBytesBound(const StreamLayout& layout);

// The layout of a validated stream problem (its shape checked by engine::ValidateShape). Each
// chunk is one engine run and, like a unary request, must fit max_request_bytes (q, k, v and
// output; 0: unlimited): RESOURCE_EXHAUSTED naming the chunk otherwise.
absl::StatusOr<StreamLayout> MakeStreamLayout(const engine::ProblemShape& shape,
                                              engine::DType dtype, engine::DType out_dtype,
                                              const engine::AttentionSpec& spec,
                                              int64_t min_chunk_tokens, int64_t max_request_bytes,
                                              bool windows = true);

class StreamAssembler {
 public:
  // slots: how many chunks may be computing or waiting to (the pipeline depth), >= 1; the ring
  // has InputSlots(layout, slots). Errors:
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
  // returns how many it took: 0 when every slot is full (call again after ReleaseChunk; windows:
  // and after the next TakeReadyChunk).
  int64_t Fill(const BlockView& block, int64_t taken);

  // The next chunk whose tokens have all arrived and that has not been taken yet, in order (a
  // window: once the segments holding its last token have arrived, its crossing rows gathered).
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
  // Windows: the token up to which chunk `index`'s segments reach (its inputs' end), and its
  // share with its crossing rows gathered from the slots.
  int64_t WindowInputEnd(int64_t index) const;
  void TakeWindow(Chunk& chunk);
  // Frees, in order, the slots no chunk will read again.
  void FreeSlots();

  // A taken window's share and gathered rows (engine::ShareOfRequest points into it).
  struct Window {
    engine::ShareOfRequest share_of;
    std::vector<engine::SpanningKeys> sets;
    std::vector<engine::GatheredKeys> gathered;
    std::unique_ptr<char[]> rows;  // Each set's K then V rows, [batch, kept count, head_dim].
  };

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
  int64_t freed_ = 0;            // Chunks [0, freed_) left their slots (windows: read no more).
  std::deque<Window> windows_;   // Taken, not yet released, in order.
};

}  // namespace da::server
