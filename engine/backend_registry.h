// Which backend computes on which device: a registry of backend factories, filled by the
// backends' own libraries (each registers itself from a static initializer; the da_engine target
// links them whole, so no registration is dropped by the linker). The engine core includes no
// backend's header: it asks the registry.
//
//   // engine/cpu/cpu_backend.cc
//   const bool kRegistered = RegisterBackend({.name = "cpu", .device_kind = "cpu",
//                                             .make = [](const DeviceInfo& d, const BackendOptions&
//                                             o)
//                                                 -> absl::StatusOr<std::unique_ptr<Backend>>
//                                                 {...}});
//   // the engine
//   DA_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeBackend("", device, options));
//
// A new backend (the CUDA one, engine/cuda) is one folder, one library linked into da_engine and
// one RegisterBackend call; docs/ARCHITECTURE.md walks through it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/device.h"
#include "engine/precision_policy.h"

namespace da::engine {

struct BackendOptions {
  PrecisionPolicyOptions precision;  // Fallback for unsupported precision wishes, tolerance.
};

struct BackendRegistration {
  std::string name;         // "cpu", "reference", "cuda".
  std::string device_kind;  // The DeviceInfo::kind it computes on.
  // The kind's default backend (MakeBackend with an empty name picks it).
  bool default_for_kind = true;
  std::function<absl::StatusOr<std::unique_ptr<Backend>>(const DeviceInfo&, const BackendOptions&)>
      make;
};

// Adds a backend; returns true (for use in a static initializer). Thread safe.
bool RegisterBackend(BackendRegistration registration);

// A new instance of backend `name` for `device` ("" : the default backend of the device's kind).
// INVALID_ARGUMENT naming the registered backends when there is none, or when the backend does
// not compute on devices of that kind.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(std::string_view name,
                                                     const DeviceInfo& device,
                                                     const BackendOptions& options = {});

// Every registered backend, in name order.
std::vector<BackendRegistration> RegisteredBackends();

}  // namespace da::engine
