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

}  // namespace da::engine::cuda
