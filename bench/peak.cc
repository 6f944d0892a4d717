#include "bench/peak.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "engine/device.h"

namespace da::bench {

float Fp32FmaLoopAvx512(int64_t iterations);
float Bf16DotLoopAvx512(int64_t iterations);
float Fp32FmaLoopAvx2(int64_t iterations);

namespace {

// Runs loop(iterations) on `threads` threads at once, best of three, and returns GFLOP/s.
double Measure(int threads, double flops_per_iteration, const std::function<float(int64_t)>& loop) {
  constexpr int64_t kIterations = 20'000'000;
  double best = 0.0;
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::atomic<float> sink{0.0f};
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&] { sink = sink + loop(kIterations); });
    }
    for (std::thread& w : workers) w.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, flops_per_iteration * kIterations * threads / seconds / 1e9);
  }
  return best;
}

}  // namespace

double MeasureFp32PeakGflops(int threads) {
  const engine::CpuFeatures f = engine::DetectCpuFeatures();
  if (f.avx512f) return Measure(threads, 16 * 16 * 2, Fp32FmaLoopAvx512);
  if (f.avx2 && f.fma) return Measure(threads, 12 * 8 * 2, Fp32FmaLoopAvx2);
  return 0.0;
}

double MeasureBf16PeakGflops(int threads) {
  if (!engine::DetectCpuFeatures().avx512_bf16) return 0.0;
  return Measure(threads, 16 * 16 * 4, Bf16DotLoopAvx512);
}

}  // namespace da::bench
