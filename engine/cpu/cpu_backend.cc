#include "engine/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/cpu/aligned_buffer.h"
#include "engine/cpu/task_plan.h"
#include "engine/dilation.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using cpu::AlignedBuffer;
using cpu::RoundUp;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
struct ThreadSpace {
  AlignedBuffer q, kt, v, out, lse, scratch, bf16;
};

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

struct CpuBackend::Workspace {
  std::vector<ThreadSpace> threads;
  AlignedBuffer acc, max_lse, weight;  // LONGNET running state.
};

CpuBackend::CpuBackend(cpu::Isa isa)
    : isa_(isa), bf16_(isa == cpu::Isa::kAvx512 && cpu::HasBf16DotProducts()) {}
CpuBackend::~CpuBackend() = default;

std::unique_ptr<CpuBackend::Workspace> CpuBackend::TakeWorkspace() {
  std::lock_guard<std::mutex> lock(pool_mutex_);
  if (idle_workspaces_.empty()) return std::make_unique<Workspace>();
  std::unique_ptr<Workspace> workspace = std::move(idle_workspaces_.back());
  idle_workspaces_.pop_back();
  return workspace;
}

void CpuBackend::ReturnWorkspace(std::unique_ptr<Workspace> workspace) {
  std::lock_guard<std::mutex> lock(pool_mutex_);
  idle_workspaces_.push_back(std::move(workspace));
}

absl::StatusOr<PrecisionChoice> CpuBackend::ChoosePrecision(const AttentionSpec& spec) const {
  const std::string supported = bf16_ ? "auto, fp32, bf16" : "auto, fp32";
  switch (spec.precision) {
    case Precision::kAuto:
      if (bf16_) {
        return PrecisionChoice{Precision::kBFloat16,
                               "auto: this CPU has AVX512-BF16; bf16 products with fp32 "
                               "accumulation (relative L2 error within 2e-2)"};
      }
      return PrecisionChoice{Precision::kFloat32, absl::StrCat("auto: no AVX512-BF16 on the ",
                                                               cpu::IsaName(isa_), " path; fp32")};
    case Precision::kFloat32:
      return PrecisionChoice{Precision::kFloat32, "requested fp32"};
    case Precision::kBFloat16:
      if (bf16_) return PrecisionChoice{Precision::kBFloat16, "requested bf16"};
      break;
    case Precision::kFloat16:
    case Precision::kFloat8:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "spec.precision ", PrecisionName(spec.precision), " is not supported by the cpu ",
      "backend on this machine (", cpu::IsaName(isa_), "); supported: ", supported));
}

absl::Status CpuBackend::Supports(const ProblemShape&, DType, const AttentionSpec& spec) const {
  return ChoosePrecision(spec).status();
}

absl::Status CpuBackend::Run(const TensorView& q, const TensorView& k, const TensorView& v,
                             const AttentionSpec& spec, const MutableTensorView& out,
                             const RunContext& context) {
  const Shape4& s = q.shape;
  const int64_t seq_len = s.seq_len;
  const int64_t heads = s.heads;
  const int64_t head_dim = s.head_dim;
  const int64_t dim_pad = RoundUp(head_dim, cpu::kDimAlign);
  const float q_factor = static_cast<float>(spec.ScaleFor(head_dim)) * kLog2e;
  const bool longnet = spec.mode == CombineMode::kLongNet;
  const float group_factor = 1.0f / static_cast<float>(spec.patterns.size());
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(heads, spec);
  const int threads = context.pool != nullptr ? context.pool->size() : 1;
  const auto cancelled = [&] { return context.cancelled != nullptr && context.cancelled->load(); };
  absl::StatusOr<PrecisionChoice> precision = ChoosePrecision(spec);
  if (!precision.ok()) return precision.status();
  const bool bf16 = precision->precision == Precision::kBFloat16;

  std::unique_ptr<Workspace> ws = TakeWorkspace();
  struct Returner {
    CpuBackend* backend;
    std::unique_ptr<Workspace>& ws;
    ~Returner() { backend->ReturnWorkspace(std::move(ws)); }
  } returner{this, ws};
  if (static_cast<int>(ws->threads.size()) < threads) ws->threads.resize(threads);

  // Per-thread tiles sized for the largest chunk any task can have.
  int64_t max_kept = 0;
  for (const Pattern& p : spec.patterns) {
    max_kept = std::max(max_kept, (std::min(p.segment_len, seq_len) + p.dilation - 1) / p.dilation);
  }
  const int64_t rows_pad = RoundUp(max_kept, cpu::kRowAlign);
  const int64_t keys_pad_max = RoundUp(max_kept, cpu::kKeyAlign);
  for (int t = 0; t < threads; ++t) {
    ThreadSpace& ts = ws->threads[t];
    if (!ts.q.Reserve(rows_pad * dim_pad) || !ts.kt.Reserve(dim_pad * keys_pad_max) ||
        !ts.v.Reserve(keys_pad_max * dim_pad) || !ts.out.Reserve(rows_pad * dim_pad) ||
        !ts.lse.Reserve(rows_pad) || !ts.scratch.Reserve(cpu::KernelScratchFloats(dim_pad)) ||
        (bf16 && !ts.bf16.Reserve(cpu::KernelBf16ScratchFloats(rows_pad, keys_pad_max, dim_pad)))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: cannot allocate workspace for ", max_kept, " kept rows"));
    }
  }

  // LONGNET state per (b, n, head): fp32 accumulator (the output itself when it is fp32), running
  // max LSE and weight sum. GROUPED writes straight into a zeroed output.
  const int64_t rows_total = s.batch * seq_len * heads;
  float* acc = nullptr;
  float* max_lse = nullptr;
  float* weight = nullptr;
  if (longnet) {
    acc = out.dtype == DType::kFloat32 ? static_cast<float*>(out.data)
                                       : ws->acc.Reserve(rows_total * head_dim);
    max_lse = ws->max_lse.Reserve(rows_total);
    weight = ws->weight.Reserve(rows_total);
    if (acc == nullptr || max_lse == nullptr || weight == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: cannot allocate combine state for ", rows_total, " rows"));
    }
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

  for (const std::vector<cpu::Task>& tasks : cpu::PlanTasks(s, spec, work, threads)) {
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
