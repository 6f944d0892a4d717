// The kernel body for AVX2 + FMA: 8 float lanes, tiled for 16 ymm registers. Scores: a 6 x 16
// tile (6 query rows, 2 vectors of keys) keeps 12 accumulators, 2 key loads and 1 broadcast query
// value in 15 registers; values: a 6 x 16 output tile (2 vectors of head dims) the same way. 12
// independent accumulators cover FMA latency times two FMA pipes (8 on Zen 3/4, 10 on Intel
// cores) and cost 8 loads per 12 FMAs. 6 does not divide kRowAlign, so 2 or 4 rows of padding
// are left to a narrower panel (kernel_body.inc). Compiled with -mavx2 -mfma
// (engine/CMakeLists.txt).
#include <immintrin.h>

#include <cstdint>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::avx2 {
namespace {

struct Vec {
  static constexpr int kWidth = 8;
  __m256 v;

  static Vec Zero() { return {_mm256_setzero_ps()}; }
  static Vec Load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static void Store(float* p, Vec x) { _mm256_storeu_ps(p, x.v); }
  static void Prefetch(const float* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  }
  static Vec Set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec Fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec Mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static Vec Add(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  static Vec Sub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  static Vec Max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static float ReduceMax(Vec a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float ReduceAdd(Vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // As in kernel_avx512.cc: 2^x for x <= 0, exactly 0 for x <= -127.
  static Vec Exp2(Vec x) {
    __m256 y = _mm256_max_ps(x.v, _mm256_set1_ps(-127.0f));
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(y, n);
    __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(p, _mm256_castsi256_ps(bits))};
  }
};

constexpr int kRows = 6;
constexpr int kCols = 2;

#include "engine/cpu/kernel_body.inc"

}  // namespace

void RunSegment(const SegmentKernelArgs& args) { RunSegmentBody(args); }

}  // namespace da::engine::cpu::avx2
