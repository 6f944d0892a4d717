// The fp32 throughput loop of the portable kernel as built for the x86-64 baseline: SSE2 has no
// FMA, so a multiply and an add per product; 6 independent chains of each (both latencies hidden,
// and on CPUs with more adders than multipliers, the kernel's own one-to-one mix).
#include <emmintrin.h>

#include <cstdint>

namespace da::bench {

float Fp32MulAddLoopSse(int64_t iterations) {
  __m128 m[6], s[6];
  for (int i = 0; i < 6; ++i) {
    m[i] = _mm_set1_ps(1.0f + 0.001f * i);
    s[i] = _mm_set1_ps(0.001f * i);
  }
  // Multiplying by 1 keeps the products normal (a factor below 1 would reach subnormals, which
  // some CPUs multiply slowly); the empty asm hides the 1 so that no multiply is folded away.
  __m128 a = _mm_set1_ps(1.0f);
  const __m128 b = _mm_set1_ps(1e-6f);
  for (int64_t it = 0; it < iterations; ++it) {
    __asm__("" : "+x"(a));
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      m[i] = _mm_mul_ps(m[i], a);
      s[i] = _mm_add_ps(s[i], b);
    }
  }
  __m128 sum = m[0];
  for (int i = 1; i < 6; ++i) sum = _mm_add_ps(sum, m[i]);
  for (int i = 0; i < 6; ++i) sum = _mm_add_ps(sum, s[i]);
  float lanes[4];
  _mm_storeu_ps(lanes, sum);
  return lanes[0] + lanes[3];
}

}  // namespace da::bench
