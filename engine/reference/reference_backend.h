// The reference backend: docs/MATH.md computed literally, one query at a time, accumulating in
// fp64. Slow and obviously correct; tests compare every other backend with it.
#pragma once

#include "engine/backend.h"

namespace da::engine {

class ReferenceBackend final : public Backend {
 public:
  std::string Name() const override { return "reference"; }
  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override;
  absl::Status Run(const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionSpec& spec, const MutableTensorView& out,
                   const RunContext& context) override;
};

}  // namespace da::engine
