#include "engine/backend.h"

#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {

PlanKey MakePlanKey(const TensorView& q, const TensorView& k, DType out_dtype,
                    const AttentionSpec& spec, Precision precision, const std::string& devices,
                    int threads) {
  PlanKey key;
  key.shape = {q.shape.batch, q.shape.seq_len, q.shape.heads, k.shape.heads, q.shape.head_dim};
  key.dtype = q.dtype;
  key.out_dtype = out_dtype;
  key.patterns = spec.patterns;
  key.causal = spec.causal;
  key.mode = spec.mode;
  key.precision = precision;
  key.devices = devices;
  key.threads = threads;
  return key;
}

absl::Status Backend::Run(const TensorView& q, const TensorView& k, const TensorView& v,
                          const AttentionSpec& spec, const MutableTensorView& out,
                          const RunContext& context) {
  DA_ASSIGN_OR_RETURN(const PrecisionChoice precision, ChoosePrecision(spec));
  const int threads = context.pool != nullptr ? context.pool->size() : 1;
  const PlanKey key = MakePlanKey(q, k, out.dtype, spec, precision.precision, Name(), threads);
  DA_ASSIGN_OR_RETURN(const std::shared_ptr<Plan> plan, BuildPlan(key, context.cancelled));
  return RunPlan(*plan, q, k, v, spec, out, context);
}

}  // namespace da::engine
