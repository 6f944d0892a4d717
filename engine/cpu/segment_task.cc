#include "engine/cpu/segment_task.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/cpu/widen_rows.h"
#include "engine/thread_pool.h"

namespace da::engine::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void Parallel(ThreadPool* pool, int64_t count, const std::function<void(int64_t, int)>& body) {
  if (pool != nullptr) {
    pool->ParallelFor(count, body);
  } else {
    for (int64_t i = 0; i < count; ++i) body(i, 0);
  }
}

// Bytes a fold's Reset or Finish writes between two stop checks: well under a millisecond, even
// where the pages are touched for the first time.
constexpr int64_t kFoldSliceBytes = int64_t{1} << 20;

// Runs body(begin, end) over [0, items) in slices of about kFoldSliceBytes (items of item_bytes
// each), in parallel on the pool; a slice starts only while `cancelled` is false.
absl::Status Sliced(ThreadPool* pool, const std::atomic<bool>* cancelled, int64_t items,
                    int64_t item_bytes, const std::function<void(int64_t, int64_t)>& body) {
  const auto stopped = [&] { return cancelled != nullptr && cancelled->load(); };
  const int64_t per_slice = std::max<int64_t>(1, kFoldSliceBytes / item_bytes);
  Parallel(pool, (items + per_slice - 1) / per_slice, [&](int64_t slice, int) {
    if (stopped()) return;
    body(slice * per_slice, std::min(items, (slice + 1) * per_slice));
  });
  if (stopped()) return absl::CancelledError("cpu run cancelled");
  return absl::OkStatus();
}

// Keys packed between two stop checks: a few milliseconds even for the strided transpose.
constexpr int64_t kPackSliceRows = 4096;

// Rows Pack asks the memory for ahead of the one it copies. Kept rows of a dilated segment are
// r * H * D elements apart in the [B, N, H, D] tensor (kilobytes), a stride the hardware
// prefetchers follow late or not at all, so without this each row waited for DRAM.
constexpr int64_t kPrefetchRows = 8;

// Prefetches row `i` of src (dim elements: every 64-byte line of it).
inline void PrefetchRow(const RowSource& src, int64_t i, int64_t dim) {
  const int64_t size = DTypeSize(src.dtype);
  const char* row = static_cast<const char*>(src.data) + (src.base + i * src.stride) * size;
  for (int64_t byte = 0; byte < dim * size; byte += 64) __builtin_prefetch(row + byte);
}

// Copies rows [begin, end) of src into dst as fp32 times factor: row-major [end - begin, dim_pad]
// or, with transpose, [dim_pad, ld] (a column per row). Each element is widened once (WidenRow:
// F16C for fp16 where the CPU has it). The transpose goes through a tile of kTileRows rows, so
// that each of its writes fills kTileRows consecutive floats of a row of dst (a cache line)
// instead of one float per row of dst, ld floats apart.
void Pack(const RowSource& src, int64_t begin, int64_t end, float factor, bool transpose,
          int64_t dim, int64_t dim_pad, int64_t ld, float* dst) {
  if (!transpose) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchRows < end) PrefetchRow(src, i + kPrefetchRows, dim);
      float* out = dst + (i - begin) * dim_pad;
      WidenRow(src.dtype, src.data, src.base + i * src.stride, dim, factor, out);
      std::fill(out + dim, out + dim_pad, 0.0f);
    }
    return;
  }
  constexpr int64_t kTileRows = 16;   // One 64-byte line of dst per d.
  constexpr int64_t kTileDims = 256;  // Head dims per tile (the tile is 16 KiB).
  float tile[kTileRows][kTileDims];
  for (int64_t r0 = begin; r0 < end; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, end - r0);
    for (int64_t r = r0 + kTileRows; r < std::min(end, r0 + 2 * kTileRows); ++r) {
      PrefetchRow(src, r, dim);
    }
    for (int64_t d0 = 0; d0 < dim; d0 += kTileDims) {
      const int64_t count = std::min(kTileDims, dim - d0);
      for (int64_t r = 0; r < rows; ++r) {
        WidenRow(src.dtype, src.data, src.base + (r0 + r) * src.stride + d0, count, factor,
                 tile[r]);
      }
      for (int64_t d = 0; d < count; ++d) {
        float* out = dst + (d0 + d) * ld + (r0 - begin);
        for (int64_t r = 0; r < rows; ++r) out[r] = tile[r][d];
      }
    }
  }
}

}  // namespace

bool RunSegmentTask(Isa isa, Bf16Kernel bf16, const SegmentTaskIo& io, ThreadSpace& ts,
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
  if (bf16 != Bf16Kernel::kNone) {
    args.bf16_scratch = ts.bf16.data();
    RunSegmentKernelBf16(bf16, args);
  } else {
    RunSegmentKernel(isa, args);
  }
  return !stopped();  // The kernel may have stopped early: its rows are not valid.
}

RowFold::RowFold(const WorkspaceSizes& z, Workspace& ws, const MutableTensorView& out,
                 size_t patterns)
    : z_(z),
      out_(out),
      direct_(!z.fold),
      group_factor_(z.longnet ? 1.0f : 1.0f / static_cast<float>(patterns)) {
  if (!direct_) {
    acc_ = z.accumulator ? ws.acc.data() : static_cast<float*>(out.data);
    max_lse_ = ws.max_lse.data();
    weight_ = ws.weight.data();
  }
}

absl::Status RowFold::Reset(ThreadPool* pool, const std::atomic<bool>* cancelled) const {
  if (direct_) {
    // Zero bits are 0.0 in fp32, fp16 and bf16.
    return Sliced(pool, cancelled, out_.bytes, 1, [&](int64_t begin, int64_t end) {
      std::memset(static_cast<char*>(out_.data) + begin, 0, end - begin);
    });
  }
  const int64_t head_dim = z_.head_dim;
  return Sliced(pool, cancelled, z_.rows_total, head_dim * sizeof(float),
                [&](int64_t begin, int64_t end) {
                  std::fill(acc_ + begin * head_dim, acc_ + end * head_dim, 0.0f);
                  std::fill(max_lse_ + begin, max_lse_ + end, kNegInf);
                  std::fill(weight_ + begin, weight_ + end, 0.0f);
                });
}

void RowFold::AddTask(const Task& task, const ThreadSpace& ts, int64_t head,
                      int64_t position0) const {
  const int64_t head_dim = z_.head_dim;
  const int64_t rows = task.row_end - task.row_begin;
  const auto row_of = [&](int64_t i) {
    const int64_t n = task.kept.first + (task.row_begin + i) * task.kept.stride;
    return (task.batch * out_.shape.seq_len + n - position0) * out_.shape.heads + head;
  };
  // The rows a task folds into are r * H rows apart (kilobytes): without asking for them ahead
  // each waited for DRAM, as Pack's reads did.
  const char* const dest =
      direct_ ? static_cast<const char*>(out_.data) : reinterpret_cast<const char*>(acc_);
  const int64_t dest_row_bytes =
      head_dim * (direct_ ? DTypeSize(out_.dtype) : static_cast<int64_t>(sizeof(float)));
  for (int64_t i = 0; i < rows; ++i) {
    if (i + kPrefetchRows < rows) {
      const char* line = dest + row_of(i + kPrefetchRows) * dest_row_bytes;
      for (int64_t b = 0; b < dest_row_bytes; b += 64) __builtin_prefetch(line + b, 1);
    }
    const int64_t row = row_of(i);
    const float* src = ts.out.data() + i * z_.dim_pad;
    if (!direct_) {
      FoldLongNetRow(src, ts.lse.data()[i], head_dim, acc_ + row * head_dim, &max_lse_[row],
                     &weight_[row]);
    } else {
      for (int64_t d = 0; d < head_dim; ++d) {
        StoreFromFloat(out_.dtype, out_.data, row * head_dim + d, src[d] * group_factor_);
      }
    }
  }
}

absl::Status RowFold::Finish(ThreadPool* pool, const std::atomic<bool>* cancelled) const {
  if (direct_) return absl::OkStatus();
  const int64_t head_dim = z_.head_dim;
  return Sliced(pool, cancelled, z_.rows_total, head_dim * sizeof(float),
                [&](int64_t begin, int64_t end) {
                  for (int64_t row = begin; row < end; ++row) {
                    const float inv = weight_[row] > 0.0f ? 1.0f / weight_[row] : 0.0f;
                    for (int64_t d = 0; d < head_dim; ++d) {
                      StoreFromFloat(out_.dtype, out_.data, row * head_dim + d,
                                     acc_[row * head_dim + d] * inv);
                    }
                  }
                });
}

absl::Status RunLoops(const std::vector<std::vector<Task>>& loops, ThreadPool* pool,
                      const std::atomic<bool>* cancelled, const char* what,
                      const std::function<void(const Task&, int thread)>& run_task) {
  const auto stopped = [&] { return cancelled != nullptr && cancelled->load(); };
  for (const std::vector<Task>& loop : loops) {
    if (stopped()) break;
    Parallel(pool, static_cast<int64_t>(loop.size()), [&](int64_t i, int thread) {
      if (!stopped()) run_task(loop[i], thread);
    });
  }
  if (stopped()) return absl::CancelledError(absl::StrCat(what, " cancelled"));
  return absl::OkStatus();
}

}  // namespace da::engine::cpu
