#include "engine/cuda/sdpa_plan.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/dilation.h"

namespace da::engine::cuda {
namespace {

std::string ViewSignature(const SdpaView& view) {
  return absl::StrCat("[", absl::StrJoin(view.dims, ","), "]/[", absl::StrJoin(view.strides, ","),
                      "]");
}

// A view of `heads` heads from share-local head h0 over n segments of one batch (or of every
// batch: folded), kept positions o, o + r, ... of each; `row` elements per (token, head).
SdpaView SegmentView(int64_t batches, int64_t n, int64_t heads, int64_t kept, int64_t row,
                     int64_t share_heads, int64_t tokens, int64_t b, int64_t start, int64_t w,
                     int64_t r, int64_t h0) {
  SdpaView view;
  view.dims = {batches * n, heads, kept, row};
  view.strides = {w * share_heads * row, row, r * share_heads * row, 1};
  view.offset = ((b * tokens + start) * share_heads + h0) * row;
  return view;
}

// The largest piece size of at most `most` (>= 1) for n items, a divisor of n when one is within
// half of `most`.
int64_t PieceSize(int64_t n, int64_t most) {
  most = std::clamp<int64_t>(most, 1, n);
  for (int64_t size = most; size * 2 >= most; --size) {
    if (n % size == 0) return size;
  }
  return most;
}

// `call` cut along its segments (dimension 0 of every view) into pieces of `size` segments.
void CutBySegments(const SdpaCall& call, int64_t size, std::vector<SdpaCall>& out) {
  const int64_t n = call.q.dims[0];
  for (int64_t first = 0; first < n; first += size) {
    SdpaCall piece = call;
    for (SdpaView* view : {&piece.q, &piece.kv, &piece.lse}) {
      view->dims[0] = std::min(size, n - first);
      view->offset += first * view->strides[0];
    }
    out.push_back(piece);
  }
}

// `call` (one segment's worth or more, not causal) cut along its queries (dimension 2 of q and
// of the log-sum-exps) into pieces of at most max_flops; each piece reads every key.
void CutByQueries(const SdpaCall& call, double max_flops, std::vector<SdpaCall>& out) {
  const int64_t queries = call.q.dims[2];
  const int64_t pieces = static_cast<int64_t>(std::ceil(SdpaCallFlops(call) / max_flops));
  int64_t size = (queries + pieces - 1) / pieces;
  constexpr int64_t kTile = 128;  // Whole query tiles of cuDNN's kernels where pieces are large.
  if (size > kTile) size = size / kTile * kTile;
  for (int64_t first = 0; first < queries; first += size) {
    SdpaCall piece = call;
    for (SdpaView* view : {&piece.q, &piece.lse}) {
      view->dims[2] = std::min(size, queries - first);
      view->offset += first * view->strides[2];
    }
    out.push_back(piece);
  }
}

// Every call of `calls` within max_flops (0: no bound on FLOPs) and kMaxSdpaSegments.
std::vector<SdpaCall> CutCalls(const std::vector<SdpaCall>& calls, double max_flops) {
  std::vector<SdpaCall> out;
  for (const SdpaCall& call : calls) {
    const double flops = SdpaCallFlops(call);
    const int64_t n = call.q.dims[0];
    if ((max_flops <= 0 || flops <= max_flops) && n <= kMaxSdpaSegments) {
      out.push_back(call);
      continue;
    }
    int64_t most = kMaxSdpaSegments;
    if (max_flops > 0 && flops > max_flops) {
      most = std::min(most, static_cast<int64_t>(max_flops / (flops / n)));
    }
    std::vector<SdpaCall> by_segments;
    CutBySegments(call, PieceSize(n, most), by_segments);
    for (const SdpaCall& piece : by_segments) {
      if (max_flops <= 0 || piece.causal || SdpaCallFlops(piece) <= max_flops) {
        out.push_back(piece);
      } else {
        CutByQueries(piece, max_flops, out);
      }
    }
  }
  return out;
}

}  // namespace

double SdpaCallFlops(const SdpaCall& call) {
  const double flops = 4.0 * static_cast<double>(call.q.dims[0]) *
                       static_cast<double>(call.q.dims[1]) * static_cast<double>(call.q.dims[2]) *
                       static_cast<double>(call.kv.dims[2]) * static_cast<double>(call.q.dims[3]);
  return call.causal ? flops / 2 : flops;
}

int64_t SdpaCall::LseAlignment() const {
  return lse.offset % 4 == 0 ? 16 : 4;  // 8 is not worth a graph of its own.
}

std::string SdpaCall::Signature() const {
  const int64_t alignment = LseAlignment();
  return absl::StrCat("q", ViewSignature(q), " kv", ViewSignature(kv), " lse", ViewSignature(lse),
                      alignment < 16 ? absl::StrCat(" lse-align", alignment) : "",
                      causal ? " causal" : "");
}

absl::StatusOr<SdpaPlan> PlanSdpaCalls(const ProblemShape& shape, const AttentionSpec& spec,
                                       const Share& share, double max_call_flops) {
  if (share.tokens() <= 0 || share.heads() <= 0 || share.kv_heads() <= 0 || share.token_begin < 0 ||
      share.token_end > shape.seq_len || share.head_begin < 0 || share.head_end > shape.heads ||
      share.kv_head_begin < 0 || share.kv_head_end > shape.kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(share.ToString(), " is not a share of ", shape.QueryShape().ToString()));
  }
  const int64_t tokens = share.tokens();
  const int64_t share_heads = share.heads();
  const int64_t share_kv_heads = share.kv_heads();
  const int64_t d = shape.head_dim;
  const int64_t group = shape.heads / shape.kv_heads;  // Query heads per kv head.
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(shape.heads, spec);

  SdpaPlan plan;
  for (int pi = 0; pi < static_cast<int>(spec.patterns.size()); ++pi) {
    const Pattern& pattern = spec.patterns[pi];
    const int64_t w = pattern.segment_len;
    const int64_t r = pattern.dilation;
    // Runs of consecutive share heads running this pattern with one offset, cut so that each
    // piece lies within one kv head or covers whole kv heads (GQA: query heads a multiple of the
    // kv heads, in order).
    struct Piece {
      int64_t h0, h1, offset;
    };
    std::vector<Piece> runs;
    for (int64_t h = share.head_begin; h < share.head_end; ++h) {
      for (const HeadWork& hw : work[h]) {
        if (hw.pattern_index != pi) continue;
        if (!runs.empty() && runs.back().h1 == h && runs.back().offset == hw.offset) {
          ++runs.back().h1;
        } else {
          runs.push_back({h, h + 1, hw.offset});
        }
      }
    }
    std::vector<Piece> aligned;
    for (Piece run : runs) {
      if (run.h0 % group != 0) {
        const int64_t end_of_kv = std::min(run.h1, (run.h0 / group + 1) * group);
        aligned.push_back({run.h0, end_of_kv, run.offset});
        run.h0 = end_of_kv;
      }
      const int64_t whole_end = run.h1 / group * group;
      if (whole_end > run.h0) {
        aligned.push_back({run.h0, whole_end, run.offset});
        run.h0 = whole_end;
      }
      if (run.h0 < run.h1) aligned.push_back(run);
    }
    for (const Piece& piece : aligned) {
      const int64_t o = piece.offset;
      const int64_t kv0 = piece.h0 / group;
      const int64_t kv1 = (piece.h1 - 1) / group + 1;
      const int64_t first_segment = share.token_begin / w;
      const int64_t last_segment = (share.token_end - 1) / w;
      // Runs of whole local segments of one span, then one call (or one per batch) each.
      int64_t run_begin = -1;
      int64_t run_span = 0;
      const auto flush = [&](int64_t run_end) {
        if (run_begin < 0) return;
        const int64_t n = run_end - run_begin;
        const int64_t kept = (run_span - o + r - 1) / r;
        const int64_t start = run_begin * w + o - share.token_begin;
        const bool fold = run_begin * w == share.token_begin && n * w == tokens;
        const int64_t calls = fold ? 1 : shape.batch;
        const int64_t batches = fold ? shape.batch : 1;
        for (int64_t b = 0; b < calls; ++b) {
          SdpaCall call;
          call.pattern_index = pi;
          call.dilation_offset = o;
          call.head_begin = piece.h0 - share.head_begin;
          call.head_end = piece.h1 - share.head_begin;
          call.kv_head_begin = kv0 - share.kv_head_begin;
          call.kv_head_end = kv1 - share.kv_head_begin;
          call.causal = spec.causal;
          call.q = SegmentView(batches, n, piece.h1 - piece.h0, kept, d, share_heads, tokens, b,
                               start, w, r, call.head_begin);
          call.kv = SegmentView(batches, n, kv1 - kv0, kept, d, share_kv_heads, tokens, b, start, w,
                                r, call.kv_head_begin);
          call.lse = SegmentView(batches, n, piece.h1 - piece.h0, kept, 1, share_heads, tokens, b,
                                 start, w, r, call.head_begin);
          plan.calls.push_back(call);
        }
        run_begin = -1;
      };
      for (int64_t t = first_segment; t <= last_segment; ++t) {
        const int64_t seg_start = t * w;
        const int64_t span = std::min(w, shape.seq_len - seg_start);
        const KeptRange kept = KeptPositions(pattern, o, shape.seq_len, t);
        if (kept.count == 0) {
          flush(t);
          continue;
        }
        const int64_t last = kept.first + (kept.count - 1) * r;
        if (kept.first >= share.token_begin && last < share.token_end) {
          if (run_begin >= 0 && span != run_span) flush(t);
          if (run_begin < 0) {
            run_begin = t;
            run_span = span;
          }
          continue;
        }
        flush(t);
        // Spanning: this share's kept positions of the segment, per kv head.
        const int64_t begin = std::max<int64_t>(0, (share.token_begin - kept.first + r - 1) / r);
        const int64_t end =
            std::min<int64_t>(kept.count, (share.token_end - kept.first + r - 1) / r);
        if (begin >= end) continue;
        for (int64_t kv = kv0; kv < kv1; ++kv) {
          SpanningQueries q;
          q.pattern_index = pi;
          q.dilation_offset = o;
          q.segment = t;
          q.head_begin = std::max(piece.h0, kv * group) - share.head_begin;
          q.head_end = std::min(piece.h1, (kv + 1) * group) - share.head_begin;
          q.kv_head = kv;
          q.kept_begin = begin;
          q.kept_end = end;
          plan.spanning.push_back(q);
        }
      }
      flush(last_segment + 1);
    }
  }
  plan.calls = CutCalls(plan.calls, max_call_flops);
  std::set<std::string> signatures;
  for (const SdpaCall& call : plan.calls) signatures.insert(call.Signature());
  plan.distinct_signatures = static_cast<int>(signatures.size());
  return plan;
}

}  // namespace da::engine::cuda
