// Machine peaks measured in-run, so that every figure da-bench prints is a ratio taken on the
// same machine at the same moment.
#pragma once

namespace da::bench {

// fp32 FMA throughput of `threads` threads running an FMA-only loop with enough independent
// accumulators to hide latency, in GFLOP/s (an FMA is 2 FLOP per lane). Uses AVX-512 when the CPU
// has it, else AVX2.
double MeasureFp32PeakGflops(int threads);

// bf16 dot-product throughput (vdpbf16ps: 2 products and 2 additions per fp32 lane pair), in
// GFLOP/s; 0 when the CPU lacks AVX512-BF16.
double MeasureBf16PeakGflops(int threads);

}  // namespace da::bench
