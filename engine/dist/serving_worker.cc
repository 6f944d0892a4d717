// RunWorker (serving_group.h): a worker rank's loop of join, serve, re-join.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/backend_registry.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/serving_group.h"
#include "engine/dist/serving_keys.h"
#include "engine/dist/sharded_run.h"
#include "engine/dist/store.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::dist {
namespace {

// The worker logs to stderr itself: engine/ has no logging library (DESIGN §3).
void Log(const std::string& line) { std::fprintf(stderr, "[worker] %s\n", line.c_str()); }

// How often the same store error is logged again while the worker keeps waiting.
constexpr std::chrono::seconds kRepeatedErrorLogPeriod{30};

}  // namespace

absl::StatusOr<engine::DeviceInfo> WorkerDevice(const std::vector<engine::DeviceInfo>& devices,
                                                const ServingGroupOptions& options) {
  if (options.data_plane == DataPlaneKind::kNccl) {
    const std::string wanted = absl::StrCat("cuda:", options.data_plane_device);
    for (const engine::DeviceInfo& device : devices) {
      if (device.id == wanted) return device;
    }
    return absl::FailedPreconditionError(
        absl::StrCat("the nccl data plane's device ", wanted, " is not among this rank's devices"));
  }
  for (const engine::DeviceInfo& device : devices) {
    if (device.kind == "cuda") return device;
  }
  if (devices.empty()) return absl::InternalError("no device to compute on");
  return devices.front();
}

namespace {

class Worker {
 public:
  Worker(const ServingGroupOptions& options, const std::atomic<bool>& stop)
      : o_(options), stop_(stop), pool_(options.threads), plans_(options.plan_cache_bytes) {}

  absl::Status Run() {
    // The worker computes its shares on one device with its kind's default backend.
    DA_ASSIGN_OR_RETURN(const engine::DeviceInfo device,
                        WorkerDevice(engine::DiscoverDevices(pool_.size()), o_));
    DA_ASSIGN_OR_RETURN(backend_, engine::MakeBackend("", device));
    device_ = device.id;
    stats_.device = device;
    Report();
    Log(absl::StrCat("rank ", o_.rank, " computes on ", device.id, " (", device.name, ")"));
    Log(absl::StrCat("rank ", o_.rank, " of ", o_.world_size, ": waiting for the coordinator at ",
                     o_.coordinator));
    State(absl::StrCat("waiting for the coordinator at ", o_.coordinator));
    while (!stop_.load()) {
      if (store_ == nullptr) {
        absl::StatusOr<std::unique_ptr<KeyValueStore>> store = ConnectCoordinatorStore(
            o_.coordinator, std::chrono::milliseconds(1000), o_.coordinator_secret);
        if (store.ok()) {
          store_ = *std::move(store);
        } else {
          Waiting(store.status());
          Pause();  // E.g. a coordinator name that does not resolve yet: no tight loop.
        }
        continue;
      }
      absl::StatusOr<int64_t> generation = NextGeneration();
      if (!generation.ok()) {
        // Not yet (a slice passed): look again; anything else (the coordinator is down): say why
        // and pause.
        const bool not_yet = absl::IsDeadlineExceeded(generation.status());
        Waiting(not_yet ? absl::OkStatus() : generation.status());
        if (!not_yet) Pause();
        continue;
      }
      waiting_error_ = absl::OkStatus();
      last_ = *generation;
      bool announced = false;
      absl::StatusOr<Joined> joined = Join(*generation, &announced);
      if (!joined.ok()) {
        // Not announced (the store refused the keys): rank 0 still waits for this worker in this
        // generation, so it joins it again rather than waiting for the next, which rank 0 opens
        // only once this one has formed or failed; after a pause, since a full store refuses at
        // once.
        if (!announced) last_ = *generation - 1;
        if (!stop_.load()) {
          Log(absl::StrCat("generation ", *generation,
                           " did not form: ", joined.status().message()));
          State(absl::StrCat("generation ", *generation,
                             " did not form: ", joined.status().message()));
        }
        if (!announced) Pause();
        continue;
      }
      Log(absl::StrCat("rank ", o_.rank, " joined generation ", *generation,
                       joined->plane != nullptr
                           ? absl::StrCat("; data plane: ", joined->plane->backend())
                           : std::string()));
      State("");
      absl::Status served = Serve(*joined->comm, joined->plane.get());
      if (shutdown_) {
        Log("shutdown frame from rank 0: leaving");
        State("shut down by rank 0");
        return absl::OkStatus();
      }
      if (!stop_.load()) {
        Log(absl::StrCat("left generation ", *generation, ": ", served.message()));
      }
      State(absl::StrCat("left generation ", *generation, ": ", served.message()));
    }
    return absl::OkStatus();
  }

 private:
  void State(const std::string& not_serving_reason) {
    if (o_.on_state) o_.on_state(not_serving_reason);
  }

  // While the worker waits for the coordinator: the error that keeps it waiting (OK: none any
  // more) goes into its state when it changes, and into the log at once when new, again at most
  // every kRepeatedErrorLogPeriod (it recurs at every attempt).
  void Waiting(const absl::Status& error) {
    std::string text = absl::StrCat("waiting for the coordinator at ", o_.coordinator);
    if (!error.ok()) absl::StrAppend(&text, ": ", error.message());
    const auto now = std::chrono::steady_clock::now();
    if (!error.ok() &&
        (error != waiting_error_ || now - error_logged_ >= kRepeatedErrorLogPeriod)) {
      Log(text);
      error_logged_ = now;
    }
    if (error != waiting_error_) State(text);
    waiting_error_ = error;
  }

  // Waits (in store slices, watching stop) for a generation newer than last_ to open and returns
  // the newest open one this worker may still join. DEADLINE_EXCEEDED / CANCELLED: look again.
  absl::StatusOr<int64_t> NextGeneration() {
    DA_ASSIGN_OR_RETURN(const std::string session,
                        store_->Get(serving::kSessionKey, serving::kStoreSlice));
    if (session != session_) {
      if (!session_.empty()) Log("a new coordinator session began");
      session_ = session;
      last_ = 0;
    }
    // A worker that tried a generation waits for the next to open; a new one (or one of a new
    // session) reads the newest at once, since rank 0 deletes the keys of generations before the
    // one that last formed.
    if (last_ > 0) {
      DA_RETURN_IF_ERROR(
          store_->Get(serving::OpenKey(session_, last_ + 1), serving::kStoreSlice).status());
    }
    DA_ASSIGN_OR_RETURN(const std::string text,
                        store_->Get(serving::GenerationKey(session_), serving::kStoreSlice));
    int64_t generation = 0;
    if (!absl::SimpleAtoi(text, &generation) || generation <= last_) {
      return absl::InternalError(absl::StrCat("generation key holds '", text, "'"));
    }
    // A generation whose go is set formed (or is forming) without this worker: wait for the next.
    if (store_->Get(serving::GoKey(session_, generation), std::chrono::milliseconds(0)).ok()) {
      last_ = generation;
      return absl::DeadlineExceededError("generation already closed");
    }
    return generation;
  }

  // The communicators of one generation: control frames and, when formed, the data plane.
  struct Joined {
    std::unique_ptr<Communicator> comm;
    std::unique_ptr<Communicator> plane;  // Null: comm carries everything.
  };

  // Joins `generation`: announces itself (*announced once it has), waits for rank 0's go, forms
  // the Gloo group and the data plane. A generation rank 0 gave up on before its go (a newer one
  // opened) is left.
  absl::StatusOr<Joined> Join(int64_t generation, bool* announced) {
    DA_RETURN_IF_ERROR(store_->Set(serving::DeviceKey(session_, generation, o_.rank), device_));
    DA_RETURN_IF_ERROR(store_->Set(serving::MemoryBudgetKey(session_, generation, o_.rank),
                                   absl::StrCat(o_.memory_budget_bytes)));
    DA_RETURN_IF_ERROR(
        store_->Set(serving::JoinedKey(session_, generation, o_.rank), absl::StrCat(getpid())));
    *announced = true;
    for (;;) {
      if (stop_.load()) return absl::CancelledError("stopping");
      absl::StatusOr<std::string> go =
          store_->Get(serving::GoKey(session_, generation), serving::kStoreSlice);
      if (go.ok()) break;
      if (!absl::IsDeadlineExceeded(go.status())) return go.status();
      absl::StatusOr<std::string> newest =
          store_->Get(serving::GenerationKey(session_), std::chrono::milliseconds(0));
      int64_t opened = 0;
      if (newest.ok() && absl::SimpleAtoi(*newest, &opened) && opened > generation) {
        return absl::UnavailableError(
            absl::StrCat("rank 0 gave generation ", generation, " up and opened ", opened));
      }
    }
    GlooOptions gloo{.rank = o_.rank,
                     .size = o_.world_size,
                     .interface_address = o_.interface_address,
                     .prefix = serving::GlooPrefix(session_, generation),
                     .timeout = o_.collective_timeout};
    Joined joined;
    DA_ASSIGN_OR_RETURN(joined.comm, MakeGlooCommunicator(*store_, gloo));
    DA_RETURN_IF_ERROR(joined.comm->Barrier(o_.collective_timeout));
    DA_ASSIGN_OR_RETURN(joined.plane, serving::FormServingDataPlane(o_, *store_, gloo.prefix));
    if (joined.plane != nullptr) DA_RETURN_IF_ERROR(joined.comm->Barrier(o_.collective_timeout));
    return joined;
  }

  // Control frames until the group fails, rank 0 goes quiet, stop (seen after a frame) or
  // kShutdown. Any failed run leaves the generation: the ranks may be out of step.
  absl::Status Serve(Communicator& comm, Communicator* plane) {
    const auto idle_timeout = o_.heartbeat * kIdleHeartbeats;
    std::string bytes(kControlFrameBytes, '\0');
    ShardRunOptions run_options;
    run_options.timeout = o_.collective_timeout;
    run_options.compute = {backend_.get(), &plans_, &pool_, device_};
    run_options.buffers = &buffers_;
    run_options.data_plane = plane;
    run_options.memory_budget_bytes = o_.memory_budget_bytes;
    for (;;) {
      absl::Status received =
          comm.Recv(bytes.data(), kControlFrameBytes, 0, kControlTag, idle_timeout);
      if (absl::IsDeadlineExceeded(received)) {
        return absl::UnavailableError(absl::StrCat("no frame from rank 0 for ",
                                                   idle_timeout.count(), " ms (", kIdleHeartbeats,
                                                   " heartbeats): rank 0 lost"));
      }
      DA_RETURN_IF_ERROR(received);
      DA_ASSIGN_OR_RETURN(const ControlFrame frame, DecodeControlFrame(bytes));
      switch (frame.kind) {
        case ControlKind::kHeartbeat:
          break;
        case ControlKind::kShutdown:
          shutdown_ = true;
          return absl::OkStatus();
        case ControlKind::kRun: {
          const absl::StatusOr<ShardRunStats> run = ServeShardedRun(comm, frame, run_options);
          const absl::Status served = run.status();
          if (run.ok()) {
            ++stats_.shares_computed;
            const size_t me = static_cast<size_t>(comm.rank());
            if (me < run->ranks.size()) stats_.compute_seconds += run->ranks[me].compute_seconds;
          } else if (AnsweredInStep(served)) {
            ++stats_.shares_stopped;
          }
          stats_.plans = plans_.stats();
          Report();
          if (!AnsweredInStep(served)) DA_RETURN_IF_ERROR(served);
          // Stopped by rank 0 (the request was cancelled) or failed in compute, and answered:
          // rank 0 has the code, the group stays in step.
          if (!served.ok()) Log(absl::StrCat("run ended early: ", served.ToString()));
          break;
        }
      }
      if (stop_.load()) return absl::CancelledError("stopping");
    }
  }

  void Report() {
    if (o_.on_stats) o_.on_stats(stats_);
  }

  // After the coordinator refused a connection: wait a little before asking again (it may be
  // restarting; a tight loop would only spin).
  void Pause() {
    for (int i = 0; i < 4 && !stop_.load(); ++i) {
      std::this_thread::sleep_for(serving::kStoreSlice / 4);
    }
  }

  const ServingGroupOptions o_;
  const std::atomic<bool>& stop_;
  engine::ThreadPool pool_;
  engine::PlanCache plans_;  // The shares' plans, warm between runs.
  std::unique_ptr<engine::Backend> backend_;
  std::string device_;
  RankBuffers buffers_;  // The share buffers, kept between runs.
  std::unique_ptr<KeyValueStore> store_;
  std::string session_;
  int64_t last_ = 0;            // The newest generation this worker tried (or skipped) in session_.
  absl::Status waiting_error_;  // The store error its state names; OK: none.
  std::chrono::steady_clock::time_point error_logged_;
  bool shutdown_ = false;
  engine::WorkerStats stats_;  // What it has computed (ServingGroupOptions::on_stats).
};

}  // namespace

absl::Status RunWorker(const ServingGroupOptions& options, const std::atomic<bool>& stop) {
  DA_RETURN_IF_ERROR(ValidateServingGroupOptions(options));
  if (options.rank == 0) {
    return absl::InvalidArgumentError("RunWorker runs on ranks 1..world_size-1; rank is 0");
  }
  Worker worker(options, stop);
  return worker.Run();
}

}  // namespace da::dist
