#include "engine/cpu/slice_run.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/cpu/segment_task.h"
#include "engine/cpu/task_plan.h"
#include "engine/dilation.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

absl::Status CheckShape(const char* what, const Shape4& got, const Shape4& want) {
  if (got.batch == want.batch && got.seq_len == want.seq_len && got.heads == want.heads &&
      got.head_dim == want.head_dim) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("slice ", what, " has shape ", got.ToString(),
                                                 "; the share needs ", want.ToString()));
}

absl::Status CheckViews(const SliceProblem& p) {
  DA_RETURN_IF_ERROR(CheckShape("q", p.q.shape, p.share.QueryShape(p.shape)));
  DA_RETURN_IF_ERROR(CheckShape("k", p.k.shape, p.share.KeyShape(p.shape)));
  DA_RETURN_IF_ERROR(CheckShape("v", p.v.shape, p.share.KeyShape(p.shape)));
  DA_RETURN_IF_ERROR(CheckShape("out", p.out.shape, p.share.QueryShape(p.shape)));
  if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype) {
    return absl::InvalidArgumentError("slice q, k and v must share one dtype");
  }
  if ((p.spanning == nullptr) != (p.gathered == nullptr) ||
      (p.spanning != nullptr && p.spanning->size() != p.gathered->size())) {
    return absl::InvalidArgumentError("slice spanning sets and gathered rows must pair up");
  }
  return absl::OkStatus();
}

// The tasks of the share (the query rows of each kept set that lie in the share), one loop per
// LONGNET pattern (patterns fold one after another into the same rows) or one loop for GROUPED,
// balanced as the whole-problem plan's loops are. Tasks point into `work`.
absl::StatusOr<std::vector<std::vector<Task>>> MakeLoops(
    const SliceProblem& p, const std::vector<std::vector<HeadWork>>& work, int threads) {
  const ProblemShape& s = p.shape;
  const RankShare& share = p.share;
  const bool longnet = p.spec.mode == CombineMode::kLongNet;
  std::map<std::tuple<int, int64_t, int64_t, int64_t>, int> spanning;
  if (p.spanning != nullptr) {
    for (size_t i = 0; i < p.spanning->size(); ++i) {
      const SpanningKeys& set = (*p.spanning)[i];
      spanning[{set.pattern_index, set.segment, set.kv_head, set.offset}] = static_cast<int>(i);
    }
  }
  std::vector<std::vector<Task>> loops(longnet ? p.spec.patterns.size() : 1);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t head = share.head_begin; head < share.head_end; ++head) {
      const int64_t kv_head = KvHeadFor(head, s.heads, s.kv_heads);
      for (const HeadWork& hw : work[head]) {
        const int64_t w = hw.pattern.segment_len;
        for (int64_t t = share.token_begin / w; t * w < share.token_end; ++t) {
          Task task;
          task.batch = b;
          task.head = head;
          task.work = &hw;
          task.kept = KeptPositions(hw.pattern, hw.offset, s.seq_len, t);
          std::tie(task.row_begin, task.row_end) =
              KeptRowsIn(task.kept, share.token_begin, share.token_end);
          if (task.row_begin == task.row_end) continue;
          const int64_t keys = p.spec.causal ? task.row_end : task.kept.count;
          const auto found = spanning.find({hw.pattern_index, t, kv_head, hw.offset});
          if (found != spanning.end()) {
            task.gathered = found->second;
            if ((*p.gathered)[task.gathered].k == nullptr ||
                (*p.gathered)[task.gathered].v == nullptr) {
              return absl::InvalidArgumentError(
                  absl::StrCat("slice: no gathered rows for pattern ", hw.pattern_index,
                               " segment ", t, " kv head ", kv_head, " offset ", hw.offset));
            }
          } else if (task.row_begin != 0 || task.row_end < keys) {
            // Keys outside the share and no gathered rows for them: the caller's sets are wrong.
            return absl::InvalidArgumentError(absl::StrCat(
                "slice: pattern ", hw.pattern_index, " segment ", t, " kv head ", kv_head,
                " offset ", hw.offset, " reads keys outside tokens [", share.token_begin, ", ",
                share.token_end, ") but is not among the spanning sets"));
          }
          loops[longnet ? hw.pattern_index : 0].push_back(task);
        }
      }
    }
  }
  for (std::vector<Task>& loop : loops) BalanceLoop(loop, p.spec.causal, threads);
  return loops;
}

}  // namespace

SliceRunner::SliceRunner(Isa isa) : isa_(isa) {}

absl::Status SliceRunner::Run(const SliceProblem& p, ThreadPool* pool,
                              const std::atomic<bool>* cancelled) {
  DA_RETURN_IF_ERROR(CheckViews(p));
  const bool bf16 = p.precision == Precision::kBFloat16;
  if (bf16 && !(isa_ == Isa::kAvx512 && HasBf16DotProducts())) {
    return absl::InvalidArgumentError("slice: bf16 requested on a CPU path without AVX512-BF16");
  }
  if (!bf16 && p.precision != Precision::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat("slice: precision ", PrecisionName(p.precision),
                                                   " is not computed on CPUs; use fp32 or bf16"));
  }
  const int threads = pool != nullptr ? pool->size() : 1;
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(p.shape.heads, p.spec);
  DA_ASSIGN_OR_RETURN(const std::vector<std::vector<Task>> loops, MakeLoops(p, work, threads));
  const ProblemShape& s = p.shape;
  const RankShare& share = p.share;
  const int64_t head_dim = s.head_dim;
  const int64_t local_heads = share.heads();
  const int64_t tokens = share.tokens();
  const bool longnet = p.spec.mode == CombineMode::kLongNet;

  WorkspaceSizes z;
  z.threads = threads;
  z.head_dim = head_dim;
  z.dim_pad = RoundUp(head_dim, kDimAlign);
  z.rows_total = s.batch * tokens * local_heads;
  z.longnet = longnet;
  z.accumulator = longnet && p.out.dtype != DType::kFloat32;
  z.bf16 = bf16;
  int64_t max_rows = 1, max_keys = 1;
  for (const auto& loop : loops) {
    for (const Task& t : loop) {
      max_rows = std::max(max_rows, t.row_end - t.row_begin);
      max_keys = std::max(max_keys, p.spec.causal ? t.row_end : t.kept.count);
    }
  }
  z.rows_pad = RoundUp(max_rows, kRowAlign);
  z.keys_pad = RoundUp(max_keys, kKeyAlign);
  DA_RETURN_IF_ERROR(PrepareWorkspace(workspace_, z, /*touch=*/false));

  RowFold fold(z, workspace_, p.out, p.spec.patterns.size());
  const float q_factor = static_cast<float>(p.spec.ScaleFor(head_dim)) * kLog2e;
  DA_RETURN_IF_ERROR(
      RunLoops(loops, pool, cancelled, "cpu slice run", [&](const Task& task, int thread) {
        ThreadSpace& ts = workspace_.threads[thread];
        const int64_t local_head = task.head - share.head_begin;
        SegmentTaskIo io;
        io.q = TensorRows(p.q, task.batch, local_head, task.kept, share.token_begin);
        if (task.gathered < 0) {
          const int64_t local_kv = KvHeadFor(task.head, s.heads, s.kv_heads) - share.kv_head_begin;
          io.k = TensorRows(p.k, task.batch, local_kv, task.kept, share.token_begin);
          io.v = TensorRows(p.v, task.batch, local_kv, task.kept, share.token_begin);
        } else {
          const GatheredKeys& g = (*p.gathered)[task.gathered];
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
        if (RunSegmentTask(isa_, bf16, io, ts, cancelled)) {
          fold.AddTask(task, ts, local_head, share.token_begin);
        }
      }));
  fold.Finish(pool);
  return absl::OkStatus();
}

}  // namespace da::engine::cpu
