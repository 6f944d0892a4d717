// Calls a server refused before it read or computed anything, sent again.
//
// A draining da-server (SIGTERM, a rolling update) refuses new calls with UNAVAILABLE and the
// trailing metadata "da-refused: draining" (GetServerInfo's protocol feature "refused-metadata")
// while it finishes the calls in flight; the client's connection to it stays open until then,
// and the next connection goes to a replica that serves. So the client waits and sends the call
// again, after a backoff that doubles from initial_backoff_ms up to max_backoff_ms (each wait
// drawn between half and all of it, so that the clients of one draining replica do not come back
// at once), for at most max_attempts attempts, and only while what is left of the call's
// deadline after the wait is at least as long as the wait (10 ms at least). AttentionClient
// sends it on a connection of its own where it has a channel factory (FreshChannels), else on
// the call's channel. Only such refusals are retried: an UNAVAILABLE without the metadata (a
// connection reset, a rank lost) may have come from a request that brought a server down, and
// sending it again could bring down the next.
//
// The defaults wait up to about 14 s in all (at least 7 s), longer than the drain grace of the
// Kubernetes manifest (deploy/, 5 s) after which a replica with nothing in flight closes its
// connections.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <string_view>

namespace da::client {

struct RetryPolicy {
  int max_attempts = 10;  // Attempts in all, the first included; 1 (or less): none again.
  int64_t initial_backoff_ms = 250;
  int64_t max_backoff_ms = 2000;
};

// The trailing metadata of a call refused before anything was read or computed, and its value
// for a draining server (server/attend_stream_reactor.h, kRefusedMetadata).
inline constexpr std::string_view kRefusedMetadata = "da-refused";

// Whether a finished call was refused before the server read or computed anything:
// UNAVAILABLE with kRefusedMetadata among its trailing metadata; or a call that reached a server
// whose gRPC had begun to shut down and was dropped before any handler saw it, which gRPC (up to
// at least 1.64: grpc/grpc#41785) ends as CANCELLED "CANCELLED" with no metadata at all (the
// client must not have cancelled it itself: it is then the same status). It happens to a call
// made after the server's GOAWAY was sent but before the client read it, which a sync client
// that is not in a call reads only when its next call starts.
bool RefusedUnread(const grpc::Status& status, const grpc::ClientContext& context);

// The wait before attempt `attempt` (2: the first retry): initial_backoff_ms doubled for each
// attempt after the second, at most max_backoff_ms, times a factor drawn from [0.5, 1].
std::chrono::milliseconds RetryBackoff(const RetryPolicy& policy, int attempt,
                                       std::mt19937_64& rng);

// Attempt `attempt` (from 1) of a call: makes it with timeout_ms (0: no deadline) and returns its
// status, with *refused set when the server refused it unread (RefusedUnread) and nothing of its
// answer was taken, so that it may be made again as it was.
using RetryAttempt = std::function<grpc::Status(int attempt, int64_t timeout_ms, bool* refused)>;
// Sleeps for a backoff; false when the call was given up meanwhile (another part failed).
using RetryWait = std::function<bool(std::chrono::milliseconds)>;

// Runs attempt until it ends other than refused, policy.max_attempts have been made, or the next
// attempt would have less time before the deadline that timeout_ms (0: none) sets from now than
// the wait before it; each attempt gets what is left of it. A refusal given back after retries says
// how many attempts were made over how long. wait defaults to sleeping.
grpc::Status WithRetries(const RetryPolicy& policy, int64_t timeout_ms, const RetryAttempt& attempt,
                         const RetryWait& wait = {});

}  // namespace da::client
