#include "engine/placement.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/shard_plan.h"
#include "engine/status_macros.h"

namespace da::engine {

absl::StatusOr<Placement> PlaceRequest(const ProblemShape& shape, DType dtype, DType out_dtype,
                                       const AttentionSpec& spec, const MemoryEstimate& estimate,
                                       double flops, const PlacementOptions& o) {
  const int64_t budget = o.device_budget_bytes;
  const bool over_one = budget > 0 && estimate.device > budget;
  const auto one_device = [&](std::string reason) -> absl::StatusOr<Placement> {
    if (over_one && o.devices > 1) {
      return WithRejectReason(
          absl::ResourceExhaustedError(absl::StrCat("request needs ", estimate.ToString(),
                                                    " on one device but a device's budget is ",
                                                    budget, " bytes (", reason, ")")),
          RejectReason::kMemory);
    }
    return Placement{1, ShardPolicy::kNone, std::move(reason)};
  };
  if (o.devices <= 1) return one_device("one device");
  if (!o.computes_shares) return one_device("the backend computes whole problems only");
  if (spec.shard_policy == ShardPolicy::kNone) return one_device("shard policy NONE");
  const bool explicit_policy =
      spec.shard_policy == ShardPolicy::kHeads || spec.shard_policy == ShardPolicy::kSequence;
  if (!explicit_policy && !over_one && flops < o.min_shard_flops) {
    return one_device(
        absl::StrFormat("%.3g FLOP, below the %.3g a split pays for", flops, o.min_shard_flops));
  }
  absl::StatusOr<ShardPolicy> strategy =
      ChooseShardStrategy(shape, dtype, out_dtype, spec, o.devices, budget);
  if (strategy.ok() && !explicit_policy && o.shares_request_memory && shape.batch == 1 &&
      !spec.causal && shape.seq_len >= o.devices) {
    strategy = ShardPolicy::kSequence;  // In place: no copy of the inputs or the output.
  }
  if (!strategy.ok()) {
    if (explicit_policy) return strategy.status();
    return one_device(absl::StrCat("cannot split: ", strategy.status().message()));
  }
  return Placement{o.devices, *strategy,
                   over_one ? std::string("over one device's budget")
                            : (explicit_policy ? std::string("shard policy")
                                               : absl::StrFormat("%.3g FLOP", flops))};
}

}  // namespace da::engine
