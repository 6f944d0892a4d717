// The CPU backend: the fused kernel of attention_kernel.h driven over (batch, head, segment, query
// chunk) tasks on the engine's thread pool; fp32 accumulation; memory O(N).
//
// A task packs the kept rows of one segment (queries of its chunk, the keys they can see) into
// padded fp32 tiles, runs the kernel, then writes its rows of the output. LONGNET patterns run one
// after another, each folding its outputs and LSEs into per-position running state, so patterns
// combine in the same pass over the output (one pattern: its rows are the output, written
// directly). GROUPED heads run disjoint patterns, so all their tasks run in one parallel loop and
// write the output directly.
//
// A plan (BuildPlan) holds the task decomposition and one workspace (packed tiles, LONGNET state),
// allocated and touched when the plan is built: page faults on fresh memory cost more than the
// arithmetic of a small request, and a cached plan pays them once. A run that finds the plan's
// workspace taken by a concurrent run of the same plan allocates its own.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu/attention_kernel.h"
#include "engine/precision_policy.h"

namespace da::engine {

class CpuBackend final : public Backend {
 public:
  // `bf16_kernel`: the kernel of bf16 runs (tests name one); by default SelectedBf16Kernel(isa).
  // A kernel this path does not have (kAmx without cpu::HasAmxBf16(), any without AVX512-BF16)
  // is not run: the default is taken instead.
  explicit CpuBackend(cpu::Isa isa = cpu::SelectedIsa(), PrecisionPolicyOptions precision = {},
                      std::optional<cpu::Bf16Kernel> bf16_kernel = std::nullopt);
  ~CpuBackend() override;

  std::string Name() const override { return "cpu"; }
  std::vector<Precision> Precisions() const override;
  cpu::Isa isa() const { return isa_; }
  cpu::Bf16Kernel bf16_kernel() const { return bf16_kernel_; }

  // The PrecisionPolicy for this CPU: fp32 always; bf16 products (fp32 accumulation) when the
  // CPU has AVX512-BF16 and the AVX-512 path is selected, which AUTO prefers unless they are the
  // slower (vdpbf16ps on a CPU that is not AMD; AMX never). fp16 and fp8 are not offered on CPUs.
  absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const override;

  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override;
  absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                  const std::atomic<bool>* stop) override;
  int64_t PlanWorkspaceBytes(const PlanKey& key) const override;
  // Any share (engine/share.h); a whole problem is the share that covers it.
  absl::Status RunShare(Plan& plan, const ShareProblem& problem,
                        const RunContext& context) override;

 private:
  cpu::Isa isa_;
  cpu::Bf16Kernel bf16_kernel_;  // kNone unless the CPU has AVX512-BF16 on the AVX-512 path.
  DeviceCapabilities capabilities_;
  PrecisionPolicyOptions precision_options_;
};

}  // namespace da::engine
