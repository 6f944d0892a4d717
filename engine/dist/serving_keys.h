// Store keys and small helpers shared by the two sides of multi-process serving
// (serving_group.h describes the protocol). Internal to engine/dist.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/dist/data_plane.h"
#include "engine/dist/serving_group.h"

namespace da::dist::serving {

inline constexpr char kSessionKey[] = "da/session";

// How long one store wait lasts before the waiter looks at its stop flag again.
inline constexpr std::chrono::milliseconds kStoreSlice{250};

inline std::string SessionPrefix(const std::string& session) {
  return absl::StrCat("da/", session, "/");
}
inline std::string GenerationKey(const std::string& session) {
  return SessionPrefix(session) + "generation";
}
// Every key of one generation starts with this ("da/<session>/g12/": the slash keeps g1 apart
// from g12); rank 0 deletes the older generations' keys by it.
inline std::string GenerationPrefix(const std::string& session, int64_t generation) {
  return absl::StrCat(SessionPrefix(session), "g", generation, "/");
}
inline std::string OpenKey(const std::string& session, int64_t generation) {
  return GenerationPrefix(session, generation) + "open";
}
inline std::string JoinedKey(const std::string& session, int64_t generation, int rank) {
  return absl::StrCat(GenerationPrefix(session, generation), "joined/", rank);
}
// The device a worker computes on ("cpu:0", "cuda:0"), set before its joined key.
inline std::string DeviceKey(const std::string& session, int64_t generation, int rank) {
  return absl::StrCat(GenerationPrefix(session, generation), "device/", rank);
}
// The memory budget of a worker's part of a run (ServingGroupOptions::memory_budget_bytes), in
// decimal, set before its joined key; absent or "0": no limit.
inline std::string MemoryBudgetKey(const std::string& session, int64_t generation, int rank) {
  return absl::StrCat(GenerationPrefix(session, generation), "memory_budget/", rank);
}
inline std::string GoKey(const std::string& session, int64_t generation) {
  return GenerationPrefix(session, generation) + "go";
}
inline std::string GlooPrefix(const std::string& session, int64_t generation) {
  return GenerationPrefix(session, generation) + "gloo";
}

// The values of the go key.
inline constexpr char kGoForm[] = "form";

// This rank's data plane of a generation (null for none), formed by every rank right after its
// Gloo group under that group's prefix + "/plane".
inline absl::StatusOr<std::unique_ptr<Communicator>> FormServingDataPlane(
    const ServingGroupOptions& o, KeyValueStore& store, const std::string& gloo_prefix) {
  return FormDataPlane(o.data_plane, store, o.rank, o.world_size, gloo_prefix + "/plane",
                       {.interface_address = o.interface_address,
                        .device = o.data_plane_device,
                        .timeout = o.collective_timeout});
}

// How ExecutionInfo names a rank's device: "rank1:cpu" for a CPU (all its cores), "rank1:cuda:0"
// for a GPU.
inline std::string RankDevice(int rank, const std::string& device) {
  const size_t colon = device.find(':');
  if (device.empty() || device.substr(0, colon) == "cpu") return absl::StrCat("rank", rank, ":cpu");
  return absl::StrCat("rank", rank, ":", device);
}

}  // namespace da::dist::serving
