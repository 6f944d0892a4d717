// The kernel body in portable C++ for CPUs without AVX2 (and for every non-x86 server), compiled
// for the target's baseline (SSE2 on x86-64; DA_PORTABLE_COMPILE_OPTIONS adds flags for a fleet
// known to have more). kernel_portable_fma.cc compiles the same source with FMA.
#include <cstdint>
#include <cstring>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::portable {
#include "engine/cpu/kernel_portable.inc"

bool UsesFma() {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return true;
#else
  return false;
#endif
}

}  // namespace da::engine::cpu::portable
