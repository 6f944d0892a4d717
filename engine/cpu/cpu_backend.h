// The CPU backend: fp32 accumulation, one task per (batch, head, segment), memory O(N).
//
// A task gathers the kept rows of one segment into fp32 tiles and runs blocked attention with an
// online softmax (running max and sum), so no score matrix larger than one tile ever exists.
// LONGNET patterns run one after another; each folds its output and LSE into per-position running
// state. GROUPED heads run disjoint patterns, so all their tasks run in one parallel loop.
#pragma once

#include "engine/backend.h"

namespace da::engine {

class CpuBackend final : public Backend {
 public:
  std::string Name() const override { return "cpu"; }
  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override;
  absl::Status Run(const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionSpec& spec, const MutableTensorView& out,
                   const RunContext& context) override;
};

}  // namespace da::engine
