// The host side of the CUDA row kernel (engine/cuda/row_attention.cuh): a ShareProblem flattened
// into the plain tables the kernel reads (each head's patterns and offsets from
// AssignHeadPatterns, the spanning sets sorted for FindSpanning), and the checks the backend makes
// before it launches. Plain C++ with no CUDA, so that the CPU tests build and run it everywhere.
//
//   DA_ASSIGN_OR_RETURN(RowTables tables, MakeRowTables(problem));
//   // copy tables.patterns, tables.pattern_begin, tables.spanning to the device, then:
//   cuda::RowShare share = tables.share;  // with its table pointers set to the device copies
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "engine/cuda/row_attention.cuh"
#include "engine/share.h"

namespace da::engine::cuda {

struct RowTables {
  RowShare share;  // Views' pointers set; the table pointers are set to the vectors below.
  std::vector<RowPattern> patterns;
  std::vector<int> pattern_begin;  // heads of the share + 1 entries.
  std::vector<RowSpanning> spanning;
};

// INVALID_ARGUMENT when the head dimension exceeds kMaxRowHeadDim or the problem's views do not
// fit the share (CheckShareViews). The tables point into the returned object: move it, do not
// copy it, or call PointAtTables again.
absl::StatusOr<RowTables> MakeRowTables(const ShareProblem& problem);

// Sets tables.share's table pointers to the tables' own vectors (host memory).
void PointAtTables(RowTables& tables);

// The one-pass combine's blocks of pattern outputs (CombineElements): one per pattern for LONGNET,
// one for all of GROUPED's (each head has one pattern, so their rows never meet).
inline int OnePassBlocks(bool grouped, int patterns) { return grouped ? 1 : patterns; }

// Whether GROUPED's patterns write straight into the output, which the combine then scales in
// place: the output is in the io type (and that is not fp8, whose stored outputs carry a scale).
inline bool GroupedInPlace(bool grouped, bool fp8, ElemType out_type, ElemType io) {
  return grouped && !fp8 && out_type == io;
}

}  // namespace da::engine::cuda
