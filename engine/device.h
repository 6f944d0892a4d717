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
};

// CPU capability flags from cpuid.
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool f16c = false;
  std::string ToString() const;  // "avx2 fma avx512f ...".
};
CpuFeatures DetectCpuFeatures();

// The CPU (with the given worker thread count) followed by any CUDA devices.
std::vector<DeviceInfo> DiscoverDevices(int cpu_threads);

// Features compiled into this build: "cuda" when the CUDA backend was built, and so on.
std::vector<std::string> BuildFeatures();

}  // namespace da::engine
