// Shares: the one vocabulary for cutting a problem across devices (DESIGN §3, Sharding).
//
// A problem is *sharded* (ShardPolicy, ShardLayout in engine/shard_plan.h) into *shares*, one per
// device or rank: a range of token positions and of heads. A device computes a ShareProblem, its
// share of the whole problem; a whole problem is simply the share that covers everything
// (WholeProblem), so every backend has one entry point (Backend::RunShare) for both.
//
//   ShareProblem p = WholeProblem(q, k, v, spec, out);            // one device, whole problem
//   ShareProblem p{.shape = whole, .spec = spec, .share = layout.shares[r], .q = my_q, ...};
//   p.spanning = &sets;      // SEQUENCE: SpanningKeySets(whole, spec, layout)
//   p.gathered = &gathered;  // every set's kept K/V rows, own and received
//
// Geometry is global: offsets and (GROUPED) patterns follow the global head index, segments and
// kept positions the global token position, so a share's output equals those rows of the whole
// problem's output, bit for bit, on the same backend.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/attention_spec.h"
#include "engine/dilation.h"
#include "engine/tensor.h"

namespace da::engine {

// One device's (or rank's) share: positions [token_begin, token_end) of every batch, query heads
// [head_begin, head_end) and the kv heads [kv_head_begin, kv_head_end) they read. `rank` is its
// place in the layout.
struct Share {
  int rank = 0;
  int64_t token_begin = 0;
  int64_t token_end = 0;
  int64_t head_begin = 0;
  int64_t head_end = 0;
  int64_t kv_head_begin = 0;
  int64_t kv_head_end = 0;

  int64_t tokens() const { return token_end - token_begin; }
  int64_t heads() const { return head_end - head_begin; }
  int64_t kv_heads() const { return kv_head_end - kv_head_begin; }
  // The local tensors' shapes: [batch, tokens, heads, head_dim] and the kv one.
  Shape4 QueryShape(const ProblemShape& shape) const;
  Shape4 KeyShape(const ProblemShape& shape) const;
  // Whether it covers every token and head of `shape`.
  bool Covers(const ProblemShape& shape) const;
  std::string ToString() const;  // "tokens [0, 512) heads [0, 4) kv heads [0, 2)".

  bool operator==(const Share&) const = default;
};

// The share that covers the whole problem.
Share WholeShare(const ProblemShape& shape);

// The kept positions of one segment of one pattern for one (kv head, offset) when they lie on
// more than one share (SEQUENCE only): the shares first_rank..last_rank each hold a contiguous
// run of its rows (RowsOf) and the only exchange of a SEQUENCE run is these rows among them.
struct SpanningKeys {
  int pattern_index = 0;
  int64_t segment = 0;
  int64_t kv_head = 0;
  int64_t offset = 0;
  KeptRange kept;  // Global positions.
  int first_rank = 0;
  int last_rank = 0;
};

// The kept K and V rows of one spanning set from every share that holds them, in kept order:
// [batch, set.kept.count, head_dim] each, in the input dtype, in the memory of the device that
// computes the share.
struct GatheredKeys {
  const void* k = nullptr;
  const void* v = nullptr;
};

// Bytes of one of a set's gathered K or V: batch * set.kept.count * head_dim elements of dtype.
inline int64_t GatheredRowsBytes(const ProblemShape& shape, const SpanningKeys& set, DType dtype) {
  return shape.batch * set.kept.count * shape.head_dim * DTypeSize(dtype);
}

// One device's share of a problem, its inputs and output in that device's memory.
struct ShareProblem {
  ProblemShape shape;  // The whole problem.
  AttentionSpec spec;
  Share share;
  TensorView q, k, v;     // share.QueryShape(shape), share.KeyShape(shape).
  MutableTensorView out;  // share.QueryShape(shape), in the output dtype.
  // SEQUENCE: the layout's spanning sets and, index-aligned, their gathered rows. An entry may be
  // empty (null k and v) for a set this share holds no rows of. Null when the share reads no
  // keys outside itself (HEADS, or the whole problem).
  const std::vector<SpanningKeys>* spanning = nullptr;
  const std::vector<GatheredKeys>* gathered = nullptr;
};

// The whole problem of validated views as the share that covers it.
ShareProblem WholeProblem(const TensorView& q, const TensorView& k, const TensorView& v,
                          const AttentionSpec& spec, const MutableTensorView& out);

// INVALID_ARGUMENT naming the view, its shape and the share's, when a view does not match the
// share, the input dtypes differ, or the spanning sets and gathered rows do not pair up.
absl::Status CheckShareViews(const ShareProblem& problem);

// INVALID_ARGUMENT naming the view and both spaces when a view of the problem is not in `space`
// (the memory the computing backend reads and writes, Backend::Space).
absl::Status CheckShareSpace(const ShareProblem& problem, MemorySpace space);

}  // namespace da::engine
