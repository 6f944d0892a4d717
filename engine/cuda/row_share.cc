#include "engine/cuda/row_share.h"

#include <algorithm>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/dilation.h"
#include "engine/status_macros.h"

namespace da::engine::cuda {

absl::StatusOr<RowTables> MakeRowTables(const ShareProblem& problem) {
  DA_RETURN_IF_ERROR(CheckShareViews(problem));
  const ProblemShape& shape = problem.shape;
  if (shape.head_dim > kMaxRowHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_dim ", shape.head_dim, ": the CUDA row kernel takes at most ", kMaxRowHeadDim));
  }
  const Share& share = problem.share;
  RowTables tables;
  RowShare& s = tables.share;
  s.batch = shape.batch;
  s.seq_len = shape.seq_len;
  s.heads = shape.heads;
  s.kv_heads = shape.kv_heads;
  s.head_dim = shape.head_dim;
  s.token_begin = share.token_begin;
  s.token_end = share.token_end;
  s.head_begin = share.head_begin;
  s.head_end = share.head_end;
  s.kv_head_begin = share.kv_head_begin;
  s.kv_head_end = share.kv_head_end;
  s.q = problem.q.data;
  s.k = problem.k.data;
  s.v = problem.v.data;
  s.out = problem.out.data;
  s.in = static_cast<ElemType>(problem.q.dtype);
  s.out_type = static_cast<ElemType>(problem.out.dtype);
  s.scale = static_cast<float>(problem.spec.ScaleFor(shape.head_dim));
  s.causal = problem.spec.causal;
  s.grouped = problem.spec.mode == CombineMode::kGrouped;
  s.patterns = static_cast<int>(problem.spec.patterns.size());

  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(shape.heads, problem.spec);
  for (int64_t head = share.head_begin; head < share.head_end; ++head) {
    tables.pattern_begin.push_back(static_cast<int>(tables.patterns.size()));
    for (const HeadWork& hw : work[head]) {
      tables.patterns.push_back(
          {hw.pattern.segment_len, hw.pattern.dilation, hw.offset, hw.pattern_index});
    }
  }
  tables.pattern_begin.push_back(static_cast<int>(tables.patterns.size()));

  if (problem.spanning != nullptr) {
    for (size_t i = 0; i < problem.spanning->size(); ++i) {
      const SpanningKeys& set = (*problem.spanning)[i];
      const GatheredKeys& rows = (*problem.gathered)[i];
      if (rows.k == nullptr) continue;  // This share holds none of the set's rows.
      tables.spanning.push_back({set.pattern_index, set.kv_head, set.offset, set.segment,
                                 set.kept.count, rows.k, rows.v});
    }
    std::sort(tables.spanning.begin(), tables.spanning.end(),
              [](const RowSpanning& a, const RowSpanning& b) {
                return std::tie(a.pattern_index, a.kv_head, a.offset, a.segment) <
                       std::tie(b.pattern_index, b.kv_head, b.offset, b.segment);
              });
  }
  PointAtTables(tables);
  return tables;
}

void PointAtTables(RowTables& tables) {
  tables.share.head_patterns = tables.patterns.data();
  tables.share.head_pattern_begin = tables.pattern_begin.data();
  tables.share.spanning = tables.spanning.data();
  tables.share.spanning_count = static_cast<int>(tables.spanning.size());
}

}  // namespace da::engine::cuda
