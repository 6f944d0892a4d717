// The kernel body in portable C++ for CPUs without AVX2: 8-lane arrays the compiler may
// vectorise with whatever the baseline target offers.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::portable {
namespace {

struct Vec {
  static constexpr int kWidth = 8;
  float v[kWidth];

  static Vec Zero() { return Set1(0.0f); }
  static Vec Load(const float* p) {
    Vec r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void Store(float* p, Vec x) { std::memcpy(p, x.v, sizeof(x.v)); }
  static Vec Set1(float x) {
    Vec r;
    for (float& lane : r.v) lane = x;
    return r;
  }
  template <typename F>
  static Vec Map2(Vec a, Vec b, F f) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = f(a.v[i], b.v[i]);
    return r;
  }
  static Vec Fma(Vec a, Vec b, Vec c) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static Vec Mul(Vec a, Vec b) {
    return Map2(a, b, [](float x, float y) { return x * y; });
  }
  static Vec Add(Vec a, Vec b) {
    return Map2(a, b, [](float x, float y) { return x + y; });
  }
  static Vec Sub(Vec a, Vec b) {
    return Map2(a, b, [](float x, float y) { return x - y; });
  }
  static Vec Max(Vec a, Vec b) {
    return Map2(a, b, [](float x, float y) { return x > y ? x : y; });
  }
  static float ReduceMax(Vec a) {
    float m = a.v[0];
    for (float lane : a.v) m = lane > m ? lane : m;
    return m;
  }
  static float ReduceAdd(Vec a) {
    float s = 0.0f;
    for (float lane : a.v) s += lane;
    return s;
  }
  static Vec Exp2(Vec x) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = x.v[i] <= -127.0f ? 0.0f : std::exp2(x.v[i]);
    return r;
  }
};

constexpr int kRows = 4;
constexpr int kCols = 2;

#include "engine/cpu/kernel_body.inc"

}  // namespace

void RunSegment(const SegmentKernelArgs& args) { RunSegmentBody(args); }

}  // namespace da::engine::cpu::portable
