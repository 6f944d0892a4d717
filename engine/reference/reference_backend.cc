#include "engine/reference/reference_backend.h"

#include <cmath>
#include <limits>
#include <vector>

#include "engine/dilation.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

// Element (b, n, h, d) of a [B, N, heads, D] tensor, widened to double.
double At(const TensorView& t, int64_t b, int64_t n, int64_t h, int64_t d) {
  const Shape4& s = t.shape;
  return LoadAsFloat(t.dtype, t.data, ((b * s.seq_len + n) * s.heads + h) * s.head_dim + d);
}

// Computes one (batch, head) slice of the output into out_row ([N, D] doubles).
void RunHead(const TensorView& q, const TensorView& k, const TensorView& v,
             const AttentionSpec& spec, const std::vector<HeadWork>& patterns, int64_t b,
             int64_t head, std::vector<double>& out_row) {
  const int64_t seq_len = q.shape.seq_len;
  const int64_t head_dim = q.shape.head_dim;
  const int64_t kv_head = KvHeadFor(head, q.shape.heads, k.shape.heads);
  const double scale = spec.ScaleFor(head_dim);
  const double num_patterns = static_cast<double>(spec.patterns.size());
  const double kNegInf = -std::numeric_limits<double>::infinity();

  // LONGNET combination state per position: out = acc / weight, weights exp(lse - max_lse).
  std::vector<double> max_lse(seq_len, kNegInf);
  std::vector<double> weight(seq_len, 0.0);
  std::fill(out_row.begin(), out_row.end(), 0.0);

  std::vector<double> scores;
  std::vector<double> pattern_out(head_dim);
  for (const HeadWork& hw : patterns) {
    for (int64_t t = 0; t < NumSegments(seq_len, hw.pattern.segment_len); ++t) {
      const KeptRange kept = KeptPositions(hw.pattern, hw.offset, seq_len, t);
      for (int64_t qi = 0; qi < kept.count; ++qi) {
        const int64_t p = kept.first + qi * kept.stride;
        const int64_t keys = spec.causal ? qi + 1 : kept.count;  // Kept positions increase.
        scores.assign(keys, 0.0);
        double max_score = kNegInf;
        for (int64_t xi = 0; xi < keys; ++xi) {
          const int64_t x = kept.first + xi * kept.stride;
          double dot = 0.0;
          for (int64_t d = 0; d < head_dim; ++d) dot += At(q, b, p, head, d) * At(k, b, x, kv_head, d);
          scores[xi] = scale * dot;
          max_score = std::max(max_score, scores[xi]);
        }
        double sum = 0.0;
        for (double& s : scores) sum += (s = std::exp(s - max_score));
        std::fill(pattern_out.begin(), pattern_out.end(), 0.0);
        for (int64_t xi = 0; xi < keys; ++xi) {
          const int64_t x = kept.first + xi * kept.stride;
          for (int64_t d = 0; d < head_dim; ++d) {
            pattern_out[d] += scores[xi] / sum * At(v, b, x, kv_head, d);
          }
        }
        double* row = &out_row[p * head_dim];
        if (spec.mode == CombineMode::kGrouped) {
          for (int64_t d = 0; d < head_dim; ++d) row[d] = pattern_out[d] / num_patterns;
          continue;
        }
        const double lse = max_score + std::log(sum);
        const double new_max = std::max(max_lse[p], lse);
        const double old_factor = std::exp(max_lse[p] - new_max);
        const double new_factor = std::exp(lse - new_max);
        for (int64_t d = 0; d < head_dim; ++d) {
          row[d] = row[d] * old_factor + pattern_out[d] * new_factor;
        }
        weight[p] = weight[p] * old_factor + new_factor;
        max_lse[p] = new_max;
      }
    }
  }
  if (spec.mode == CombineMode::kLongNet) {
    for (int64_t p = 0; p < seq_len; ++p) {
      for (int64_t d = 0; d < head_dim; ++d) {
        out_row[p * head_dim + d] = weight[p] > 0.0 ? out_row[p * head_dim + d] / weight[p] : 0.0;
      }
    }
  }
}

}  // namespace

absl::Status ReferenceBackend::Supports(const ProblemShape&, DType, const AttentionSpec&) const {
  return absl::OkStatus();
}

absl::Status ReferenceBackend::Run(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const AttentionSpec& spec, const MutableTensorView& out,
                                   const RunContext& context) {
  const Shape4& s = q.shape;
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(s.heads, spec);
  const auto body = [&](int64_t task, int) {
    if (context.cancelled != nullptr && context.cancelled->load()) return;
    const int64_t b = task / s.heads;
    const int64_t head = task % s.heads;
    std::vector<double> out_row(s.seq_len * s.head_dim);
    RunHead(q, k, v, spec, work[head], b, head, out_row);
    for (int64_t n = 0; n < s.seq_len; ++n) {
      for (int64_t d = 0; d < s.head_dim; ++d) {
        StoreFromFloat(out.dtype, out.data, ((b * s.seq_len + n) * s.heads + head) * s.head_dim + d,
                       static_cast<float>(out_row[n * s.head_dim + d]));
      }
    }
  };
  if (context.pool != nullptr) {
    context.pool->ParallelFor(s.batch * s.heads, body);
  } else {
    for (int64_t task = 0; task < s.batch * s.heads; ++task) body(task, 0);
  }
  if (context.cancelled != nullptr && context.cancelled->load()) {
    return absl::CancelledError("reference run cancelled");
  }
  return absl::OkStatus();
}

}  // namespace da::engine
