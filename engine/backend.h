// The interface every compute backend implements (reference, CPU, later CUDA).
//
// A backend says what it supports, then runs one whole problem. It must write every element of
// the output (positions no pattern keeps get 0) and must not write anywhere else.
#pragma once

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/tensor.h"

namespace da::engine {

class ThreadPool;

struct RunContext {
  ThreadPool* pool = nullptr;                    // May be null: run on the calling thread.
  const std::atomic<bool>* cancelled = nullptr;  // When it turns true, stop and return CANCELLED.
};

// The precision a backend will compute a request in, and why.
struct PrecisionChoice {
  Precision precision = Precision::kFloat32;
  std::string reason;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string Name() const = 0;

  // Maps the request's precision wish to what this backend computes in; INVALID_ARGUMENT naming
  // the supported precisions when the wish cannot be met.
  virtual absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const = 0;

  // OK when this backend can compute the problem; otherwise why not.
  virtual absl::Status Supports(const ProblemShape& shape, DType dtype,
                                const AttentionSpec& spec) const = 0;

  // Computes out = DilatedAttention(q, k, v) per docs/MATH.md. Views are already validated.
  virtual absl::Status Run(const TensorView& q, const TensorView& k, const TensorView& v,
                           const AttentionSpec& spec, const MutableTensorView& out,
                           const RunContext& context) = 0;
};

}  // namespace da::engine
