#include "server/stream_assembler.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <utility>

#include "absl/numeric/int128.h"
#include "absl/strings/str_format.h"
#include "engine/dilation.h"
#include "engine/shard_plan.h"
#include "engine/status_macros.h"

namespace da::server {
namespace {

constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();

// a * b, or -1 when it would overflow (both non-negative).
int64_t CheckedMul(int64_t a, int64_t b) {
  if (a != 0 && b > kMaxInt64 / a) return -1;
  return a * b;
}

}  // namespace

int64_t ChooseChunkTokens(const engine::AttentionSpec& spec, int64_t seq_len,
                          int64_t min_chunk_tokens) {
  if (seq_len < 1) return seq_len;
  int64_t period = 1;  // The least common multiple of the segment lengths so far.
  for (const engine::Pattern& pattern : spec.patterns) {
    const int64_t w = std::max<int64_t>(1, pattern.segment_len);
    const int64_t step = period / std::gcd(period, w);
    if (step > seq_len / w) return seq_len;  // The period reaches seq_len: one chunk.
    period = step * w;
  }
  const int64_t factor = std::max<int64_t>(1, (min_chunk_tokens + period - 1) / period);
  if (factor > seq_len / period) return seq_len;
  return std::min(seq_len, factor * period);
}

StreamChunking ChooseStreamChunking(const engine::AttentionSpec& spec, int64_t seq_len,
                                    int64_t min_chunk_tokens, bool windows) {
  const int64_t chunk = ChooseChunkTokens(spec, seq_len, min_chunk_tokens);
  if (!windows) return {chunk, false};
  int64_t longest = 1;
  for (const engine::Pattern& pattern : spec.patterns) {
    longest = std::max(longest, std::min(pattern.segment_len, seq_len));
  }
  // A window holds its longest segment whole, so that it reads only the chunks beside it.
  const int64_t window = std::min(seq_len, std::max(longest, min_chunk_tokens));
  if (chunk / 2 > window) return {window, true};
  return {chunk, false};
}

int InputSlots(const StreamLayout& layout, int pipeline_depth) {
  return layout.windowed ? pipeline_depth + 2 : pipeline_depth;
}

int64_t GatheredBytesBound(const StreamLayout& layout) {
  if (!layout.windowed) return 0;
  const std::vector<std::set<std::pair<int64_t, int64_t>>> pairs =
      engine::KvHeadOffsets(layout.shape, layout.spec, 0, layout.shape.heads);
  // Saturating at the int64 range: the caller's budget check refuses it then.
  absl::int128 bytes = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const engine::Pattern& pattern = layout.spec.patterns[i];
    const int64_t dilation = std::max<int64_t>(1, pattern.dilation);
    const int64_t kept = (pattern.segment_len + dilation - 1) / dilation;
    // Both ends, K and V.
    bytes += absl::int128(4) * static_cast<int64_t>(pairs[i].size()) * kept * layout.batch *
             layout.head_bytes;
  }
  return bytes > kMaxInt64 ? kMaxInt64 : static_cast<int64_t>(bytes);
}

void ByteSpans::Append(std::string_view piece) {
  if (piece.empty()) return;
  pieces_.push_back(piece);
  starts_.push_back(size_);
  size_ += static_cast<int64_t>(piece.size());
}

void ByteSpans::CopyTo(int64_t offset, int64_t n, char* dst) const {
  DA_CHECK(offset >= 0 && n >= 0 && offset + n <= size_);
  // The piece holding offset: the last one starting at or before it.
  size_t i = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), offset) -
                                 starts_.begin());
  i = i == 0 ? 0 : i - 1;
  while (n > 0) {
    const std::string_view piece = pieces_[i];
    const int64_t within = offset - starts_[i];
    const int64_t take = std::min<int64_t>(n, static_cast<int64_t>(piece.size()) - within);
    std::memcpy(dst, piece.data() + within, static_cast<size_t>(take));
    dst += take;
    offset += take;
    n -= take;
    ++i;
  }
}

absl::StatusOr<StreamLayout> MakeStreamLayout(const engine::ProblemShape& shape,
                                              engine::DType dtype, engine::DType out_dtype,
                                              const engine::AttentionSpec& spec,
                                              int64_t min_chunk_tokens, int64_t max_request_bytes,
                                              bool windows) {
  StreamLayout layout;
  layout.batch = shape.batch;
  layout.seq_len = shape.seq_len;
  layout.q_row_bytes = shape.heads * shape.head_dim * engine::DTypeSize(dtype);
  layout.kv_row_bytes = shape.kv_heads * shape.head_dim * engine::DTypeSize(dtype);
  layout.out_row_bytes = shape.heads * shape.head_dim * engine::DTypeSize(out_dtype);
  const StreamChunking chunking =
      ChooseStreamChunking(spec, shape.seq_len, min_chunk_tokens, windows);
  layout.chunk_tokens = chunking.chunk_tokens;
  if (chunking.windowed) {
    layout.windowed = true;
    layout.shape = shape;
    layout.spec = spec;
    layout.head_bytes = shape.head_dim * engine::DTypeSize(dtype);
  }
  // Validated shapes fit the engine's limits, but compute without trusting that.
  const int64_t rows = CheckedMul(layout.chunk_tokens, layout.batch);
  const int64_t chunk_bytes =
      CheckedMul(rows, layout.q_row_bytes + 2 * layout.kv_row_bytes + layout.out_row_bytes);
  if (rows < 0 || chunk_bytes < 0 || (max_request_bytes > 0 && chunk_bytes > max_request_bytes)) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "a stream chunk of %d tokens (%s) needs %d bytes for query, key, value and output; limit "
        "is %d (--max-request-bytes)",
        layout.chunk_tokens,
        layout.windowed ? "a window at least as long as the longest segment"
                        : "a multiple of every segment length",
        chunk_bytes < 0 ? std::numeric_limits<int64_t>::max() : chunk_bytes, max_request_bytes));
  }
  return layout;
}

absl::StatusOr<std::unique_ptr<StreamAssembler>> StreamAssembler::Create(const StreamLayout& layout,
                                                                         int slots,
                                                                         HostBufferPool* pool) {
  const std::pair<const char*, int64_t> positive[] = {{"batch", layout.batch},
                                                      {"seq_len", layout.seq_len},
                                                      {"q_row_bytes", layout.q_row_bytes},
                                                      {"kv_row_bytes", layout.kv_row_bytes},
                                                      {"chunk_tokens", layout.chunk_tokens}};
  for (const auto& [name, value] : positive) {
    if (value < 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("stream layout: %s is %d; must be >= 1", name, value));
    }
  }
  if (slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("stream layout: slots is %d; must be >= 1", slots));
  }
  if (layout.windowed) {
    // What TakeWindow relies on: rows laid out as the shape says, and windows at least as long
    // as every segment (clipped to the sequence), so that a window reads only its neighbours.
    bool whole = layout.head_bytes >= 1 && layout.shape.seq_len == layout.seq_len &&
                 layout.shape.batch == layout.batch &&
                 layout.kv_row_bytes == layout.shape.kv_heads * layout.head_bytes &&
                 layout.q_row_bytes == layout.shape.heads * layout.head_bytes &&
                 !layout.spec.patterns.empty();
    for (const engine::Pattern& pattern : layout.spec.patterns) {
      whole = whole && pattern.segment_len >= 1 &&
              layout.chunk_tokens >= std::min(pattern.segment_len, layout.seq_len);
    }
    if (!whole) {
      return absl::InvalidArgumentError(
          "stream layout: a windowed layout needs its whole shape, rows of its heads and windows "
          "at least as long as every segment");
    }
  }
  slots = InputSlots(layout, slots);
  auto assembler = std::unique_ptr<StreamAssembler>(new StreamAssembler(layout, slots));
  const int64_t tokens = CheckedMul(layout.chunk_tokens, layout.batch);
  const int64_t row_bytes = layout.q_row_bytes + 2 * layout.kv_row_bytes;
  const int64_t slot_bytes = CheckedMul(tokens, row_bytes);
  const int64_t total = CheckedMul(slot_bytes, slots);
  if (tokens < 0 || slot_bytes < 0 || total < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("stream layout: %d slots of %d tokens x batch %d x %d bytes overflow int64",
                        slots, layout.chunk_tokens, layout.batch, row_bytes));
  }
  assembler->slot_q_bytes_ = tokens * layout.q_row_bytes;
  assembler->slot_kv_bytes_ = tokens * layout.kv_row_bytes;
  assembler->buffer_bytes_ = total;
  if (pool != nullptr) {
    assembler->buffer_ = pool->Take(total);
  } else if (HostBuffer fresh = AllocateHostBuffer(total)) {
    assembler->buffer_ = PooledBuffer(std::move(fresh), total, nullptr);
  }
  if (!assembler->buffer_) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("cannot allocate %d bytes for %d stream chunks of %d tokens", total, slots,
                        layout.chunk_tokens));
  }
  return assembler;
}

StreamAssembler::StreamAssembler(const StreamLayout& layout, int slots)
    : layout_(layout), slots_(slots) {}

int64_t StreamAssembler::ChunkCount(int64_t index) const {
  return std::min(layout_.chunk_tokens, layout_.seq_len - ChunkStart(index));
}

Chunk StreamAssembler::ChunkAt(int64_t index) const {
  char* slot = buffer_.get() + (index % slots_) * (slot_q_bytes_ + 2 * slot_kv_bytes_);
  Chunk chunk;
  chunk.index = index;
  chunk.token_start = ChunkStart(index);
  chunk.token_count = ChunkCount(index);
  chunk.q = slot;
  chunk.k = slot + slot_q_bytes_;
  chunk.v = slot + slot_q_bytes_ + slot_kv_bytes_;
  return chunk;
}

absl::Status StreamAssembler::CheckBlock(const BlockView& block) {
  const int64_t index = blocks_received_;
  const int64_t start = block.token_start;
  const int64_t count = block.token_count;
  // Without signed overflow: the numbers come straight from the client.
  const int64_t end =
      static_cast<int64_t>(static_cast<uint64_t>(start) + static_cast<uint64_t>(count));
  const std::string where = absl::StrFormat("block %d (tokens [%d, %d))", index, start, end);
  DA_CHECK(tokens_received_ == block_end_);  // The previous block was filled completely.
  if (count < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: token_count is %d; must be >= 1", where, count));
  }
  if (start < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: token_start is %d; must be >= 0", where, start));
  }
  if (start < tokens_received_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s overlaps tokens already received: expected token_start %d (blocks must be contiguous "
        "and in order)",
        where, tokens_received_));
  }
  if (start > tokens_received_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is out of order: tokens [%d, %d) are missing before it (blocks must be contiguous and "
        "in order)",
        where, tokens_received_, start));
  }
  if (count > layout_.seq_len - start) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s extends past seq_len %d", where, layout_.seq_len));
  }
  // count <= seq_len here, and seq_len * batch * row bytes fit (Create checked a chunk; the
  // server's limits bound the request), but compute the sizes without trusting that.
  const int64_t rows = CheckedMul(count, layout_.batch);
  const int64_t expected_q = CheckedMul(rows, layout_.q_row_bytes);
  const int64_t expected_kv = CheckedMul(rows, layout_.kv_row_bytes);
  const std::pair<const char*, std::pair<int64_t, int64_t>> sizes[] = {
      {"query", {block.q.size(), expected_q}},
      {"key", {block.k.size(), expected_kv}},
      {"value", {block.v.size(), expected_kv}}};
  for (const auto& [field, size] : sizes) {
    if (size.first != size.second) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: %s has %d bytes; expected %d (batch x token_count x heads x head_dim x dtype size)",
          where, field, size.first, size.second));
    }
  }
  block_end_ = end;
  ++blocks_received_;
  return absl::OkStatus();
}

int64_t StreamAssembler::Fill(const BlockView& block, int64_t taken) {
  DA_CHECK(block.token_start + taken == tokens_received_);  // In step with the stream.
  const int64_t chunk_tokens = layout_.chunk_tokens;
  const int64_t batch = layout_.batch;
  const int64_t q_row = layout_.q_row_bytes;
  const int64_t kv_row = layout_.kv_row_bytes;
  const int64_t block_count = block.token_count;
  int64_t took = 0;
  while (tokens_received_ < block_end_) {
    const int64_t index = tokens_received_ / chunk_tokens;
    if (index >= freed_ + slots_) break;  // Every slot holds a chunk not yet freed.
    const Chunk chunk = ChunkAt(index);
    const int64_t first = tokens_received_;
    const int64_t last = std::min(block_end_, chunk.token_start + chunk.token_count);
    const int64_t n = last - first;
    const int64_t in_block = first - block.token_start;  // Token offset within the block.
    const int64_t in_chunk = first - chunk.token_start;  // Token offset within the chunk.
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t src_row = b * block_count + in_block;
      const int64_t dst_row = b * chunk.token_count + in_chunk;
      block.q.CopyTo(src_row * q_row, n * q_row, chunk.q + dst_row * q_row);
      block.k.CopyTo(src_row * kv_row, n * kv_row, chunk.k + dst_row * kv_row);
      block.v.CopyTo(src_row * kv_row, n * kv_row, chunk.v + dst_row * kv_row);
    }
    tokens_received_ += n;
    took += n;
  }
  return took;
}

std::optional<Chunk> StreamAssembler::TakeReadyChunk() {
  if (next_take_ >= layout_.chunk_count()) return std::nullopt;
  const int64_t end = layout_.windowed ? WindowInputEnd(next_take_)
                                       : ChunkStart(next_take_) + ChunkCount(next_take_);
  if (tokens_received_ < end) return std::nullopt;
  Chunk chunk = ChunkAt(next_take_);
  if (layout_.windowed) TakeWindow(chunk);
  ++next_take_;
  FreeSlots();
  return chunk;
}

void StreamAssembler::ReleaseChunk(int64_t index) {
  DA_CHECK(index == released_);  // Chunks are released in order,
  DA_CHECK(index < next_take_);  // after they were taken.
  ++released_;
  if (layout_.windowed) windows_.pop_front();
  FreeSlots();
}

void StreamAssembler::FreeSlots() {
  if (!layout_.windowed) {
    freed_ = released_;
    return;
  }
  // A window reads the tail of the chunk before it: a chunk's slot is free once the chunk is
  // released and the next one taken (or it is the last).
  while (freed_ < released_ && (freed_ + 1 < next_take_ || freed_ + 1 >= layout_.chunk_count())) {
    ++freed_;
  }
}

int64_t StreamAssembler::WindowInputEnd(int64_t index) const {
  const int64_t end = ChunkStart(index) + ChunkCount(index);
  // With causal attention a window reads no key after its last token: it waits for nothing more.
  if (end == layout_.seq_len || layout_.spec.causal) return end;
  int64_t reach = end;
  for (const engine::Pattern& pattern : layout_.spec.patterns) {
    const int64_t w = pattern.segment_len;
    reach = std::max(reach, std::min(layout_.seq_len, (end + w - 1) / w * w));
  }
  return reach;
}

void StreamAssembler::TakeWindow(Chunk& chunk) {
  const engine::ProblemShape& shape = layout_.shape;
  Window& window = windows_.emplace_back();
  engine::Share& share = window.share_of.share;
  share.token_begin = chunk.token_start;
  share.token_end = chunk.token_start + chunk.token_count;
  share.head_end = shape.heads;
  share.kv_head_end = shape.kv_heads;
  window.sets = engine::SpanningKeySetsOf(shape, layout_.spec, share);
  int64_t bytes = 0;
  for (const engine::SpanningKeys& set : window.sets) {
    bytes += 2 * layout_.batch * set.kept.count * layout_.head_bytes;
  }
  window.rows.reset(new char[static_cast<size_t>(bytes)]);  // Every byte is written below.
  const int64_t head = layout_.head_bytes;
  const int64_t kv_row = layout_.kv_row_bytes;
  char* write = window.rows.get();
  for (const engine::SpanningKeys& set : window.sets) {
    engine::GatheredKeys& gathered = window.gathered.emplace_back();
    char* k = write;
    char* v = write + layout_.batch * set.kept.count * head;
    gathered.k = k;
    gathered.v = v;
    write = v + layout_.batch * set.kept.count * head;
    // Causal: the rows after the window's last token are never read (nor arrived, perhaps).
    const int64_t read = layout_.spec.causal
                             ? engine::KeptRowsIn(set.kept, 0, share.token_end).second
                             : set.kept.count;
    for (int64_t b = 0; b < layout_.batch && read < set.kept.count; ++b) {
      const int64_t unread = (b * set.kept.count + read) * head;
      const size_t bytes = static_cast<size_t>((set.kept.count - read) * head);
      std::memset(k + unread, 0, bytes);
      std::memset(v + unread, 0, bytes);
    }
    for (int64_t r = 0; r < read; ++r) {
      const int64_t position = set.kept.first + r * set.kept.stride;
      const int64_t index = position / layout_.chunk_tokens;
      // Every row a window reads is in a slot still held: the chunk before, its own, the next.
      DA_CHECK(index >= freed_ && index < freed_ + slots_ && position < tokens_received_);
      const Chunk from = ChunkAt(index);
      const int64_t within = position - from.token_start;
      for (int64_t b = 0; b < layout_.batch; ++b) {
        const int64_t source = (b * from.token_count + within) * kv_row + set.kv_head * head;
        const int64_t target = (b * set.kept.count + r) * head;
        std::memcpy(k + target, from.k + source, static_cast<size_t>(head));
        std::memcpy(v + target, from.v + source, static_cast<size_t>(head));
      }
    }
  }
  window.share_of.whole = shape;
  window.share_of.spanning = &window.sets;
  window.share_of.gathered = &window.gathered;
  chunk.share_of = &window.share_of;
}

absl::Status StreamAssembler::CheckComplete() const {
  if (tokens_received_ == layout_.seq_len) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("the stream ended after %d blocks with tokens [%d, %d) missing (seq_len %d)",
                      blocks_received_, tokens_received_, layout_.seq_len, layout_.seq_len));
}

}  // namespace da::server
