#include "engine/cpu/segment_task.h"

#include <algorithm>

namespace da::engine::cpu {
namespace {

// Keys packed between two stop checks: a few milliseconds even for the strided transpose.
constexpr int64_t kPackSliceRows = 4096;

// Copies rows [begin, end) of src into dst as fp32 times factor: row-major [end - begin, dim_pad]
// or, with transpose, [dim_pad, ld] (a column per row).
void Pack(const RowSource& src, int64_t begin, int64_t end, float factor, bool transpose,
          int64_t dim, int64_t dim_pad, int64_t ld, float* dst) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t base = src.base + i * src.stride;
    const int64_t row = i - begin;
    if (transpose) {
      for (int64_t d = 0; d < dim; ++d)
        dst[d * ld + row] = factor * LoadAsFloat(src.dtype, src.data, base + d);
    } else if (src.dtype == DType::kFloat32) {
      const float* in = static_cast<const float*>(src.data) + base;
      float* out = dst + row * dim_pad;
      for (int64_t d = 0; d < dim; ++d) out[d] = factor * in[d];
      std::fill(out + dim, out + dim_pad, 0.0f);
    } else {
      float* out = dst + row * dim_pad;
      for (int64_t d = 0; d < dim; ++d)
        out[d] = factor * LoadAsFloat(src.dtype, src.data, base + d);
      std::fill(out + dim, out + dim_pad, 0.0f);
    }
  }
}

}  // namespace

bool RunSegmentTask(Isa isa, bool bf16, const SegmentTaskIo& io, ThreadSpace& ts,
                    const std::atomic<bool>* cancelled) {
  const auto stopped = [&] { return cancelled != nullptr && cancelled->load(); };
  const int64_t dim_pad = io.dim_pad;
  const int64_t keys = io.keys;
  const int64_t keys_pad = RoundUp(keys, kKeyAlign);
  const int64_t rows = io.row_end - io.row_begin;
  float* qt = ts.q.data();
  float* kt = ts.kt.data();
  float* vt = ts.v.data();
  Pack(io.q, io.row_begin, io.row_end, io.q_factor, false, io.head_dim, dim_pad, 0, qt);
  std::fill(qt + rows * dim_pad, qt + RoundUp(rows, kRowAlign) * dim_pad, 0.0f);
  std::fill(kt, kt + dim_pad * keys_pad, 0.0f);
  // Packing a long segment's keys takes tens of milliseconds (the transpose writes with a
  // stride), so it goes in slices with a stop check between them.
  for (int64_t k0 = 0; k0 < keys; k0 += kPackSliceRows) {
    if (stopped()) return false;
    const int64_t k1 = std::min(keys, k0 + kPackSliceRows);
    Pack(io.k, k0, k1, 1.0f, true, io.head_dim, dim_pad, keys_pad, kt + k0);
    Pack(io.v, k0, k1, 1.0f, false, io.head_dim, dim_pad, 0, vt + k0 * dim_pad);
  }
  std::fill(vt + keys * dim_pad, vt + keys_pad * dim_pad, 0.0f);

  SegmentKernelArgs args;
  args.keys = keys;
  args.dim_pad = dim_pad;
  args.keys_pad = keys_pad;
  args.causal = io.causal;
  args.row_begin = io.row_begin;
  args.row_end = io.row_end;
  args.q = qt;
  args.kt = kt;
  args.v = vt;
  args.out = ts.out.data();
  args.lse = ts.lse.data();
  args.scratch = ts.scratch.data();
  args.cancelled = cancelled;
  if (bf16) {
    args.bf16_scratch = ts.bf16.data();
    RunSegmentKernelBf16(args);
  } else {
    RunSegmentKernel(isa, args);
  }
  return !stopped();  // The kernel may have stopped early: its rows are not valid.
}

}  // namespace da::engine::cpu
