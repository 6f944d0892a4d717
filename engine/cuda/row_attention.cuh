// The CUDA backend's per-row arithmetic (issue #15), in __host__ __device__ functions so that the
// CPU tests run exactly the code the GPU runs: dtype conversions by bits (round to nearest, ties
// to even), and one output row of a share of docs/MATH.md's dilated attention: for each pattern
// its head runs and that keeps the row's position, softmax attention over the kept set (online,
// in fp32), folded into the LONGNET combine by log-sum-exp (or GROUPED's one pattern divided by
// P) as it goes, so that the only memory beyond the inputs and the output is one row's registers.
//
//   RowShare s = ...;                      // pointers in the GPU's memory (host in CPU tests)
//   for (int64_t row = 0; row < RowCount(s); ++row) ComputeRow(s, row);   // a kernel: one thread
//
// This is the correctness path: one thread per output row, keys read from global memory. The
// tiled tensor-core kernels and cuDNN's fused attention are the fast paths built on top of it
// and compared with it.
//
// Only the standard library and CUDA here (compiled by nvcc and by the host compiler).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DA_HD __host__ __device__ __forceinline__
#else
#define DA_HD inline
#endif

namespace da::engine::cuda {

// The largest head dimension the row kernel holds in registers; the backend refuses larger ones.
inline constexpr int kMaxRowHeadDim = 128;

// Element types, numbered as engine::DType (fp32, fp16, bf16), then fp8 E4M3 (the fused path's
// fp8 inputs and pattern outputs; not a wire dtype).
enum class ElemType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF8E4M3 = 3 };

DA_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}

DA_HD float BitsFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

DA_HD float Bf16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

// Round to nearest, ties to even; NaN stays NaN (quiet), infinities stay.
DA_HD uint16_t FloatToBf16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

DA_HD float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return BitsFloat(FloatBits(magnitude) | sign);
  }
  if (exponent == 31) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));
  return BitsFloat(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest, ties to even; overflow to infinity; subnormals kept; NaN stays NaN.
DA_HD uint16_t FloatToHalf(float f) {
  uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;   // NaN.
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity.
  if (x >= 0x38800000u) {                       // >= 2^-14: a normal half.
    uint32_t h = (((x >> 23) - 112u) << 10) | ((x >> 13) & 0x3ffu);
    const uint32_t rest = x & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // A carry moves the exponent.
    return sign | static_cast<uint16_t>(h);
  }
  if (x < 0x33000000u) return sign;  // At most 2^-25: rounds to zero (2^-25 ties to even 0).
  // Subnormal: f / 2^-24 = mantissa * 2^(exponent - 126), rounded.
  const uint32_t mantissa = (x & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - (x >> 23);  // 14 .. 24.
  uint32_t h = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (h & 1u))) ++h;  // 0x400 is the smallest normal: right.
  return sign | static_cast<uint16_t>(h);
}

// fp8 E4M3 (OCP "E4M3FN", CUDA's __nv_fp8_e4m3): sign, 4 exponent bits (bias 7), 3 mantissa
// bits; no infinities, S.1111.111 is NaN; largest 448, smallest normal 2^-6, subnormals
// m * 2^-9.
inline constexpr float kFp8E4M3Max = 448.0f;

DA_HD float Fp8E4M3ToFloat(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exponent = (b >> 3) & 0xfu;
  const uint32_t mantissa = b & 0x7u;
  if (exponent == 15 && mantissa == 7) return BitsFloat(sign | 0x7fc00000u);  // NaN.
  if (exponent == 0) {  // Zero or subnormal: mantissa * 2^-9, exact in fp32.
    return BitsFloat(FloatBits(static_cast<float>(mantissa) * 0.001953125f) | sign);
  }
  return BitsFloat(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Round to nearest, ties to even; magnitudes of 448 and more saturate to 448 (CUDA's
// __NV_SATFINITE: there is no infinity), infinities too; NaN stays NaN.
DA_HD uint8_t FloatToFp8E4M3(float f) {
  uint32_t x = FloatBits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7fu;   // NaN.
  if (x >= 0x43e00000u) return sign | 0x7eu;  // >= 448.
  const uint32_t exponent = x >> 23;
  if (exponent >= 121u) {  // >= 2^-6: a normal fp8.
    uint32_t h = ((exponent - 120u) << 3) | ((x >> 20) & 0x7u);
    const uint32_t rest = x & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (h & 1u))) ++h;  // Below 448: never to NaN.
    return sign | static_cast<uint8_t>(h);
  }
  if (exponent < 117u) return sign;  // Below 2^-10: rounds to zero.
  // Subnormal: f / 2^-9 = mantissa * 2^(exponent - 141), rounded (8 is the smallest normal).
  const uint32_t mantissa = (x & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 141u - exponent;  // 21 .. 24.
  uint32_t h = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return sign | static_cast<uint8_t>(h);
}

// The largest fp8 scale: 2^100. 448 / amax overflows to infinity for amax below about 1.3e-36
// (which bf16 holds), and an infinite scale turns the zeros of a tensor into NaN (0 x inf) and its
// descale into 0; capped, such a tensor quantises to zeros, within any error bound of its own size.
inline constexpr float kFp8MaxScale = 1.2676506e30f;

// The factor that maps a tensor of largest magnitude amax onto fp8 E4M3's range (amax to 448, at
// most kFp8MaxScale); 1 for an all-zero or non-finite amax (the caller refuses non-finite data).
DA_HD float Fp8ScaleFor(float amax) {
  if (!(amax > 0.0f && amax <= 3.4e38f)) return 1.0f;
  const float scale = kFp8E4M3Max / amax;
  return scale < kFp8MaxScale ? scale : kFp8MaxScale;
}

DA_HD float LoadElem(const void* data, ElemType type, int64_t index) {
  switch (type) {
    case ElemType::kF8E4M3:
      return Fp8E4M3ToFloat(static_cast<const uint8_t*>(data)[index]);
    case ElemType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(data)[index]);
    case ElemType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(data)[index]);
    case ElemType::kF32:
      break;
  }
  return static_cast<const float*>(data)[index];
}

DA_HD void StoreElem(void* data, ElemType type, int64_t index, float value) {
  switch (type) {
    case ElemType::kF8E4M3:
      static_cast<uint8_t*>(data)[index] = FloatToFp8E4M3(value);
      return;
    case ElemType::kF16:
      static_cast<uint16_t*>(data)[index] = FloatToHalf(value);
      return;
    case ElemType::kBF16:
      static_cast<uint16_t*>(data)[index] = FloatToBf16(value);
      return;
    case ElemType::kF32:
      break;
  }
  static_cast<float*>(data)[index] = value;
}

// One pattern a head runs (from engine::AssignHeadPatterns, computed on the host).
struct RowPattern {
  int64_t segment_len = 1;
  int64_t dilation = 1;
  int64_t offset = 0;
  int pattern_index = 0;
};

// A segment whose kept keys lie on several shares (engine::SpanningKeys) and its gathered rows:
// [batch, count, head_dim] each, in the input type. Sorted by (pattern, kv head, offset,
// segment) for the binary search in FindSpanning.
struct RowSpanning {
  int pattern_index = 0;
  int64_t kv_head = 0;
  int64_t offset = 0;
  int64_t segment = 0;
  int64_t count = 0;
  const void* k = nullptr;
  const void* v = nullptr;
};

// A share of a problem as the row kernel reads it (engine::ShareProblem, flattened).
struct RowShare {
  // The whole problem.
  int64_t batch = 1;
  int64_t seq_len = 1;
  int64_t heads = 1;
  int64_t kv_heads = 1;
  int64_t head_dim = 1;
  // The share: tokens [token_begin, token_end), query heads [head_begin, head_end), kv heads
  // [kv_head_begin, kv_head_end).
  int64_t token_begin = 0;
  int64_t token_end = 1;
  int64_t head_begin = 0;
  int64_t head_end = 1;
  int64_t kv_head_begin = 0;
  int64_t kv_head_end = 1;
  // q [batch, tokens, share heads, D], k and v [batch, tokens, share kv heads, D] in `in`,
  // out like q in `out_type`.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  ElemType in = ElemType::kF32;
  ElemType out_type = ElemType::kF32;
  float scale = 1.0f;
  bool causal = false;
  bool grouped = false;  // GROUPED: one pattern per head, divided by `patterns`.
  int patterns = 1;      // P of the request.
  // The fused path: the factor on every pattern output the fold and the combine read (fp8 outputs
  // are stored scaled onto fp8's range: this is their descale; 1 otherwise).
  float pattern_scale = 1.0f;
  // Per share head h (0 .. heads of the share): its patterns are
  // head_patterns[head_pattern_begin[h] .. head_pattern_begin[h + 1]).
  const RowPattern* head_patterns = nullptr;
  const int* head_pattern_begin = nullptr;
  const RowSpanning* spanning = nullptr;
  int spanning_count = 0;
  // A stop flag the host may set while the kernel runs (pinned, mapped host memory; null: none).
  // ComputeRow reads it every kStopPollKeys keys and, once it is set, returns leaving its row
  // unwritten: a cancelled run ends within a few microseconds of the flag, however long its rows.
  const volatile int* stop = nullptr;
};

inline constexpr int64_t kStopPollKeys = 256;

DA_HD int64_t ShareTokens(const RowShare& s) { return s.token_end - s.token_begin; }
DA_HD int64_t ShareHeads(const RowShare& s) { return s.head_end - s.head_begin; }
DA_HD int64_t ShareKvHeads(const RowShare& s) { return s.kv_head_end - s.kv_head_begin; }
// Output rows of the share: batch * tokens * heads, row = (b * tokens + token) * heads + head.
DA_HD int64_t RowCount(const RowShare& s) { return s.batch * ShareTokens(s) * ShareHeads(s); }

// Floats from one pattern's LSE block of the one-pass combine (CombineElements) to the next:
// RowCount rounded up to a multiple of 4, so that every block starts 16-byte aligned, as cuDNN
// takes the Stats pointer of a call whose view starts at a block's row 0.
DA_HD int64_t LseBlockStrideFor(int64_t rows) { return (rows + 3) / 4 * 4; }
DA_HD int64_t LseBlockStride(const RowShare& s) { return LseBlockStrideFor(RowCount(s)); }

// The spanning set of (pattern, kv head, offset, segment), or null.
DA_HD const RowSpanning* FindSpanning(const RowShare& s, int pattern_index, int64_t kv_head,
                                      int64_t offset, int64_t segment) {
  int lo = 0;
  int hi = s.spanning_count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const RowSpanning& m = s.spanning[mid];
    const bool less = m.pattern_index != pattern_index ? m.pattern_index < pattern_index
                      : m.kv_head != kv_head           ? m.kv_head < kv_head
                      : m.offset != offset             ? m.offset < offset
                                                       : m.segment < segment;
    if (less) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo < s.spanning_count) {
    const RowSpanning& f = s.spanning[lo];
    if (f.pattern_index == pattern_index && f.kv_head == kv_head && f.offset == offset &&
        f.segment == segment) {
      return &f;
    }
  }
  return nullptr;
}

// The LONGNET combine of pattern results at one position, folded one pattern at a time
// (docs/MATH.md: a softmax over the patterns' log-sum-exps, largest subtracted first).
struct CombineFold {
  float max_lse = -INFINITY;
  float weight = 0.0f;
};

// Folds a pattern's normalised row out (with its lse) into acc; rows are head_dim long.
DA_HD void FoldPattern(CombineFold& fold, float* acc, const float* out, float lse,
                       int64_t head_dim) {
  const float new_max = fold.max_lse > lse ? fold.max_lse : lse;
  const float old_factor = fold.weight > 0.0f ? expf(fold.max_lse - new_max) : 0.0f;
  const float new_factor = expf(lse - new_max);
  for (int64_t d = 0; d < head_dim; ++d) acc[d] = acc[d] * old_factor + out[d] * new_factor;
  fold.weight = fold.weight * old_factor + new_factor;
  fold.max_lse = new_max;
}

// Computes output row `row` of the share (RowCount) and stores it. Returns false (writing
// nothing) when the share reads keys outside itself that no spanning set provides: the caller's
// layout is wrong. Returns true, writing nothing, once s.stop is set.
DA_HD bool ComputeRow(const RowShare& s, int64_t row) {
  const int64_t share_heads = ShareHeads(s);
  const int64_t tokens = ShareTokens(s);
  const int64_t local_head = row % share_heads;
  const int64_t local_token = (row / share_heads) % tokens;
  const int64_t b = row / (share_heads * tokens);
  const int64_t p = s.token_begin + local_token;
  const int64_t head = s.head_begin + local_head;
  const int64_t kv_head = head / (s.heads / s.kv_heads);
  const int64_t local_kv_head = kv_head - s.kv_head_begin;
  const int64_t d_count = s.head_dim;
  const int64_t share_kv_heads = ShareKvHeads(s);

  float q[kMaxRowHeadDim];
  float acc[kMaxRowHeadDim];
  float combined[kMaxRowHeadDim];
  const int64_t q_base = ((b * tokens + local_token) * share_heads + local_head) * d_count;
  for (int64_t d = 0; d < d_count; ++d) {
    q[d] = LoadElem(s.q, s.in, q_base + d) * s.scale;
    combined[d] = 0.0f;
  }
  CombineFold fold;
  bool any = false;
  for (int e = s.head_pattern_begin[local_head]; e < s.head_pattern_begin[local_head + 1]; ++e) {
    const RowPattern& pattern = s.head_patterns[e];
    const int64_t w = pattern.segment_len;
    const int64_t r = pattern.dilation;
    const int64_t segment = p / w;
    const int64_t start = segment * w;
    const int64_t span = s.seq_len - start < w ? s.seq_len - start : w;
    const int64_t from_first = p - start - pattern.offset;
    if (from_first < 0 || from_first % r != 0) continue;  // Not kept by this pattern.
    const int64_t count = pattern.offset < span ? (span - pattern.offset + r - 1) / r : 0;
    const int64_t qi = from_first / r;
    const int64_t keys = s.causal ? qi + 1 : count;
    const int64_t first = start + pattern.offset;
    const int64_t last = first + (count - 1) * r;
    // The keys: the share's own rows, or the set's gathered rows when it spans shares.
    const void* k_rows = s.k;
    const void* v_rows = s.v;
    int64_t k_base = 0;  // Element index of key xi's row: k_base + xi * k_step.
    int64_t k_step = 0;
    if (first >= s.token_begin && last < s.token_end) {
      k_base = ((b * tokens + (first - s.token_begin)) * share_kv_heads + local_kv_head) * d_count;
      k_step = r * share_kv_heads * d_count;
    } else {
      const RowSpanning* set =
          FindSpanning(s, pattern.pattern_index, kv_head, pattern.offset, segment);
      if (set == nullptr || set->count != count) return false;
      k_rows = set->k;
      v_rows = set->v;
      k_base = b * count * d_count;
      k_step = d_count;
    }
    // Online softmax over the keys, in fp32.
    float m = -INFINITY;
    float l = 0.0f;
    for (int64_t d = 0; d < d_count; ++d) acc[d] = 0.0f;
    for (int64_t xi = 0; xi < keys; ++xi) {
      if (s.stop != nullptr && xi % kStopPollKeys == 0 && *s.stop != 0) return true;
      const int64_t at = k_base + xi * k_step;
      float score = 0.0f;
      for (int64_t d = 0; d < d_count; ++d) score += q[d] * LoadElem(k_rows, s.in, at + d);
      const float new_m = m > score ? m : score;
      const float correction = expf(m - new_m);  // 0 on the first key (m = -inf).
      const float weight = expf(score - new_m);
      for (int64_t d = 0; d < d_count; ++d) {
        acc[d] = acc[d] * correction + weight * LoadElem(v_rows, s.in, at + d);
      }
      l = l * correction + weight;
      m = new_m;
    }
    const float inverse = 1.0f / l;
    for (int64_t d = 0; d < d_count; ++d) acc[d] *= inverse;
    if (s.grouped) {
      const float share = 1.0f / static_cast<float>(s.patterns);
      for (int64_t d = 0; d < d_count; ++d) combined[d] = acc[d] * share;
      fold.weight = 1.0f;
    } else {
      FoldPattern(fold, combined, acc, m + logf(l), d_count);
    }
    any = true;
  }
  const int64_t out_base = q_base;
  const float inverse = any ? 1.0f / fold.weight : 0.0f;
  for (int64_t d = 0; d < d_count; ++d) {
    StoreElem(s.out, s.out_type, out_base + d, any ? combined[d] * inverse : 0.0f);
  }
  return true;
}

// The fused path's combine (issue #15): each pattern's attention comes from cuDNN as a normalised
// output row (in the io type, q's layout) and its natural-log LSE (fp32 [B, T, H]); FoldRow folds
// pattern `pattern_index` into running fp32 accumulators (acc [rows, D], max_lse and weight
// [rows], all starting at 0) for the rows that pattern keeps, and FinishRow writes the
// output: LONGNET the LSE-weighted mean, GROUPED the one pattern divided by P, 0 where no pattern
// kept the row. Rows as RowCount(s); the same head tables as ComputeRow.

// The share head's entry for pattern_index and whether it keeps the row's position; null when
// the head does not run the pattern.
DA_HD const RowPattern* KeptBy(const RowShare& s, int pattern_index, int64_t local_head,
                               int64_t position) {
  for (int e = s.head_pattern_begin[local_head]; e < s.head_pattern_begin[local_head + 1]; ++e) {
    const RowPattern& p = s.head_patterns[e];
    if (p.pattern_index != pattern_index) continue;
    const int64_t from_first = position - (position / p.segment_len) * p.segment_len - p.offset;
    if (from_first < 0 || from_first % p.dilation != 0) return nullptr;
    return &p;
  }
  return nullptr;
}

// What folding pattern `pattern_index` does to one row: whether the pattern keeps it, the factors
// for the old accumulator and the pattern's output, and the row's new maximum and weight. It only
// reads the row's state, so that every thread working on the row can compute it before any of
// them writes (FoldRow's kernel: a warp per row, lanes over the head dimension).
struct FoldStep {
  bool kept = false;
  float old_factor = 0.0f;
  float new_factor = 0.0f;
  float new_max = 0.0f;
  float new_weight = 0.0f;
};

DA_HD FoldStep FoldStepFor(const RowShare& s, int pattern_index, const float* lse,
                           const float* max_lse, const float* weight, int64_t row) {
  FoldStep step;
  const int64_t share_heads = ShareHeads(s);
  const int64_t local_head = row % share_heads;
  const int64_t position = s.token_begin + (row / share_heads) % ShareTokens(s);
  if (KeptBy(s, pattern_index, local_head, position) == nullptr) return step;
  step.kept = true;
  if (s.grouped) {  // One pattern per head: its output divided by P.
    step.new_factor = s.pattern_scale / static_cast<float>(s.patterns);
    step.new_weight = 1.0f;
    return step;
  }
  const float l = lse[row];
  // The first kept pattern sets the maximum (the buffers may start as zeros).
  step.new_max = weight[row] > 0.0f && max_lse[row] > l ? max_lse[row] : l;
  step.old_factor = weight[row] > 0.0f ? expf(max_lse[row] - step.new_max) : 0.0f;
  const float factor = expf(l - step.new_max);
  step.new_weight = weight[row] * step.old_factor + factor;
  step.new_factor = factor * s.pattern_scale;  // On the stored output; the weight has none.
  return step;
}

// Elements first, first + stride, ... of a kept row's fold (a thread's part of the row).
DA_HD void FoldElements(const FoldStep& step, const void* pattern_out, ElemType type, float* acc,
                        int64_t row, int64_t head_dim, int64_t first, int64_t stride) {
  float* a = acc + row * head_dim;
  for (int64_t d = first; d < head_dim; d += stride) {
    const float x = LoadElem(pattern_out, type, row * head_dim + d);
    // GROUPED sets (a head's one pattern); LONGNET rescales what was there.
    a[d] = step.old_factor == 0.0f ? x * step.new_factor
                                   : a[d] * step.old_factor + x * step.new_factor;
  }
}

// FoldStepFor, FoldElements over the whole row, then the row's new state: one thread's fold.
DA_HD void FoldRow(const RowShare& s, int pattern_index, const void* pattern_out, ElemType type,
                   const float* lse, float* acc, float* max_lse, float* weight, int64_t row) {
  const FoldStep step = FoldStepFor(s, pattern_index, lse, max_lse, weight, row);
  if (!step.kept) return;
  FoldElements(step, pattern_out, type, acc, row, s.head_dim, 0, 1);
  weight[row] = step.new_weight;
  max_lse[row] = step.new_max;
}

// Elements first, first + stride, ... of output row `row`: LONGNET's weighted mean, GROUPED's
// pattern, 0 where no pattern kept the row.
DA_HD void FinishElements(const RowShare& s, const float* acc, const float* weight, int64_t row,
                          int64_t first, int64_t stride) {
  const int64_t d_count = s.head_dim;
  const float w = weight[row];
  const float inverse = w > 0.0f ? 1.0f / w : 0.0f;
  for (int64_t d = first; d < d_count; d += stride) {
    StoreElem(s.out, s.out_type, row * d_count + d,
              w > 0.0f ? acc[row * d_count + d] * inverse : 0.0f);
  }
}

DA_HD void FinishRow(const RowShare& s, const float* acc, const float* weight, int64_t row) {
  FinishElements(s, acc, weight, row, 0, 1);
}

// The one-pass combine (the alternative to FoldRow + FinishRow): every pattern's output kept,
// LONGNET's pattern pi at outs + pi * RowCount(s) * head_dim (io type) with its LSE at
// lses + pi * RowCount(s), and each output row computed once from the patterns that keep it:
// LONGNET the LSE-weighted mean (folded as FoldPattern does), GROUPED its head's one pattern
// divided by P, 0 where none keeps it. GROUPED's patterns share one block at outs (a head has one
// pattern, so their rows never meet) and read no LSE; that block may be s.out itself when it is in
// the io type (each element is read before the same thread writes it). Rows a pattern does not
// keep are never read, so the buffers need no clearing. The thread computes elements first + j *
// stride, j < kSlots (kSlots a compile-time bound so that its accumulators stay in registers: 4 for
// a warp's lanes over D <= 128, kMaxRowHeadDim for one thread over the whole row).
template <int kSlots>
DA_HD void CombineElements(const RowShare& s, const void* outs, ElemType type, const float* lses,
                           int64_t row, int64_t first, int64_t stride) {
  const int64_t rows = RowCount(s);
  const int64_t d_count = s.head_dim;
  const int64_t share_heads = ShareHeads(s);
  const int64_t local_head = row % share_heads;
  const int64_t position = s.token_begin + (row / share_heads) % ShareTokens(s);
  float acc[kSlots];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kSlots; ++j) acc[j] = 0.0f;
  // The patterns that keep the row, folded as they come (FoldPattern's arithmetic: the largest
  // LSE so far subtracted, the sum rescaled when it grows).
  CombineFold fold;
  bool any = false;
  for (int e = s.head_pattern_begin[local_head]; e < s.head_pattern_begin[local_head + 1]; ++e) {
    const int pi = s.head_patterns[e].pattern_index;
    if (KeptBy(s, pi, local_head, position) == nullptr) continue;
    float old_factor = 1.0f, new_factor = 1.0f;  // GROUPED: the head's one pattern.
    if (!s.grouped) {
      const float l = lses[pi * LseBlockStride(s) + row];
      const float new_max = any && fold.max_lse > l ? fold.max_lse : l;
      old_factor = any ? expf(fold.max_lse - new_max) : 0.0f;
      new_factor = expf(l - new_max);
      fold.max_lse = new_max;
    }
    fold.weight = fold.weight * old_factor + new_factor;
    const float out_factor = new_factor * s.pattern_scale;  // On the stored output only.
    const int64_t base = ((s.grouped ? 0 : pi) * rows + row) * d_count;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < kSlots; ++j) {
      const int64_t d = first + j * stride;
      if (d < d_count) acc[j] = acc[j] * old_factor + out_factor * LoadElem(outs, type, base + d);
    }
    any = true;
  }
  // GROUPED: one pattern, weight 1, divided by P; LONGNET: divided by the weights' sum.
  const float inverse = !any        ? 0.0f
                        : s.grouped ? 1.0f / static_cast<float>(s.patterns)
                                    : 1.0f / fold.weight;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kSlots; ++j) {
    const int64_t d = first + j * stride;
    if (d < d_count) StoreElem(s.out, s.out_type, row * d_count + d, acc[j] * inverse);
  }
}

// One thread's whole row of the one-pass combine.
DA_HD void CombineRow(const RowShare& s, const void* outs, ElemType type, const float* lses,
                      int64_t row) {
  CombineElements<kMaxRowHeadDim>(s, outs, type, lses, row, 0, 1);
}

}  // namespace da::engine::cuda
