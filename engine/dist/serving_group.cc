#include "engine/dist/serving_group.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/admission.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/serving_keys.h"
#include "engine/dist/sharded_run.h"
#include "engine/dist/stop_watch.h"
#include "engine/dist/store.h"
#include "engine/dist/store_auth.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

using Clock = std::chrono::steady_clock;
using engine::ShardGroupStatus;

// How often a run waiting for the group looks at its stop flag.
constexpr std::chrono::milliseconds kRunWaitSlice{5};
// The least time between two attempts to form the group.
constexpr std::chrono::milliseconds kReformPause{200};

// The least time a stopped run may take to end before the group is failed under it (StopWatch;
// kIdleHeartbeats heartbeat periods when longer). Every rank hears a stop within milliseconds (its
// stop word, or its compute's stop flag), but a run also finishes what no stop interrupts (an
// output already on its way, a scatter piece); one that has not ended by then waits on a rank
// that does not answer (stalled: SIGSTOP, a frozen node), which would otherwise hold the request
// until the collective timeout. The grace counts from the last byte the run moved
// (internal::StopWatch).
constexpr std::chrono::milliseconds kMinStopGrace{1000};

// Errors of CoordinateShardedRun after which the ranks may be out of step: the communicator
// failed (lost or stalled peer) or something unexpected happened. A run every rank answered (a
// rank's compute failed, with whatever code: AnsweredInStep), a cancelled run, or one refused
// before any message (bad geometry) leaves the group usable. A run given up out of step has
// aborted the communicators and never returns those codes (sharded_run.h).
bool BreaksGroup(const absl::Status& status) {
  if (AnsweredInStep(status)) return false;
  switch (status.code()) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kResourceExhausted:
      return false;
    default:
      return true;
  }
}

// "with peer 2" in a communicator message (gloo_communicator.cc) names the rank a Send or Recv
// failed with; -1 when the message names none.
int PeerNamedIn(absl::string_view message) {
  const size_t at = message.find("with peer ");
  if (at == absl::string_view::npos) return -1;
  int peer = -1;
  for (size_t i = at + 10; i < message.size() && message[i] >= '0' && message[i] <= '9'; ++i) {
    peer = (peer < 0 ? 0 : peer * 10) + (message[i] - '0');
  }
  return peer;
}

std::string RandomSession() {
  std::random_device device;
  return absl::StrCat(getpid(), "-", device(), device());
}

}  // namespace

absl::Status ValidateServingGroupOptions(const ServingGroupOptions& o) {
  if (o.world_size < 1 || o.world_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("world size is ", o.world_size, "; must be in [1, 1024]"));
  }
  if (o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank is ", o.rank, "; must be in [0, ", o.world_size, ") for world size ", o.world_size));
  }
  if (o.world_size > 1 && o.coordinator.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a group of ", o.world_size, " ranks needs the coordinator's HOST:PORT"));
  }
  DA_RETURN_IF_ERROR(internal::CheckStoreSecret(o.coordinator_secret, "the coordinator secret"));
  if (o.collective_timeout.count() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "collective timeout is ", o.collective_timeout.count(), " ms; must be >= 1 ms"));
  }
  if (o.heartbeat.count() < 1 || o.heartbeat >= o.collective_timeout) {
    return absl::InvalidArgumentError(absl::StrCat("heartbeat is ", o.heartbeat.count(),
                                                   " ms; must be >= 1 ms and below the collective "
                                                   "timeout (",
                                                   o.collective_timeout.count(), " ms)"));
  }
  if (o.data_plane_device < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("data plane device is ", o.data_plane_device, "; must be >= 0"));
  }
  if (absl::Status plane = CheckDataPlane(o.data_plane, o.data_plane_device); !plane.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("data plane ", DataPlaneName(o.data_plane), ": ", plane.message()));
  }
  if (o.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads is ", o.threads, "; must be >= 0 (0 = every core)"));
  }
  if (o.plan_cache_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("plan_cache_bytes is ", o.plan_cache_bytes,
                                                   "; must be >= 0 (0 caches nothing)"));
  }
  if (o.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("memory_budget_bytes is ", o.memory_budget_bytes,
                                                   "; must be >= 0 (0 = no limit)"));
  }
  return absl::OkStatus();
}

class CoordinatorGroup::Impl {
 public:
  ServingGroupOptions options;
  std::string session = RandomSession();
  std::unique_ptr<CoordinatorStoreServer> store_server;
  std::unique_ptr<KeyValueStore> store;
  int port = 0;

  ~Impl() { Stop(); }

  void StartLoop() {
    stats_.status = {options.world_size, false, 0, "forming generation 1"};
    stats_.ranks.resize(options.world_size);
    loop_ = std::thread([this] { Loop(); });
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      // A generation forming now would wait out its barriers' timeouts on a stalled rank.
      for (Communicator* comm : forming_) comm->Abort(kStoppingDuringFormation);
    }
    cv_.notify_all();
    // Waits in the store (joins, Gloo's rendezvous) end at once when the store stops serving.
    store_server.reset();
    if (loop_.joinable()) loop_.join();
    std::lock_guard<std::timed_mutex> run_lock(run_mu_);
    plane_.reset();
    comm_.reset();  // The workers see their connections close.
  }

  ShardGroupStatus status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_.status;
  }

  engine::ShardGroupStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void SetListener(std::function<void(const ShardGroupStatus&)> listener) {
    std::lock_guard<std::mutex> lock(listener_mu_);
    listener_ = std::move(listener);
  }

  absl::StatusOr<engine::ShardGroupRunInfo> Run(const engine::ShardedProblem& problem) {
    // The group is taken in turns (a heartbeat to a stalled worker may hold it for its whole
    // timeout): a request cancelled or past its deadline while it waits is answered at once.
    std::unique_lock<std::timed_mutex> run_lock(run_mu_, std::defer_lock);
    while (!run_lock.try_lock_for(kRunWaitSlice)) {
      if (problem.stop != nullptr && problem.stop->load()) {
        return absl::CancelledError("cancelled while waiting for the group (a run or a heartbeat)");
      }
    }
    const ShardGroupStatus now = status();
    if (comm_ == nullptr || !now.whole) {
      return absl::UnavailableError(
          absl::StrCat("the group of ", options.world_size, " ranks is not whole: ", now.reason));
    }
    ShardRunOptions run_options;
    run_options.timeout = options.collective_timeout;
    run_options.buffers = &buffers_;
    run_options.data_plane = plane_.get();
    run_options.keepalive = options.heartbeat;  // Workers that left a cancelled run wait on.
    run_options.rank_memory_budgets = rank_budgets_;
    absl::StatusOr<ShardRunStats> result;
    std::optional<std::string> aborted;  // Why, when the stop watch aborted the run.
    const int64_t sent_before = comm_->counters().bytes_sent;
    {
      internal::StopWatch watch(
          problem.stop,
          std::max<std::chrono::milliseconds>(kMinStopGrace, options.heartbeat * kIdleHeartbeats),
          {comm_.get(), plane_.get()});
      result = CoordinateShardedRun(*comm_, problem, run_options);
      // Stopped before it is asked: a grace that ran out between the question and the watch's
      // end would abort the communicators of a group this run then reports as fine.
      watch.Stop();
      if (watch.fired()) aborted = watch.why();
    }
    // Aborted just as the run ended (OK, or in step): the communicators are unusable all the same.
    if (aborted && !BreaksGroup(result.status())) result = absl::UnavailableError(*aborted);
    // Only a run that sent its frame is activity the workers heard: one refused before it (a
    // problem that cannot be sent) put the next heartbeat off all the same, so that refusals
    // more often than the heartbeat kept every worker from hearing rank 0 until it took rank 0
    // for lost and the group re-formed.
    if (comm_->counters().bytes_sent != sent_before) last_activity_ = Clock::now();
    if (result.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.runs_completed;
      for (size_t r = 0; r < result->ranks.size() && r < stats_.ranks.size(); ++r) {
        const ShardRunStats::Rank& from = result->ranks[r];
        engine::ShardGroupStats::Rank& to = stats_.ranks[r];
        to.bytes_sent += from.bytes_sent;
        to.bytes_received += from.bytes_received;
        to.exchange_bytes += from.exchange_bytes;
        to.compute_seconds += from.compute_seconds;
        to.collective_seconds += from.collective_seconds;
      }
      engine::ShardGroupRunInfo info;
      info.strategy = result->strategy;
      info.generation = now.generation;
      for (int r = 0; r < options.world_size; ++r) {
        info.devices.push_back(
            serving::RankDevice(r, r == 0 ? problem.compute.device : rank_devices_[r]));
      }
      return info;
    }
    if (!BreaksGroup(result.status())) return result.status();
    const int peer = PeerNamedIn(result.status().message());
    const std::string lost = peer > 0 ? absl::StrCat("rank ", peer, " lost or unreachable")
                                      : std::string("a rank lost or stalled");
    const std::string cause = absl::StrCat(lost, " during a sharded run of generation ",
                                           now.generation, ": ", result.status().message());
    Break(cause);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.runs_failed;
    }
    return engine::FailedWhileRunning(
        absl::UnavailableError(absl::StrCat(cause, "; the group is re-forming")));
  }

 private:
  // Under run_mu_: drops the communicator (the workers' connections close, so they re-join at
  // once) and has the loop form the next generation.
  void Break(const std::string& cause) {
    plane_.reset();
    comm_.reset();
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = true;
    }
    SetStatus(false, absl::StrCat(cause, "; re-forming"));
    cv_.notify_all();
  }

  void SetStatus(bool whole, std::string reason, int64_t generation = -1) {
    // Held across the change and its report, so that two threads' reports reach the listener in
    // the order of their changes (a run's Break and the loop's formation race).
    std::lock_guard<std::mutex> report_lock(listener_mu_);
    ShardGroupStatus copy;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ShardGroupStatus& s = stats_.status;
      if (generation >= 0) s.generation = generation;
      if (s.whole == whole && s.reason == reason) return;
      s.whole = whole;
      s.reason = std::move(reason);
      copy = s;
    }
    if (listener_) listener_(copy);
  }

  bool stopping() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }

  void Loop() {
    if (absl::Status set = store->Set(serving::kSessionKey, session); !set.ok()) {
      SetStatus(false, absl::StrCat("cannot publish the session: ", set.message()));
      return;
    }
    int64_t generation = 0;
    while (!stopping()) {
      ++generation;
      // Keys of generations before the last one are no one's any more (a worker that tried the
      // last one waits for this one's open key): deleted before this one opens, those of failed
      // attempts too, so that a run of failures cannot fill the store.
      DeleteGenerationsBefore(generation - 1);
      absl::Status formed = Form(generation);
      if (stopping()) break;
      if (!formed.ok()) {
        SetStatus(false, absl::StrCat("generation ", generation,
                                      " failed to form: ", formed.message(), "; re-forming"));
        // A failure that came at once (the store refused a key) is not retried in a tight loop.
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, kReformPause, [&] { return stopping_; });
        continue;
      }
      SetStatus(true, "", generation);
      DeleteGenerationsBefore(generation);
      Heartbeats();
    }
  }

  // Opens `generation`, waits for every worker to join, then forms the Gloo group.
  absl::Status Form(int64_t generation) {
    const int world = options.world_size;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.status.generation = generation;
      broken_ = false;
    }
    DA_RETURN_IF_ERROR(store->Set(serving::GenerationKey(session), absl::StrCat(generation)));
    DA_RETURN_IF_ERROR(store->Set(serving::OpenKey(session, generation), "1"));
    std::vector<int> missing;
    for (int r = 1; r < world; ++r) missing.push_back(r);
    // Every missing rank is looked at, then the first one still missing waited for one slice:
    // readiness names exactly the ranks that have not joined.
    std::vector<int> reported;
    for (bool first_pass = true; !missing.empty(); first_pass = false) {
      if (stopping()) return absl::CancelledError("stopping");
      std::vector<int> still;
      for (const int rank : missing) {
        const auto wait =
            first_pass || !still.empty() ? std::chrono::milliseconds(0) : serving::kStoreSlice;
        absl::StatusOr<std::string> joined =
            store->Get(serving::JoinedKey(session, generation, rank), wait);
        if (joined.ok()) continue;
        if (!absl::IsDeadlineExceeded(joined.status())) return joined.status();
        still.push_back(rank);
      }
      if (!still.empty() && still != reported) {
        reported = still;
        SetStatus(false,
                  absl::StrCat(still.size() == 1 ? "rank " : "ranks ", absl::StrJoin(still, ", "),
                               " missing; waiting for ", still.size() == 1 ? "it" : "them",
                               " to join generation ", generation));
      }
      missing = std::move(still);
    }
    // The device each worker computes on (set before its joined key), for ExecutionInfo, and
    // the memory budget of its part of a run (0: none, or a worker that publishes none).
    std::vector<std::string> devices(world);
    std::vector<int64_t> budgets(world, 0);
    for (int r = 1; r < world; ++r) {
      absl::StatusOr<std::string> device =
          store->Get(serving::DeviceKey(session, generation, r), std::chrono::milliseconds(0));
      if (device.ok()) devices[r] = *device;
      absl::StatusOr<std::string> budget = store->Get(
          serving::MemoryBudgetKey(session, generation, r), std::chrono::milliseconds(0));
      if (budget.ok() && !absl::SimpleAtoi(*budget, &budgets[r])) budgets[r] = 0;
    }
    SetStatus(false, absl::StrCat("every rank joined generation ", generation, "; connecting"));
    DA_RETURN_IF_ERROR(store->Set(serving::GoKey(session, generation), serving::kGoForm));
    GlooOptions gloo{.rank = 0,
                     .size = world,
                     .interface_address = options.interface_address,
                     .prefix = serving::GlooPrefix(session, generation),
                     .timeout = options.collective_timeout};
    DA_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm, MakeGlooCommunicator(*store, gloo));
    std::unique_ptr<Communicator> plane;
    const Forming forming(this);  // After the communicators: gone before they are.
    forming.Add(comm.get());
    DA_RETURN_IF_ERROR(comm->Barrier(options.collective_timeout));
    DA_ASSIGN_OR_RETURN(plane, serving::FormServingDataPlane(options, *store, gloo.prefix));
    if (plane != nullptr) {
      forming.Add(plane.get());
      DA_RETURN_IF_ERROR(comm->Barrier(options.collective_timeout));
    }
    std::lock_guard<std::timed_mutex> run_lock(run_mu_);
    plane_ = std::move(plane);
    comm_ = std::move(comm);
    rank_devices_ = std::move(devices);
    rank_budgets_ = std::move(budgets);
    last_activity_ = Clock::now();
    return absl::OkStatus();
  }

  // The communicators of the generation being formed, for Stop to abort: registered while Form
  // holds them (Add aborts at once when Stop came first), unregistered when Form returns.
  class Forming {
   public:
    explicit Forming(Impl* impl) : impl_(impl) {}
    ~Forming() {
      std::lock_guard<std::mutex> lock(impl_->mu_);
      impl_->forming_.clear();
    }
    void Add(Communicator* comm) const {
      std::lock_guard<std::mutex> lock(impl_->mu_);
      if (impl_->stopping_) comm->Abort(kStoppingDuringFormation);
      impl_->forming_.push_back(comm);
    }

   private:
    Impl* const impl_;
  };
  static constexpr char kStoppingDuringFormation[] = "rank 0 is stopping";

  // Once `generation` has formed, no rank needs the keys of an older one: every worker joined
  // `generation` and entered its barriers, so it is done with their rendezvous keys, and a worker
  // looks only for generations newer than the last it joined (a new worker process reads the
  // "generation" key first). Without this a worker that keeps failing would grow the store by a
  // generation's Gloo addresses (about 136 * world_size^2 bytes) every time. A failed delete is
  // retried after the next formation.
  void DeleteGenerationsBefore(int64_t generation) {
    for (; oldest_kept_ < generation; ++oldest_kept_) {
      const std::string prefix = serving::GenerationPrefix(session, oldest_kept_);
      if (!store->DeletePrefix(prefix).ok()) return;
    }
  }

  // While the group is formed: a heartbeat to every worker whenever the group has been idle for
  // a heartbeat period. Returns when the group breaks (here or in a run) or on Stop.
  void Heartbeats() {
    const std::string frame = EncodeControlFrame({ControlKind::kHeartbeat, ""});
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, options.heartbeat, [&] { return stopping_ || broken_; });
        if (stopping_ || broken_) return;
      }
      std::lock_guard<std::timed_mutex> run_lock(run_mu_);
      if (comm_ == nullptr) return;
      if (Clock::now() - last_activity_ < options.heartbeat) continue;
      for (int r = 1; r < options.world_size; ++r) {
        absl::Status sent =
            comm_->Send(frame.data(), kControlFrameBytes, r, kControlTag, HeartbeatTimeout());
        if (!sent.ok()) {
          Break(absl::StrCat("rank ", r, " lost (heartbeat): ", sent.message()));
          return;
        }
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.heartbeats_sent;
      }
      last_activity_ = Clock::now();
    }
  }

  // A worker that has not taken a heartbeat within the time it would itself wait for one
  // (kIdleHeartbeats periods) is stalled: the group breaks then, not after collective_timeout,
  // with the group held meanwhile.
  std::chrono::milliseconds HeartbeatTimeout() const {
    return std::min(options.collective_timeout, options.heartbeat * kIdleHeartbeats);
  }

  mutable std::mutex mu_;  // stats_, stopping_, broken_, forming_.
  std::condition_variable cv_;
  engine::ShardGroupStats stats_;
  bool stopping_ = false;
  bool broken_ = false;
  int64_t oldest_kept_ = 1;  // The loop's: generations before it are deleted from the store.
  std::vector<Communicator*> forming_;  // Form's communicators while it forms (Forming).

  // Runs and heartbeats take turns on comm_; guards comm_ and buffers_. Timed: a waiting run
  // looks at its stop flag every kRunWaitSlice.
  std::timed_mutex run_mu_;
  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<Communicator> plane_;    // The data plane; null: comm_ carries everything.
  std::vector<std::string> rank_devices_;  // What each worker computes on ("cpu:0", "cuda:0").
  std::vector<int64_t> rank_budgets_;      // Each worker's memory_budget_bytes (0: none).
  RankBuffers buffers_;                    // Rank 0's share when not contiguous, kept between runs.
  Clock::time_point last_activity_;

  std::mutex listener_mu_;
  std::function<void(const ShardGroupStatus&)> listener_;
  std::thread loop_;
};

absl::StatusOr<std::shared_ptr<CoordinatorGroup>> CoordinatorGroup::Start(
    const ServingGroupOptions& options) {
  DA_RETURN_IF_ERROR(ValidateServingGroupOptions(options));
  if (options.rank != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CoordinatorGroup runs on rank 0; rank is ", options.rank));
  }
  const size_t colon = options.coordinator.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("coordinator '", options.coordinator, "' is not HOST:PORT"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  const std::string listen = absl::StrCat("0.0.0.0", options.coordinator.substr(colon));
  // Every rank keeps one connection (rank 0's own client too), and a rank that restarts opens a
  // new one before the kernel has noticed its old one gone: room for twice the group.
  CoordinatorStoreOptions store_options;
  store_options.max_connections =
      std::max(store_options.max_connections, 2 * options.world_size + 16);
  store_options.secret = options.coordinator_secret;
  DA_ASSIGN_OR_RETURN(impl->store_server, CoordinatorStoreServer::Start(listen, store_options));
  impl->port = impl->store_server->port();
  DA_ASSIGN_OR_RETURN(
      impl->store, ConnectCoordinatorStore(absl::StrCat("127.0.0.1:", impl->store_server->port()),
                                           options.collective_timeout, options.coordinator_secret));
  impl->StartLoop();
  return std::shared_ptr<CoordinatorGroup>(new CoordinatorGroup(std::move(impl)));
}

CoordinatorGroup::CoordinatorGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CoordinatorGroup::~CoordinatorGroup() = default;

int CoordinatorGroup::coordinator_port() const { return impl_->port; }
int CoordinatorGroup::world_size() const { return impl_->options.world_size; }
engine::ShardGroupStatus CoordinatorGroup::status() const { return impl_->status(); }
absl::StatusOr<engine::ShardGroupRunInfo> CoordinatorGroup::Run(
    const engine::ShardedProblem& problem) {
  return impl_->Run(problem);
}
engine::ShardGroupStats CoordinatorGroup::stats() const { return impl_->stats(); }
void CoordinatorGroup::SetStatusListener(
    std::function<void(const engine::ShardGroupStatus&)> listener) {
  impl_->SetListener(std::move(listener));
}

}  // namespace da::dist
