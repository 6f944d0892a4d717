#include "engine/shard_data.h"

#include <algorithm>
#include <cstring>

namespace da::engine {
namespace {

int64_t ShareHeads(const Share& share, bool kv) { return kv ? share.kv_heads() : share.heads(); }
int64_t ShareHeadBegin(const Share& share, bool kv) {
  return kv ? share.kv_head_begin : share.head_begin;
}

}  // namespace

int64_t ShareBytes(const Shape4& whole, const Share& share, DType dtype, bool kv) {
  return whole.batch * share.tokens() * ShareHeads(share, kv) * whole.head_dim * DTypeSize(dtype);
}

void CopyShareOut(const TensorView& whole, const Share& share, bool kv, void* dst) {
  CopyShareOutRows(whole, share, kv, 0, whole.shape.batch * share.tokens(), dst);
}

bool CopyShareOutUnlessStopped(const TensorView& whole, const Share& share, bool kv, void* dst,
                               const std::atomic<bool>* stop, int64_t piece_bytes) {
  const int64_t row_bytes = ShareHeads(share, kv) * whole.shape.head_dim * DTypeSize(whole.dtype);
  const int64_t rows = whole.shape.batch * share.tokens();
  const int64_t piece = std::max<int64_t>(1, piece_bytes / std::max<int64_t>(1, row_bytes));
  for (int64_t begin = 0; begin < rows; begin += piece) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) return false;
    CopyShareOutRows(whole, share, kv, begin, std::min(rows, begin + piece),
                     static_cast<uint8_t*>(dst) + begin * row_bytes);
  }
  return true;
}

void CopyShareOutRows(const TensorView& whole, const Share& share, bool kv, int64_t row_begin,
                      int64_t row_end, void* dst) {
  const Shape4& s = whole.shape;
  const int64_t elem = DTypeSize(whole.dtype);
  const int64_t heads = ShareHeads(share, kv);
  const int64_t row_bytes = heads * s.head_dim * elem;  // One token's heads of the share.
  const int64_t tokens = share.tokens();
  const auto* src = static_cast<const uint8_t*>(whole.data);
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t b = row_begin / tokens; b < s.batch && b * tokens < row_end; ++b) {
    const int64_t first = std::max(row_begin, b * tokens) - b * tokens + share.token_begin;
    const int64_t last = std::min(row_end, (b + 1) * tokens) - b * tokens + share.token_begin;
    if (heads == s.heads) {  // Whole tokens: one copy per batch.
      std::memcpy(out, src + (b * s.seq_len + first) * row_bytes, (last - first) * row_bytes);
      out += (last - first) * row_bytes;
      continue;
    }
    for (int64_t n = first; n < last; ++n) {
      const int64_t offset =
          ((b * s.seq_len + n) * s.heads + ShareHeadBegin(share, kv)) * s.head_dim * elem;
      std::memcpy(out, src + offset, row_bytes);
      out += row_bytes;
    }
  }
}

void CopyShareIn(const void* src, const Share& share, const MutableTensorView& whole) {
  const Shape4& s = whole.shape;
  const int64_t elem = DTypeSize(whole.dtype);
  const int64_t row_bytes = share.heads() * s.head_dim * elem;
  const auto* in = static_cast<const uint8_t*>(src);
  auto* dst = static_cast<uint8_t*>(whole.data);
  for (int64_t b = 0; b < s.batch; ++b) {
    if (share.heads() == s.heads) {
      std::memcpy(dst + (b * s.seq_len + share.token_begin) * row_bytes, in,
                  share.tokens() * row_bytes);
      in += share.tokens() * row_bytes;
      continue;
    }
    for (int64_t n = share.token_begin; n < share.token_end; ++n) {
      const int64_t offset = ((b * s.seq_len + n) * s.heads + share.head_begin) * s.head_dim * elem;
      std::memcpy(dst + offset, in, row_bytes);
      in += row_bytes;
    }
  }
}

void CopyKeptRows(const TensorView& share_kv, const Share& share, const SpanningKeys& set,
                  int64_t row_begin, int64_t row_end, void* dst) {
  const Shape4& s = share_kv.shape;  // [B, tokens, kv heads, D]
  const int64_t row_bytes = s.head_dim * DTypeSize(share_kv.dtype);
  const auto* src = static_cast<const uint8_t*>(share_kv.data);
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t head = set.kv_head - share.kv_head_begin;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      const int64_t n = set.kept.first + i * set.kept.stride - share.token_begin;
      std::memcpy(out, src + ((b * s.seq_len + n) * s.heads + head) * row_bytes, row_bytes);
      out += row_bytes;
    }
  }
}

bool CopyKeptRowsUnlessStopped(const TensorView& share_kv, const Share& share,
                               const SpanningKeys& set, void* dst, const std::atomic<bool>* stop,
                               int64_t piece_bytes) {
  const Shape4& s = share_kv.shape;
  const int64_t row_bytes = s.head_dim * DTypeSize(share_kv.dtype);
  const int64_t piece = std::max<int64_t>(1, piece_bytes / std::max<int64_t>(1, row_bytes));
  // One batch at a time: CopyKeptRows writes [B, rows, D], so a piece of rows is contiguous in
  // dst only within a batch.
  TensorView batch = share_kv;
  const int64_t batch_bytes = s.seq_len * s.heads * row_bytes;
  batch.shape.batch = 1;
  batch.bytes = batch_bytes;
  for (int64_t b = 0; b < s.batch; ++b) {
    batch.data = static_cast<const uint8_t*>(share_kv.data) + b * batch_bytes;
    for (int64_t begin = 0; begin < set.kept.count; begin += piece) {
      if (stop != nullptr && stop->load(std::memory_order_relaxed)) return false;
      CopyKeptRows(batch, share, set, begin, std::min(set.kept.count, begin + piece),
                   static_cast<uint8_t*>(dst) + (b * set.kept.count + begin) * row_bytes);
    }
  }
  return true;
}

void PlaceKeptRows(const void* piece, const SpanningKeys& set, int64_t row_begin, int64_t row_end,
                   DType dtype, int64_t batch, int64_t head_dim, void* gathered) {
  const int64_t row_bytes = head_dim * DTypeSize(dtype);
  const int64_t rows = row_end - row_begin;
  if (rows == 0) return;  // An empty piece may have no storage at all.
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(static_cast<uint8_t*>(gathered) + (b * set.kept.count + row_begin) * row_bytes,
                static_cast<const uint8_t*>(piece) + b * rows * row_bytes, rows * row_bytes);
  }
}

}  // namespace da::engine
