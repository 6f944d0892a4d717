// A test backend for a device with memory of its own, computed on the host: it lets the CPU
// tests walk every path the engine takes for a GPU (a memory account per device, placement at
// admission, copies in and out through the backend, device buffers, share plans) on a machine
// with no GPU. Its memory is host memory tagged MemorySpace::Device(index), counted, and refused
// past the device's memory_bytes as a GPU's allocator refuses; its compute is the CPU backend's,
// on views it has checked are in its space.
//
//   RegisterStagedBackend();
//   EngineOptions options;
//   options.added_devices = {StagedDevice(0, 64 << 20), StagedDevice(1, 64 << 20)};
//   ... run requests ...
//   EXPECT_LE(StagedCountersOf(0).peak_bytes, budget);
#pragma once

#include <cstdint>

#include "engine/device.h"

namespace da::engine::testing {

inline constexpr char kStagedKind[] = "staged";

// What the staged devices' backends did, per device index, since the process started (or
// ResetStagedCounters).
struct StagedCounters {
  int64_t live_bytes = 0;  // Allocated now.
  int64_t peak_bytes = 0;  // The most allocated at once.
  int64_t allocations = 0;
  int64_t refused_allocations = 0;  // Past the device's memory.
  int64_t bytes_in = 0;             // Copied host to device.
  int64_t bytes_out = 0;            // Copied device to host.
  int64_t shares_run = 0;           // RunShare calls.
};

// Registers backend "staged" for devices of kind kStagedKind (once; later calls do nothing).
void RegisterStagedBackend();

// A staged device: id "staged:<index>", memory_bytes of memory (0: unlimited).
DeviceInfo StagedDevice(int index, int64_t memory_bytes);

StagedCounters StagedCountersOf(int index);
void ResetStagedCounters();

// When on, every staged run reports what an fp8 run would (RunContext::report): fp8, and its
// share's largest magnitude of q, k and v (read on the host) with scale 448 / amax; for the tests
// of how reports reach ExecutionInfo. Off at start.
void SetStagedReportsAmax(bool on);

// Bit i of devices set: staged:i reports that it computed in `fallback` instead of the chosen
// precision (RunReport::fallback, as the CUDA backend where its fused path cannot take a share).
// While any bit is set every staged device chooses `chosen` (and computes in fp32 on the host
// whatever it says). devices 0 (at start): off.
void SetStagedFallbacks(unsigned devices, Precision chosen = Precision::kBFloat16,
                        Precision fallback = Precision::kFloat32);

}  // namespace da::engine::testing
