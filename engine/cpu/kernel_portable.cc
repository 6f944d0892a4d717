// The kernel body in portable C++ for CPUs without AVX2 (and for every non-x86 server): GCC/clang
// generic vectors of 4 floats (vector_size(16): SSE2 on x86-64, NEON on Arm, VSX on POWER), so
// that the compiler emits the target's own vector instructions without intrinsics. Exp2 is the
// same polynomial as the AVX paths, written with plain vector arithmetic; a * b + c becomes an
// FMA where the target has one and contracts (GCC's default outside ISO mode). Tiles of 6 rows x
// 2 vectors: 12 accumulators, 2 loads and a broadcast in the 16 vector registers of SSE2 (NEON
// has 32); the rows left after the full panels go to a narrower panel (kernel_body.inc).
#include <cstdint>
#include <cstring>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::portable {
namespace {

typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int4 __attribute__((vector_size(16)));

struct Vec {
  static constexpr int kWidth = 4;
  Float4 v;

  static Vec Zero() { return {Float4{0.0f, 0.0f, 0.0f, 0.0f}}; }
  static Vec Load(const float* p) {
    Vec r;
    std::memcpy(&r.v, p, sizeof(r.v));
    return r;
  }
  static void Store(float* p, Vec x) { std::memcpy(p, &x.v, sizeof(x.v)); }
  static void Prefetch(const float* p) { __builtin_prefetch(p); }
  static Vec Set1(float x) { return {Float4{x, x, x, x}}; }
  static Vec Fma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  static Vec Mul(Vec a, Vec b) { return {a.v * b.v}; }
  static Vec Add(Vec a, Vec b) { return {a.v + b.v}; }
  static Vec Sub(Vec a, Vec b) { return {a.v - b.v}; }
  // Lane-wise a > b ? a : b through the comparison mask (portable across GCC and clang).
  static Vec Max(Vec a, Vec b) {
    const Int4 a_wins = a.v > b.v;
    return {(Float4)(((Int4)a.v & a_wins) | ((Int4)b.v & ~a_wins))};
  }
  static float ReduceMax(Vec a) {
    const float m01 = a.v[0] > a.v[1] ? a.v[0] : a.v[1];
    const float m23 = a.v[2] > a.v[3] ? a.v[2] : a.v[3];
    return m01 > m23 ? m01 : m23;
  }
  static float ReduceAdd(Vec a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
  // 2^x for x <= 0 as in kernel_avx512.cc: x = n + f, 2^f by the degree-7 Taylor polynomial, 2^n
  // from the exponent bits. n = trunc(y - 1/2) rounds to nearest for y <= 0 (|f| <= 1/2 up to an
  // ulp, which the polynomial does not notice). x <= -127 gives exactly 0.
  static Vec Exp2(Vec x) {
    const Float4 lo = Set1(-127.0f).v;
    const Int4 below = x.v < lo;
    const Float4 y = (Float4)(((Int4)lo & below) | ((Int4)x.v & ~below));
    const Int4 n = __builtin_convertvector(y - 0.5f, Int4);
    const Float4 f = y - __builtin_convertvector(n, Float4);
    Float4 p = Set1(1.525273380405984e-05f).v;
    p = p * f + 1.5403530393381606e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.618129107628477e-03f;
    p = p * f + 5.550410866482158e-02f;
    p = p * f + 2.402265069591007e-01f;
    p = p * f + 6.931471805599453e-01f;
    p = p * f + 1.0f;
    const Int4 bits = (n + 127) << 23;
    return {p * (Float4)bits};
  }
};

constexpr int kRows = 6;
constexpr int kCols = 2;

#include "engine/cpu/kernel_body.inc"

}  // namespace

void RunSegment(const SegmentKernelArgs& args) { RunSegmentBody(args); }

bool UsesFma() {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return true;
#else
  return false;
#endif
}

}  // namespace da::engine::cpu::portable
