#include "engine/reference/reference_backend.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend_registry.h"
#include "engine/dilation.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Element (b, n, h, d) of a [B, N, heads, D] tensor, widened to double.
double At(const TensorView& t, int64_t b, int64_t n, int64_t h, int64_t d) {
  const Shape4& s = t.shape;
  return LoadAsFloat(t.dtype, t.data, ((b * s.seq_len + n) * s.heads + h) * s.head_dim + d);
}

// Softmax attention of the qi-th kept position of a segment over the segment's kept set (only
// keys up to the query when causal). Writes the output row to out and returns the LSE.
double AttendQuery(const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionSpec& spec, int64_t b, int64_t head, const KeptRange& kept,
                   int64_t qi, std::vector<double>& out) {
  const int64_t head_dim = q.shape.head_dim;
  const int64_t kv_head = KvHeadFor(head, q.shape.heads, k.shape.heads);
  const double scale = spec.ScaleFor(head_dim);
  const int64_t p = kept.first + qi * kept.stride;
  const int64_t keys = spec.causal ? qi + 1 : kept.count;  // Kept positions increase.
  std::vector<double> scores(keys);
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
  out.assign(head_dim, 0.0);
  for (int64_t xi = 0; xi < keys; ++xi) {
    const int64_t x = kept.first + xi * kept.stride;
    for (int64_t d = 0; d < head_dim; ++d) out[d] += scores[xi] / sum * At(v, b, x, kv_head, d);
  }
  return max_score + std::log(sum);
}

// Combination of pattern outputs at one position: LONGNET weighs them by softmax over their LSEs
// (kept as a running max and weight sum), GROUPED has one pattern per head, divided by P.
struct Combiner {
  double max_lse = kNegInf;
  double weight = 0.0;
  std::vector<double> acc;

  void Add(const AttentionSpec& spec, const std::vector<double>& out, double lse) {
    if (acc.empty()) acc.assign(out.size(), 0.0);
    if (spec.mode == CombineMode::kGrouped) {
      for (size_t d = 0; d < out.size(); ++d) acc[d] = out[d] / spec.patterns.size();
      weight = 1.0;
      return;
    }
    const double new_max = std::max(max_lse, lse);
    const double old_factor = std::exp(max_lse - new_max);
    const double new_factor = std::exp(lse - new_max);
    for (size_t d = 0; d < out.size(); ++d) acc[d] = acc[d] * old_factor + out[d] * new_factor;
    weight = weight * old_factor + new_factor;
    max_lse = new_max;
  }

  // The combined row; zeros when no pattern kept the position.
  std::vector<double> Result(int64_t head_dim) const {
    std::vector<double> row(head_dim, 0.0);
    if (weight > 0.0) {
      for (int64_t d = 0; d < head_dim; ++d) row[d] = acc[d] / weight;
    }
    return row;
  }
};

// Computes one (batch, head) slice of the output into out_rows ([N, D] doubles).
void RunHead(const TensorView& q, const TensorView& k, const TensorView& v,
             const AttentionSpec& spec, const std::vector<HeadWork>& patterns, int64_t b,
             int64_t head, std::vector<double>& out_rows) {
  const int64_t seq_len = q.shape.seq_len;
  const int64_t head_dim = q.shape.head_dim;
  std::vector<Combiner> combiners(seq_len);
  std::vector<double> pattern_out;
  for (const HeadWork& hw : patterns) {
    for (int64_t t = 0; t < NumSegments(seq_len, hw.pattern.segment_len); ++t) {
      const KeptRange kept = KeptPositions(hw.pattern, hw.offset, seq_len, t);
      for (int64_t qi = 0; qi < kept.count; ++qi) {
        const double lse = AttendQuery(q, k, v, spec, b, head, kept, qi, pattern_out);
        combiners[kept.first + qi * kept.stride].Add(spec, pattern_out, lse);
      }
    }
  }
  for (int64_t p = 0; p < seq_len; ++p) {
    const std::vector<double> row = combiners[p].Result(head_dim);
    std::copy(row.begin(), row.end(), out_rows.begin() + p * head_dim);
  }
}

}  // namespace

std::vector<double> ReferenceRow(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const AttentionSpec& spec, int64_t batch, int64_t position,
                                 int64_t head) {
  const int64_t seq_len = q.shape.seq_len;
  Combiner combiner;
  std::vector<double> pattern_out;
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(q.shape.heads, spec);
  for (const HeadWork& hw : work[head]) {
    const KeptRange kept =
        KeptPositions(hw.pattern, hw.offset, seq_len, position / hw.pattern.segment_len);
    const int64_t from_first = position - kept.first;
    if (from_first < 0 || from_first % kept.stride != 0 || from_first / kept.stride >= kept.count) {
      continue;  // This pattern does not keep the position for this head.
    }
    const double lse =
        AttendQuery(q, k, v, spec, batch, head, kept, from_first / kept.stride, pattern_out);
    combiner.Add(spec, pattern_out, lse);
  }
  return combiner.Result(q.shape.head_dim);
}

absl::StatusOr<PrecisionChoice> ReferenceBackend::ChoosePrecision(const AttentionSpec&) const {
  return PrecisionChoice{Precision::kFloat32, "reference backend: fp64 accumulation"};
}

absl::Status ReferenceBackend::Supports(const ProblemShape&, DType, const AttentionSpec&) const {
  return absl::OkStatus();
}

namespace {

// The reference computes from scratch each time; its plan holds nothing.
class ReferencePlan final : public Plan {
 public:
  int64_t bytes() const override { return 0; }
};

// The reference backend computes on CPU devices when asked for by name ("reference").
const bool kRegistered =
    RegisterBackend({.name = "reference",
                     .device_kind = "cpu",
                     .default_for_kind = false,
                     .make = [](const DeviceInfo&,
                                const BackendOptions&) -> absl::StatusOr<std::unique_ptr<Backend>> {
                       return std::make_unique<ReferenceBackend>();
                     }});

}  // namespace

absl::StatusOr<std::shared_ptr<Plan>> ReferenceBackend::BuildPlan(const PlanKey&,
                                                                  const std::atomic<bool>*) {
  return std::make_shared<ReferencePlan>();
}

absl::Status ReferenceBackend::RunShare(Plan&, const ShareProblem& problem,
                                        const RunContext& context) {
  if (!problem.share.Covers(problem.shape)) {
    return absl::UnimplementedError(
        absl::StrCat("the reference backend computes whole problems "
                     "only; given ",
                     problem.share.ToString(), " of ", problem.shape.QueryShape().ToString()));
  }
  DA_RETURN_IF_ERROR(CheckShareSpace(problem, Space()));
  const TensorView& q = problem.q;
  const TensorView& k = problem.k;
  const TensorView& v = problem.v;
  const AttentionSpec& spec = problem.spec;
  const MutableTensorView& out = problem.out;
  const Shape4& s = q.shape;
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(s.heads, spec);
  const auto body = [&](int64_t task, int) {
    if (context.cancelled != nullptr && context.cancelled->load()) return;
    const int64_t b = task / s.heads;
    const int64_t head = task % s.heads;
    std::vector<double> out_rows(s.seq_len * s.head_dim);
    RunHead(q, k, v, spec, work[head], b, head, out_rows);
    for (int64_t n = 0; n < s.seq_len; ++n) {
      for (int64_t d = 0; d < s.head_dim; ++d) {
        StoreFromFloat(out.dtype, out.data, ((b * s.seq_len + n) * s.heads + head) * s.head_dim + d,
                       static_cast<float>(out_rows[n * s.head_dim + d]));
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
