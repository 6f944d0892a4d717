// The serving group's pure parts (which device a worker computes on, the options it refuses)
// and what a worker that cannot reach its coordinator reports.
#include "engine/dist/serving_group.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace da::dist {
namespace {

engine::DeviceInfo Device(const std::string& id, const std::string& kind) {
  engine::DeviceInfo device;
  device.id = id;
  device.kind = kind;
  return device;
}

TEST(ServingGroupTest, AWorkerComputesOnItsFirstGpuOrElseItsCpu) {
  ServingGroupOptions options;
  const std::vector<engine::DeviceInfo> cpu_only = {Device("cpu:0", "cpu")};
  EXPECT_EQ(WorkerDevice(cpu_only, options)->id, "cpu:0");
  const std::vector<engine::DeviceInfo> gpus = {Device("cpu:0", "cpu"), Device("cuda:0", "cuda"),
                                                Device("cuda:1", "cuda")};
  EXPECT_EQ(WorkerDevice(gpus, options)->id, "cuda:0");
  // With the nccl data plane: the plane's GPU, and none other.
  options.data_plane = DataPlaneKind::kNccl;
  options.data_plane_device = 1;
  EXPECT_EQ(WorkerDevice(gpus, options)->id, "cuda:1");
  options.data_plane_device = 2;
  absl::StatusOr<engine::DeviceInfo> missing = WorkerDevice(gpus, options);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.status().message().find("cuda:2 is not among this rank's devices"),
            std::string::npos)
      << missing.status();
  EXPECT_FALSE(WorkerDevice({}, ServingGroupOptions{}).ok());
}

TEST(ServingGroupTest, ADataPlaneThisMachineCannotFormIsRefusedSayingWhy) {
  ServingGroupOptions options;
  options.world_size = 2;
  options.coordinator = "127.0.0.1:1";
  EXPECT_TRUE(ValidateServingGroupOptions(options).ok());
  options.data_plane = DataPlaneKind::kGlooStaged;
  EXPECT_TRUE(ValidateServingGroupOptions(options).ok());
  options.data_plane_device = -1;
  EXPECT_NE(
      ValidateServingGroupOptions(options).message().find("data plane device is -1; must be >= 0"),
      std::string::npos);
  // nccl on a device this process cannot see (no machine has 4096 GPUs), or in a build without
  // NCCL.
  options.data_plane = DataPlaneKind::kNccl;
  options.data_plane_device = 4096;
  const absl::Status refused = ValidateServingGroupOptions(options);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("data plane nccl: the nccl data plane needs"), std::string::npos)
      << refused;
  EXPECT_EQ(ParseDataPlane("gloo-staged").value(), DataPlaneKind::kGlooStaged);
  EXPECT_EQ(ParseDataPlane("ib").status().message(),
            "data plane is 'ib'; must be none, nccl or gloo-staged");
}

// Readiness names what keeps a worker waiting, not only that it waits.
TEST(ServingGroupTest, AWorkerThatCannotReachItsCoordinatorSaysWhyInItsState) {
  ServingGroupOptions options;
  options.world_size = 2;
  options.rank = 1;
  options.coordinator = "127.0.0.1:1";  // Nobody listens on port 1.
  options.threads = 1;
  std::mutex mu;
  std::condition_variable changed;
  std::vector<std::string> states;
  options.on_state = [&](const std::string& state) {
    std::lock_guard<std::mutex> lock(mu);
    states.push_back(state);
    changed.notify_all();
  };
  std::atomic<bool> stop{false};
  absl::Status ended;
  std::thread worker([&] { ended = RunWorker(options, stop); });
  const std::string waiting = "waiting for the coordinator at 127.0.0.1:1";
  bool said_why = false;
  {
    std::unique_lock<std::mutex> lock(mu);
    said_why = changed.wait_for(lock, std::chrono::seconds(10), [&] {
      return !states.empty() && states.back().rfind(waiting + ": ", 0) == 0;
    });
  }
  stop = true;
  worker.join();
  EXPECT_TRUE(ended.ok()) << ended;
  ASSERT_TRUE(said_why) << (states.empty() ? "no state" : states.back());
  EXPECT_EQ(states.front(), waiting);
  EXPECT_NE(states.back().find("not reachable within 1000 ms"), std::string::npos) << states.back();
}

}  // namespace
}  // namespace da::dist
