// The reference backend: docs/MATH.md computed literally, one query at a time, accumulating in
// fp64. Slow and obviously correct; tests compare every other backend with it.
#pragma once

#include <vector>

#include "engine/backend.h"

namespace da::engine {

// The output of one (batch, position, head) row in fp64, computed as ReferenceBackend::Run would;
// for checking large problems on a sample of rows.
std::vector<double> ReferenceRow(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const AttentionSpec& spec, int64_t batch, int64_t position,
                                 int64_t head);

class ReferenceBackend final : public Backend {
 public:
  std::string Name() const override { return "reference"; }
  absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const override;
  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override;
  absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                  const std::atomic<bool>* stop) override;
  // Whole problems only: a share smaller than the problem is UNIMPLEMENTED.
  bool ComputesShares() const override { return false; }
  absl::Status RunShare(Plan& plan, const ShareProblem& problem,
                        const RunContext& context) override;
};

}  // namespace da::engine
