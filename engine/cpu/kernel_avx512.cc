// The kernel body for AVX-512F: 16 float lanes; a 4 x 64 score tile and a 4 x 64 output tile keep
// 16 accumulators in the 32 zmm registers. Compiled with -mavx512f -mfma (engine/CMakeLists.txt).
#include <immintrin.h>

#include <cstdint>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::avx512 {
namespace {

struct Vec {
  static constexpr int kWidth = 16;
  __m512 v;

  static Vec Zero() { return {_mm512_setzero_ps()}; }
  static Vec Load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static void Store(float* p, Vec x) { _mm512_storeu_ps(p, x.v); }
  static Vec Set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec Fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec Mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static Vec Add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  static Vec Sub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  static Vec Max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static float ReduceMax(Vec a) { return _mm512_reduce_max_ps(a.v); }
  static float ReduceAdd(Vec a) { return _mm512_reduce_add_ps(a.v); }

  // 2^x for x <= 0: x = n + f with |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (relative
  // error below 2e-7), 2^n by building the exponent bits. x <= -127 gives exactly 0.
  static Vec Exp2(Vec x) {
    __m512 y = _mm512_max_ps(x.v, _mm512_set1_ps(-127.0f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i bits =
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return {_mm512_mul_ps(p, _mm512_castsi512_ps(bits))};
  }
};

constexpr int kRows = 4;
constexpr int kCols = 4;

#include "engine/cpu/kernel_body.inc"

}  // namespace

void RunSegment(const SegmentKernelArgs& args) { RunSegmentBody(args); }

}  // namespace da::engine::cpu::avx512
