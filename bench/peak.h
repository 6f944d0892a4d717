// Machine peaks measured in-run, so that every figure da-bench prints is a ratio taken on the
// same machine at the same moment.
//
//   PeakSampler peak(Fp32PeakLoopFor(isa), threads);
//   peak.Sample(3);                       // before the timed runs
//   for (...) { TimeOneRun(); peak.Sample(); }
//   peak.Sample(3);                       // after them
//   ratio = gflops / peak.Best();         // the best sample; Min and Median show the spread
//
// A sample is one short run (about 20 ms) of a throughput loop on `threads` threads at once.
// Other work on the machine can only lower a sample, so the best of several samples spread over
// the run is the estimate of what the machine can do; the spread says how disturbed the run was.
#pragma once

#include <string>
#include <vector>

#include "engine/cpu/attention_kernel.h"

namespace da::bench {

enum class PeakLoop {
  kNone,        // Not available on this CPU.
  kFp32Avx512,  // fp32 FMAs on zmm registers, 16 independent accumulators.
  kFp32Avx2,    // fp32 FMAs on ymm registers (AVX2 + FMA), 12 independent accumulators.
  kBf16Avx512,  // bf16 dot products (vdpbf16ps: 2 products and 2 additions per fp32 lane pair).
  kFp32Sse,     // fp32 multiplies and adds on xmm registers (SSE2, no FMA), 6 + 6 accumulators.
  kFp32XmmFma,  // fp32 FMAs on xmm registers, 12 accumulators.
  kBf16Amx,     // bf16 tile products (tdpbf16ps, 16 x 16 x 32), 4 accumulator tiles.
};

// The fp32 loop for the unit a kernel ISA runs on: zmm FMAs for avx512, ymm FMAs for avx2, and
// for the portable kernel the 128-bit unit it was built for (xmm FMAs where it uses FMA, else
// SSE2 multiplies and adds; x86 only).
PeakLoop Fp32PeakLoopFor(engine::cpu::Isa isa);
// The unit of the bf16 kernel `kernel` runs on: kBf16Amx for AMX, kBf16Avx512 for the dot-product
// kernel (and for none, where the CPU has AVX512-BF16), else kNone.
PeakLoop Bf16PeakLoop(engine::cpu::Bf16Kernel kernel);
// "avx512 zmm FMA", "avx2 ymm FMA", "avx512 bf16 dot", "sse2 xmm mul+add", "xmm FMA",
// "amx bf16 tile", "none".
std::string PeakLoopName(PeakLoop loop);

class PeakSampler {
 public:
  PeakSampler(PeakLoop loop, int threads) : loop_(loop), threads_(threads) {}

  // Takes `count` short samples, in GFLOP/s (an FMA is 2 FLOP per lane). Nothing for kNone.
  void Sample(int count = 1);

  double Best() const;  // 0 without samples.
  double Min() const;
  double Median() const;  // Of an even count: the mean of the two middle samples.
  int Count() const { return static_cast<int>(gflops_.size()); }
  PeakLoop loop() const { return loop_; }

 private:
  PeakLoop loop_;
  int threads_;
  std::vector<double> gflops_;
};

}  // namespace da::bench
