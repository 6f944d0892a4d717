// fp16 rows to fp32 with F16C (vcvtph2ps, exact), 8 at a time. Compiled with -mavx -mf16c.
#include <immintrin.h>

#include <cstring>

#include "engine/cpu/widen_rows.h"

namespace da::engine::cpu::f16c {

void WidenHalfRow(const uint16_t* in, int64_t count, float factor, float* out) {
  const __m256 f = _mm256_set1_ps(factor);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtph_ps(half), f));
  }
  if (i < count) {  // The last count % 8 elements, through a zero-padded copy.
    uint16_t tail[8] = {};
    float wide[8];
    std::memcpy(tail, in + i, (count - i) * sizeof(uint16_t));
    _mm256_storeu_ps(
        wide,
        _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail))), f));
    std::memcpy(out + i, wide, (count - i) * sizeof(float));
  }
}

}  // namespace da::engine::cpu::f16c
