// Placement: which of the engine's local devices compute a request (DESIGN §3, Sharding; issue
// #14). Pure decision, no data: the engine asks it once per request, before admission, so that
// the memory it reserves is the memory the placement needs.
//
//   DA_ASSIGN_OR_RETURN(Placement where, PlaceRequest(shape, dtype, out_dtype, spec, estimate,
//                                                     flops, {.devices = 2, ...}));
//   if (where.devices == 1) ... one device (the least busy) ... else RunLocalSharded(...)
//
// Rules, per the request's shard policy:
// - NONE, or one local device (or a backend that computes no shares): one device. Over one
//   device's budget: RESOURCE_EXHAUSTED naming the request's bytes and the device's budget.
// - HEADS or SEQUENCE: across every local device with that strategy (ChooseShardStrategy).
// - AUTO: across every local device when splitting gains: the request does not fit one device's
//   budget, or its compute (min_shard_flops and more) dwarfs the cost of copying its shares;
//   the strategy by ChooseShardStrategy's cost and memory model with the per-device budget, or
//   SEQUENCE in place for devices that share the request's memory (see shares_request_memory).
//   Otherwise one device, so that concurrent small requests run side by side on different
//   devices.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/admission.h"
#include "engine/attention_spec.h"
#include "engine/tensor.h"

namespace da::engine {

struct PlacementOptions {
  int devices = 1;                  // Local devices that compute.
  bool computes_shares = true;      // Their backend computes shares (Backend::ComputesShares).
  int64_t device_budget_bytes = 0;  // One device's memory budget; 0: unlimited.
  double min_shard_flops = 1e9;     // AUTO shards requests of at least this many FLOPs.
  // The devices compute in the memory the request is in (CPU devices): a SEQUENCE share of one
  // batch is then computed in place, with no copy, so AUTO prefers SEQUENCE for a non-causal
  // request of one batch (causal SEQUENCE shares are uneven: later tokens see more keys).
  bool shares_request_memory = false;
};

struct Placement {
  int devices = 1;  // 1: one device; more: an in-process shard group over that many devices.
  ShardPolicy strategy = ShardPolicy::kNone;  // kHeads or kSequence when devices > 1.
  std::string reason;                         // Why, in a few words, for logs.
};

// `estimate` is the request's memory on one device (Engine::EstimateMemory; its `device` bytes
// are compared with device_budget_bytes), `flops` its cost (EstimateFlops).
absl::StatusOr<Placement> PlaceRequest(const ProblemShape& shape, DType dtype, DType out_dtype,
                                       const AttentionSpec& spec, const MemoryEstimate& estimate,
                                       double flops, const PlacementOptions& options);

}  // namespace da::engine
