// The CPU backend: the fused kernel of attention_kernel.h driven over (batch, head, segment, query
// chunk) tasks on the engine's thread pool; fp32 accumulation; memory O(N).
//
// A task packs the kept rows of one segment (queries of its chunk, the keys they can see) into
// padded fp32 tiles, runs the kernel, then writes its rows of the output. LONGNET patterns run one
// after another, each folding its outputs and LSEs into per-position running state, so patterns
// combine in the same pass over the output. GROUPED heads run disjoint patterns, so all their
// tasks run in one parallel loop and write the output directly.
//
// Workspaces (packed tiles, LONGNET state) are pooled across runs: page faults on fresh memory
// cost more than the arithmetic of a small request.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu/attention_kernel.h"

namespace da::engine {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(cpu::Isa isa = cpu::SelectedIsa());
  ~CpuBackend() override;

  std::string Name() const override { return "cpu"; }
  cpu::Isa isa() const { return isa_; }

  // fp32 always; bf16 dot products (fp32 accumulation) when the CPU has AVX512-BF16 and the wish is
  // BF16 or AUTO. fp16 and fp8 are not offered on CPUs.
  absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const override;

  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override;
  absl::Status Run(const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionSpec& spec, const MutableTensorView& out,
                   const RunContext& context) override;

 private:
  struct Workspace;
  std::unique_ptr<Workspace> TakeWorkspace();
  void ReturnWorkspace(std::unique_ptr<Workspace> workspace);

  cpu::Isa isa_;
  bool bf16_;  // The CPU has AVX512-BF16 and the AVX-512 path is selected.
  std::mutex pool_mutex_;
  std::vector<std::unique_ptr<Workspace>> idle_workspaces_;
};

}  // namespace da::engine
