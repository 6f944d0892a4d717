#include "engine/cpu/attention_kernel.h"

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "engine/device.h"

namespace da::engine::cpu {

int64_t KernelScratchFloats(int64_t dim_pad) {
  return kMaxPanelRows * kKeyBlock + kGroupPanels * PanelStateFloats(kMaxPanelRows, dim_pad);
}

int64_t KernelBf16ScratchFloats(int64_t rows_pad, int64_t keys_pad, int64_t dim_pad) {
  // bf16 halves of q (its rows padded to a whole panel of kMaxPanelRows), kt and v, plus one
  // panel of bf16 weights, counted in floats.
  return (RoundUp(rows_pad, kMaxPanelRows) * dim_pad + 2 * keys_pad * dim_pad) / 2 +
         kMaxPanelRows * kKeyBlock / 2;
}

bool HasBf16DotProducts() {
  const CpuFeatures f = DetectCpuFeatures();
  return f.avx512f && f.avx512_bf16;
}

bool HasAmxBf16() {
  static const bool granted = [] {
    const CpuFeatures f = DetectCpuFeatures();
    if (!(f.avx512f && f.avx512_bf16 && f.amx_bf16)) return false;
#if defined(__linux__) && defined(__x86_64__)
    // Linux keeps AMX's 8 KiB of tile data out of a process's state until it asks for it.
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return granted;
}

std::string Bf16KernelName(Bf16Kernel kernel) {
  switch (kernel) {
    case Bf16Kernel::kNone:
      return "none";
    case Bf16Kernel::kDotProducts:
      return "avx512_bf16";
    case Bf16Kernel::kAmx:
      return "amx_bf16";
  }
  return "unknown";
}

Bf16Kernel BestBf16Kernel(Isa isa) {
  if (isa != Isa::kAvx512 || !HasBf16DotProducts()) return Bf16Kernel::kNone;
  return HasAmxBf16() ? Bf16Kernel::kAmx : Bf16Kernel::kDotProducts;
}

Bf16Kernel SelectedBf16Kernel(Isa isa) {
  const Bf16Kernel best = BestBf16Kernel(isa);
  const char* wanted = std::getenv("DA_CPU_BF16");
  if (best != Bf16Kernel::kNone && wanted != nullptr &&
      std::string(wanted) == Bf16KernelName(Bf16Kernel::kDotProducts)) {
    return Bf16Kernel::kDotProducts;
  }
  return best;
}

void RunSegmentKernelBf16(Bf16Kernel kernel, const SegmentKernelArgs& args) {
  if (kernel == Bf16Kernel::kAmx) {
    amx_bf16::RunSegment(args);
  } else {
    avx512_bf16::RunSegment(args);
  }
}

std::string IsaName(Isa isa) {
  switch (isa) {
    case Isa::kPortableSse2:
      return "portable-sse2";
    case Isa::kPortable:
      return "portable";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

Isa BestIsa() {
  const CpuFeatures f = DetectCpuFeatures();
  if (f.avx512f) return Isa::kAvx512;
  if (f.avx2 && f.fma) return Isa::kAvx2;
  if (f.fma) return Isa::kPortable;
  return Isa::kPortableSse2;
}

Isa SelectedIsa() {
  static const Isa selected = [] {
    const Isa best = BestIsa();
    const char* wanted = std::getenv("DA_CPU_ISA");
    if (wanted == nullptr) return best;
    for (Isa isa : {Isa::kPortableSse2, Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
      if (IsaName(isa) == wanted && isa <= best) return isa;
    }
    return best;  // Unknown or unsupported: the best available, never an illegal instruction.
  }();
  return selected;
}

void RunSegmentKernel(Isa isa, const SegmentKernelArgs& args) {
  switch (isa) {
    case Isa::kAvx512:
      avx512::RunSegment(args);
      return;
    case Isa::kAvx2:
      avx2::RunSegment(args);
      return;
    case Isa::kPortable:
      portable_fma::RunSegment(args);
      return;
    case Isa::kPortableSse2:
      portable::RunSegment(args);
      return;
  }
}

}  // namespace da::engine::cpu
