#include "engine/device.h"

#include <unistd.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/precision_policy.h"

#ifdef DA_HAVE_CUDA
#include "engine/cuda/device_query.cuh"
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace da::engine {
namespace {

std::string CpuModelName() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "cpu";
}

int64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? static_cast<int64_t>(pages) * page_size : 0;
}

#ifdef DA_HAVE_CUDA
void AppendCudaDevices(std::vector<DeviceInfo>& devices) {
  constexpr int kMaxDevices = 64;
  cuda::CudaDeviceProperties props[kMaxDevices];
  int count = 0;
  // No driver or no GPU is the normal case on CPU machines: then there are no CUDA devices.
  if (cuda::QueryCudaDevices(props, kMaxDevices, &count) != cudaSuccess) return;
  for (int i = 0; i < count; ++i) {
    DeviceInfo d;
    d.id = absl::StrCat("cuda:", i);
    d.kind = "cuda";
    d.name = props[i].name;
    // What the policy allows on this generation; the CUDA backend itself lands in a later issue.
    d.precisions = SupportedPrecisions(CudaCapabilities(props[i].major, props[i].minor));
    d.memory_bytes = props[i].global_memory_bytes;
    d.compute_units = props[i].multiprocessors;
    d.capability = absl::StrCat("sm_", props[i].major, props[i].minor);
    devices.push_back(std::move(d));
  }
}
#endif

}  // namespace

std::string CpuFeatures::ToString() const {
  std::vector<std::string> names;
  if (avx2) names.push_back("avx2");
  if (fma) names.push_back("fma");
  if (f16c) names.push_back("f16c");
  if (avx512f) names.push_back("avx512f");
  if (avx512_bf16) names.push_back("avx512_bf16");
  if (avx512_fp16) names.push_back("avx512_fp16");
  return absl::StrJoin(names, " ");
}

CpuFeatures DetectCpuFeatures() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  // clang 14 (the fuzz build) knows neither feature name, so these two are read from CPUID:
  // leaf 1 ECX bit 29 (F16C) and leaf 7 EDX bit 23 (AVX512-FP16).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) f.f16c = (ecx >> 29) & 1;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
    f.avx512_fp16 = f.avx512f && ((edx >> 23) & 1);
#endif
  return f;
}

std::vector<DeviceInfo> DiscoverDevices(int cpu_threads) {
  std::vector<DeviceInfo> devices;
  DeviceInfo cpu;
  cpu.id = "cpu:0";
  cpu.kind = "cpu";
  cpu.name = CpuModelName();
  cpu.memory_bytes = PhysicalMemoryBytes();
  cpu.compute_units = cpu_threads;
  cpu.capability = DetectCpuFeatures().ToString();
  devices.push_back(std::move(cpu));
#ifdef DA_HAVE_CUDA
  AppendCudaDevices(devices);
#endif
  return devices;
}

std::vector<std::string> BuildFeatures() {
  std::vector<std::string> features = {"cpu"};
#ifdef DA_HAVE_CUDA
  features.push_back("cuda");
#endif
  return features;
}

}  // namespace da::engine
