// Test helpers shared by engine and server tests: owned random tensors, poisoned outputs and
// comparisons with tolerances. Test-only; not part of da_engine's sources.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/attention_kernel.h"
#include "engine/engine.h"
#include "engine/tensor.h"

namespace da::engine::testing {

// An owned tensor in its dtype's bytes.
struct OwnedTensor {
  DType dtype = DType::kFloat32;
  Shape4 shape;
  std::vector<uint8_t> bytes;

  TensorView view() const {
    return {dtype, shape, bytes.data(), static_cast<int64_t>(bytes.size())};
  }
  MutableTensorView mutable_view() {
    return {dtype, shape, bytes.data(), static_cast<int64_t>(bytes.size())};
  }
  float at(int64_t i) const { return LoadAsFloat(dtype, bytes.data(), i); }
  int64_t elements() const { return shape.elements(); }
};

// Uniform values in [-1, 1), rounded to dtype; never all zeros.
inline OwnedTensor RandomTensor(DType dtype, Shape4 shape, std::mt19937& rng) {
  OwnedTensor t{dtype, shape, std::vector<uint8_t>(shape.elements() * DTypeSize(dtype))};
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int64_t i = 0; i < shape.elements(); ++i)
    StoreFromFloat(dtype, t.bytes.data(), i, uniform(rng));
  return t;
}

// An output buffer filled with NaN bit patterns (0xff bytes are NaN in fp32, fp16 and bf16), so
// any element a backend forgets to write shows up.
inline OwnedTensor PoisonedTensor(DType dtype, Shape4 shape) {
  return {dtype, shape, std::vector<uint8_t>(shape.elements() * DTypeSize(dtype), 0xff)};
}

struct Tolerance {
  double atol;
  double rtol;
};

// Tolerance for an output stored in dtype compared with an fp32 rendering of the fp64 reference:
// half an ulp of the storage type plus fp32 accumulation error.
inline Tolerance ToleranceFor(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return {1e-5, 1e-4};
    case DType::kFloat16:
      return {1e-4, 1e-3};
    case DType::kBFloat16:
      return {1e-3, 8e-3};
  }
  return {0, 0};
}

// Empty when every element of actual is within tolerance of expected (and finite); otherwise a
// description of the worst element.
inline std::string Compare(const OwnedTensor& actual, const OwnedTensor& expected, Tolerance tol) {
  if (actual.elements() != expected.elements()) return "element counts differ";
  double worst_excess = 0.0;
  int64_t worst = -1;
  for (int64_t i = 0; i < actual.elements(); ++i) {
    const double a = actual.at(i);
    const double e = expected.at(i);
    if (!std::isfinite(a)) return "element " + std::to_string(i) + " is not finite";
    const double excess = std::fabs(a - e) - (tol.atol + tol.rtol * std::fabs(e));
    if (excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (worst < 0) return "";
  return "element " + std::to_string(worst) + ": got " + std::to_string(actual.at(worst)) +
         ", expected " + std::to_string(expected.at(worst));
}

// ||actual - expected||_2 / ||expected||_2, the error measure of reduced-precision products.
inline double RelativeL2(const OwnedTensor& actual, const OwnedTensor& expected) {
  double err2 = 0.0, ref2 = 0.0;
  for (int64_t i = 0; i < actual.elements(); ++i) {
    const double e = expected.at(i);
    const double d = actual.at(i) - e;
    err2 += d * d;
    ref2 += e * e;
  }
  return ref2 > 0.0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
}

// The documented bound of bf16 products with fp32 accumulation (docs/PRECISION.md): relative L2
// error at most 2e-2 against the fp64 reference. Tests hold the kernel to half of it.
constexpr double kBf16RelativeL2 = 1e-2;

// ctest runs the CPU backend tests once per instruction set, naming it in DA_CPU_ISA. Empty when
// that path is the one selected (or none is named); otherwise why the test must be skipped, so a
// path the machine lacks is skipped, never silently replaced by another.
inline std::string MissingRequestedIsa() {
  const char* wanted = std::getenv("DA_CPU_ISA");
  if (wanted == nullptr || cpu::IsaName(cpu::SelectedIsa()) == wanted) return "";
  return std::string("this CPU lacks ") + wanted + "; best is " + cpu::IsaName(cpu::BestIsa());
}

// Largest |actual - expected| over the largest |expected|: the bound sharded and multi-device
// outputs are held to. Infinity when an element of actual is not finite (not written) or expected
// is all zero.
inline double MaxRelativeError(const OwnedTensor& actual, const OwnedTensor& expected) {
  double max_abs = 0, max_diff = 0;
  for (int64_t i = 0; i < expected.elements(); ++i) {
    if (!std::isfinite(actual.at(i))) return INFINITY;
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(expected.at(i))));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(actual.at(i)) - expected.at(i)));
  }
  return max_abs > 0 ? max_diff / max_abs : INFINITY;
}

// One problem's owned tensors (fresh random q, k, v; a poisoned output) and its spec, as an
// engine RunRequest of views into them.
struct OwnedProblem {
  OwnedTensor q, k, v, out;
  AttentionSpec spec;

  RunRequest Request() {
    RunRequest r;
    r.q = q.view();
    r.k = k.view();
    r.v = v.view();
    r.out = out.mutable_view();
    r.spec = spec;
    return r;
  }
};

// fp32 inputs and output of `shape`, random from `seed`; spec fp32 with no patterns yet.
inline OwnedProblem RandomProblem(const ProblemShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  OwnedProblem p;
  p.q = RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
  p.k = RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
  p.v = RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
  p.out = PoisonedTensor(DType::kFloat32, shape.QueryShape());
  p.spec.precision = Precision::kFloat32;
  return p;
}

}  // namespace da::engine::testing
