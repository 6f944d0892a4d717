// Admission control for the engine: what a request's memory is estimated at, the budget it is
// reserved against, why a request was refused, and the statistics the server exports.
//
//   DA_ASSIGN_OR_RETURN(MemoryEstimate estimate,
//                       engine.EstimateMemory(shape, dtype, out_dtype, spec));
//   DA_ASSIGN_OR_RETURN(MemoryReservation reservation,
//                       engine.ReserveMemory(estimate.total, estimate.ToString()));
//   ...  // The bytes stay reserved until `reservation` is destroyed (or moved from and reset).
//
// A refusal by admission (queue full, memory, deadline, cancelled before compute) is an
// absl::Status carrying a payload under kRejectReasonPayload; RejectReasonOf reads it back, so a
// caller can count refusals by reason without parsing messages.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"

namespace da::engine {

// Bytes one request needs while it is queued and computed: in host memory (total, reserved
// against the host budget) and in the memory of the device that computes it (device, reserved
// against that device's account). A CPU device computes in host memory, so the two are the same
// bytes; a GPU holds copies of the inputs and the output and its workspace in its own.
struct MemoryEstimate {
  int64_t inputs = 0;     // q + k + v (and, sharded, the shares' copies in host memory).
  int64_t outputs = 0;    // The output tensor.
  int64_t workspace = 0;  // The backend plan's workspace (Backend::PlanWorkspaceBytes).
  int64_t total = 0;      // Host bytes: inputs + outputs, + workspace when it is in host memory.
  // Bytes in the computing device's memory: total for a host device; for a device with memory
  // of its own, its copies of the inputs and output, and the workspace (split across the
  // devices of a sharded run).
  int64_t device = 0;
  bool workspace_on_host = true;  // Whether workspace is host memory (counted in total).

  // "805306368 bytes (inputs 402653184, outputs 134217728, workspace 268435456)"; for a device
  // with memory of its own, the host bytes and then the device's.
  std::string ToString() const;
};

// The FLOPs of a problem per DESIGN §2 "Cost": a segment keeping m positions costs 4 * m^2 * D per
// head that runs its pattern (half that when causal), summed over segments, patterns and batch.
// What the engine divides by its measured throughput to refuse runs that cannot meet a deadline.
double EstimateFlops(const ProblemShape& shape, const AttentionSpec& spec);

// Why admission refused a request; kNone for any other status.
enum class RejectReason {
  kNone,
  kQueueFull,  // RESOURCE_EXHAUSTED: max_queue requests already wait.
  kMemory,     // RESOURCE_EXHAUSTED: the memory budget cannot hold the request.
  kDeadline,   // DEADLINE_EXCEEDED before compute began (up front, or while queued).
  kCancelled,  // CANCELLED before compute began (while queued).
};

inline constexpr char kRejectReasonPayload[] = "type.googleapis.com/da.engine.RejectReason";

// A run that failed after it began (a rank lost mid-run: UNAVAILABLE) is no refusal, whatever its
// code: marked with this payload, a status is counted as a failed run, never as a rejection.
inline constexpr char kFailedWhileRunningPayload[] =
    "type.googleapis.com/da.engine.FailedWhileRunning";
absl::Status FailedWhileRunning(absl::Status status);
bool IsFailedWhileRunning(const absl::Status& status);

// "queue_full", "memory", "deadline", "cancelled"; "" for kNone.
std::string RejectReasonName(RejectReason reason);
// status with the reason attached as its payload.
absl::Status WithRejectReason(absl::Status status, RejectReason reason);
RejectReason RejectReasonOf(const absl::Status& status);

// The shared counter of reserved bytes. Thread safe. Reservations keep it alive, so a reservation
// may outlive the engine that granted it.
class MemoryAccount {
 public:
  explicit MemoryAccount(int64_t budget_bytes) : budget_bytes_(budget_bytes) {}

  int64_t budget_bytes() const { return budget_bytes_; }  // 0: unlimited.
  int64_t reserved_bytes() const;
  // Memory the server keeps outside any request (the stream buffer pool's capacity): it takes
  // room from the budget, apart from reserved_bytes. `what` names it in refusals.
  void SetKept(int64_t bytes, std::string what);
  int64_t kept_bytes() const;

  // Adds bytes when they fit the budget; otherwise RESOURCE_EXHAUSTED (reason kMemory) naming
  // what (a description of the bytes such as MemoryEstimate::ToString(); empty: the byte count),
  // the budget and the bytes in use.
  absl::Status Reserve(int64_t bytes, std::string_view what);
  // Reserve's answer without reserving: OK when the bytes fit now, else its refusal.
  absl::Status CheckFits(int64_t bytes, std::string_view what) const;
  // Whether `bytes` would fit were nothing reserved: the budget less what is kept.
  bool FitsWhenFree(int64_t bytes) const;
  // Adds bytes that exist already (an answer computed and waiting on its client), past the budget
  // if need be: what is admitted next sees them.
  void Hold(int64_t bytes);
  void Release(int64_t bytes);

 private:
  absl::Status CheckFitsLocked(int64_t bytes, std::string_view what) const;  // Under mutex_.

  const int64_t budget_bytes_;
  mutable std::mutex mutex_;
  int64_t reserved_bytes_ = 0;
  int64_t kept_bytes_ = 0;
  std::string kept_what_;
};

// Bytes held against a MemoryAccount; released on destruction. Movable, not copyable. A
// default-constructed reservation holds nothing.
class MemoryReservation {
 public:
  MemoryReservation() = default;
  MemoryReservation(std::shared_ptr<MemoryAccount> account, int64_t bytes)
      : account_(std::move(account)), bytes_(bytes) {}
  ~MemoryReservation() { Reset(); }
  MemoryReservation(MemoryReservation&& other) noexcept;
  MemoryReservation& operator=(MemoryReservation&& other) noexcept;
  MemoryReservation(const MemoryReservation&) = delete;
  MemoryReservation& operator=(const MemoryReservation&) = delete;

  int64_t bytes() const { return bytes_; }
  // Releases the bytes now.
  void Reset();
  // Releases all but `bytes` now (nothing where it holds no more than that).
  void ShrinkTo(int64_t bytes);

 private:
  std::shared_ptr<MemoryAccount> account_;
  int64_t bytes_ = 0;
};

// Waits until `bytes` fit on `account` now (CheckFits), reserving nothing: while they do not fit
// only because of memory that others hold and will give back (FitsWhenFree), it looks again every
// `poll`. OK once they fit, or once `no_longer_needed` (may be empty) says so; CANCELLED once
// `stop` (may be null) is set; the refusal (CheckFits') at once for bytes that would not fit even
// then, or once `until` has passed.
absl::Status WaitForRoom(const MemoryAccount& account, int64_t bytes, std::string_view what,
                         const std::atomic<bool>* stop, std::chrono::steady_clock::time_point until,
                         const std::function<bool()>& no_longer_needed = nullptr,
                         std::chrono::milliseconds poll = std::chrono::milliseconds(10));

// One place in the engine's queue, held by a sequence of runs that never wait at the same time
// (the chunks of one stream): taken once within max_queue (Engine::TakeQueuePlace) and counted
// as one waiting request until destroyed, so the queue never holds more than max_queue requests
// however many chunks pass through it (RunRequest::queue_place). Movable, not copyable; one run at
// a time may carry it. May outlive the engine.
class QueuePlace {
 public:
  QueuePlace() = default;
  explicit QueuePlace(std::shared_ptr<std::atomic<int64_t>> held) : held_(std::move(held)) {}
  ~QueuePlace() { Reset(); }
  QueuePlace(QueuePlace&& other) noexcept;
  QueuePlace& operator=(QueuePlace&& other) noexcept;
  QueuePlace(const QueuePlace&) = delete;
  QueuePlace& operator=(const QueuePlace&) = delete;

  bool held() const { return held_ != nullptr; }
  void Reset();

 private:
  std::shared_ptr<std::atomic<int64_t>> held_;  // The engine's count of places held.
};

// Stop latencies (from the moment the engine saw a cancellation or a passed deadline to the moment
// compute returned), as a cumulative histogram the server exports unchanged.
struct StopLatencyStats {
  std::vector<double> bounds_seconds;  // Upper bounds, increasing; +Inf is implied.
  std::vector<int64_t> cumulative;     // Stops at or below each bound.
  int64_t count = 0;
  double sum_seconds = 0;
  double max_seconds = 0;
  double last_seconds = 0;
};

struct EngineStats {
  int64_t queued = 0;   // Waiting for a dispatcher.
  int64_t running = 0;  // Computing now (Submit and Run).
  int64_t max_queue = 0;
  int64_t memory_reserved_bytes = 0;
  int64_t memory_budget_bytes = 0;  // 0: unlimited.
  int64_t memory_kept_bytes = 0;    // Kept by the server outside requests (MemoryAccount::SetKept).
  int64_t rejected_queue_full = 0;
  int64_t rejected_memory = 0;
  int64_t rejected_deadline = 0;       // Refused up front or expired while queued.
  int64_t rejected_cancelled = 0;      // Cancelled while queued.
  int64_t runs_completed = 0;          // Computed successfully.
  int64_t runs_cancelled = 0;          // Stopped during compute by their cancelled flag.
  int64_t runs_deadline_exceeded = 0;  // Stopped during compute by their deadline.
  // Best seen over completed runs of at least 1 ms and 1e8 FLOP computed in this process (on its
  // devices); 0 before the first.
  double measured_flops_per_second = 0;
  // The same over runs of the multi-process shard group (EngineOptions::shard_group), which the
  // up-front deadline checks of the group's requests divide by; 0 before the first.
  double measured_group_flops_per_second = 0;
  // What the up-front deadline checks of requests computed in this process divide by: the
  // measured throughput, or before the first measurement the start-up figure
  // (Engine::SetStartupThroughput); 0 when neither exists.
  double deadline_flops_per_second = 0;
  int64_t queue_places_held = 0;  // QueuePlaces held (open streams), each counted as waiting.
  StopLatencyStats stop_latency;
  // Per device id (every device of Engine::devices(), from 0): seconds runs spent computing on
  // it, from the start of compute (plan lookup or build included) until it returned, whether it
  // succeeded, failed or was stopped. Concurrent runs on one device each count their own time.
  std::map<std::string, double> device_busy_seconds;
  std::map<std::string, int64_t> device_runs;  // Runs that computed on each device (or part).
  // Per device: the memory account its requests hold bytes in ("host" for CPU devices, which
  // share the host budget; the device's id for a device with memory of its own), and that
  // account's reserved bytes and budget (0: unlimited).
  std::map<std::string, std::string> device_memory_account;
  std::map<std::string, int64_t> device_memory_reserved_bytes;
  std::map<std::string, int64_t> device_memory_budget_bytes;
};

}  // namespace da::engine
