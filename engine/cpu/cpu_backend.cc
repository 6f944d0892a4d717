#include "engine/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/dilation.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

// Tile sizes: a query block of kQueryBlock rows meets a key block of kKeyBlock rows; both tiles
// and the score block stay in L1/L2 for head_dim up to a few hundred.
constexpr int64_t kQueryBlock = 32;
constexpr int64_t kKeyBlock = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread buffers, grown on demand and reused across tasks.
struct Scratch {
  std::vector<float> q, k, v;    // Gathered kept rows, [kept, head_dim].
  std::vector<float> scores;     // [kQueryBlock, kKeyBlock].
  std::vector<float> acc;        // [kQueryBlock, head_dim].
  std::vector<float> row_max, row_sum;
  std::vector<float> out;        // Normalised pattern output, [kept, head_dim].
  std::vector<float> lse;        // [kept].
};

// Copies rows first + i * stride (i < count) of head `head` into dst as fp32, times factor.
void Gather(const TensorView& t, int64_t b, int64_t head, const KeptRange& kept, float factor,
            float* dst) {
  const Shape4& s = t.shape;
  for (int64_t i = 0; i < kept.count; ++i) {
    const int64_t n = kept.first + i * kept.stride;
    const int64_t base = ((b * s.seq_len + n) * s.heads + head) * s.head_dim;
    float* row = dst + i * s.head_dim;
    if (t.dtype == DType::kFloat32 && factor == 1.0f) {
      std::memcpy(row, static_cast<const float*>(t.data) + base, s.head_dim * sizeof(float));
    } else {
      for (int64_t d = 0; d < s.head_dim; ++d) row[d] = factor * LoadAsFloat(t.dtype, t.data, base + d);
    }
  }
}

// Attention among `kept` gathered rows: writes normalised outputs and LSEs into scratch.out/lse.
// Queries are pre-scaled. Causal: key i is visible to query j only when i <= j.
void AttendSegment(int64_t kept, int64_t head_dim, bool causal, Scratch& s) {
  s.out.resize(kept * head_dim);
  s.lse.resize(kept);
  for (int64_t q0 = 0; q0 < kept; q0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, kept - q0);
    std::fill(s.acc.begin(), s.acc.begin() + rows * head_dim, 0.0f);
    std::fill(s.row_max.begin(), s.row_max.begin() + rows, kNegInf);
    std::fill(s.row_sum.begin(), s.row_sum.begin() + rows, 0.0f);
    const int64_t key_end = causal ? q0 + rows : kept;  // Later key blocks are fully masked.
    for (int64_t k0 = 0; k0 < key_end; k0 += kKeyBlock) {
      const int64_t cols = std::min(kKeyBlock, key_end - k0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* qrow = &s.q[(q0 + r) * head_dim];
        float* score_row = &s.scores[r * kKeyBlock];
        const int64_t visible = causal ? std::min(cols, q0 + r - k0 + 1) : cols;
        float block_max = kNegInf;
        for (int64_t c = 0; c < visible; ++c) {
          const float* krow = &s.k[(k0 + c) * head_dim];
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qrow[d] * krow[d];
          score_row[c] = dot;
          block_max = std::max(block_max, dot);
        }
        if (visible <= 0) continue;
        const float new_max = std::max(s.row_max[r], block_max);
        const float correction = std::exp(s.row_max[r] - new_max);
        float* acc_row = &s.acc[r * head_dim];
        for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= correction;
        float block_sum = 0.0f;
        for (int64_t c = 0; c < visible; ++c) {
          const float weight = std::exp(score_row[c] - new_max);
          block_sum += weight;
          const float* vrow = &s.v[(k0 + c) * head_dim];
          for (int64_t d = 0; d < head_dim; ++d) acc_row[d] += weight * vrow[d];
        }
        s.row_sum[r] = s.row_sum[r] * correction + block_sum;
        s.row_max[r] = new_max;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / s.row_sum[r];
      for (int64_t d = 0; d < head_dim; ++d) {
        s.out[(q0 + r) * head_dim + d] = s.acc[r * head_dim + d] * inv;
      }
      s.lse[q0 + r] = s.row_max[r] + std::log(s.row_sum[r]);
    }
  }
}

// One unit of parallel work: a segment of one pattern for one (batch, head).
struct Task {
  int64_t batch;
  int64_t head;
  const HeadWork* work;
  int64_t segment;
};

}  // namespace

absl::Status CpuBackend::Supports(const ProblemShape&, DType, const AttentionSpec& spec) const {
  if (spec.precision != Precision::kAuto && spec.precision != Precision::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat("spec.precision ", PrecisionName(spec.precision),
                                                   " is not supported by the cpu backend; "
                                                   "supported: auto, fp32"));
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Run(const TensorView& q, const TensorView& k, const TensorView& v,
                             const AttentionSpec& spec, const MutableTensorView& out,
                             const RunContext& context) {
  const Shape4& s = q.shape;
  const int64_t seq_len = s.seq_len;
  const int64_t heads = s.heads;
  const int64_t head_dim = s.head_dim;
  const float scale = static_cast<float>(spec.ScaleFor(head_dim));
  const bool longnet = spec.mode == CombineMode::kLongNet;
  const float group_factor = 1.0f / static_cast<float>(spec.patterns.size());
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(heads, spec);
  const int threads = context.pool != nullptr ? context.pool->size() : 1;

  std::vector<Scratch> scratch(threads);
  int64_t max_kept = 0;
  for (const Pattern& p : spec.patterns) {
    max_kept = std::max(max_kept, (std::min(p.segment_len, seq_len) + p.dilation - 1) / p.dilation);
  }
  for (Scratch& sc : scratch) {
    sc.q.resize(max_kept * head_dim);
    sc.k.resize(max_kept * head_dim);
    sc.v.resize(max_kept * head_dim);
    sc.scores.resize(kQueryBlock * kKeyBlock);
    sc.acc.resize(kQueryBlock * head_dim);
    sc.row_max.resize(kQueryBlock);
    sc.row_sum.resize(kQueryBlock);
  }

  // LONGNET state per (b, n, head): fp32 accumulator (the output itself when it is fp32),
  // running max LSE and weight sum. GROUPED writes straight into a zeroed output.
  const int64_t rows_total = s.batch * seq_len * heads;
  std::unique_ptr<float[]> acc_owned;
  float* acc = nullptr;
  std::vector<float> max_lse, weight;
  if (longnet) {
    if (out.dtype == DType::kFloat32) {
      acc = static_cast<float*>(out.data);
    } else {
      acc_owned.reset(new float[rows_total * head_dim]);
      acc = acc_owned.get();
    }
    std::fill(acc, acc + rows_total * head_dim, 0.0f);
    max_lse.assign(rows_total, kNegInf);
    weight.assign(rows_total, 0.0f);
  } else {
    std::memset(out.data, 0, out.bytes);  // Zero bits are 0.0 in fp32, fp16 and bf16.
  }

  const auto run_task = [&](const Task& task, int thread) {
    Scratch& sc = scratch[thread];
    const KeptRange kept = KeptPositions(task.work->pattern, task.work->offset, seq_len, task.segment);
    if (kept.count == 0) return;
    const int64_t kv_head = KvHeadFor(task.head, heads, k.shape.heads);
    Gather(q, task.batch, task.head, kept, scale, sc.q.data());
    Gather(k, task.batch, kv_head, kept, 1.0f, sc.k.data());
    Gather(v, task.batch, kv_head, kept, 1.0f, sc.v.data());
    AttendSegment(kept.count, head_dim, spec.causal, sc);
    for (int64_t i = 0; i < kept.count; ++i) {
      const int64_t row = (task.batch * seq_len + kept.first + i * kept.stride) * heads + task.head;
      const float* src = &sc.out[i * head_dim];
      if (!longnet) {
        for (int64_t d = 0; d < head_dim; ++d) {
          StoreFromFloat(out.dtype, out.data, row * head_dim + d, src[d] * group_factor);
        }
        continue;
      }
      // Fold this pattern into the running softmax over patterns' LSEs.
      const float lse = sc.lse[i];
      const float new_max = std::max(max_lse[row], lse);
      const float old_factor = std::exp(max_lse[row] - new_max);
      const float new_factor = std::exp(lse - new_max);
      float* dst = acc + row * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = dst[d] * old_factor + src[d] * new_factor;
      weight[row] = weight[row] * old_factor + new_factor;
      max_lse[row] = new_max;
    }
  };

  const auto cancelled = [&] { return context.cancelled != nullptr && context.cancelled->load(); };
  const auto run_tasks = [&](const std::vector<Task>& tasks) {
    const auto body = [&](int64_t i, int thread) {
      if (!cancelled()) run_task(tasks[i], thread);
    };
    if (context.pool != nullptr) {
      context.pool->ParallelFor(static_cast<int64_t>(tasks.size()), body);
    } else {
      for (size_t i = 0; i < tasks.size(); ++i) body(static_cast<int64_t>(i), 0);
    }
  };

  // Tasks of one loop must write disjoint rows: in LONGNET one loop per pattern index, in
  // GROUPED one loop for everything (each head runs one pattern).
  const size_t loops = longnet ? spec.patterns.size() : 1;
  for (size_t loop = 0; loop < loops && !cancelled(); ++loop) {
    std::vector<Task> tasks;
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        for (const HeadWork& hw : work[h]) {
          if (longnet && hw.pattern_index != static_cast<int>(loop)) continue;
          for (int64_t t = 0; t < NumSegments(seq_len, hw.pattern.segment_len); ++t) {
            tasks.push_back({b, h, &hw, t});
          }
        }
      }
    }
    run_tasks(tasks);
  }
  if (cancelled()) return absl::CancelledError("cpu run cancelled");

  if (longnet) {
    const int64_t chunk = 4096;
    const int64_t chunks = (rows_total + chunk - 1) / chunk;
    const auto finish = [&](int64_t c, int) {
      for (int64_t row = c * chunk; row < std::min(rows_total, (c + 1) * chunk); ++row) {
        const float inv = weight[row] > 0.0f ? 1.0f / weight[row] : 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) {
          StoreFromFloat(out.dtype, out.data, row * head_dim + d, acc[row * head_dim + d] * inv);
        }
      }
    };
    if (context.pool != nullptr) {
      context.pool->ParallelFor(chunks, finish);
    } else {
      for (int64_t c = 0; c < chunks; ++c) finish(c, 0);
    }
  }
  return absl::OkStatus();
}

}  // namespace da::engine
