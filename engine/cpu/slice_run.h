// One rank's share of a sharded problem on the CPU (engine/shard_plan.h): the rows a single
// process would compute for this rank's tokens and heads, with the same kernel on the same packed
// rows, so the share equals those rows of the whole problem's output.
//
//   SliceProblem p{.shape = whole, .spec = spec, .share = layout.shares[rank], .q = my_q, ...};
//   p.spanning = &sets;     // SpanningKeySets(whole, spec, layout) (SEQUENCE)
//   p.gathered = &gathered;  // every set's kept K/V rows, own and received
//   SliceRunner runner;
//   DA_RETURN_IF_ERROR(runner.Run(p, &pool, &stop));
//
// Geometry is global: offsets and (GROUPED) patterns follow the global head index, segments and
// kept positions the global token position, and GROUPED divides by the global pattern count. A
// segment wholly inside the share reads its keys from the local k and v; a spanning segment reads
// them from its gathered rows.
//
// Thread safety: one Run at a time per runner (it owns a workspace reused across runs: fresh
// pages cost more than the arithmetic of a small share).
#pragma once

#include <atomic>
#include <vector>

#include "absl/status/status.h"
#include "engine/attention_spec.h"
#include "engine/cpu/attention_kernel.h"
#include "engine/cpu/cpu_plan.h"
#include "engine/shard_plan.h"
#include "engine/tensor.h"

namespace da::engine {
class ThreadPool;
}

namespace da::engine::cpu {

// The kept K and V rows of one spanning set from every rank that holds them, in kept order:
// [batch, set.kept.count, head_dim] each, in the input dtype.
struct GatheredKeys {
  const void* k = nullptr;
  const void* v = nullptr;
};

struct SliceProblem {
  ProblemShape shape;  // The whole problem.
  AttentionSpec spec;
  RankShare share;        // This rank's tokens and heads.
  TensorView q, k, v;     // This rank's inputs: share.QueryShape(shape), share.KeyShape(shape).
  MutableTensorView out;  // share.QueryShape(shape), in the output dtype.
  Precision precision = Precision::kFloat32;  // fp32, or bf16 on a CPU with AVX512-BF16.
  // SEQUENCE: the layout's spanning sets and, index-aligned, their gathered rows. An entry may be
  // empty (null k and v) for a set this rank holds no rows of. Null for HEADS.
  const std::vector<SpanningKeys>* spanning = nullptr;
  const std::vector<GatheredKeys>* gathered = nullptr;
};

class SliceRunner {
 public:
  explicit SliceRunner(Isa isa = SelectedIsa());

  // Computes problem.out. INVALID_ARGUMENT for views that do not match the share, or a spanning
  // segment without gathered rows; CANCELLED when `cancelled` turned true.
  absl::Status Run(const SliceProblem& problem, ThreadPool* pool,
                   const std::atomic<bool>* cancelled);

  int64_t workspace_bytes() const { return workspace_.bytes(); }

 private:
  Isa isa_;
  Workspace workspace_;
};

}  // namespace da::engine::cpu
