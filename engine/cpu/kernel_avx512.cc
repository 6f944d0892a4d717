// The kernel body for AVX-512F: 16 float lanes; a 4 x 64 score tile and a 4 x 64 output tile keep
// 16 accumulators in the 32 zmm registers. Compiled with -mavx512f -mfma (engine/CMakeLists.txt).
#include <immintrin.h>

#include <cstdint>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::avx512 {
namespace {

constexpr int kExp2Degree = 7;  // vec_avx512.inc's exp2 polynomial.
#include "engine/cpu/vec_avx512.inc"

constexpr int kRows = 4;
constexpr int kCols = 4;

#include "engine/cpu/kernel_body.inc"

}  // namespace

void RunSegment(const SegmentKernelArgs& args) { RunSegmentBody(args); }

}  // namespace da::engine::cpu::avx512
