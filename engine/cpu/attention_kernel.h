// The fused attention kernel of the CPU backend: one segment's packed rows in, normalised outputs
// and log-sum-exps out, in cache-sized tiles with an online softmax.
//
//   SegmentKernelArgs args = ...;          // packed by the caller, see the field comments
//   RunSegmentKernel(SelectedIsa(), args);  // AVX-512, AVX2 or portable code, chosen at run time
//
// The same kernel body is compiled once per instruction set (kernel_avx512.cc, kernel_avx2.cc,
// and the portable C++ source twice: kernel_portable_fma.cc with FMA, kernel_portable.cc for the
// x86-64 baseline); SelectedIsa picks the best the CPU has, or the one named by the environment
// variable DA_CPU_ISA (avx512, avx2, portable, portable-sse2), which tests use to run every path
// the machine can.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace da::engine::cpu {

// Padding every packed buffer honours, so that no ISA ever needs a tail loop.
constexpr int64_t kDimAlign = 16;      // head_dim is padded to a multiple of this (zeros).
constexpr int64_t kKeyAlign = 64;      // Key counts are padded to a multiple of this (zeros).
constexpr int64_t kRowAlign = 8;       // Query rows are padded to a multiple of this (zeros).
constexpr int64_t kKeyBlock = 512;     // Keys per online-softmax step (a multiple of kKeyAlign).
constexpr int64_t kMaxPanelRows = 16;  // Query rows per kernel panel, at most (every ISA's kRows).
constexpr int kGroupPanels = 16;       // Panels that share each key block (kernel_body.inc).

inline int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

struct SegmentKernelArgs {
  int64_t keys = 0;           // Packed keys: the segment's first `keys` kept positions.
  int64_t dim_pad = 0;        // head_dim rounded up to kDimAlign.
  int64_t keys_pad = 0;       // keys rounded up to kKeyAlign; the leading dimension of kt.
  bool causal = false;        // Query i sees keys j <= i (kept positions increase with the index).
  int64_t row_begin = 0;      // Queries [row_begin, row_end) of the segment are computed; with
  int64_t row_end = 0;        // causal, keys >= row_end need not be packed.
  const float* q = nullptr;   // [RoundUp(row_end - row_begin, kRowAlign), dim_pad], zero padded,
                              // times softmax scale * log2(e).
  const float* kt = nullptr;  // [dim_pad, keys_pad]: keys transposed, zero padded.
  const float* v = nullptr;   // [keys_pad, dim_pad], zero padded.
  float* out = nullptr;       // [row_end - row_begin, dim_pad]: softmax-normalised outputs.
  float* lse = nullptr;       // [row_end - row_begin]: natural-log log-sum-exp of the scores.
  float* scratch = nullptr;   // KernelScratchFloats(dim_pad) floats, 64-byte aligned.
  // bf16 kernel only: KernelBf16ScratchFloats(...) floats for the bf16 copies of q, kt, v and P.
  float* bf16_scratch = nullptr;
  // Checked before every panel of queries; when it turns true the kernel returns early and its
  // outputs are undefined (the caller reports CANCELLED).
  const std::atomic<bool>* cancelled = nullptr;
};

// One panel's running state in the scratch: its output rows [rows][dim_pad] and its rows' max,
// sum and correction, rounded to whole cache lines.
inline int64_t PanelStateFloats(int64_t rows, int64_t dim_pad) {
  return (rows * dim_pad + 3 * rows + 15) / 16 * 16;
}
int64_t KernelScratchFloats(int64_t dim_pad);
int64_t KernelBf16ScratchFloats(int64_t rows_pad, int64_t keys_pad, int64_t dim_pad);

// In order of preference. kPortable is the portable source built with FMA (as Arm servers run it),
// for x86 CPUs with FMA; kPortableSse2 the same source for any x86-64.
enum class Isa { kPortableSse2, kPortable, kAvx2, kAvx512 };

// The portable C++ kernel, in either build (no intrinsics, no F16C conversions).
inline bool IsPortable(Isa isa) { return isa == Isa::kPortableSse2 || isa == Isa::kPortable; }

std::string IsaName(Isa isa);
Isa BestIsa();      // The widest instruction set this CPU supports.
Isa SelectedIsa();  // BestIsa, or DA_CPU_ISA when it names a supported one.

void RunSegmentKernel(Isa isa, const SegmentKernelArgs& args);

// True when this CPU has AVX512-BF16 dot products (vdpbf16ps).
bool HasBf16DotProducts();

// True when this CPU has AMX-TILE and AMX-BF16 tiles besides AVX512-BF16, and the OS granted this
// process the tile state (Linux 5.16+, arch_prctl ARCH_REQ_XCOMP_PERM: asked once, here).
bool HasAmxBf16();

// The kernels that compute in bf16 (bf16 products, fp32 accumulation), fastest last.
enum class Bf16Kernel {
  kNone,         // No bf16 kernel on this path: bf16 is not offered.
  kDotProducts,  // AVX512-BF16 vdpbf16ps on zmm registers (kernel_avx512_bf16.cc).
  kAmx,          // AMX tdpbf16ps on tiles (kernel_amx_bf16.cc).
};

// "none", "avx512_bf16", "amx_bf16".
std::string Bf16KernelName(Bf16Kernel kernel);
// The fastest bf16 kernel for the fp32 path `isa`: none unless it is AVX-512 on a CPU with
// AVX512-BF16; AMX where HasAmxBf16().
Bf16Kernel BestBf16Kernel(Isa isa);
// BestBf16Kernel, or the dot-product kernel when DA_CPU_BF16=avx512_bf16 asks for it (and
// there is a bf16 kernel at all).
Bf16Kernel SelectedBf16Kernel(Isa isa);

// The same contract with bf16 products and fp32 accumulation: q, kt, v and the softmax weights are
// rounded to bf16 (8 significant bits) before each product. `kernel` must be available (not
// kNone; kAmx only where HasAmxBf16()); args.bf16_scratch must be set.
void RunSegmentKernelBf16(Bf16Kernel kernel, const SegmentKernelArgs& args);

// One entry per instruction set; each is compiled with its own target flags.
namespace avx512 {
void RunSegment(const SegmentKernelArgs& args);
}
namespace avx2 {
void RunSegment(const SegmentKernelArgs& args);
}
namespace portable_fma {
void RunSegment(const SegmentKernelArgs& args);
}  // namespace portable_fma
namespace portable {
void RunSegment(const SegmentKernelArgs& args);
// Whether the baseline build was compiled with FMA anyway (DA_PORTABLE_COMPILE_OPTIONS=-mfma), so
// that its `a * b + c` are fused; otherwise a multiply and an add.
bool UsesFma();
}  // namespace portable
namespace avx512_bf16 {
void RunSegment(const SegmentKernelArgs& args);
}
namespace amx_bf16 {
void RunSegment(const SegmentKernelArgs& args);
}

}  // namespace da::engine::cpu
