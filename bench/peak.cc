#include "bench/peak.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "bench/median.h"
#include "engine/device.h"

namespace da::bench {

float Fp32FmaLoopAvx512(int64_t iterations);
float Bf16DotLoopAvx512(int64_t iterations);
float Fp32FmaLoopAvx2(int64_t iterations);
float Fp32FmaLoopXmm(int64_t iterations);
float Fp32MulAddLoopSse(int64_t iterations);
float Bf16TileLoopAmx(int64_t iterations);

namespace {

struct LoopInfo {
  float (*run)(int64_t iterations) = nullptr;
  double flops_per_iteration = 0.0;
  double rate_scale = 1.0;  // About how many times a vector unit's rate: sizes a sample.
};

LoopInfo InfoFor(PeakLoop loop) {
  switch (loop) {
    case PeakLoop::kFp32Avx512:
      return {Fp32FmaLoopAvx512, 16 * 16 * 2};  // 16 zmm FMAs of 16 lanes.
    case PeakLoop::kFp32Avx2:
      return {Fp32FmaLoopAvx2, 12 * 8 * 2};  // 12 ymm FMAs of 8 lanes.
    case PeakLoop::kBf16Avx512:
      return {Bf16DotLoopAvx512, 16 * 16 * 4};  // 16 vdpbf16ps of 16 lane pairs.
    case PeakLoop::kFp32Sse:
      return {Fp32MulAddLoopSse, 12 * 4};  // 6 mulps and 6 addps of 4 lanes.
    case PeakLoop::kFp32XmmFma:
      return {Fp32FmaLoopXmm, 12 * 4 * 2};  // 12 xmm FMAs of 4 lanes.
    case PeakLoop::kBf16Amx:
      // 4 tdpbf16ps of 16 x 16 x 32: about 3.5 TFLOP/s per core, so samples of 30x the FLOPs.
      return {Bf16TileLoopAmx, 4 * 16 * 16 * 32 * 2, 30.0};
    case PeakLoop::kNone:
      break;
  }
  return {};
}

// About 20 ms per thread at 100 GFLOP/s per core; a bf16 sample takes half as long.
constexpr double kFlopsPerThreadPerSample = 2e9;

}  // namespace

PeakLoop Fp32PeakLoopFor(engine::cpu::Isa isa) {
  const engine::CpuFeatures f = engine::DetectCpuFeatures();
  const bool avx2 = f.avx2 && f.fma;
  switch (isa) {
    case engine::cpu::Isa::kAvx512:
      return f.avx512f ? PeakLoop::kFp32Avx512 : PeakLoop::kNone;
    case engine::cpu::Isa::kAvx2:
      return avx2 ? PeakLoop::kFp32Avx2 : PeakLoop::kNone;
    case engine::cpu::Isa::kPortable:
      return f.fma ? PeakLoop::kFp32XmmFma : PeakLoop::kNone;
    case engine::cpu::Isa::kPortableSse2:
      return engine::cpu::portable::UsesFma() ? (f.fma ? PeakLoop::kFp32XmmFma : PeakLoop::kNone)
                                              : PeakLoop::kFp32Sse;
  }
  return PeakLoop::kNone;
}

PeakLoop Bf16PeakLoop(engine::cpu::Bf16Kernel kernel) {
  if (kernel == engine::cpu::Bf16Kernel::kAmx && engine::cpu::HasAmxBf16()) {
    return PeakLoop::kBf16Amx;
  }
  return engine::DetectCpuFeatures().avx512_bf16 ? PeakLoop::kBf16Avx512 : PeakLoop::kNone;
}

std::string PeakLoopName(PeakLoop loop) {
  switch (loop) {
    case PeakLoop::kFp32Avx512:
      return "avx512 zmm FMA";
    case PeakLoop::kFp32Avx2:
      return "avx2 ymm FMA";
    case PeakLoop::kBf16Avx512:
      return "avx512 bf16 dot";
    case PeakLoop::kFp32Sse:
      return "sse2 xmm mul+add";
    case PeakLoop::kFp32XmmFma:
      return "xmm FMA";
    case PeakLoop::kBf16Amx:
      return "amx bf16 tile";
    case PeakLoop::kNone:
      break;
  }
  return "none";
}

void PeakSampler::Sample(int count) {
  const LoopInfo info = InfoFor(loop_);
  if (info.run == nullptr) return;
  const int64_t iterations =
      static_cast<int64_t>(kFlopsPerThreadPerSample * info.rate_scale / info.flops_per_iteration);
  for (int i = 0; i < count; ++i) {
    std::atomic<float> sink{0.0f};
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (int t = 0; t < threads_; ++t) {
      workers.emplace_back([&] { sink = sink + info.run(iterations); });
    }
    for (std::thread& w : workers) w.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    gflops_.push_back(info.flops_per_iteration * iterations * threads_ / seconds / 1e9);
  }
}

double PeakSampler::Best() const {
  return gflops_.empty() ? 0.0 : *std::max_element(gflops_.begin(), gflops_.end());
}

double PeakSampler::Min() const {
  return gflops_.empty() ? 0.0 : *std::min_element(gflops_.begin(), gflops_.end());
}

double PeakSampler::Median() const { return bench::Median(gflops_); }

}  // namespace da::bench
