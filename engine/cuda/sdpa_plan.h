// The geometry of the CUDA backend's fused-attention path (issue #15): the scaled-dot-product
// attention calls (cuDNN's SDPA, BHSD tensors with free strides) that compute every pattern of a
// share, as plain numbers the CPU tests check element by element. No gather pass: a dilated
// segment is a strided view of the share's own tensors,
//
//   dims    [segments, heads, kept, D]
//   strides [w * H * D, D, r * H * D, 1]       (H: the share's heads of that tensor)
//   offset  ((b * T + start + o) * H + h0) * D  (T: the share's tokens, start: first segment's)
//
// so one call covers a run of equal segments of one batch (or of every batch, when the run covers
// all the share's tokens: batch and segment then fold into one stride), for a group of heads that
// share the pattern's offset and whose kv heads line up for GQA (query heads a multiple of the kv
// heads). The log-sum-exp each call returns (generate_stats) is written with the same geometry
// into an fp32 [B, T, H] buffer, for the LONGNET fold.
//
// Segments that span shares (SEQUENCE) read keys gathered from other devices: they are listed as
// SpanningQueries for the path that computes them, not as calls.
//
//   DA_ASSIGN_OR_RETURN(SdpaPlan plan, PlanSdpaCalls(shape, spec, share));
//   for (const SdpaCall& call : plan.calls) ... build (or find) the graph for call.Signature()
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/share.h"

namespace da::engine::cuda {

// A BHSD view: element (i0, i1, i2, i3) is at offset + sum(i_k * strides[k]) in its tensor.
struct SdpaView {
  std::array<int64_t, 4> dims = {0, 0, 0, 0};
  std::array<int64_t, 4> strides = {0, 0, 0, 0};
  int64_t offset = 0;
};

struct SdpaCall {
  int pattern_index = 0;
  int64_t dilation_offset = 0;  // The pattern's offset o for these heads.
  // Share-local heads: query heads [head_begin, head_end), kv heads [kv_head_begin, kv_head_end).
  int64_t head_begin = 0;
  int64_t head_end = 0;
  int64_t kv_head_begin = 0;
  int64_t kv_head_end = 0;
  SdpaView q;    // In the share's q (and the pattern's output, which has q's layout).
  SdpaView kv;   // In the share's k and v.
  SdpaView lse;  // In the fp32 [B, T, H] log-sum-exp buffer (D = 1).
  bool causal = false;

  // The alignment in bytes (16 or 4) of the call's first LSE element in a 16-byte aligned
  // buffer: cuDNN takes the Stats pointer as 16-byte aligned unless the graph says otherwise, and
  // a call whose rows start off a multiple of 4 (a head group from head 3, say) is not.
  int64_t LseAlignment() const;

  // What a graph depends on (dims, strides, causality, the LSE's alignment; not the offsets):
  // calls with one signature share one built graph.
  std::string Signature() const;
};

// Rows of a segment that spans shares: kept positions [kept_begin, kept_end) of the set's kept
// range (engine::SpanningKeys) are this share's queries; its keys are the gathered rows.
struct SpanningQueries {
  int pattern_index = 0;
  int64_t dilation_offset = 0;
  int64_t segment = 0;
  int64_t head_begin = 0;  // Share-local query heads reading kv head `kv_head` (global).
  int64_t head_end = 0;
  int64_t kv_head = 0;
  int64_t kept_begin = 0;
  int64_t kept_end = 0;
};

struct SdpaPlan {
  std::vector<SdpaCall> calls;
  std::vector<SpanningQueries> spanning;
  int distinct_signatures = 0;  // Graphs to build.
};

// The most FLOPs one call does by default: about 6 ms of cuDNN on an H200 (650 TFLOP/s), 60 ms
// on the slowest GPU the fused path runs on (sm_80 and later, from about 70 TFLOP/s), so that a
// run polls its stop between calls well within 100 ms (issue #15).
inline constexpr double kMaxSdpaCallFlops = 4e12;

// The most segments (dimension 0) one call covers: cuDNN's fused attention fails past 65,535 in
// its batch dimension (PyTorch routes such batches away from it, pytorch/pytorch#180718,
// #181235), which many short segments reach: N = 1M tokens with w = 16 is 65,536 per batch.
inline constexpr int64_t kMaxSdpaSegments = 65535;

// A call's FLOPs: 4 * segments * heads * queries * keys * D (half that when causal).
double SdpaCallFlops(const SdpaCall& call);

// Every call of the share, each cut to at most kMaxSdpaSegments segments and max_call_flops (0: no
// bound on FLOPs): first by segments (a
// divisor of the call's segment count where one is within half of the largest piece allowed, so
// that the pieces share one graph), then, for a single segment over the bound that is not causal,
// by queries (every piece reads all the segment's keys; a causal segment is not cut by queries, as
// cuDNN's top-left diagonal would then be wrong). INVALID_ARGUMENT for a share that is not one of
// `shape`.
absl::StatusOr<SdpaPlan> PlanSdpaCalls(const ProblemShape& shape, const AttentionSpec& spec,
                                       const Share& share,
                                       double max_call_flops = kMaxSdpaCallFlops);

}  // namespace da::engine::cuda
