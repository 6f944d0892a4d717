// One request computed by several devices of this process (an in-process shard group): each
// device computes its share (engine/share.h) with its own backend, plan cache entry and pool, at
// the same time; the shares' outputs are the whole problem's rows, so the result equals the
// single-device output (bit-identical on CPU devices: the same kernel on the same packed rows).
//
//   std::vector<ShareCompute> devices = {{cpu0_backend, &plans, &pool0, "cpu:0"},
//                                        {cpu1_backend, &plans, &pool1, "cpu:1"}};
//   HostKeyExchange exchange;
//   DA_ASSIGN_OR_RETURN(LocalShardStats stats, RunLocalSharded(problem, devices, exchange));
//
// Data movement goes through two seams a GPU backend fills in: each share's inputs are copied
// out of the whole tensors into the device's buffers (host memory for CPU devices; a GPU copies
// them to its memory, through its backend), and for SEQUENCE the kept K/V rows of segments that
// span shares come through a KeyExchange (for CPU devices: one host copy of each set's rows, read
// by every device; between GPUs: peer copies or NCCL grouped send/recv).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/shard_group.h"
#include "engine/shard_plan.h"

namespace da::engine {

// Supplies, for the device computing share `device` of a SEQUENCE layout, the gathered K and V
// rows of every spanning set (index-aligned with `sets`; an entry may stay empty for a set the
// share holds no rows of), in host memory; RunLocalSharded moves them into a device's memory
// through its backend when the device computes elsewhere (a peer-to-peer exchange between GPUs
// will hand out device memory directly). Called once per device per run, from the device's own
// thread; the views stay valid until the exchange is destroyed. `stop` (optional) set during the
// copies returns CANCELLED within one piece of kStopCheckBytes (engine/shard_data.h).
class KeyExchange {
 public:
  virtual ~KeyExchange() = default;
  virtual absl::StatusOr<std::vector<GatheredKeys>> Gather(
      const TensorView& whole_k, const TensorView& whole_v, const ShardLayout& layout,
      const std::vector<SpanningKeys>& sets, int device, const std::atomic<bool>* stop) = 0;
  // Bytes of kept rows moved so far.
  virtual int64_t bytes() const = 0;
};

// CPU devices share host memory: every set's rows are copied once out of the whole k and v (on
// first use, under a lock) and read by every device that needs them.
class HostKeyExchange final : public KeyExchange {
 public:
  absl::StatusOr<std::vector<GatheredKeys>> Gather(
      const TensorView& whole_k, const TensorView& whole_v, const ShardLayout& layout,
      const std::vector<SpanningKeys>& sets, int device, const std::atomic<bool>* stop) override;
  int64_t bytes() const override;

 private:
  mutable std::mutex mutex_;
  std::vector<std::vector<uint8_t>> k_, v_;
  std::vector<bool> done_;
};

struct LocalShardStats {
  ShardPolicy strategy = ShardPolicy::kSequence;
  std::vector<double> compute_seconds;  // Per device, in its share's RunShare.
  std::vector<double> copy_seconds;     // Per device: its share in and out, and the exchange.
  int64_t exchange_bytes = 0;           // Kept K/V rows of spanning segments gathered.
  int plan_cache_hits = 0;              // Devices whose share's plan was cached.
  std::vector<RunReport> reports;       // Per device, from its share's RunShare.
};

// The memory a local sharded run holds beyond the whole tensors: every share's copy of its
// inputs and output (their sum is the whole tensors' bytes; none for a share computed in place:
// host devices and ShareIsContiguous) and the gathered rows of SEQUENCE.
int64_t LocalShardCopyBytes(const ProblemShape& shape, DType dtype, DType out_dtype,
                            const AttentionSpec& spec, const ShardLayout& layout, bool host);

// Runs problem (strategy kHeads or kSequence; compute ignored) over devices.size() devices,
// share r on devices[r], each on a thread of its own (share 0 on the calling thread). The first
// failure is returned (naming the device); problem.stop stops every device's compute.
absl::StatusOr<LocalShardStats> RunLocalSharded(const ShardedProblem& problem,
                                                const std::vector<ShareCompute>& devices,
                                                KeyExchange& exchange);

}  // namespace da::engine
