// The AVX-512 score loop of the CPU kernel (kernel_body.inc's ScoreTile) alone, on one core, for
// three tiles, with its keys in L1 and with a 512-key block read from L2, next to the core's zmm
// FMA peak measured in the same run. An exploration program, not part of the build:
//
//   g++ -O3 -mavx512f -mfma -o /tmp/score_loop bench/score_loop_avx512.cc && /tmp/score_loop
//
// Figures: docs/PERFORMANCE.md, "Long segments: panels share each key block".
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
// The AVX-512 score loop alone: R rows x C vectors of 16 keys, D = 64, over kt [D][ld].
template <int R, int C>
__attribute__((noinline)) void Score(const float* q, const float* kt, long ld, long keys,
                                     float* s) {
  for (long c0 = 0; c0 < keys; c0 += C * 16) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_ps();
    const float* ktp = kt + c0;
    for (long d = 0; d < 64; ++d) {
      __m512 kv[C];
      for (int j = 0; j < C; ++j) kv[j] = _mm512_loadu_ps(ktp + d * ld + j * 16);
      for (int r = 0; r < R; ++r) {
        const __m512 qb = _mm512_set1_ps(q[r * 64 + d]);
        for (int j = 0; j < C; ++j) acc[r][j] = _mm512_fmadd_ps(qb, kv[j], acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) _mm512_storeu_ps(s + r * 512 + c0 + j * 16, acc[r][j]);
  }
}
template <int R, int C>
void Run(long keys, long ld, const char* name) {
  std::vector<float> q(R * 64, 0.5f), kt(64 * ld, 0.25f), s(R * 512 * 64);
  const long reps = 2e10 / (2.0 * R * 64 * keys);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < reps; ++i) Score<R, C>(q.data(), kt.data(), ld, keys, s.data() + (i % 2));
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s keys %ld ld %ld: %.1f GFLOP/s\n", name, keys, ld,
              2.0 * R * 64 * keys * reps / sec / 1e9);
}
__attribute__((noinline)) double Peak() {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(i);
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(0.001f);
  const long n = 1e8;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i)
    for (int k = 0; k < 12; ++k) a[k] = _mm512_fmadd_ps(a[k], b, c);
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(a[i]);
  if (sink == 1234.5f) std::printf("x");
  return 12.0 * 32 * n / sec / 1e9;
}
int main() {
  std::printf("peak 1 core: %.1f GFLOP/s\n", Peak());
  Run<4, 4>(64, 64, "4x4 L1");
  Run<4, 4>(512, 512, "4x4 block512");
  Run<4, 4>(512, 2048, "4x4 ld2048");
  Run<8, 2>(64, 64, "8x2 L1");
  Run<8, 2>(512, 2048, "8x2 ld2048");
  Run<6, 4>(64, 64, "6x4 L1");
  Run<6, 4>(512, 2048, "6x4 ld2048");
  std::printf("peak 1 core: %.1f GFLOP/s\n", Peak());
}
