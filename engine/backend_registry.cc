#include "engine/backend_registry.h"

#include <algorithm>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace da::engine {
namespace {

struct Registry {
  std::mutex mutex;
  std::vector<BackendRegistration> entries;
};

Registry& TheRegistry() {
  static Registry* registry = new Registry();  // Never destroyed: static initializers use it.
  return *registry;
}

}  // namespace

bool RegisterBackend(BackendRegistration registration) {
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.entries.push_back(std::move(registration));
  std::sort(r.entries.begin(), r.entries.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return true;
}

std::vector<BackendRegistration> RegisteredBackends() {
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.entries;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(std::string_view name,
                                                     const DeviceInfo& device,
                                                     const BackendOptions& options) {
  const std::vector<BackendRegistration> entries = RegisteredBackends();
  std::vector<std::string> names;
  for (const BackendRegistration& entry : entries) {
    names.push_back(absl::StrCat(entry.name, " (", entry.device_kind, ")"));
  }
  for (const BackendRegistration& entry : entries) {
    const bool named = name.empty() ? entry.default_for_kind && entry.device_kind == device.kind
                                    : entry.name == name;
    if (!named) continue;
    if (entry.device_kind != device.kind) {
      return absl::InvalidArgumentError(absl::StrCat("backend '", entry.name, "' computes on ",
                                                     entry.device_kind, " devices, not on ",
                                                     device.id));
    }
    return entry.make(device, options);
  }
  return absl::InvalidArgumentError(
      absl::StrCat(name.empty() ? absl::StrCat("no backend computes on ", device.kind, " devices")
                                : absl::StrCat("backend '", std::string(name), "' is unknown"),
                   "; registered: ", names.empty() ? "none" : absl::StrJoin(names, ", ")));
}

}  // namespace da::engine
