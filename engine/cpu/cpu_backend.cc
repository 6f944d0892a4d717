#include "engine/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend_registry.h"
#include "engine/cpu/cpu_plan.h"
#include "engine/cpu/segment_task.h"
#include "engine/cpu/task_plan.h"
#include "engine/dilation.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// The default backend of CPU devices (engine/backend_registry.h).
const bool kRegistered = RegisterBackend(
    {.name = "cpu",
     .device_kind = "cpu",
     .default_for_kind = true,
     .make = [](const DeviceInfo&,
                const BackendOptions& options) -> absl::StatusOr<std::unique_ptr<Backend>> {
       DA_RETURN_IF_ERROR(options.precision.Validate());
       return std::make_unique<CpuBackend>(cpu::SelectedIsa(), options.precision);
     }});

}  // namespace

std::vector<Precision> CpuBackend::Precisions() const { return SupportedPrecisions(capabilities_); }

CpuBackend::CpuBackend(cpu::Isa isa, PrecisionPolicyOptions precision,
                       std::optional<cpu::Bf16Kernel> bf16_kernel)
    : isa_(isa),
      // A named kernel where this path has it (the enum goes slowest to fastest).
      bf16_kernel_(bf16_kernel.has_value() && *bf16_kernel != cpu::Bf16Kernel::kNone &&
                           *bf16_kernel <= cpu::BestBf16Kernel(isa)
                       ? *bf16_kernel
                       : cpu::SelectedBf16Kernel(isa)),
      capabilities_(
          CpuCapabilities(isa == cpu::Isa::kAvx512, bf16_kernel_ == cpu::Bf16Kernel::kAmx)),
      precision_options_(precision) {}
CpuBackend::~CpuBackend() = default;

absl::StatusOr<std::shared_ptr<Plan>> CpuBackend::BuildPlan(const PlanKey& key,
                                                            const std::atomic<bool>* stop) {
  if (key.precision == Precision::kBFloat16 && bf16_kernel_ == cpu::Bf16Kernel::kNone) {
    return absl::InvalidArgumentError("bf16 plan requested on a CPU path without AVX512-BF16");
  }
  if (key.precision != Precision::kBFloat16 && key.precision != Precision::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat("precision ", PrecisionName(key.precision),
                                                   " is not computed on CPUs; use fp32 or bf16"));
  }
  DA_ASSIGN_OR_RETURN(std::shared_ptr<cpu::CpuPlan> plan, cpu::BuildCpuPlan(key, stop));
  return std::shared_ptr<Plan>(std::move(plan));
}

int64_t CpuBackend::PlanWorkspaceBytes(const PlanKey& key) const { return cpu::PlanBytesFor(key); }

absl::StatusOr<PrecisionChoice> CpuBackend::ChoosePrecision(const AttentionSpec& spec) const {
  return engine::ChoosePrecision(capabilities_, spec.precision, precision_options_);
}

absl::Status CpuBackend::Supports(const ProblemShape&, DType, const AttentionSpec& spec) const {
  return ChoosePrecision(spec).status();
}

absl::Status CpuBackend::RunShare(Plan& plan_base, const ShareProblem& p,
                                  const RunContext& context) {
  cpu::CpuPlan* plan = dynamic_cast<cpu::CpuPlan*>(&plan_base);
  if (plan == nullptr) return absl::InternalError("cpu backend given a plan it did not build");
  DA_RETURN_IF_ERROR(CheckShareViews(p));
  DA_RETURN_IF_ERROR(CheckShareSpace(p, Space()));
  if (plan->key().ShareOrWhole() != p.share) {
    return absl::InternalError(absl::StrCat("cpu plan built for ",
                                            plan->key().ShareOrWhole().ToString(), ", run on ",
                                            p.share.ToString()));
  }
  const cpu::WorkspaceSizes& z = plan->sizes();
  const ProblemShape& s = p.shape;
  const Share& share = p.share;
  const int64_t head_dim = s.head_dim;
  const float q_factor = static_cast<float>(p.spec.ScaleFor(head_dim)) * kLog2e;
  const int threads = context.pool != nullptr ? context.pool->size() : 1;
  if (threads > z.threads) {
    return absl::InternalError(
        absl::StrCat("cpu plan cut for ", z.threads, " threads, run on ", threads));
  }

  // The gathered rows of each spanning set the plan's tasks read, found by the set's identity.
  std::vector<const GatheredKeys*> gathered(plan->spanning().size(), nullptr);
  if (!gathered.empty()) {
    std::map<cpu::SpanningId, size_t> given;
    if (p.spanning != nullptr) {
      for (size_t i = 0; i < p.spanning->size(); ++i) {
        const SpanningKeys& set = (*p.spanning)[i];
        given[{set.pattern_index, set.segment, set.kv_head, set.offset}] = i;
      }
    }
    for (size_t i = 0; i < gathered.size(); ++i) {
      const cpu::SpanningId& id = plan->spanning()[i];
      const auto found = given.find(id);
      if (found == given.end() || (*p.gathered)[found->second].k == nullptr ||
          (*p.gathered)[found->second].v == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("share: pattern ", id.pattern_index, " segment ", id.segment, " kv head ",
                         id.kv_head, " offset ", id.offset, " reads keys outside ",
                         share.ToString(), " but no gathered rows were given for it"));
      }
      gathered[i] = &(*p.gathered)[found->second];
    }
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

  // The plan's pattern count, which its loops were made for (a spec of one pattern run on a plan
  // of several would otherwise store each loop's rows over the last).
  const cpu::RowFold fold(z, *ws, p.out, plan->key().patterns.size());
  DA_RETURN_IF_ERROR(fold.Reset(context.pool, context.cancelled));
  DA_RETURN_IF_ERROR(cpu::RunLoops(
      plan->loops(), context.pool, context.cancelled, "cpu run",
      [&](const cpu::Task& run, int thread) {
        for (int64_t segment = 0; segment < run.segments; ++segment) {
          const cpu::Task task = cpu::SegmentOf(run, segment);
          cpu::ThreadSpace& ts = ws->threads[thread];
          const int64_t local_head = task.head - share.head_begin;
          cpu::SegmentTaskIo io;
          io.q = cpu::TensorRows(p.q, task.batch, local_head, task.kept, share.token_begin);
          if (task.spanning < 0) {
            const int64_t local_kv =
                KvHeadFor(task.head, s.heads, s.kv_heads) - share.kv_head_begin;
            io.k = cpu::TensorRows(p.k, task.batch, local_kv, task.kept, share.token_begin);
            io.v = cpu::TensorRows(p.v, task.batch, local_kv, task.kept, share.token_begin);
          } else {
            const GatheredKeys& g = *gathered[task.spanning];
            const int64_t base = task.batch * task.kept.count * head_dim;
            io.k = {p.k.dtype, g.k, base, head_dim};
            io.v = {p.v.dtype, g.v, base, head_dim};
          }
          io.keys = p.spec.causal ? task.row_end : task.kept.count;
          io.row_begin = task.row_begin;
          io.row_end = task.row_end;
          io.head_dim = head_dim;
          io.dim_pad = z.dim_pad;
          io.q_factor = q_factor;
          io.causal = p.spec.causal;
          if (!cpu::RunSegmentTask(isa_, z.bf16 ? bf16_kernel_ : cpu::Bf16Kernel::kNone, io, ts,
                                   context.cancelled)) {
            return;  // Cancelled: RunLoops reports it.
          }
          fold.AddTask(task, ts, local_head, share.token_begin);
        }
      }));
  return fold.Finish(context.pool, context.cancelled);
}

}  // namespace da::engine
