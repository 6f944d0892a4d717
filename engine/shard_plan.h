// How one problem is cut across the ranks of a group (DESIGN §3, Sharding): the strategy, each
// rank's share of tokens and heads, and for SEQUENCE the kept keys and values that segments
// spanning several ranks exchange. Pure geometry: no data, no communication; every rank computes
// the same answer from the same (shape, spec, world size).
//
//   DA_ASSIGN_OR_RETURN(ShardPolicy strategy,
//                       ChooseShardStrategy(shape, dtype, out_dtype, spec, world, budget));
//   DA_ASSIGN_OR_RETURN(ShardLayout layout, MakeShardLayout(shape, spec, strategy, world));
//   for (const SpanningKeys& set : SpanningKeySets(shape, spec, layout)) { ... }
//
// HEADS: rank r takes a contiguous block of query heads over every token, the blocks cut so that
// their compute (HeadCosts) is as even as contiguous blocks allow (GROUPED heads of a dense
// pattern cost many times those of a dilated one), and the kv heads those heads read. SEQUENCE:
// rank r takes a contiguous range of token positions (the first N % W ranks one token more) of
// every batch and every head.
#pragma once

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/dilation.h"
#include "engine/share.h"
#include "engine/tensor.h"

namespace da::engine {

struct ShardLayout {
  ShardPolicy strategy = ShardPolicy::kSequence;  // kHeads or kSequence.
  std::vector<Share> shares;                      // One per rank, in rank order.
};

// The strategy for a problem on world_size ranks. The spec's shard_policy HEADS or SEQUENCE is
// obeyed (HEADS needs heads >= world_size: INVALID_ARGUMENT otherwise); AUTO (and NONE, which a
// caller that wants one process must not send here) picks HEADS when heads >= world_size and the
// largest rank's HEADS share (its q, k, v and output) fits per_rank_budget_bytes (0: no limit),
// otherwise SEQUENCE. SEQUENCE needs seq_len >= world_size.
absl::StatusOr<ShardPolicy> ChooseShardStrategy(const ProblemShape& shape, DType dtype,
                                                DType out_dtype, const AttentionSpec& spec,
                                                int world_size, int64_t per_rank_budget_bytes);

// Every rank's share under a strategy. INVALID_ARGUMENT when the strategy cannot give every rank
// work (fewer heads or tokens than ranks) or is not HEADS or SEQUENCE.
absl::StatusOr<ShardLayout> MakeShardLayout(const ProblemShape& shape, const AttentionSpec& spec,
                                            ShardPolicy strategy, int world_size);

// Per query head, the score entries its patterns compute over the whole sequence (kept rows
// squared per segment; with causal, the unmasked half), the cost HEADS balances.
std::vector<double> HeadCosts(const ProblemShape& shape, const AttentionSpec& spec);

// Rows [first, second) of kept whose positions lie in [token_begin, token_end).
std::pair<int64_t, int64_t> KeptRowsIn(const KeptRange& kept, int64_t token_begin,
                                       int64_t token_end);

// Every spanning set a SEQUENCE layout has, for the (kv head, offset) pairs some query head reads
// under the spec's combine mode, in a fixed order (pattern, segment, kv head, offset). Empty for
// HEADS.
std::vector<SpanningKeys> SpanningKeySets(const ProblemShape& shape, const AttentionSpec& spec,
                                          const ShardLayout& layout);

// Per pattern, the (kv head, offset) pairs query heads [head_begin, head_end) read under the
// spec's combine mode.
std::vector<std::set<std::pair<int64_t, int64_t>>> KvHeadOffsets(const ProblemShape& shape,
                                                                 const AttentionSpec& spec,
                                                                 int64_t head_begin,
                                                                 int64_t head_end);

// The spanning sets one share reads: for every (kv head, offset) pair some query head of the
// share reads under the spec's combine mode, each segment that holds kept rows inside the share
// and outside it, in the order (pattern, segment, kv head, offset). What a share computed apart
// from any layout (a stream's window) needs gathered; first_rank and last_rank are 0.
std::vector<SpanningKeys> SpanningKeySetsOf(const ProblemShape& shape, const AttentionSpec& spec,
                                            const Share& share);

// Rows of set.kept that rank `rank` holds.
std::pair<int64_t, int64_t> RowsOf(const SpanningKeys& set, const ShardLayout& layout, int rank);

// Whether rank `to` needs rank `from`'s rows of a spanning set: every other rank of the set that
// holds rows of its own (queries) does, except that with causal attention only later ranks read
// earlier ranks' keys. Both ranks must hold rows (RowsOf non-empty) for a message to exist.
inline bool NeedsRowsFrom(bool causal, int from, int to) {
  return from != to && (!causal || from < to);
}

// Whether rank `from` sends its rows of `set` to rank `to` in the SEQUENCE exchange: both hold rows
// of it and `to` reads `from`'s (NeedsRowsFrom).
bool SendsRows(const SpanningKeys& set, const ShardLayout& layout, bool causal, int from, int to);

// The bytes of kept K and V rows rank `rank` receives in the SEQUENCE exchange (all batches),
// for inputs of dtype: sum over the spanning sets of the rows it needs from other ranks, times
// 2 * head_dim * dtype size * batch. Summed over ranks this is the whole exchange.
int64_t ExchangeBytesReceived(const ProblemShape& shape, const AttentionSpec& spec,
                              const ShardLayout& layout, DType dtype, int rank);

}  // namespace da::engine
