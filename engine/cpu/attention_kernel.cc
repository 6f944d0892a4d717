#include "engine/cpu/attention_kernel.h"

#include <cstdlib>
#include <cstring>

#include "engine/device.h"

namespace da::engine::cpu {

int64_t KernelScratchFloats(int64_t dim_pad) {
  return kMaxPanelRows * kKeyBlock + kGroupPanels * PanelStateFloats(kMaxPanelRows, dim_pad);
}

int64_t KernelBf16ScratchFloats(int64_t rows_pad, int64_t keys_pad, int64_t dim_pad) {
  // bf16 halves of q, kt and v, plus one row-panel of bf16 weights, counted in floats.
  return (rows_pad * dim_pad + 2 * keys_pad * dim_pad) / 2 + 8 * kKeyBlock;
}

bool HasBf16DotProducts() {
  const CpuFeatures f = DetectCpuFeatures();
  return f.avx512f && f.avx512_bf16;
}

void RunSegmentKernelBf16(const SegmentKernelArgs& args) { avx512_bf16::RunSegment(args); }

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
