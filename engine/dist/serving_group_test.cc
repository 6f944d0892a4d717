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

#include "absl/strings/str_cat.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/serving_keys.h"
#include "engine/dist/stop_watch.h"
#include "engine/dist/store.h"

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

TEST(ServingGroupTest, ANegativeMemoryBudgetIsRefusedNamingIt) {
  ServingGroupOptions options;
  options.world_size = 2;
  options.rank = 1;
  options.coordinator = "127.0.0.1:1";
  options.memory_budget_bytes = 1;
  EXPECT_TRUE(ValidateServingGroupOptions(options).ok());
  options.memory_budget_bytes = -1;
  EXPECT_EQ(ValidateServingGroupOptions(options).message(),
            "memory_budget_bytes is -1; must be >= 0 (0 = no limit)");
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

// Rank 0 told to stop while a generation forms, with a rank that joined, connected and then
// stalled (a frozen node): its barrier waits on that rank for the collective timeout unless the
// stop aborts it.
TEST(ServingGroupTest, StoppingRankZeroEndsAFormationHeldByAStalledRankAtOnce) {
  using std::chrono::milliseconds;
  constexpr milliseconds kTimeout{20000};
  ServingGroupOptions options;
  options.world_size = 2;
  options.coordinator = "127.0.0.1:0";
  options.collective_timeout = kTimeout;
  auto group = CoordinatorGroup::Start(options);
  ASSERT_TRUE(group.ok()) << group.status();
  // Rank 1 by hand, through the serving protocol's keys (serving_group.h).
  auto store = ConnectCoordinatorStore(absl::StrCat("127.0.0.1:", (*group)->coordinator_port()),
                                       milliseconds(2000));
  ASSERT_TRUE(store.ok()) << store.status();
  auto session = (*store)->Get(serving::kSessionKey, milliseconds(5000));
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*store)->Get(serving::OpenKey(*session, 1), milliseconds(5000)).ok());
  ASSERT_TRUE((*store)->Set(serving::DeviceKey(*session, 1, 1), "cpu:0").ok());
  ASSERT_TRUE((*store)->Set(serving::JoinedKey(*session, 1, 1), "1").ok());
  ASSERT_TRUE((*store)->Get(serving::GoKey(*session, 1), milliseconds(5000)).ok());
  auto stalled = MakeGlooCommunicator(**store, {.rank = 1,
                                                .size = 2,
                                                .interface_address = "127.0.0.1",
                                                .prefix = serving::GlooPrefix(*session, 1),
                                                .timeout = kTimeout});
  ASSERT_TRUE(stalled.ok()) << stalled.status();
  // Rank 1 never enters the barrier. Rank 0 has connected too (the mesh is formed on both
  // sides), so it is in its barrier or about to be, which nothing outside shows. The pause makes
  // the barrier the likely place the stop finds it (a stop that comes first is aborted at
  // Forming::Add, and passes too); without the abort this test took 19.8 s.
  std::this_thread::sleep_for(milliseconds(200));
  EXPECT_FALSE((*group)->status().whole);
  const auto start = std::chrono::steady_clock::now();
  group->reset();
  const auto stopped_ms =
      std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(stopped_ms, 3000) << "a stopping rank 0 waited out its formation barrier";
}

// Runs refused before their first frame move nothing and are not activity. Before, each put the
// next heartbeat off by a period: refusals more often than the heartbeat kept the worker from
// hearing rank 0 for its 5 periods, it left, and the group re-formed.
TEST(ServingGroupTest, RunsRefusedBeforeTheirFrameDoNotHoldTheHeartbeatsBack) {
  using std::chrono::milliseconds;
  ServingGroupOptions options;
  options.world_size = 2;
  options.coordinator = "127.0.0.1:0";
  options.heartbeat = milliseconds(100);
  options.collective_timeout = milliseconds(5000);
  options.threads = 1;
  auto group = CoordinatorGroup::Start(options);
  ASSERT_TRUE(group.ok()) << group.status();
  ServingGroupOptions worker_options = options;
  worker_options.rank = 1;
  worker_options.coordinator = absl::StrCat("127.0.0.1:", (*group)->coordinator_port());
  std::mutex states_mu;
  std::vector<std::string> states;
  worker_options.on_state = [&](const std::string& state) {
    std::lock_guard<std::mutex> lock(states_mu);
    states.push_back(state);
  };
  std::atomic<bool> stop{false};
  absl::Status ended;
  std::thread worker([&] { ended = RunWorker(worker_options, stop); });
  const auto formed_by = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!(*group)->status().whole && std::chrono::steady_clock::now() < formed_by) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  const engine::ShardGroupStatus formed = (*group)->status();
  ASSERT_TRUE(formed.whole) << formed.reason;

  // 300 patterns do not fit a control frame: refused before anything is sent.
  engine::ShardedProblem refused;
  const engine::ProblemShape shape{1, 64, 2, 2, 8};
  refused.q = {engine::DType::kFloat32, shape.QueryShape(), nullptr, 0};
  refused.k = refused.v = {engine::DType::kFloat32, shape.KeyShape(), nullptr, 0};
  refused.out = {engine::DType::kFloat32, shape.QueryShape(), nullptr, 0};
  refused.spec.patterns.assign(300, {16, 1});
  // For 1.5 s (15 heartbeats, 3 of the worker's waits), a refusal every 20 ms.
  const auto until = std::chrono::steady_clock::now() + milliseconds(1500);
  int refusals = 0;
  while (std::chrono::steady_clock::now() < until) {
    const absl::StatusOr<engine::ShardGroupRunInfo> run = (*group)->Run(refused);
    ASSERT_EQ(run.status().code(), absl::StatusCode::kInvalidArgument) << run.status();
    ++refusals;
    std::this_thread::sleep_for(milliseconds(20));
  }
  // A worker that had left would fail the next heartbeat, and the group would re-form.
  std::this_thread::sleep_for(milliseconds(500));
  const engine::ShardGroupStatus after = (*group)->status();
  EXPECT_TRUE(after.whole) << after.reason;
  EXPECT_EQ(after.generation, formed.generation) << after.reason;
  EXPECT_GT((*group)->stats().heartbeats_sent, 5) << refusals << " refusals";
  {
    std::lock_guard<std::mutex> lock(states_mu);
    for (const std::string& state : states) {
      EXPECT_EQ(state.find("left generation"), std::string::npos) << state;
    }
  }
  stop = true;
  group->reset();
  worker.join();
  EXPECT_TRUE(ended.ok()) << ended;
}

// A communicator whose completed operations the test moves by hand; Abort is recorded.
class CountedCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string backend() const override { return "counted"; }
  Capabilities capabilities() const override { return {}; }
  absl::Status AllGather(const void*, void*, int64_t, std::chrono::milliseconds) override {
    return absl::UnimplementedError("counted");
  }
  absl::Status Broadcast(void*, int64_t, int, std::chrono::milliseconds) override {
    return absl::UnimplementedError("counted");
  }
  absl::Status Send(const void*, int64_t, int, int, std::chrono::milliseconds) override {
    return absl::UnimplementedError("counted");
  }
  absl::Status Recv(void*, int64_t, int, int, std::chrono::milliseconds) override {
    return absl::UnimplementedError("counted");
  }
  absl::Status Barrier(std::chrono::milliseconds) override {
    return absl::UnimplementedError("counted");
  }
  Counters counters() const override {
    Counters counters;
    counters.operations = operations_.load();
    counters.bytes_received = 32 * counters.operations;
    return counters;
  }
  void Abort(const std::string& why) override {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = why;
  }
  void CompletePiece() { ++operations_; }
  std::string aborted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return aborted_;
  }

 private:
  std::atomic<int64_t> operations_{0};
  mutable std::mutex mu_;
  std::string aborted_;
};

// A stopped run that still moves bytes (outputs arriving piece by piece) is left to end; one that
// moves nothing for the grace is aborted.
TEST(StopWatchTest, AbortsAStoppedRunOnlyOnceItHasMovedNothingForTheGrace) {
  using std::chrono::milliseconds;
  using Clock = std::chrono::steady_clock;
  CountedCommunicator comm;
  std::atomic<bool> stop{false};
  internal::StopWatch watch(&stop, milliseconds(300), {&comm, nullptr});
  std::this_thread::sleep_for(milliseconds(400));  // Not stopped: nothing happens.
  EXPECT_EQ(comm.aborted(), "");
  stop = true;
  // A piece every 50 ms for 1.5 s: five times the grace in all, a sixth of it between pieces.
  for (int piece = 0; piece < 30; ++piece) {
    comm.CompletePiece();
    std::this_thread::sleep_for(milliseconds(50));
  }
  EXPECT_EQ(comm.aborted(), "") << "aborted while bytes were still moving";
  EXPECT_FALSE(watch.fired());
  const auto quiet = Clock::now();
  while (comm.aborted().empty() && Clock::now() - quiet < milliseconds(5000)) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  const auto after_ms = std::chrono::duration_cast<milliseconds>(Clock::now() - quiet).count();
  EXPECT_TRUE(watch.fired());
  EXPECT_NE(comm.aborted().find("moved no bytes for 300 ms"), std::string::npos) << comm.aborted();
  EXPECT_GE(after_ms, 250);
  EXPECT_LT(after_ms, 1500);
}

// A run that ends just inside its grace: the group reads fired() once the run has returned and
// the watch has stopped, and carries on with its communicators when it says false. A watch that
// went on until its destructor could abort them after that answer (CoordinatorGroup::Run then
// kept a group whose every later call fails); a stopped one has decided for good.
TEST(StopWatchTest, AStoppedWatchHasDecidedForGoodAndAbortsNothingAfterwards) {
  using std::chrono::milliseconds;
  CountedCommunicator comm;
  std::atomic<bool> stop{true};  // The request was stopped and its run moves nothing.
  internal::StopWatch watch(&stop, milliseconds(100), {&comm});
  watch.Stop();  // The run returned within its grace.
  const bool fired = watch.fired();
  std::this_thread::sleep_for(milliseconds(500));  // Five graces: a running watch fires by then.
  EXPECT_EQ(watch.fired(), fired);
  // Fired only if the machine was so slow that the grace passed before Stop(); then the group
  // knows it, and re-forms.
  EXPECT_EQ(comm.aborted().empty(), !fired) << comm.aborted();
}

}  // namespace
}  // namespace da::dist
