#include "engine/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_plan.h"
#include "engine/cpu/segment_task.h"
#include "engine/cpu/task_plan.h"
#include "engine/dilation.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace

CpuBackend::CpuBackend(cpu::Isa isa, PrecisionPolicyOptions precision)
    : isa_(isa),
      bf16_(isa == cpu::Isa::kAvx512 && cpu::HasBf16DotProducts()),
      capabilities_(CpuCapabilities(isa == cpu::Isa::kAvx512)),
      precision_options_(precision) {}
CpuBackend::~CpuBackend() = default;

absl::StatusOr<std::shared_ptr<Plan>> CpuBackend::BuildPlan(const PlanKey& key,
                                                            const std::atomic<bool>* stop) {
  if (key.precision == Precision::kBFloat16 && !bf16_) {
    return absl::InvalidArgumentError("bf16 plan requested on a CPU path without AVX512-BF16");
  }
  DA_ASSIGN_OR_RETURN(std::shared_ptr<cpu::CpuPlan> plan, cpu::BuildCpuPlan(key, stop));
  return std::shared_ptr<Plan>(std::move(plan));
}

int64_t CpuBackend::PlanWorkspaceBytes(const PlanKey& key) const {
  return cpu::WorkspaceBytes(cpu::SizesFor(key));
}

absl::StatusOr<PrecisionChoice> CpuBackend::ChoosePrecision(const AttentionSpec& spec) const {
  return engine::ChoosePrecision(capabilities_, spec.precision, precision_options_);
}

absl::Status CpuBackend::Supports(const ProblemShape&, DType, const AttentionSpec& spec) const {
  return ChoosePrecision(spec).status();
}

absl::Status CpuBackend::RunPlan(Plan& plan_base, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const AttentionSpec& spec,
                                 const MutableTensorView& out, const RunContext& context) {
  cpu::CpuPlan* plan = dynamic_cast<cpu::CpuPlan*>(&plan_base);
  if (plan == nullptr) return absl::InternalError("cpu backend given a plan it did not build");
  const cpu::WorkspaceSizes& z = plan->sizes();
  const Shape4& s = q.shape;
  const int64_t heads = s.heads;
  const int64_t head_dim = s.head_dim;
  const float q_factor = static_cast<float>(spec.ScaleFor(head_dim)) * kLog2e;
  const int threads = context.pool != nullptr ? context.pool->size() : 1;
  if (threads > z.threads) {
    return absl::InternalError(
        absl::StrCat("cpu plan cut for ", z.threads, " threads, run on ", threads));
  }

  // The plan's warm workspace, or (when a concurrent run of this plan holds it) a fresh one.
  std::unique_ptr<cpu::Workspace> ws = plan->TakeWorkspace();
  if (ws == nullptr) {
    ws = std::make_unique<cpu::Workspace>();
    DA_RETURN_IF_ERROR(cpu::PrepareWorkspace(*ws, z, /*touch=*/false));
  }
  struct Returner {
    cpu::CpuPlan* plan;
    std::unique_ptr<cpu::Workspace>& ws;
    ~Returner() { plan->ReturnWorkspace(std::move(ws)); }
  } returner{plan, ws};

  cpu::RowFold fold(z, *ws, out, spec.patterns.size());
  DA_RETURN_IF_ERROR(
      cpu::RunLoops(plan->loops(), context.pool, context.cancelled, "cpu run",
                    [&](const cpu::Task& task, int thread) {
                      cpu::ThreadSpace& ts = ws->threads[thread];
                      const int64_t kv_head = KvHeadFor(task.head, heads, k.shape.heads);
                      cpu::SegmentTaskIo io;
                      io.q = cpu::TensorRows(q, task.batch, task.head, task.kept);
                      io.k = cpu::TensorRows(k, task.batch, kv_head, task.kept);
                      io.v = cpu::TensorRows(v, task.batch, kv_head, task.kept);
                      io.keys = spec.causal ? task.row_end : task.kept.count;
                      io.row_begin = task.row_begin;
                      io.row_end = task.row_end;
                      io.head_dim = head_dim;
                      io.dim_pad = z.dim_pad;
                      io.q_factor = q_factor;
                      io.causal = spec.causal;
                      if (cpu::RunSegmentTask(isa_, z.bf16, io, ts, context.cancelled)) {
                        fold.AddTask(task, ts, task.head);
                      }
                    }));
  fold.Finish(context.pool);
  return absl::OkStatus();
}

}  // namespace da::engine
