#include "engine/cpu/cpu_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "engine/cpu/aligned_buffer.h"
#include "engine/cpu/task_plan.h"
#include "engine/dilation.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using cpu::AlignedBuffer;
using cpu::RoundUp;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
// Copies rows kept.first + i * kept.stride, i in [begin, end), of `head` into dst as fp32 times
// factor: row-major [end - begin, dim_pad] or, with transpose, [dim_pad, ld] (column per row).
void Pack(const TensorView& t, int64_t b, int64_t head, const KeptRange& kept, int64_t begin,
          int64_t end, float factor, bool transpose, int64_t dim_pad, int64_t ld, float* dst) {
  const Shape4& s = t.shape;
  const int64_t dim = s.head_dim;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = kept.first + i * kept.stride;
    const int64_t base = ((b * s.seq_len + n) * s.heads + head) * dim;
    const int64_t row = i - begin;
    if (transpose) {
      for (int64_t d = 0; d < dim; ++d)
        dst[d * ld + row] = factor * LoadAsFloat(t.dtype, t.data, base + d);
    } else if (t.dtype == DType::kFloat32) {
      const float* src = static_cast<const float*>(t.data) + base;
      float* out = dst + row * dim_pad;
      for (int64_t d = 0; d < dim; ++d) out[d] = factor * src[d];
      std::fill(out + dim, out + dim_pad, 0.0f);
    } else {
      float* out = dst + row * dim_pad;
      for (int64_t d = 0; d < dim; ++d) out[d] = factor * LoadAsFloat(t.dtype, t.data, base + d);
      std::fill(out + dim, out + dim_pad, 0.0f);
    }
  }
}

}  // namespace

namespace {

struct ThreadSpace {
  AlignedBuffer q, kt, v, out, lse, scratch, bf16;
};

// What a plan's workspace must hold.
struct WorkspaceSizes {
  int threads = 1;
  int64_t head_dim = 0;
  int64_t dim_pad = 0;
  int64_t rows_pad = 0;    // Query rows of the largest chunk, padded.
  int64_t keys_pad = 0;    // Keys of the largest segment, padded.
  int64_t rows_total = 0;  // batch x seq x heads: LONGNET state rows.
  bool longnet = false;
  bool accumulator = false;  // LONGNET with a non-fp32 output needs its own fp32 accumulator.
  bool bf16 = false;
};

struct Workspace {
  std::vector<ThreadSpace> threads;
  AlignedBuffer acc, max_lse, weight;  // LONGNET running state.

  int64_t bytes() const {
    int64_t total = acc.capacity_bytes() + max_lse.capacity_bytes() + weight.capacity_bytes();
    for (const ThreadSpace& t : threads) {
      for (const AlignedBuffer* b : {&t.q, &t.kt, &t.v, &t.out, &t.lse, &t.scratch, &t.bf16}) {
        total += b->capacity_bytes();
      }
    }
    return total;
  }
};

// Reserves every buffer; with touch, writes them once so that their pages are resident.
absl::Status PrepareWorkspace(Workspace& ws, const WorkspaceSizes& z, bool touch) {
  ws.threads.resize(z.threads);
  std::vector<std::pair<AlignedBuffer*, int64_t>> wanted;
  for (ThreadSpace& t : ws.threads) {
    wanted.push_back({&t.q, z.rows_pad * z.dim_pad});
    wanted.push_back({&t.kt, z.dim_pad * z.keys_pad});
    wanted.push_back({&t.v, z.keys_pad * z.dim_pad});
    wanted.push_back({&t.out, z.rows_pad * z.dim_pad});
    wanted.push_back({&t.lse, z.rows_pad});
    wanted.push_back({&t.scratch, cpu::KernelScratchFloats(z.dim_pad)});
    if (z.bf16) {
      wanted.push_back({&t.bf16, cpu::KernelBf16ScratchFloats(z.rows_pad, z.keys_pad, z.dim_pad)});
    }
  }
  if (z.longnet) {
    if (z.accumulator) wanted.push_back({&ws.acc, z.rows_total * z.head_dim});
    wanted.push_back({&ws.max_lse, z.rows_total});
    wanted.push_back({&ws.weight, z.rows_total});
  }
  for (const auto& [buffer, floats] : wanted) {
    float* data = buffer->Reserve(floats);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: cannot allocate a ", floats * 4, "-byte workspace buffer"));
    }
    if (touch) std::memset(data, 0, buffer->capacity_bytes());
  }
  return absl::OkStatus();
}

class CpuPlan final : public Plan {
 public:
  CpuPlan(const PlanKey& key, const WorkspaceSizes& sizes) : key_(key), sizes_(sizes) {}

  absl::Status Build() {
    work_ = AssignHeadPatterns(key_.shape.heads, SpecOf(key_));
    loops_ = cpu::PlanTasks(key_.shape.QueryShape(), SpecOf(key_), work_, sizes_.threads);
    idle_ = std::make_unique<Workspace>();
    DA_RETURN_IF_ERROR(PrepareWorkspace(*idle_, sizes_, /*touch=*/true));
    workspace_bytes_ = idle_->bytes();
    for (const auto& loop : loops_) table_bytes_ += loop.size() * sizeof(cpu::Task);
    return absl::OkStatus();
  }

  int64_t bytes() const override { return workspace_bytes_ + table_bytes_; }
  const WorkspaceSizes& sizes() const { return sizes_; }
  const std::vector<std::vector<cpu::Task>>& loops() const { return loops_; }

  // The plan's own workspace, or null while another run holds it.
  std::unique_ptr<Workspace> TakeWorkspace() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::move(idle_);
  }
  void ReturnWorkspace(std::unique_ptr<Workspace> workspace) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_ == nullptr) idle_ = std::move(workspace);
  }

  static AttentionSpec SpecOf(const PlanKey& key) {
    AttentionSpec spec;
    spec.patterns = key.patterns;
    spec.causal = key.causal;
    spec.mode = key.mode;
    return spec;
  }

 private:
  const PlanKey key_;
  const WorkspaceSizes sizes_;
  std::vector<std::vector<HeadWork>> work_;  // Tasks point into it.
  std::vector<std::vector<cpu::Task>> loops_;
  std::mutex mutex_;
  std::unique_ptr<Workspace> idle_;
  int64_t workspace_bytes_ = 0;
  int64_t table_bytes_ = 0;
};

}  // namespace

CpuBackend::CpuBackend(cpu::Isa isa, PrecisionPolicyOptions precision)
    : isa_(isa),
      bf16_(isa == cpu::Isa::kAvx512 && cpu::HasBf16DotProducts()),
      capabilities_(CpuCapabilities(isa == cpu::Isa::kAvx512)),
      precision_options_(precision) {}
CpuBackend::~CpuBackend() = default;

absl::StatusOr<std::shared_ptr<Plan>> CpuBackend::BuildPlan(const PlanKey& key) {
  const auto start = std::chrono::steady_clock::now();
  WorkspaceSizes z;
  z.threads = std::max(1, key.threads);
  z.head_dim = key.shape.head_dim;
  z.dim_pad = RoundUp(key.shape.head_dim, cpu::kDimAlign);
  int64_t max_kept = 0;
  for (const Pattern& p : key.patterns) {
    const int64_t span = std::min(p.segment_len, key.shape.seq_len);
    max_kept = std::max(max_kept, (span + p.dilation - 1) / p.dilation);
  }
  z.rows_pad = RoundUp(max_kept, cpu::kRowAlign);
  z.keys_pad = RoundUp(max_kept, cpu::kKeyAlign);
  z.rows_total = key.shape.batch * key.shape.seq_len * key.shape.heads;
  z.longnet = key.mode == CombineMode::kLongNet;
  z.accumulator = z.longnet && key.out_dtype != DType::kFloat32;
  z.bf16 = key.precision == Precision::kBFloat16;
  if (z.bf16 && !bf16_) {
    return absl::InvalidArgumentError("bf16 plan requested on a CPU path without AVX512-BF16");
  }
  auto plan = std::make_shared<CpuPlan>(key, z);
  DA_RETURN_IF_ERROR(plan->Build());
  plan->build_time_us = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
  return plan;
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
  CpuPlan* plan = dynamic_cast<CpuPlan*>(&plan_base);
  if (plan == nullptr) return absl::InternalError("cpu backend given a plan it did not build");
  const WorkspaceSizes& z = plan->sizes();
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
  std::unique_ptr<Workspace> ws = plan->TakeWorkspace();
  if (ws == nullptr) {
    ws = std::make_unique<Workspace>();
    DA_RETURN_IF_ERROR(PrepareWorkspace(*ws, z, /*touch=*/false));
  }
  struct Returner {
    CpuPlan* plan;
    std::unique_ptr<Workspace>& ws;
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
    ThreadSpace& ts = ws->threads[thread];
    const int64_t kv_head = KvHeadFor(task.head, heads, k.shape.heads);
    const int64_t keys = spec.causal ? task.row_end : task.kept.count;
    const int64_t keys_pad = RoundUp(keys, cpu::kKeyAlign);
    const int64_t rows = task.row_end - task.row_begin;
    float* qt = ts.q.data();
    float* kt = ts.kt.data();
    float* vt = ts.v.data();
    Pack(q, task.batch, task.head, task.kept, task.row_begin, task.row_end, q_factor, false,
         dim_pad, 0, qt);
    std::fill(qt + rows * dim_pad, qt + RoundUp(rows, cpu::kRowAlign) * dim_pad, 0.0f);
    std::fill(kt, kt + dim_pad * keys_pad, 0.0f);
    Pack(k, task.batch, kv_head, task.kept, 0, keys, 1.0f, true, dim_pad, keys_pad, kt);
    Pack(v, task.batch, kv_head, task.kept, 0, keys, 1.0f, false, dim_pad, 0, vt);
    std::fill(vt + keys * dim_pad, vt + keys_pad * dim_pad, 0.0f);

    cpu::SegmentKernelArgs args;
    args.keys = keys;
    args.dim_pad = dim_pad;
    args.keys_pad = keys_pad;
    args.causal = spec.causal;
    args.row_begin = task.row_begin;
    args.row_end = task.row_end;
    args.q = qt;
    args.kt = kt;
    args.v = vt;
    args.out = ts.out.data();
    args.lse = ts.lse.data();
    args.scratch = ts.scratch.data();
    args.cancelled = context.cancelled;
    if (bf16) {
      args.bf16_scratch = ts.bf16.data();
      cpu::RunSegmentKernelBf16(args);
    } else {
      cpu::RunSegmentKernel(isa_, args);
    }

    if (cancelled()) return;  // The kernel may have stopped early: its rows are not valid.
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t n = task.kept.first + (task.row_begin + i) * task.kept.stride;
      const int64_t row = (task.batch * seq_len + n) * heads + task.head;
      const float* src = args.out + i * dim_pad;
      if (!longnet) {
        for (int64_t d = 0; d < head_dim; ++d) {
          StoreFromFloat(out.dtype, out.data, row * head_dim + d, src[d] * group_factor);
        }
        continue;
      }
      // Fold this pattern into the running softmax over the patterns' LSEs.
      const float lse = args.lse[i];
      const float new_max = std::max(max_lse[row], lse);
      const float old_factor = std::exp(max_lse[row] - new_max);
      const float new_factor = std::exp(lse - new_max);
      float* dst = acc + row * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = dst[d] * old_factor + src[d] * new_factor;
      weight[row] = weight[row] * old_factor + new_factor;
      max_lse[row] = new_max;
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
