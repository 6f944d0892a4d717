#include "engine/testing/staged_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/backend_registry.h"
#include "engine/status_macros.h"

namespace da::engine::testing {
namespace {

std::mutex& CountersMutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}

std::map<int, StagedCounters>& Counters() {
  static auto* counters = new std::map<int, StagedCounters>;
  return *counters;
}

// Live allocations per device index: start address -> bytes (under CountersMutex).
std::map<int, std::map<const uint8_t*, int64_t>>& Allocations() {
  static auto* allocations = new std::map<int, std::map<const uint8_t*, int64_t>>;
  return *allocations;
}

// Whether [p, p + bytes) lies within one live allocation of device `index`.
bool InAllocation(int index, const void* p, int64_t bytes) {
  const auto* at = static_cast<const uint8_t*>(p);
  std::lock_guard<std::mutex> lock(CountersMutex());
  const std::map<const uint8_t*, int64_t>& live = Allocations()[index];
  auto it = live.upper_bound(at);
  if (it == live.begin()) return false;
  --it;
  return at + bytes <= it->first + it->second;
}

std::atomic<bool>& ReportsAmax() {
  static std::atomic<bool> on{false};
  return on;
}

// Bit i of devices: staged:i reports a fallback to `fallback`; any bit set: every staged device
// chooses `chosen` (and computes in fp32 on the host whatever it says).
struct StagedFallbacks {
  unsigned devices = 0;
  Precision chosen = Precision::kBFloat16;
  Precision fallback = Precision::kFloat32;
};
std::mutex& FallbacksMutex() {
  static std::mutex mutex;
  return mutex;
}
StagedFallbacks& Fallbacks() {
  static StagedFallbacks fallbacks;
  return fallbacks;
}
StagedFallbacks CurrentFallbacks() {
  std::lock_guard<std::mutex> lock(FallbacksMutex());
  return Fallbacks();
}

float LargestMagnitude(const TensorView& t) {
  float most = 0.0f;
  for (int64_t i = 0; i < t.shape.elements(); ++i) {
    most = std::max(most, std::fabs(LoadAsFloat(t.dtype, t.data, i)));
  }
  return most;
}

class StagedBackend final : public Backend {
 public:
  StagedBackend(int index, int64_t memory_bytes, std::unique_ptr<Backend> cpu)
      : index_(index), memory_bytes_(memory_bytes), cpu_(std::move(cpu)) {}

  std::string Name() const override { return "staged"; }
  MemorySpace Space() const override { return MemorySpace::Device(index_); }

  absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes) override {
    {
      std::lock_guard<std::mutex> lock(CountersMutex());
      StagedCounters& c = Counters()[index_];
      if (memory_bytes_ > 0 && c.live_bytes + bytes > memory_bytes_) {
        ++c.refused_allocations;
        return absl::ResourceExhaustedError(
            absl::StrCat("staged:", index_, " is out of memory: ", bytes, " bytes asked, ",
                         c.live_bytes, " of ", memory_bytes_, " in use"));
      }
      c.live_bytes += bytes;
      c.peak_bytes = std::max(c.peak_bytes, c.live_bytes);
      ++c.allocations;
    }
    void* data =
        ::operator new (static_cast<size_t>(std::max<int64_t>(bytes, 1)), std::align_val_t{64});
    const int index = index_;
    {
      std::lock_guard<std::mutex> lock(CountersMutex());
      Allocations()[index][static_cast<const uint8_t*>(data)] = bytes;
    }
    return DeviceBuffer(data, bytes, Space(), [index, bytes](void* p) {
      std::lock_guard<std::mutex> lock(CountersMutex());
      Allocations()[index].erase(static_cast<const uint8_t*>(p));
      ::operator delete (p, std::align_val_t{64});
      Counters()[index].live_bytes -= bytes;
    });
  }

  absl::Status CopyToDevice(void* dst, const void* src, int64_t bytes, const RunContext&) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    std::lock_guard<std::mutex> lock(CountersMutex());
    Counters()[index_].bytes_in += bytes;
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, int64_t bytes, const RunContext&) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    std::lock_guard<std::mutex> lock(CountersMutex());
    Counters()[index_].bytes_out += bytes;
    return absl::OkStatus();
  }

  std::vector<Precision> Precisions() const override { return cpu_->Precisions(); }
  absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const override {
    if (const StagedFallbacks f = CurrentFallbacks(); f.devices != 0) {
      return PrecisionChoice{f.chosen, absl::StrCat("staged: ", PrecisionName(f.chosen))};
    }
    return cpu_->ChoosePrecision(spec);
  }
  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override {
    return cpu_->Supports(shape, dtype, spec);
  }
  absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                  const std::atomic<bool>* stop) override {
    if (CurrentFallbacks().devices != 0) {  // Whatever was chosen, computed in fp32 on the host.
      PlanKey fp32 = key;
      fp32.precision = Precision::kFloat32;
      return cpu_->BuildPlan(fp32, stop);
    }
    return cpu_->BuildPlan(key, stop);
  }
  int64_t PlanWorkspaceBytes(const PlanKey& key) const override {
    return cpu_->PlanWorkspaceBytes(key);
  }

  // Views in this device's memory only, as a GPU kernel could read nothing else.
  absl::Status RunShare(Plan& plan, const ShareProblem& problem,
                        const RunContext& context) override {
    DA_RETURN_IF_ERROR(CheckShareSpace(problem, Space()));
    // The gathered rows of spanning segments too (plain pointers, no space of their own): in
    // this device's allocations, as a GPU kernel could read nothing else.
    if (problem.gathered != nullptr) {
      for (size_t i = 0; i < problem.gathered->size(); ++i) {
        const GatheredKeys& rows = (*problem.gathered)[i];
        if (rows.k == nullptr) continue;
        const int64_t bytes =
            GatheredRowsBytes(problem.shape, (*problem.spanning)[i], problem.k.dtype);
        for (const void* p : {rows.k, rows.v}) {
          if (!InAllocation(index_, p, bytes)) {
            return absl::InvalidArgumentError(absl::StrCat(
                "gathered rows of spanning set ", i, " are not in staged:", index_, "'s memory"));
          }
        }
      }
    }
    {
      std::lock_guard<std::mutex> lock(CountersMutex());
      ++Counters()[index_].shares_run;
    }
    ShareProblem host = problem;
    for (MemorySpace* space : {&host.q.space, &host.k.space, &host.v.space, &host.out.space}) {
      *space = MemorySpace::Host();
    }
    if (ReportsAmax().load() && context.report != nullptr) {
      context.report->fp8 = true;
      const TensorView* views[3] = {&host.q, &host.k, &host.v};
      for (int i = 0; i < 3; ++i) {
        context.report->amax[i] = LargestMagnitude(*views[i]);
        context.report->scale[i] = 448.0f / context.report->amax[i];
      }
    }
    if (const StagedFallbacks f = CurrentFallbacks();
        (f.devices >> index_ & 1) != 0 && context.report != nullptr) {
      context.report->fallback = f.fallback;
      context.report->fallback_why = "staged test fallback";
    }
    return cpu_->RunShare(plan, host, context);
  }

 private:
  const int index_;
  const int64_t memory_bytes_;
  const std::unique_ptr<Backend> cpu_;
};

}  // namespace

void SetStagedReportsAmax(bool on) { ReportsAmax() = on; }
void SetStagedFallbacks(unsigned devices, Precision chosen, Precision fallback) {
  std::lock_guard<std::mutex> lock(FallbacksMutex());
  Fallbacks() = {devices, chosen, fallback};
}

void RegisterStagedBackend() {
  static const bool registered = RegisterBackend(
      {.name = "staged",
       .device_kind = kStagedKind,
       .default_for_kind = true,
       .make = [](const DeviceInfo& device,
                  const BackendOptions& options) -> absl::StatusOr<std::unique_ptr<Backend>> {
         DeviceInfo cpu = device;
         cpu.kind = "cpu";
         DA_ASSIGN_OR_RETURN(std::unique_ptr<Backend> inner, MakeBackend("cpu", cpu, options));
         const int index = std::stoi(device.id.substr(device.id.find(':') + 1));
         return std::make_unique<StagedBackend>(index, device.memory_bytes, std::move(inner));
       }});
  (void)registered;
}

DeviceInfo StagedDevice(int index, int64_t memory_bytes) {
  DeviceInfo device;
  device.id = absl::StrCat(kStagedKind, ":", index);
  device.kind = kStagedKind;
  device.name = "staged test device";
  device.memory_bytes = memory_bytes;
  device.compute_units = 1;
  device.capability = "host compute, device-tagged memory";
  return device;
}

StagedCounters StagedCountersOf(int index) {
  std::lock_guard<std::mutex> lock(CountersMutex());
  return Counters()[index];
}

void ResetStagedCounters() {
  std::lock_guard<std::mutex> lock(CountersMutex());
  for (auto& [index, counters] : Counters()) {
    const int64_t live = counters.live_bytes;
    counters = StagedCounters();
    counters.live_bytes = live;
    counters.peak_bytes = live;
  }
}

}  // namespace da::engine::testing
