// The portable kernel (kernel_portable.inc) compiled with FMA (-mfma; engine/CMakeLists.txt): still
// 128-bit generic vectors, now with fused multiply-adds, which is what the same source gets on
// aarch64, whose baseline has NEON and FMA. It is what DA_CPU_ISA=portable runs on an x86 CPU
// with FMA, so that x86 machines run and test the portable path with the arithmetic and rounding
// of the Arm servers it is for; `portable-sse2` names the baseline build.
#include <cstdint>
#include <cstring>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::portable_fma {
#include "engine/cpu/kernel_portable.inc"
}  // namespace da::engine::cpu::portable_fma
