// Moving the bytes of a sharded problem (engine/shard_plan.h): a rank's share in and out of the
// whole tensors, and the kept K/V rows of spanning segments out of a share and into the gathered
// buffers a rank computes from (engine/share.h). Plain copies in the tensors' dtype.
//
//   std::vector<uint8_t> q_share(ShareBytes(q.shape, share, q.dtype, /*kv=*/false));
//   CopyShareOut(q, share, /*kv=*/false, q_share.data());      // rank 0, before the scatter
//   CopyShareIn(out_share.data(), share, whole_out);            // rank 0, after the gather
//   CopyKeptRows(my_k, share, set, begin, end, piece.data());   // a rank's rows of a set
//   PlaceKeptRows(piece.data(), set, begin, end, dtype, batch, head_dim, gathered_k.data());
#pragma once

#include <atomic>
#include <cstdint>

#include "engine/shard_plan.h"
#include "engine/tensor.h"

namespace da::engine {

// Whether a share's rows are one contiguous block of the whole tensors (every head, and one
// batch or every token): then views into the whole tensors serve as the share's, with no copy.
inline bool ShareIsContiguous(const ProblemShape& shape, const Share& share) {
  return (shape.batch == 1 || share.tokens() == shape.seq_len) && share.heads() == shape.heads &&
         share.kv_heads() == shape.kv_heads;
}

// The first byte of a contiguous share in a whole tensor of `heads` heads per token.
inline const uint8_t* ShareStart(const void* whole, const ProblemShape& shape, const Share& share,
                                 int64_t heads, DType dtype) {
  return static_cast<const uint8_t*>(whole) +
         share.token_begin * heads * shape.head_dim * DTypeSize(dtype);
}

// Bytes of a share of a tensor shaped like `whole` ([B, N, H or Hkv, D]); kv selects the share's
// kv heads instead of its query heads.
int64_t ShareBytes(const Shape4& whole, const Share& share, DType dtype, bool kv);

// Copies the share's tokens and heads (kv: kv heads) of `whole` into dst, contiguous
// [B, share.tokens(), heads, D].
void CopyShareOut(const TensorView& whole, const Share& share, bool kv, void* dst);

// CopyShareOut in pieces of about piece_bytes (whole rows), looking at `stop` (optional) before
// each, so that a cancelled request does not wait for a multi-GiB copy. Returns false, with dst
// partly written, when it found `stop` set.
inline constexpr int64_t kStopCheckBytes = int64_t{64} << 20;
bool CopyShareOutUnlessStopped(const TensorView& whole, const Share& share, bool kv, void* dst,
                               const std::atomic<bool>* stop,
                               int64_t piece_bytes = kStopCheckBytes);

// Rows [row_begin, row_end) of that contiguous share (row i: batch i / share.tokens(), token
// share.token_begin + i % share.tokens(); share heads x D elements) into dst.
void CopyShareOutRows(const TensorView& whole, const Share& share, bool kv, int64_t row_begin,
                      int64_t row_end, void* dst);

// Writes a contiguous share [B, share.tokens(), share.heads(), D] of out's dtype into `whole`.
void CopyShareIn(const void* src, const Share& share, const MutableTensorView& whole);

// Copies rows [row_begin, row_end) of set.kept for set.kv_head out of a share's k or v
// (shape share.KeyShape) into dst, contiguous [B, row_end - row_begin, D].
void CopyKeptRows(const TensorView& share_kv, const Share& share, const SpanningKeys& set,
                  int64_t row_begin, int64_t row_end, void* dst);

// Every kept row of the set, [B, set.kept.count, D], as CopyKeptRows(..., 0, set.kept.count, dst)
// does, in pieces of about piece_bytes (whole rows) with `stop` (optional) looked at before each.
// Returns false, with dst partly written, when it found `stop` set.
bool CopyKeptRowsUnlessStopped(const TensorView& share_kv, const Share& share,
                               const SpanningKeys& set, void* dst, const std::atomic<bool>* stop,
                               int64_t piece_bytes = kStopCheckBytes);

// Places a piece [B, row_end - row_begin, D] (CopyKeptRows' output) at rows [row_begin, row_end)
// of a gathered buffer [B, set.kept.count, D].
void PlaceKeptRows(const void* piece, const SpanningKeys& set, int64_t row_begin, int64_t row_end,
                   DType dtype, int64_t batch, int64_t head_dim, void* gathered);

}  // namespace da::engine
