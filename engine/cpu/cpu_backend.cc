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

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
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
  const int64_t seq_len = s.seq_len;
  const int64_t heads = s.heads;
  const int64_t head_dim = s.head_dim;
  const int64_t dim_pad = z.dim_pad;
  const float q_factor = static_cast<float>(spec.ScaleFor(head_dim)) * kLog2e;
  const bool longnet = z.longnet;
  const bool bf16 = z.bf16;
  const float group_factor = 1.0f / static_cast<float>(spec.patterns.size());
  const int threads = context.pool != nullptr ? context.pool->size() : 1;
  if (threads > z.threads) {
    return absl::InternalError(
        absl::StrCat("cpu plan cut for ", z.threads, " threads, run on ", threads));
  }
  const auto cancelled = [&] { return context.cancelled != nullptr && context.cancelled->load(); };

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

  // LONGNET state per (b, n, head): fp32 accumulator (the output itself when it is fp32), running
  // max LSE and weight sum. GROUPED writes straight into a zeroed output.
  const int64_t rows_total = z.rows_total;
  float* acc = nullptr;
  float* max_lse = nullptr;
  float* weight = nullptr;
  if (longnet) {
    acc = z.accumulator ? ws->acc.data() : static_cast<float*>(out.data);
    max_lse = ws->max_lse.data();
    weight = ws->weight.data();
    std::fill(acc, acc + rows_total * head_dim, 0.0f);
    std::fill(max_lse, max_lse + rows_total, kNegInf);
    std::fill(weight, weight + rows_total, 0.0f);
  } else {
    std::memset(out.data, 0, out.bytes);  // Zero bits are 0.0 in fp32, fp16 and bf16.
  }

  const auto run_task = [&](const cpu::Task& task, int thread) {
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
    io.dim_pad = dim_pad;
    io.q_factor = q_factor;
    io.causal = spec.causal;
    if (!cpu::RunSegmentTask(isa_, bf16, io, ts, context.cancelled)) return;

    for (int64_t i = 0; i < task.row_end - task.row_begin; ++i) {
      const int64_t n = task.kept.first + (task.row_begin + i) * task.kept.stride;
      const int64_t row = (task.batch * seq_len + n) * heads + task.head;
      const float* src = ts.out.data() + i * dim_pad;
      if (longnet) {
        cpu::FoldLongNetRow(src, ts.lse.data()[i], head_dim, acc + row * head_dim, &max_lse[row],
                            &weight[row]);
      } else {
        for (int64_t d = 0; d < head_dim; ++d) {
          StoreFromFloat(out.dtype, out.data, row * head_dim + d, src[d] * group_factor);
        }
      }
    }
  };

  const auto parallel = [&](int64_t count, const std::function<void(int64_t, int)>& body) {
    if (context.pool != nullptr) {
      context.pool->ParallelFor(count, body);
    } else {
      for (int64_t i = 0; i < count; ++i) body(i, 0);
    }
  };

  for (const std::vector<cpu::Task>& tasks : plan->loops()) {
    if (cancelled()) break;
    parallel(static_cast<int64_t>(tasks.size()), [&](int64_t i, int thread) {
      if (!cancelled()) run_task(tasks[i], thread);
    });
  }
  if (cancelled()) return absl::CancelledError("cpu run cancelled");

  if (longnet) {
    const int64_t chunk = 4096;
    parallel((rows_total + chunk - 1) / chunk, [&](int64_t c, int) {
      for (int64_t row = c * chunk; row < std::min(rows_total, (c + 1) * chunk); ++row) {
        const float inv = weight[row] > 0.0f ? 1.0f / weight[row] : 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) {
          StoreFromFloat(out.dtype, out.data, row * head_dim + d, acc[row * head_dim + d] * inv);
        }
      }
    });
  }
  return absl::OkStatus();
}

}  // namespace da::engine
