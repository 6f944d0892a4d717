// The devices this process can compute on, found once at start-up.
//
//   for (const DeviceInfo& d : DiscoverDevices(threads)) std::cout << d.id << " " << d.name;
//
// CUDA devices appear only in a build with CUDA and only where a driver and a GPU are present;
// their absence is not an error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/attention_spec.h"

namespace da::engine {

struct DeviceInfo {
  std::string id;    // "cpu:0", "cuda:0", ...
  std::string kind;  // "cpu" or "cuda".
  std::string name;  // CPU model name or GPU product name.
  // What the device computes in today: filled by the engine from the device's backend
  // (Backend::Precisions); empty in DiscoverDevices' answer.
  std::vector<Precision> precisions;
  int64_t memory_bytes = 0;  // Physical memory (host RAM or GPU global memory).
  int compute_units = 0;     // Worker threads for a CPU, multiprocessors for a GPU.
  std::string capability;    // CPU feature list or "sm_90".
  // A GPU's CUDA ordinal, when it is not the id's number: tests map two logical devices
  // ("cuda:0", "cuda:1", each with its own stream) to one GPU to run the multi-GPU paths on a
  // one-GPU machine (issue #16). -1: the id's number.
  int ordinal = -1;
};

// CPU capability flags from cpuid.
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool f16c = false;
  // AMX-TILE and AMX-BF16, with the tile state enabled in XCR0 by the OS.
  bool amx_bf16 = false;
  bool amd = false;  // The vendor is "AuthenticAMD" (not a feature: ToString leaves it out).
  std::string ToString() const;  // "avx2 fma avx512f ...".
};
CpuFeatures DetectCpuFeatures();

// The CPU (with the given worker thread count) followed by any CUDA devices.
std::vector<DeviceInfo> DiscoverDevices(int cpu_threads);

// "0-3,8,10-11" (a Linux cpulist) as {0, 1, 2, 3, 8, 10, 11}; INVALID_ARGUMENT on anything else.
absl::StatusOr<std::vector<int>> ParseCpuList(absl::string_view list);

// The CPUs of each NUMA node with CPUs, in node order, read from `root`/node<N>/cpulist (Linux
// sysfs); empty when the directory is missing or lists no node.
std::vector<std::vector<int>> NumaNodeCpus(const std::string& root = "/sys/devices/system/node");

// How the CPU is cut into compute devices (EngineOptions::cpu_devices).
struct CpuDevicePlan {
  DeviceInfo info;        // id "cpu:<i>", compute_units its threads.
  int threads = 1;        // Its pool's threads.
  std::vector<int> cpus;  // The CPUs its threads are pinned to (NUMA); empty: not pinned.
};

// The CPUs this process may run on (its affinity mask: taskset, a container's cpuset), in order.
std::vector<int> AffinityCpus();

// `count` devices that split `threads` threads (0: HostResources' CPUs, the affinity mask and any
// CPU quota) as evenly as possible (the first threads % count one more), or with numa_nodes (from
// NumaNodeCpus) one device per node, pinned to that node's CPUs among `allowed_cpus` (null: all;
// nodes with none are left out). With numa_nodes, `threads` (0: the nodes' allowed CPUs, at most
// HostResources' CPUs, so a CPU quota holds) is split over the nodes in proportion to their
// allowed CPUs, one at least each; with fewer threads than nodes, the largest nodes take one
// each and the rest are left out. INVALID_ARGUMENT naming the numbers when there are fewer
// threads than devices, or numa is asked for and no node has an allowed CPU.
absl::StatusOr<std::vector<CpuDevicePlan>> PlanCpuDevices(
    int threads, int count, const std::vector<std::vector<int>>* numa_nodes,
    const std::vector<int>* allowed_cpus = nullptr);

// Features compiled into this build: "cuda" when the CUDA backend was built, and so on.
std::vector<std::string> BuildFeatures();

}  // namespace da::engine
