// The interface every compute backend implements (reference, CPU, later CUDA).
//
// A backend says what it supports and in which precision it would compute, builds a Plan for a
// problem's key (work decomposition and warm workspaces, kept by the engine's PlanCache), and runs
// problems on a plan. A run must write every element of the output (positions no pattern keeps
// get 0) and nothing else.
//
//   DA_ASSIGN_OR_RETURN(PrecisionChoice precision, backend.ChoosePrecision(spec));
//   PlanKey key = MakePlanKey(q, k, out.dtype, spec, precision.precision, "cpu:0", threads);
//   DA_ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, backend.BuildPlan(key, /*stop=*/nullptr));
//   DA_RETURN_IF_ERROR(backend.RunPlan(*plan, q, k, v, spec, out, context));
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/plan_cache.h"
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

  // Everything derivable from the key, workspaces allocated and touched. When `stop` (optional)
  // turns true, the build ends early with CANCELLED and keeps nothing.
  virtual absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                          const std::atomic<bool>* stop) = 0;

  // The workspace bytes BuildPlan(key) allocates, computed without allocating anything: the
  // engine's admission control counts them. A run that finds its plan's workspace taken by a
  // concurrent run allocates the same amount again, so this is also what one run needs. 0 for a
  // backend whose plans hold no workspace.
  virtual int64_t PlanWorkspaceBytes(const PlanKey& key) const {
    (void)key;
    return 0;
  }

  // Computes out = DilatedAttention(q, k, v) per docs/MATH.md on a plan this backend built for
  // these views' key. Views are already validated. A plan may serve concurrent runs.
  virtual absl::Status RunPlan(Plan& plan, const TensorView& q, const TensorView& k,
                               const TensorView& v, const AttentionSpec& spec,
                               const MutableTensorView& out, const RunContext& context) = 0;

  // Builds a plan for this one problem and runs it (no cache): for tests and one-off use.
  absl::Status Run(const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionSpec& spec, const MutableTensorView& out,
                   const RunContext& context);
};

// The plan key of a problem: views' shapes and dtypes, the spec's patterns, mode and causality,
// the chosen precision, the devices and the thread count.
PlanKey MakePlanKey(const TensorView& q, const TensorView& k, DType out_dtype,
                    const AttentionSpec& spec, Precision precision, const std::string& devices,
                    int threads);

}  // namespace da::engine
