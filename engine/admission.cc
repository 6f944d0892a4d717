#include "engine/admission.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace da::engine {

std::string MemoryEstimate::ToString() const {
  if (workspace_on_host) {
    return absl::StrCat(total, " bytes (inputs ", inputs, ", outputs ", outputs, ", workspace ",
                        workspace, ")");
  }
  return absl::StrCat(total, " bytes in host memory (inputs ", inputs, ", outputs ", outputs,
                      ") and ", device, " in the device's (their copies and workspace ", workspace,
                      ")");
}

double EstimateFlops(const ProblemShape& shape, const AttentionSpec& spec) {
  const int64_t patterns = static_cast<int64_t>(spec.patterns.size());
  double flops = 0;
  for (int64_t i = 0; i < patterns; ++i) {
    const Pattern& p = spec.patterns[i];
    if (p.segment_len < 1 || p.dilation < 1) continue;
    // LONGNET: every head runs every pattern. GROUPED: group i has H / P heads, one more for the
    // first H % P groups.
    const int64_t heads = spec.mode == CombineMode::kLongNet
                              ? shape.heads
                              : shape.heads / patterns + (i < shape.heads % patterns ? 1 : 0);
    const auto segment_flops = [&](int64_t span) {
      const double kept = static_cast<double>((span + p.dilation - 1) / p.dilation);
      return 4.0 * kept * kept * static_cast<double>(shape.head_dim);
    };
    const int64_t full = shape.seq_len / p.segment_len;
    const int64_t rest = shape.seq_len % p.segment_len;
    double per_head = static_cast<double>(full) * segment_flops(p.segment_len);
    if (rest > 0) per_head += segment_flops(rest);
    flops += per_head * static_cast<double>(heads * shape.batch);
  }
  return spec.causal ? flops / 2 : flops;
}

std::string RejectReasonName(RejectReason reason) {
  switch (reason) {
    case RejectReason::kNone:
      return "";
    case RejectReason::kQueueFull:
      return "queue_full";
    case RejectReason::kMemory:
      return "memory";
    case RejectReason::kDeadline:
      return "deadline";
    case RejectReason::kCancelled:
      return "cancelled";
  }
  return "";
}

absl::Status WithRejectReason(absl::Status status, RejectReason reason) {
  if (!status.ok() && reason != RejectReason::kNone) {
    status.SetPayload(kRejectReasonPayload, absl::Cord(RejectReasonName(reason)));
  }
  return status;
}

absl::Status FailedWhileRunning(absl::Status status) {
  if (!status.ok()) status.SetPayload(kFailedWhileRunningPayload, absl::Cord("1"));
  return status;
}

bool IsFailedWhileRunning(const absl::Status& status) {
  return status.GetPayload(kFailedWhileRunningPayload).has_value();
}

RejectReason RejectReasonOf(const absl::Status& status) {
  // absl::optional: Debian's Abseil is built without std::optional aliasing.
  const auto payload = status.GetPayload(kRejectReasonPayload);
  if (!payload.has_value()) return RejectReason::kNone;
  for (RejectReason reason : {RejectReason::kQueueFull, RejectReason::kMemory,
                              RejectReason::kDeadline, RejectReason::kCancelled}) {
    if (*payload == RejectReasonName(reason)) return reason;
  }
  return RejectReason::kNone;
}

int64_t MemoryAccount::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reserved_bytes_;
}

absl::Status MemoryAccount::Reserve(int64_t bytes, std::string_view what) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (absl::Status fits = CheckFitsLocked(bytes, what); !fits.ok()) return fits;
  reserved_bytes_ += bytes;
  return absl::OkStatus();
}

absl::Status MemoryAccount::CheckFits(int64_t bytes, std::string_view what) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return CheckFitsLocked(bytes, what);
}

absl::Status MemoryAccount::CheckFitsLocked(int64_t bytes, std::string_view what) const {
  if (budget_bytes_ > 0 && bytes > budget_bytes_ - reserved_bytes_ - kept_bytes_) {
    return WithRejectReason(
        absl::ResourceExhaustedError(absl::StrCat(
            "request needs an estimated ",
            what.empty() ? absl::StrCat(bytes, " bytes") : std::string(what),
            " but the memory budget is ", budget_bytes_, " bytes with ", reserved_bytes_, " in use",
            kept_bytes_ > 0 ? absl::StrCat(" and ", kept_bytes_, " kept for ", kept_what_) : "")),
        RejectReason::kMemory);
  }
  return absl::OkStatus();
}

bool MemoryAccount::FitsWhenFree(int64_t bytes) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return budget_bytes_ <= 0 || bytes <= budget_bytes_ - kept_bytes_;
}

absl::Status WaitForRoom(const MemoryAccount& account, int64_t bytes, std::string_view what,
                         const std::atomic<bool>* stop, std::chrono::steady_clock::time_point until,
                         const std::function<bool()>& no_longer_needed,
                         std::chrono::milliseconds poll) {
  for (;;) {
    if (no_longer_needed && no_longer_needed()) return absl::OkStatus();
    absl::Status fits = account.CheckFits(bytes, what);
    if (fits.ok() || !account.FitsWhenFree(bytes)) return fits;
    if (stop != nullptr && stop->load()) {
      return absl::CancelledError(absl::StrCat(
          "stopped while waiting for memory that calls in flight hold: ", fits.message()));
    }
    if (std::chrono::steady_clock::now() >= until) return fits;
    std::this_thread::sleep_for(poll);
  }
}

void MemoryAccount::Hold(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  reserved_bytes_ += std::max<int64_t>(bytes, 0);
}

void MemoryAccount::SetKept(int64_t bytes, std::string what) {
  std::lock_guard<std::mutex> lock(mutex_);
  kept_bytes_ = bytes;
  kept_what_ = std::move(what);
}

int64_t MemoryAccount::kept_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return kept_bytes_;
}

void MemoryAccount::Release(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  reserved_bytes_ -= bytes;
}

MemoryReservation::MemoryReservation(MemoryReservation&& other) noexcept
    : account_(std::move(other.account_)), bytes_(std::exchange(other.bytes_, 0)) {}

MemoryReservation& MemoryReservation::operator=(MemoryReservation&& other) noexcept {
  if (this != &other) {
    Reset();
    account_ = std::move(other.account_);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void MemoryReservation::Reset() {
  if (account_ != nullptr && bytes_ > 0) account_->Release(bytes_);
  account_.reset();
  bytes_ = 0;
}

void MemoryReservation::ShrinkTo(int64_t bytes) {
  bytes = std::max<int64_t>(bytes, 0);
  if (account_ == nullptr || bytes >= bytes_) return;
  account_->Release(bytes_ - bytes);
  bytes_ = bytes;
}

QueuePlace::QueuePlace(QueuePlace&& other) noexcept : held_(std::move(other.held_)) {}

QueuePlace& QueuePlace::operator=(QueuePlace&& other) noexcept {
  if (this != &other) {
    Reset();
    held_ = std::move(other.held_);
  }
  return *this;
}

void QueuePlace::Reset() {
  if (held_ != nullptr) held_->fetch_sub(1);
  held_.reset();
}

}  // namespace da::engine
