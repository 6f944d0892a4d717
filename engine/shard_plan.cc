#include "engine/shard_plan.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"

namespace da::engine {
namespace {

// [begin, end) of part `index` when `total` items are cut into `parts` near-equal contiguous
// parts, the first total % parts one larger.
std::pair<int64_t, int64_t> EvenPart(int64_t total, int64_t parts, int64_t index) {
  const int64_t base = total / parts;
  const int64_t extra = total % parts;
  const int64_t begin = index * base + std::min(index, extra);
  return {begin, begin + base + (index < extra ? 1 : 0)};
}

// q, k, v and output bytes of a share.
int64_t ShareBytes(const ProblemShape& shape, const Share& share, DType dtype, DType out_dtype) {
  const int64_t per_head = shape.batch * share.tokens() * shape.head_dim;
  return per_head * (share.heads() * (DTypeSize(dtype) + DTypeSize(out_dtype)) +
                     2 * share.kv_heads() * DTypeSize(dtype));
}

// Cuts items 0..n-1 (n >= parts) into `parts` contiguous non-empty blocks whose largest cost sum
// is as small as possible (dynamic programming over prefix sums, O(parts * n^2)); among the
// optimal cuts, earlier blocks take as many items as fit, so equal costs give the first n % parts
// blocks one item more. Returns the parts + 1 boundaries.
std::vector<int64_t> BalancedCuts(const std::vector<double>& costs, int parts) {
  const int64_t n = static_cast<int64_t>(costs.size());
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + costs[i];
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // best[p][i]: the least largest block cost of items [0, i) in p blocks.
  std::vector<std::vector<double>> best(parts + 1, std::vector<double>(n + 1, kInf));
  best[0][0] = 0;
  for (int p = 1; p <= parts; ++p) {
    for (int64_t i = p; i <= n; ++i) {
      for (int64_t j = p - 1; j < i; ++j) {
        best[p][i] = std::min(best[p][i], std::max(best[p - 1][j], prefix[i] - prefix[j]));
      }
    }
  }
  // A block within the optimum may carry rounding of the sums: compare with a relative slack.
  const double cap = best[parts][n] * (1 + 1e-12);
  std::vector<int64_t> cuts(parts + 1, 0);
  cuts[parts] = n;
  for (int r = 1; r < parts; ++r) {
    int64_t end = cuts[r - 1] + 1;
    // Filling each block as far as the optimum allows never needs more blocks than the optimum
    // (the classic greedy argument); one item stays for each later block.
    while (end < n - (parts - r) && prefix[end + 1] - prefix[cuts[r - 1]] <= cap) {
      ++end;
    }
    cuts[r] = end;
  }
  return cuts;
}

}  // namespace

absl::StatusOr<ShardPolicy> ChooseShardStrategy(const ProblemShape& shape, DType dtype,
                                                DType out_dtype, const AttentionSpec& spec,
                                                int world_size, int64_t per_rank_budget_bytes) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size is ", world_size, "; must be >= 1"));
  }
  switch (spec.shard_policy) {
    case ShardPolicy::kHeads:
      if (shape.heads < world_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("shard_policy HEADS needs at least one query head per rank: heads is ",
                         shape.heads, ", world size ", world_size));
      }
      return ShardPolicy::kHeads;
    case ShardPolicy::kSequence:
      if (shape.seq_len < world_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("shard_policy SEQUENCE needs at least one token per rank: seq_len is ",
                         shape.seq_len, ", world size ", world_size));
      }
      return ShardPolicy::kSequence;
    case ShardPolicy::kAuto:
    case ShardPolicy::kNone:
      break;
  }
  if (shape.heads >= world_size) {
    absl::StatusOr<ShardLayout> heads =
        MakeShardLayout(shape, spec, ShardPolicy::kHeads, world_size);
    if (!heads.ok()) return heads.status();
    int64_t largest = 0;
    for (const Share& share : heads->shares) {
      largest = std::max(largest, ShareBytes(shape, share, dtype, out_dtype));
    }
    if (per_rank_budget_bytes <= 0 || largest <= per_rank_budget_bytes) return ShardPolicy::kHeads;
  }
  if (shape.seq_len < world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot shard: heads (", shape.heads, ") and seq_len (", shape.seq_len,
                     ") are both smaller than the world size ", world_size));
  }
  return ShardPolicy::kSequence;
}

std::vector<double> HeadCosts(const ProblemShape& shape, const AttentionSpec& spec) {
  // AssignHeadPatterns' assignment in closed form, without its heads x patterns table: each
  // (pattern, offset) costs the same for every head that runs it, and those heads are one range.
  // Ranges are added through a difference array: time in patterns x offsets + heads.
  const int64_t heads = shape.heads;
  const int64_t num_patterns = static_cast<int64_t>(spec.patterns.size());
  std::vector<double> diff(heads + 1, 0.0);
  const auto add = [&](int64_t begin, int64_t end, double cost) {
    if (begin >= end) return;
    diff[begin] += cost;
    diff[end] -= cost;
  };
  // A (pattern, offset)'s cost: every segment but the last is whole and keeps as many positions
  // as the first.
  const auto cost = [&](const Pattern& pattern, int64_t offset) {
    const auto segment = [&](int64_t t) {
      const double m = static_cast<double>(KeptPositions(pattern, offset, shape.seq_len, t).count);
      return spec.causal ? m * (m + 1) / 2 : m * m;
    };
    const int64_t segments = NumSegments(shape.seq_len, pattern.segment_len);
    return static_cast<double>(segments - 1) * segment(0) + segment(segments - 1);
  };
  int64_t group_begin = 0;
  for (int64_t i = 0; i < num_patterns; ++i) {
    const Pattern& p = spec.patterns[i];
    if (spec.mode == CombineMode::kLongNet) {
      // Heads [o * per, (o + 1) * per) run offset o.
      const int64_t per = (heads + p.dilation - 1) / p.dilation;
      for (int64_t o = 0; o * per < heads; ++o)
        add(o * per, std::min(heads, (o + 1) * per), cost(p, o));
    } else {
      const int64_t group = heads / num_patterns + (i < heads % num_patterns ? 1 : 0);
      add(group_begin, group_begin + group, cost(p, i % p.dilation));
      group_begin += group;
    }
  }
  std::vector<double> costs(heads, 0.0);
  double running = 0;
  for (int64_t h = 0; h < heads; ++h) {
    running += diff[h];
    costs[h] = running;
  }
  return costs;
}

absl::StatusOr<ShardLayout> MakeShardLayout(const ProblemShape& shape, const AttentionSpec& spec,
                                            ShardPolicy strategy, int world_size) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size is ", world_size, "; must be >= 1"));
  }
  ShardLayout layout;
  layout.strategy = strategy;
  const int64_t group = shape.heads / shape.kv_heads;  // Query heads per kv head.
  std::vector<int64_t> head_bounds;
  if (strategy == ShardPolicy::kHeads && shape.heads >= world_size) {
    head_bounds = BalancedCuts(HeadCosts(shape, spec), world_size);
  }
  for (int r = 0; r < world_size; ++r) {
    Share share;
    share.rank = r;
    if (strategy == ShardPolicy::kHeads) {
      if (shape.heads < world_size) {
        return absl::InvalidArgumentError(absl::StrCat("HEADS layout: heads (", shape.heads,
                                                       ") must be >= world size ", world_size));
      }
      share.head_begin = head_bounds[r];
      share.head_end = head_bounds[r + 1];
      share.token_begin = 0;
      share.token_end = shape.seq_len;
      share.kv_head_begin = share.head_begin / group;
      share.kv_head_end = (share.head_end - 1) / group + 1;
    } else if (strategy == ShardPolicy::kSequence) {
      if (shape.seq_len < world_size) {
        return absl::InvalidArgumentError(absl::StrCat("SEQUENCE layout: seq_len (", shape.seq_len,
                                                       ") must be >= world size ", world_size));
      }
      std::tie(share.token_begin, share.token_end) = EvenPart(shape.seq_len, world_size, r);
      share.head_begin = 0;
      share.head_end = shape.heads;
      share.kv_head_begin = 0;
      share.kv_head_end = shape.kv_heads;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "shard layout for strategy ", ShardPolicyName(strategy), "; expected HEADS or SEQUENCE"));
    }
    layout.shares.push_back(share);
  }
  return layout;
}

std::pair<int64_t, int64_t> KeptRowsIn(const KeptRange& kept, int64_t token_begin,
                                       int64_t token_end) {
  // Row i is at kept.first + i * stride: the first row at or past a position p is
  // ceil((p - first) / stride), clamped to [0, count].
  const auto first_row_at = [&](int64_t position) {
    if (position <= kept.first) return int64_t{0};
    const int64_t row = (position - kept.first + kept.stride - 1) / kept.stride;
    return std::min(row, kept.count);
  };
  const int64_t begin = first_row_at(token_begin);
  const int64_t end = first_row_at(token_end);
  return {begin, std::max(begin, end)};
}

std::vector<std::set<std::pair<int64_t, int64_t>>> KvHeadOffsets(const ProblemShape& shape,
                                                                 const AttentionSpec& spec,
                                                                 int64_t head_begin,
                                                                 int64_t head_end) {
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(shape.heads, spec);
  std::vector<std::set<std::pair<int64_t, int64_t>>> pairs(spec.patterns.size());
  for (int64_t head = head_begin; head < head_end; ++head) {
    for (const HeadWork& hw : work[head]) {
      pairs[hw.pattern_index].insert({KvHeadFor(head, shape.heads, shape.kv_heads), hw.offset});
    }
  }
  return pairs;
}

namespace {

// The set of segment t of pattern i for one (kv head, offset); ranks 0 until a layout says more.
SpanningKeys SetOf(const ProblemShape& shape, const AttentionSpec& spec, size_t i, int64_t t,
                   int64_t kv_head, int64_t offset) {
  SpanningKeys set;
  set.pattern_index = static_cast<int>(i);
  set.segment = t;
  set.kv_head = kv_head;
  set.offset = offset;
  set.kept = KeptPositions(spec.patterns[i], offset, shape.seq_len, t);
  return set;
}

}  // namespace

std::vector<SpanningKeys> SpanningKeySetsOf(const ProblemShape& shape, const AttentionSpec& spec,
                                            const Share& share) {
  std::vector<SpanningKeys> sets;
  const std::vector<std::set<std::pair<int64_t, int64_t>>> pairs =
      KvHeadOffsets(shape, spec, share.head_begin, share.head_end);
  for (size_t i = 0; i < spec.patterns.size(); ++i) {
    const Pattern& pattern = spec.patterns[i];
    const int64_t w = pattern.segment_len;
    for (int64_t t = share.token_begin / w; t * w < share.token_end; ++t) {
      const int64_t start = t * w;
      const int64_t end = std::min(shape.seq_len, start + w);
      if (share.token_begin <= start && end <= share.token_end) continue;  // Inside the share.
      for (const auto& [kv_head, offset] : pairs[i]) {
        const SpanningKeys set = SetOf(shape, spec, i, t, kv_head, offset);
        const auto [b, e] = KeptRowsIn(set.kept, share.token_begin, share.token_end);
        // Rows inside the share (its queries) and outside it (keys it must be given).
        if (b < e && (b > 0 || e < set.kept.count)) sets.push_back(set);
      }
    }
  }
  return sets;
}

std::vector<SpanningKeys> SpanningKeySets(const ProblemShape& shape, const AttentionSpec& spec,
                                          const ShardLayout& layout) {
  std::vector<SpanningKeys> sets;
  if (layout.strategy != ShardPolicy::kSequence || layout.shares.size() < 2) return sets;
  // The (kv head, offset) pairs each pattern's query heads read.
  const std::vector<std::set<std::pair<int64_t, int64_t>>> pairs =
      KvHeadOffsets(shape, spec, 0, shape.heads);
  const int world = static_cast<int>(layout.shares.size());
  for (size_t i = 0; i < spec.patterns.size(); ++i) {
    const Pattern& pattern = spec.patterns[i];
    for (int64_t t = 0; t < NumSegments(shape.seq_len, pattern.segment_len); ++t) {
      const int64_t start = t * pattern.segment_len;
      const int64_t end = std::min(shape.seq_len, start + pattern.segment_len);
      // Cheap test first: a segment inside one rank's range spans nothing.
      int first_touch = world, last_touch = -1;
      for (int r = 0; r < world; ++r) {
        const Share& s = layout.shares[r];
        if (s.token_begin < end && start < s.token_end) {
          first_touch = std::min(first_touch, r);
          last_touch = r;
        }
      }
      if (first_touch == last_touch) continue;
      for (const auto& [kv_head, offset] : pairs[i]) {
        SpanningKeys set = SetOf(shape, spec, i, t, kv_head, offset);
        // Only ranks holding at least one kept row take part.
        int first = world, last = -1;
        for (int r = first_touch; r <= last_touch; ++r) {
          const auto [b, e] =
              KeptRowsIn(set.kept, layout.shares[r].token_begin, layout.shares[r].token_end);
          if (b < e) {
            first = std::min(first, r);
            last = r;
          }
        }
        if (last <= first) continue;
        set.first_rank = first;
        set.last_rank = last;
        sets.push_back(set);
      }
    }
  }
  return sets;
}

std::pair<int64_t, int64_t> RowsOf(const SpanningKeys& set, const ShardLayout& layout, int rank) {
  const Share& share = layout.shares[rank];
  return KeptRowsIn(set.kept, share.token_begin, share.token_end);
}

bool SendsRows(const SpanningKeys& set, const ShardLayout& layout, bool causal, int from, int to) {
  if (!NeedsRowsFrom(causal, from, to)) return false;
  for (int rank : {from, to}) {
    const auto [begin, end] = RowsOf(set, layout, rank);
    if (begin == end) return false;
  }
  return true;
}

int64_t ExchangeBytesReceived(const ProblemShape& shape, const AttentionSpec& spec,
                              const ShardLayout& layout, DType dtype, int rank) {
  int64_t rows = 0;
  for (const SpanningKeys& set : SpanningKeySets(shape, spec, layout)) {
    if (rank < set.first_rank || rank > set.last_rank) continue;
    for (int from = set.first_rank; from <= set.last_rank; ++from) {
      if (!SendsRows(set, layout, spec.causal, from, rank)) continue;
      const auto [b, e] = RowsOf(set, layout, from);
      rows += e - b;
    }
  }
  return rows * 2 * shape.head_dim * DTypeSize(dtype) * shape.batch;
}

}  // namespace da::engine
