// libFuzzer target: StreamAssembler (server/stream_assembler.h) under a hostile stream.
//
// The input drives a FuzzedDataProvider: a small layout (sometimes a malformed or overflowing
// one), then a sequence of operations: send a block (the next one, or one out of order,
// overlapping, past seq_len, empty, or with wrong byte counts), take a ready chunk, release the
// oldest taken chunk, check completeness. The target keeps its own copy of every byte the
// assembler accepted and checks:
//   - CheckBlock accepts exactly the blocks a correct stream may send next; a refusal is
//     INVALID_ARGUMENT and its message names the block;
//   - Fill never holds more tokens than slots * chunk_tokens beyond the last released chunk, and
//     takes nothing only when every slot is full;
//   - every chunk comes in order, with the right tokens, and its bytes equal what was sent for
//     them, both when taken and when released (so no later block overwrote a held slot);
//   - counters and CheckComplete agree with what was sent.
// Some inputs make a layout of windows instead (MakeStreamLayout of a fuzzed spec whose segment
// lengths have no common chunk within reach): a window is due once the segments holding its
// last token have arrived, the ring has two slots more, a slot is freed only once the next
// window is taken, and every gathered K/V row equals the row sent at its kept position.
// A violation aborts; ASan/UBSan catch out-of-bounds copies and overflow.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/stream_assembler.h"

namespace da::server {
namespace {

constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();
constexpr int kMaxOperations = 512;

#define FUZZ_CHECK(condition)                                                                     \
  do {                                                                                            \
    if (!(condition)) {                                                                           \
      std::fprintf(stderr, "fuzz_stream_assembly: %s:%d: check failed: %s\n", __FILE__, __LINE__, \
                   #condition);                                                                   \
      std::abort();                                                                               \
    }                                                                                             \
  } while (0)

// One stream under test and everything the sender knows about it.
class StreamModel {
 public:
  StreamModel(const StreamLayout& layout, int slots, std::unique_ptr<StreamAssembler> assembler)
      : layout_(layout),
        slots_(layout.windowed ? slots + 2 : slots),
        assembler_(std::move(assembler)),
        sent_q_(Bytes(layout.q_row_bytes)),
        sent_k_(Bytes(layout.kv_row_bytes)),
        sent_v_(Bytes(layout.kv_row_bytes)) {
    FUZZ_CHECK(assembler_->slots() == slots_);
    FUZZ_CHECK(assembler_->buffer_bytes() == slots_ * layout.chunk_tokens * layout.batch *
                                                 (layout.q_row_bytes + 2 * layout.kv_row_bytes));
  }

  void Run(FuzzedDataProvider& fdp) {
    for (int op = 0; op < kMaxOperations && fdp.remaining_bytes() > 0; ++op) {
      switch (fdp.ConsumeIntegralInRange<int>(0, 5)) {
        case 0:
        case 1:
          SendBlock(fdp);
          break;
        case 2:
          TakeReady();
          break;
        case 3:
          ReleaseOldest();
          break;
        case 4:
          CheckComplete();
          break;
        case 5:
          // Drain: what a server does between reads.
          while (TakeReady()) {
          }
          while (!taken_.empty()) ReleaseOldest();
          break;
      }
    }
    CheckComplete();
    for (const Chunk& chunk : taken_) CheckChunkBytes(chunk);
  }

 private:
  std::vector<char> Bytes(int64_t row_bytes) const {
    return std::vector<char>(static_cast<size_t>(layout_.batch * layout_.seq_len * row_bytes));
  }

  int64_t ChunkCount() const {
    return (layout_.seq_len + layout_.chunk_tokens - 1) / layout_.chunk_tokens;
  }
  int64_t ChunkEnd(int64_t index) const {
    return std::min(layout_.seq_len, (index + 1) * layout_.chunk_tokens);
  }
  // The tokens a chunk needs before it is due: its own, and a window's segments' to their ends.
  int64_t DueAt(int64_t index) const {
    const int64_t end = ChunkEnd(index);
    // Causal windows read no key after their last token.
    if (!layout_.windowed || end == layout_.seq_len || layout_.spec.causal) return end;
    int64_t reach = end;
    for (const engine::Pattern& pattern : layout_.spec.patterns) {
      const int64_t w = pattern.segment_len;
      reach = std::max(reach, std::min(layout_.seq_len, (end + w - 1) / w * w));
    }
    return reach;
  }
  // Chunks whose slots are free: released, and (windows) the next one taken.
  int64_t Freed() const {
    if (!layout_.windowed) return released_;
    int64_t freed = released_;
    if (freed > 0 && freed >= next_take_ && freed < ChunkCount()) --freed;
    return freed;
  }

  // Block bytes [batch, count, row], different for every block sent so that a byte the
  // assembler takes from the wrong block or the wrong offset shows.
  std::string BlockBytes(int64_t size) {
    std::string bytes(static_cast<size_t>(size), '\0');
    for (char& c : bytes) {
      uint64_t z = (salt_ += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      c = static_cast<char>(z >> 56);
    }
    return bytes;
  }

  // A byte count: usually right, sometimes off by a little or wildly.
  static int64_t MaybeWrongSize(FuzzedDataProvider& fdp, int64_t right) {
    switch (fdp.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:
        return right + 1;
      case 1:
        return std::max<int64_t>(0, right - 1);
      case 2:
        return fdp.ConsumeIntegralInRange<int64_t>(0, 64);
      default:
        return right;
    }
  }

  void SendBlock(FuzzedDataProvider& fdp) {
    const int64_t next = tokens_;
    const int64_t left = layout_.seq_len - next;
    BlockView block;
    switch (fdp.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:  // Anywhere, any length, including negative and huge numbers.
        block.token_start = fdp.ConsumeIntegral<int64_t>();
        block.token_count = fdp.ConsumeIntegral<int64_t>();
        break;
      case 1:  // Overlapping or leaving a gap.
        block.token_start = next + fdp.ConsumeIntegralInRange<int64_t>(-8, 8);
        block.token_count = fdp.ConsumeIntegralInRange<int64_t>(1, 16);
        break;
      case 2:  // Past seq_len.
        block.token_start = next;
        block.token_count = left + fdp.ConsumeIntegralInRange<int64_t>(0, 4);
        break;
      default:  // The next block, of a fuzzed length.
        block.token_start = next;
        block.token_count = fdp.ConsumeIntegralInRange<int64_t>(0, std::max<int64_t>(left, 1));
        break;
    }
    const bool placed =
        block.token_count >= 1 && block.token_start == next && block.token_count <= left;
    // Bytes only where the count is sane: a block claiming 2^62 tokens carries a few bytes.
    const int64_t rows = placed ? block.token_count * layout_.batch : 1;
    const int64_t q_size = MaybeWrongSize(fdp, rows * layout_.q_row_bytes);
    const int64_t k_size = MaybeWrongSize(fdp, rows * layout_.kv_row_bytes);
    const int64_t v_size = MaybeWrongSize(fdp, rows * layout_.kv_row_bytes);
    const std::string q = BlockBytes(q_size), k = BlockBytes(k_size), v = BlockBytes(v_size);
    // In pieces, as gRPC's slices hold a received message.
    block.q = Split(fdp, q);
    block.k = Split(fdp, k);
    block.v = Split(fdp, v);
    const bool valid = placed && q_size == rows * layout_.q_row_bytes &&
                       k_size == rows * layout_.kv_row_bytes &&
                       v_size == rows * layout_.kv_row_bytes;

    const absl::Status status = assembler_->CheckBlock(block);
    if (!valid) {
      FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument);
      FUZZ_CHECK(status.message().find("block") != std::string::npos);
      FUZZ_CHECK(assembler_->tokens_received() == tokens_);
      FUZZ_CHECK(assembler_->blocks_received() == blocks_);
      return;
    }
    FUZZ_CHECK(status.ok());
    ++blocks_;
    Record(block);
    // Fill until the whole block is in, making room the way a server does when Fill stalls.
    int64_t taken = 0;
    while (taken < block.token_count) {
      if (fdp.ConsumeBool()) TakeReady();
      if (fdp.ConsumeBool()) ReleaseOldest();
      const int64_t n = assembler_->Fill(block, taken);
      FUZZ_CHECK(n >= 0 && n <= block.token_count - taken);
      tokens_ += n;
      taken += n;
      FUZZ_CHECK(assembler_->tokens_received() == tokens_);
      // Never more than the slots hold beyond the last freed chunk.
      FUZZ_CHECK(tokens_ <= (Freed() + slots_) * layout_.chunk_tokens);
      if (n == 0) {
        // Only a full ring may refuse: the next token belongs to the chunk after the window.
        FUZZ_CHECK(tokens_ == (Freed() + slots_) * layout_.chunk_tokens);
        if (taken_.empty()) {
          const bool took_one = TakeReady();
          FUZZ_CHECK(took_one);  // A full ring holds a ready chunk.
        }
        ReleaseOldest();
      }
    }
  }

  // bytes cut into up to a few pieces of fuzzed lengths.
  static ByteSpans Split(FuzzedDataProvider& fdp, const std::string& bytes) {
    ByteSpans spans;
    size_t at = 0;
    for (int piece = 0; at < bytes.size(); ++piece) {
      const size_t left = bytes.size() - at;
      const size_t n = piece == 3 ? left : fdp.ConsumeIntegralInRange<size_t>(1, left);
      spans.Append(std::string_view(bytes).substr(at, n));
      at += n;
    }
    FUZZ_CHECK(spans.size() == static_cast<int64_t>(bytes.size()));
    return spans;
  }

  // The sender's copy of an accepted block.
  void Record(const BlockView& block) {
    const std::pair<const ByteSpans*, std::pair<std::vector<char>*, int64_t>> tensors[] = {
        {&block.q, {&sent_q_, layout_.q_row_bytes}},
        {&block.k, {&sent_k_, layout_.kv_row_bytes}},
        {&block.v, {&sent_v_, layout_.kv_row_bytes}}};
    for (const auto& [bytes, target] : tensors) {
      const auto [sent, row] = target;
      for (int64_t b = 0; b < layout_.batch; ++b) {
        bytes->CopyTo(b * block.token_count * row, block.token_count * row,
                      sent->data() + (b * layout_.seq_len + block.token_start) * row);
      }
    }
  }

  // Takes the next ready chunk if there is one; checks it is the one due.
  bool TakeReady() {
    const std::optional<Chunk> chunk = assembler_->TakeReadyChunk();
    const bool due = next_take_ < ChunkCount() && tokens_ >= DueAt(next_take_);
    FUZZ_CHECK(chunk.has_value() == due);
    if (!chunk) return false;
    FUZZ_CHECK(chunk->index == next_take_);
    FUZZ_CHECK(chunk->token_start == next_take_ * layout_.chunk_tokens);
    FUZZ_CHECK(chunk->token_count == ChunkEnd(next_take_) - chunk->token_start);
    CheckChunkBytes(*chunk);
    FUZZ_CHECK((chunk->share_of != nullptr) == layout_.windowed);
    if (layout_.windowed) CheckGathered(*chunk);
    taken_.push_back(*chunk);
    ++next_take_;
    return true;
  }

  void ReleaseOldest() {
    if (taken_.empty()) return;
    // Still intact: nothing sent since it was taken may have landed in its slot.
    CheckChunkBytes(taken_.front());
    assembler_->ReleaseChunk(taken_.front().index);
    taken_.pop_front();
    ++released_;
  }

  void CheckChunkBytes(const Chunk& chunk) const {
    const std::pair<const char*, std::pair<const std::vector<char>*, int64_t>> tensors[] = {
        {chunk.q, {&sent_q_, layout_.q_row_bytes}},
        {chunk.k, {&sent_k_, layout_.kv_row_bytes}},
        {chunk.v, {&sent_v_, layout_.kv_row_bytes}}};
    for (const auto& [held, source] : tensors) {
      const auto [sent, row] = source;
      for (int64_t b = 0; b < layout_.batch; ++b) {
        const char* want = sent->data() + (b * layout_.seq_len + chunk.token_start) * row;
        const char* got = held + b * chunk.token_count * row;
        FUZZ_CHECK(std::equal(got, got + chunk.token_count * row, want));
      }
    }
  }

  // A window's share is its tokens, and each gathered row is the row sent at its kept position.
  void CheckGathered(const Chunk& chunk) const {
    const engine::ShareOfRequest& of = *chunk.share_of;
    FUZZ_CHECK(of.share.token_begin == chunk.token_start);
    FUZZ_CHECK(of.share.token_end == chunk.token_start + chunk.token_count);
    FUZZ_CHECK(of.spanning != nullptr && of.gathered != nullptr);
    FUZZ_CHECK(of.spanning->size() == of.gathered->size());
    int64_t gathered = 0;
    for (const engine::SpanningKeys& set : *of.spanning) {
      gathered += 2 * layout_.batch * set.kept.count * layout_.head_bytes;
    }
    FUZZ_CHECK(gathered <= GatheredBytesBound(layout_));  // What the stream's window reserved.
    const int64_t head = layout_.head_bytes;
    const int64_t row = layout_.kv_row_bytes;
    for (size_t i = 0; i < of.spanning->size(); ++i) {
      const engine::SpanningKeys& set = (*of.spanning)[i];
      const engine::GatheredKeys& rows = (*of.gathered)[i];
      for (int64_t r = 0; r < set.kept.count; ++r) {
        const int64_t position = set.kept.first + r * set.kept.stride;
        if (layout_.spec.causal && position >= of.share.token_end) break;  // Never read.
        FUZZ_CHECK(position >= 0 && position < tokens_);
        for (int64_t b = 0; b < layout_.batch; ++b) {
          const int64_t at = (b * layout_.seq_len + position) * row + set.kv_head * head;
          const int64_t got = (b * set.kept.count + r) * head;
          FUZZ_CHECK(std::equal(sent_k_.data() + at, sent_k_.data() + at + head,
                                static_cast<const char*>(rows.k) + got));
          FUZZ_CHECK(std::equal(sent_v_.data() + at, sent_v_.data() + at + head,
                                static_cast<const char*>(rows.v) + got));
        }
      }
    }
  }

  void CheckComplete() const {
    const absl::Status status = assembler_->CheckComplete();
    FUZZ_CHECK(status.ok() == (tokens_ == layout_.seq_len));
    if (!status.ok()) FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  }

  const StreamLayout layout_;
  const int slots_;
  std::unique_ptr<StreamAssembler> assembler_;
  std::vector<char> sent_q_, sent_k_, sent_v_;  // [batch, seq_len, row] as accepted.
  uint64_t salt_ = 1;
  int64_t tokens_ = 0;     // Tokens filled in.
  int64_t blocks_ = 0;     // Blocks accepted.
  int64_t next_take_ = 0;  // Chunks [0, next_take_) were taken.
  int64_t released_ = 0;   // Chunks [0, released_) were released.
  std::deque<Chunk> taken_;
};

// A malformed or overflowing layout must be refused up front with INVALID_ARGUMENT.
void FuzzBadLayout(FuzzedDataProvider& fdp) {
  StreamLayout layout{
      .batch = 1, .seq_len = 64, .q_row_bytes = 8, .kv_row_bytes = 8, .chunk_tokens = 16};
  int slots = 2;
  const bool overflow = fdp.ConsumeBool();
  if (overflow) {
    // Each factor alone is plausible; the product of a slot's bytes overflows int64.
    layout.chunk_tokens = fdp.ConsumeIntegralInRange<int64_t>(int64_t{1} << 32, kMaxInt64);
    layout.batch = fdp.ConsumeIntegralInRange<int64_t>(int64_t{1} << 32, kMaxInt64);
  } else {
    const int64_t bad = fdp.ConsumeIntegralInRange<int64_t>(std::numeric_limits<int64_t>::min(), 0);
    switch (fdp.ConsumeIntegralInRange<int>(0, 5)) {
      case 0:
        layout.batch = bad;
        break;
      case 1:
        layout.seq_len = bad;
        break;
      case 2:
        layout.q_row_bytes = bad;
        break;
      case 3:
        layout.kv_row_bytes = bad;
        break;
      case 4:
        layout.chunk_tokens = bad;
        break;
      case 5:
        slots = static_cast<int>(std::max<int64_t>(bad, std::numeric_limits<int>::min()));
        break;
    }
  }
  const auto made = StreamAssembler::Create(layout, slots);
  FUZZ_CHECK(!made.ok());
  FUZZ_CHECK(made.status().code() == absl::StatusCode::kInvalidArgument);
  FUZZ_CHECK(!made.status().message().empty());
}

}  // namespace
}  // namespace da::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using da::server::StreamLayout;
  FuzzedDataProvider fdp(data, size);
  if (fdp.ConsumeIntegralInRange<int>(0, 15) == 0) {
    da::server::FuzzBadLayout(fdp);
    return 0;
  }
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) {
    // Windows: segment lengths drawn until they have no common chunk within reach.
    da::engine::AttentionSpec spec;
    const int patterns = fdp.ConsumeIntegralInRange<int>(1, 3);
    for (int i = 0; i < patterns; ++i) {
      const int64_t w = fdp.ConsumeIntegralInRange<int64_t>(1, 40);
      spec.patterns.push_back({w, fdp.ConsumeIntegralInRange<int64_t>(1, w)});
    }
    spec.mode =
        fdp.ConsumeBool() ? da::engine::CombineMode::kLongNet : da::engine::CombineMode::kGrouped;
    spec.causal = fdp.ConsumeBool();
    const int64_t kv_heads = fdp.ConsumeIntegralInRange<int64_t>(1, 2);
    const da::engine::ProblemShape shape{fdp.ConsumeIntegralInRange<int64_t>(1, 2),
                                         fdp.ConsumeIntegralInRange<int64_t>(1, 300),
                                         kv_heads * fdp.ConsumeIntegralInRange<int64_t>(1, 3),
                                         kv_heads, fdp.ConsumeIntegralInRange<int64_t>(1, 2)};
    const int64_t min_chunk = fdp.ConsumeIntegralInRange<int64_t>(1, 48);
    const absl::StatusOr<StreamLayout> windows = da::server::MakeStreamLayout(
        shape, da::engine::DType::kFloat32, da::engine::DType::kFloat32, spec, min_chunk, 0);
    FUZZ_CHECK(windows.ok());
    if (!windows->windowed) return 0;
    const int slots = fdp.ConsumeIntegralInRange<int>(1, 3);
    auto made = da::server::StreamAssembler::Create(*windows, slots);
    FUZZ_CHECK(made.ok());
    da::server::StreamModel model(*windows, slots, *std::move(made));
    model.Run(fdp);
    return 0;
  }
  // Small enough that an input runs in microseconds, large enough for several chunks per slot.
  StreamLayout layout;
  layout.batch = fdp.ConsumeIntegralInRange<int64_t>(1, 3);
  layout.seq_len = fdp.ConsumeIntegralInRange<int64_t>(1, 300);
  layout.q_row_bytes = fdp.ConsumeIntegralInRange<int64_t>(1, 24);
  layout.kv_row_bytes = fdp.ConsumeIntegralInRange<int64_t>(1, 24);
  layout.chunk_tokens = fdp.ConsumeIntegralInRange<int64_t>(1, 64);
  const int slots = fdp.ConsumeIntegralInRange<int>(1, 4);
  auto made = da::server::StreamAssembler::Create(layout, slots);
  if (!made.ok()) {
    std::fprintf(stderr, "fuzz_stream_assembly: a valid layout was refused: %s\n",
                 made.status().ToString().c_str());
    std::abort();
  }
  da::server::StreamModel model(layout, slots, *std::move(made));
  model.Run(fdp);
  return 0;
}
