#include "client/retry.h"

#include <algorithm>
#include <optional>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/connection_options.h"

namespace da::client {
namespace {

constexpr std::chrono::milliseconds kLeastAttemptTime{10};

}  // namespace

bool RefusedUnread(const grpc::Status& status, const grpc::ClientContext& context) {
  const auto& trailing = context.GetServerTrailingMetadata();
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return trailing.find(grpc::string_ref(kRefusedMetadata.data(), kRefusedMetadata.size())) !=
           trailing.end();
  }
  // gRPC's own status for a call its server dropped unstarted while shutting down (a handler's
  // cancel says "Cancelled on the server side", da-server's own statuses say more).
  return status.error_code() == grpc::StatusCode::CANCELLED &&
         status.error_message() == "CANCELLED" && trailing.empty() &&
         context.GetServerInitialMetadata().empty();
}

std::chrono::milliseconds RetryBackoff(const RetryPolicy& policy, int attempt,
                                       std::mt19937_64& rng) {
  const int64_t ceiling = std::max<int64_t>(policy.max_backoff_ms, 0);
  int64_t backoff = std::clamp<int64_t>(policy.initial_backoff_ms, 0, ceiling);
  for (int i = 2; i < attempt && backoff < ceiling; ++i) backoff = std::min(2 * backoff, ceiling);
  std::uniform_real_distribution<double> factor(0.5, 1.0);
  return std::chrono::milliseconds(
      static_cast<int64_t>(static_cast<double>(backoff) * factor(rng)));
}

grpc::Status WithRetries(const RetryPolicy& policy, int64_t timeout_ms, const RetryAttempt& attempt,
                         const RetryWait& wait) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  std::optional<Clock::time_point> deadline;
  if (timeout_ms > 0) {
    deadline = start + std::chrono::milliseconds(std::min(timeout_ms, kMaxTimeoutMs));
  }
  std::mt19937_64 rng(std::random_device{}());
  for (int made = 1;; ++made) {
    int64_t left_ms = 0;
    if (deadline.has_value()) {
      // Rounded up, and at least 1: 0 would mean no deadline at all.
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - Clock::now());
      left_ms = std::max<int64_t>(left.count(), 1);
    }
    bool refused = false;
    grpc::Status status = attempt(made, left_ms, &refused);
    if (!refused) return status;
    const auto given_back = [&] {
      if (made == 1) return status;
      const auto over =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
      return grpc::Status(
          status.error_code(),
          absl::StrCat(status.error_message(), " (refused ", made, " times over ", over, " ms)"),
          status.error_details());
    };
    if (made >= policy.max_attempts) return given_back();
    const std::chrono::milliseconds backoff = RetryBackoff(policy, made + 1, rng);
    // An attempt gets at least as long as the wait before it (10 ms at least): one started with
    // a millisecond left would only end in DEADLINE_EXCEEDED in place of the refusal.
    const auto least = std::max<std::chrono::milliseconds>(backoff, kLeastAttemptTime);
    if (deadline.has_value() && Clock::now() + backoff + least > *deadline) return given_back();
    if (wait) {
      if (!wait(backoff)) return given_back();
    } else {
      std::this_thread::sleep_for(backoff);
    }
  }
}

}  // namespace da::client
