// Pattern geometry of docs/MATH.md, shared by every backend: which patterns each head runs, with
// which offset, and which positions a segment keeps.
//
//   std::vector<HeadWork> work = AssignHeadPatterns(heads, spec);
//   for (const HeadWork& hw : work[j]) {  // patterns head j runs
//     for (int64_t t = 0; t < NumSegments(seq_len, hw.pattern.segment_len); ++t) {
//       KeptRange kept = KeptPositions(hw.pattern, hw.offset, seq_len, t);
//       // positions kept.first + i * kept.stride for i < kept.count
//     }
//   }
#pragma once

#include <cstdint>
#include <vector>

#include "engine/attention_spec.h"

namespace da::engine {

// One pattern run by one head.
struct HeadWork {
  int pattern_index = 0;
  Pattern pattern;
  int64_t offset = 0;  // 0 <= offset < dilation.
};

// For each query head j in [0, heads): the patterns it runs. LONGNET: every pattern, offset
// floor(j / ceil(heads / r)). GROUPED: one pattern per contiguous head group, offset i mod r_i;
// heads of an empty group cannot exist, but groups may be empty when heads < patterns.
std::vector<std::vector<HeadWork>> AssignHeadPatterns(int64_t heads, const AttentionSpec& spec);

// Segments of length segment_len needed to cover seq_len tokens (the last may be partial).
inline int64_t NumSegments(int64_t seq_len, int64_t segment_len) {
  return (seq_len + segment_len - 1) / segment_len;
}

// Positions first + i * stride, i < count, all < seq_len.
struct KeptRange {
  int64_t first = 0;
  int64_t stride = 1;
  int64_t count = 0;
};

// The positions segment t of a pattern keeps with the given offset.
inline KeptRange KeptPositions(const Pattern& pattern, int64_t offset, int64_t seq_len,
                               int64_t segment) {
  const int64_t start = segment * pattern.segment_len;
  const int64_t span =
      seq_len - start < pattern.segment_len ? seq_len - start : pattern.segment_len;
  KeptRange kept;
  kept.first = start + offset;
  kept.stride = pattern.dilation;
  kept.count = offset < span ? (span - offset + pattern.dilation - 1) / pattern.dilation : 0;
  return kept;
}

// Query head j reads key/value head j / (heads / kv_heads).
inline int64_t KvHeadFor(int64_t head, int64_t heads, int64_t kv_heads) {
  return head / (heads / kv_heads);
}

}  // namespace da::engine
