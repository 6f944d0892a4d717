// The kernel with bf16 dot products (AVX512-BF16 vdpbf16ps) and fp32 accumulation.
//
// vdpbf16ps adds, per fp32 lane, the products of two adjacent bf16 pairs. So the operands are
// re-packed from the fp32 tiles into pairs along the reduction dimension of each product
// (bf16_pack_avx512.inc):
//   scores  S = Q K^T: q as [rows][dim_pad/2] pairs along d, broadcast; kt as
//           [dim_pad/2][keys_pad][2] (for each d-pair, every key's two values side by side);
//   values  O += P V: the softmax weights as [kRows][kb/2] pairs along keys, broadcast; v as
//           [keys_pad/2][dim_pad][2] (for each key pair, every d's two values side by side).
// The panel loop, masking and online softmax are the fp32 kernel's (kernel_body.inc), so only the
// two products differ. Compiled with -mavx512f -mavx512bf16 -mfma.
#include <immintrin.h>

#include <cstdint>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::avx512_bf16 {
namespace {

constexpr int kExp2Degree = 7;  // vec_avx512.inc's exp2 polynomial.
#include "engine/cpu/vec_avx512.inc"

constexpr int kRows = 4;
constexpr int kCols = 4;

#include "engine/cpu/bf16_pack_avx512.inc"
#include "engine/cpu/kernel_body.inc"

struct Bf16Tiles {
  static constexpr int kPanelRows = kRows;
  const SegmentKernelArgs& a;
  const uint32_t* q;   // [rows_pad][dim_pad / 2]
  const uint32_t* kt;  // [dim_pad / 2][keys_pad]
  const uint32_t* v;   // [keys_pad / 2][dim_pad]
  uint32_t* p;         // [kRows][kKeyBlock / 2]

  void Score(int64_t r0, int64_t k0, int64_t kb, float* s) const {
    const int64_t pairs = a.dim_pad / 2;
    const uint32_t* qp = q + (r0 - a.row_begin) * pairs;
    for (int64_t c0 = 0; c0 < kb; c0 += kCols * 16) {
      __m512 acc[kRows][kCols];
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < kCols; ++j) acc[r][j] = _mm512_setzero_ps();
      }
      for (int64_t dp = 0; dp < pairs; ++dp) {
        __m512bh kv[kCols];
#pragma GCC unroll 8
        for (int j = 0; j < kCols; ++j) {
          kv[j] = (__m512bh)_mm512_loadu_si512(kt + dp * a.keys_pad + k0 + c0 + j * 16);
        }
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[r * pairs + dp]));
#pragma GCC unroll 8
          for (int j = 0; j < kCols; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qb, kv[j]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < kCols; ++j)
          _mm512_storeu_ps(s + r * kKeyBlock + c0 + j * 16, acc[r][j]);
      }
    }
  }

  template <int kVecs>
  void ValueTile(int64_t k0, int64_t kb, const float* corr, float* o, int64_t d0) const {
    const int64_t dim_pad = a.dim_pad;
    __m512 acc[kRows][kVecs];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 c = _mm512_set1_ps(corr[r]);
#pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j) {
        acc[r][j] = _mm512_mul_ps(_mm512_loadu_ps(o + r * dim_pad + d0 + j * 16), c);
      }
    }
    const uint32_t* vp = v + (k0 / 2) * dim_pad + d0;
    for (int64_t c2 = 0; c2 < kb / 2; ++c2) {
      __m512bh vv[kVecs];
#pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j)
        vv[j] = (__m512bh)_mm512_loadu_si512(vp + c2 * dim_pad + j * 16);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const __m512bh pb =
            (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * (kKeyBlock / 2) + c2]));
#pragma GCC unroll 8
        for (int j = 0; j < kVecs; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, vv[j]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(o + r * dim_pad + d0 + j * 16, acc[r][j]);
    }
  }

  void Value(const float* weights, int64_t k0, int64_t kb, const float* corr, float* o) const {
    for (int r = 0; r < kRows; ++r) {
      ToBf16(weights + r * kKeyBlock, kb, reinterpret_cast<uint16_t*>(p + r * (kKeyBlock / 2)));
    }
    for (int64_t d0 = 0; d0 < a.dim_pad; d0 += kCols * 16) {
      switch ((a.dim_pad - d0) / 16) {
        case 1:
          ValueTile<1>(k0, kb, corr, o, d0);
          break;
        case 2:
          ValueTile<2>(k0, kb, corr, o, d0);
          break;
        case 3:
          ValueTile<3>(k0, kb, corr, o, d0);
          break;
        default:
          ValueTile<4>(k0, kb, corr, o, d0);
          break;
      }
    }
  }
};

}  // namespace

void RunSegment(const SegmentKernelArgs& a) {
  const Bf16Operands o = PackBf16Operands(a);
  RunPanels(a, Bf16Tiles{a, o.q, o.kt, o.v, o.p}, a.row_begin, a.row_end);
}

}  // namespace da::engine::cpu::avx512_bf16
