#include "engine/device.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/host_resources.h"
#include "engine/precision_policy.h"
#include "engine/status_macros.h"

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
    // What the policy allows on this generation; the engine replaces it with what the CUDA
    // backend computes in (Backend::Precisions).
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
  if (amx_bf16) names.push_back("amx_bf16");
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
  // Leaf 0: the vendor string in EBX, EDX, ECX ("Auth" "enti" "cAMD").
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx)) {
    f.amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;
  }
  // Leaf 1 ECX bit 27: OSXSAVE, the OS enabled XGETBV (read for AMX below).
  bool osxsave = false;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
    f.f16c = (ecx >> 29) & 1;
    osxsave = (ecx >> 27) & 1;
  }
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    f.avx512_fp16 = f.avx512f && ((edx >> 23) & 1);
    // Leaf 7 EDX bit 22: AMX-BF16, bit 24: AMX-TILE; XCR0 bits 17 and 18: the OS saves the tile
    // configuration and data.
    const bool amx = ((edx >> 22) & 1) && ((edx >> 24) & 1);
    if (amx && osxsave) {
      uint32_t xcr0_low = 0, xcr0_high = 0;
      __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
      f.amx_bf16 = (xcr0_low & (3u << 17)) == (3u << 17);
    }
  }
#endif
  return f;
}

std::vector<DeviceInfo> DiscoverDevices(int cpu_threads) {
  std::vector<DeviceInfo> devices;
  DeviceInfo cpu;
  cpu.id = "cpu:0";
  cpu.kind = "cpu";
  cpu.name = CpuModelName();
  cpu.memory_bytes = HostResourcesOfThisProcess().memory_bytes;  // The container's limit.
  cpu.compute_units = cpu_threads;
  cpu.capability = DetectCpuFeatures().ToString();
  devices.push_back(std::move(cpu));
#ifdef DA_HAVE_CUDA
  AppendCudaDevices(devices);
#endif
  return devices;
}

absl::StatusOr<std::vector<int>> ParseCpuList(absl::string_view list) {
  std::vector<int> cpus;
  for (absl::string_view part : absl::StrSplit(absl::StripAsciiWhitespace(list), ',')) {
    if (part.empty()) continue;
    const size_t dash = part.find('-');
    int first = 0, last = 0;
    const bool parsed = dash == absl::string_view::npos
                            ? absl::SimpleAtoi(part, &first) && absl::SimpleAtoi(part, &last)
                            : absl::SimpleAtoi(part.substr(0, dash), &first) &&
                                  absl::SimpleAtoi(part.substr(dash + 1), &last);
    if (!parsed || first < 0 || last < first) {
      return absl::InvalidArgumentError(
          absl::StrCat("cpu list \"", std::string(list), "\": \"", part, "\" is not N or N-M"));
    }
    for (int cpu = first; cpu <= last; ++cpu) cpus.push_back(cpu);
  }
  return cpus;
}

std::vector<std::vector<int>> NumaNodeCpus(const std::string& root) {
  std::vector<std::vector<int>> nodes;
  // Node numbers may have gaps (offline nodes); 1024 bounds the search.
  for (int node = 0, missing = 0; node < 1024 && missing < 64; ++node) {
    std::ifstream file(absl::StrCat(root, "/node", node, "/cpulist"));
    if (!file) {
      ++missing;
      continue;
    }
    missing = 0;
    std::string line;
    std::getline(file, line);
    absl::StatusOr<std::vector<int>> cpus = ParseCpuList(line);
    if (cpus.ok() && !cpus->empty()) nodes.push_back(*std::move(cpus));
  }
  return nodes;
}

std::vector<int> AffinityCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

namespace {

// One plan per NUMA node that has CPUs in `allowed` (null: all), pinned to those, splitting
// `threads` (0: see PlanCpuDevices) in proportion to them (PlanCpuDevices' comment).
absl::StatusOr<std::vector<CpuDevicePlan>> PlanNumaDevices(
    const DeviceInfo& cpu, int threads, const std::vector<std::vector<int>>& numa_nodes,
    const std::vector<int>* allowed) {
  std::vector<std::vector<int>> nodes;  // Each node's allowed CPUs; nodes with none left out.
  int allowed_total = 0;
  for (const std::vector<int>& node : numa_nodes) {
    std::vector<int> cpus;
    for (int c : node) {
      if (allowed == nullptr || std::find(allowed->begin(), allowed->end(), c) != allowed->end()) {
        cpus.push_back(c);
      }
    }
    allowed_total += static_cast<int>(cpus.size());
    if (!cpus.empty()) nodes.push_back(std::move(cpus));
  }
  if (numa_nodes.empty()) {
    return absl::InvalidArgumentError(
        "cpu devices \"numa\": no NUMA node with CPUs is listed under "
        "/sys/devices/system/node");
  }
  if (nodes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu devices \"numa\": none of the ", numa_nodes.size(),
                     " NUMA nodes' CPUs is in this process's affinity mask (",
                     allowed == nullptr ? std::string("all") : absl::StrJoin(*allowed, ","), ")"));
  }
  if (threads <= 0) threads = std::min(allowed_total, HostResourcesOfThisProcess().cpus);
  threads = std::max(threads, 1);
  // With fewer threads than nodes, the largest nodes (the first among equals) take one each.
  if (threads < static_cast<int>(nodes.size())) {
    std::vector<size_t> order(nodes.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return nodes[a].size() > nodes[b].size(); });
    std::vector<bool> kept(nodes.size(), false);
    for (int i = 0; i < threads; ++i) kept[order[i]] = true;
    std::vector<std::vector<int>> largest;
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (kept[i]) largest.push_back(std::move(nodes[i]));
    }
    nodes = std::move(largest);
    allowed_total = 0;
    for (const std::vector<int>& node : nodes) allowed_total += static_cast<int>(node.size());
  }
  // One thread each, the rest in proportion to the nodes' CPUs (largest remainders first).
  const int n = static_cast<int>(nodes.size());
  const int64_t rest = threads - n;
  std::vector<int> share(n, 1);
  std::vector<std::pair<int64_t, int>> remainders;  // (remainder, node), to sort.
  int64_t given = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t weighted = rest * static_cast<int64_t>(nodes[i].size());
    share[i] += static_cast<int>(weighted / allowed_total);
    given += weighted / allowed_total;
    remainders.emplace_back(weighted % allowed_total, i);
  }
  std::stable_sort(remainders.begin(), remainders.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int64_t i = 0; i < rest - given; ++i) ++share[remainders[i].second];
  std::vector<CpuDevicePlan> plans;
  for (int i = 0; i < n; ++i) plans.push_back({cpu, share[i], std::move(nodes[i])});
  return plans;
}

}  // namespace

absl::StatusOr<std::vector<CpuDevicePlan>> PlanCpuDevices(
    int threads, int count, const std::vector<std::vector<int>>* numa_nodes,
    const std::vector<int>* allowed_cpus) {
  DeviceInfo cpu;
  cpu.kind = "cpu";
  cpu.name = CpuModelName();
  cpu.memory_bytes = HostResourcesOfThisProcess().memory_bytes;  // The container's limit.
  cpu.capability = DetectCpuFeatures().ToString();
  std::vector<CpuDevicePlan> plans;
  if (numa_nodes != nullptr) {
    DA_ASSIGN_OR_RETURN(plans, PlanNumaDevices(cpu, threads, *numa_nodes, allowed_cpus));
  } else {
    if (threads <= 0) threads = HostResourcesOfThisProcess().cpus;
    if (count < 1 || count > threads) {
      // Named as da-server's flags, since that is where both numbers come from.
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu devices (--cpu-devices) is ", count, "; must be in [1, ", threads,
          "], the compute threads (--threads, by default the CPUs this process may use)"));
    }
    for (int i = 0; i < count; ++i) {
      plans.push_back({cpu, threads / count + (i < threads % count ? 1 : 0), {}});
    }
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    plans[i].info.id = absl::StrCat("cpu:", i);
    plans[i].info.compute_units = plans[i].threads;
  }
  return plans;
}

std::vector<std::string> BuildFeatures() {
  std::vector<std::string> features = {"cpu"};
#ifdef DA_HAVE_CUDA
  features.push_back("cuda");
#endif
  return features;
}

}  // namespace da::engine
