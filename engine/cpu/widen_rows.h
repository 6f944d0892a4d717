// Widening of q, k and v rows to the kernel's fp32 tiles (segment_task.cc), once per element per
// tile and never inside the kernel's loops: fp32 times a factor, bf16 by a shift, fp16 with the
// F16C instructions where the CPU has them (and the selected ISA is not the portable one, so that
// DA_CPU_ISA=portable also tests the plain C++ conversion).
//
//   float row[64];
//   // row[i] = q_factor * data[base + i]
//   WidenRow(DType::kFloat16, data, base, 64, q_factor, row);
#pragma once

#include <cstdint>

#include "engine/tensor.h"

namespace da::engine::cpu {

// out[i] = factor * element (base + i) of data, for i in [0, count).
void WidenRow(DType dtype, const void* data, int64_t base, int64_t count, float factor, float* out);

// Compiled with -mavx -mf16c (widen_rows_f16c.cc); call only when the CPU has F16C.
namespace f16c {
void WidenHalfRow(const uint16_t* in, int64_t count, float factor, float* out);
}

}  // namespace da::engine::cpu
