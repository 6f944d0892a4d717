// The serving group's watch over a stopped run (serving_group.cc): a run whose request was
// cancelled or passed its deadline should end within milliseconds (every rank hears the stop),
// but a rank that does not answer (stalled: SIGSTOP, a frozen node) cannot hear it, and the run
// would hold the request until the collective timeout. Internal to engine/dist.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/dist/communicator.h"

namespace da::dist::internal {

// While a run is in progress: once its request's stop flag is up and `grace` has passed with
// the run neither ending nor moving (no operation of its communicators completed: a stopped run
// still finishes what no stop interrupts, such as outputs already on their way, in pieces), aborts
// its communicators (every call in flight returns UNAVAILABLE, so the run returns); fired() then
// says the group must re-form, whatever the run returned. Null communicators are skipped.
// Stop() once the run has returned, then read fired(): a watch still running could abort the
// communicators after a fired() that said it had not, and the group would carry on with
// communicators that fail every later call.
class StopWatch {
 public:
  // How often the watch looks at the flag and the communicators' counters.
  static constexpr std::chrono::milliseconds kPoll{5};

  StopWatch(const std::atomic<bool>* stop, std::chrono::milliseconds grace,
            std::vector<Communicator*> comms)
      : stop_(stop), grace_(grace), comms_(std::move(comms)) {
    if (stop_ != nullptr) thread_ = std::thread([this] { Watch(); });
  }
  ~StopWatch() { Stop(); }
  StopWatch(const StopWatch&) = delete;
  StopWatch& operator=(const StopWatch&) = delete;

  // Ends the watch: it aborts nothing after this returns, so fired() is final. The watch aborts
  // under mu_, so once done_ is set under it the decision cannot change.
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

  // Whether it aborted the communicators; final once Stop() has returned.
  bool fired() const { return fired_.load(); }
  std::string why() const {
    return absl::StrCat("the run was stopped and moved no bytes for ", grace_.count(),
                        " ms: a rank does not answer");
  }

 private:
  // Operations completed and bytes moved so far, over every communicator: it changes whenever
  // one of the run's calls completes.
  int64_t Progress() const {
    int64_t progress = 0;
    for (const Communicator* comm : comms_) {
      if (comm == nullptr) continue;
      const Communicator::Counters counters = comm->counters();
      progress += counters.operations + counters.bytes_sent + counters.bytes_received;
    }
    return progress;
  }

  void Watch() {
    std::unique_lock<std::mutex> lock(mu_);
    std::optional<std::chrono::steady_clock::time_point> quiet_since;
    int64_t seen = 0;
    while (!cv_.wait_for(lock, kPoll, [&] { return done_; })) {
      if (!stop_->load()) continue;
      const auto now = std::chrono::steady_clock::now();
      const int64_t progress = Progress();
      if (!quiet_since || progress != seen) {
        quiet_since = now;
        seen = progress;
        continue;
      }
      if (now - *quiet_since < grace_) continue;
      fired_ = true;
      for (Communicator* comm : comms_) {
        if (comm != nullptr) comm->Abort(why());
      }
      return;
    }
  }

  const std::atomic<bool>* const stop_;
  const std::chrono::milliseconds grace_;
  const std::vector<Communicator*> comms_;
  std::atomic<bool> fired_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;  // Guarded by mu_.
  std::thread thread_;
};

}  // namespace da::dist::internal
