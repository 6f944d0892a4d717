#include "engine/dist/gloo_communicator.h"

#include <algorithm>
#include <csignal>
#include <cstring>
#include <mutex>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/dist/gloo_store_adapter.h"
#include "gloo/allgather.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/common/logging.h"
#include "gloo/rendezvous/context.h"
#include "gloo/transport/tcp/device.h"
#include "gloo/transport/unbound_buffer.h"

namespace da::dist {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Slot prefix of Send/Recv; Gloo's own collectives use 0x01..0x08 (gloo/types.h).
constexpr uint64_t kPointToPointSlotPrefix = 0xDA;
// The slot of Barrier's messages (point to point too, see Barrier), apart from every Send/Recv.
constexpr uint64_t kBarrierSlot = uint64_t{0xDB} << 56;

// Thrown inside Run when the group failed while the call was in flight (its wait was aborted).
struct EndedByFailure {};

// What one call moves, for the counters.
struct Traffic {
  int64_t sent = 0;
  int64_t received = 0;
};

// Bytes gloo::broadcast's binomial tree sends and receives on `rank` (mirrors gloo/broadcast.cc).
Traffic BroadcastTraffic(int rank, int size, int root, int64_t bytes) {
  const int vrank = (rank + size - root) % size;
  int dim = 0;
  while ((1 << dim) < size) ++dim;
  int mask = (1 << dim) - 1;
  Traffic traffic;
  for (int i = 0; i < dim; ++i) {
    mask ^= (1 << i);
    if ((vrank & mask) != 0) continue;
    const int vpeer = vrank ^ (1 << i);
    if (vpeer >= size) continue;
    if ((vrank & (1 << i)) == 0) {
      traffic.sent += bytes;
    } else {
      traffic.received += bytes;
    }
  }
  return traffic;
}

void IgnoreSigpipeOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
  });
}

class GlooCommunicator : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::rendezvous::Context> context,
                   std::shared_ptr<gloo::transport::Device> device)
      : context_(std::move(context)), device_(std::move(device)) {}

  int rank() const override { return context_->rank; }
  int size() const override { return context_->size; }
  std::string backend() const override { return "gloo"; }
  Capabilities capabilities() const override {
    return {.concurrent_calls = true, .tagged_messages = true};
  }

  absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                         milliseconds timeout) override {
    const std::string what = absl::StrCat("AllGather of ", bytes, " bytes");
    if (absl::Status s = CheckArgs(what, bytes, timeout); !s.ok()) return s;
    if (bytes > 0 && (send == nullptr || recv == nullptr)) return NullBuffer(what);
    std::lock_guard<std::mutex> lock(collective_mu_);
    const int left = (rank() + size() - 1) % size(), right = (rank() + 1) % size();
    const std::string peers = absl::StrCat("ring neighbours ", left, " and ", right);
    const Traffic traffic{(size() - 1) * bytes, (size() - 1) * bytes};
    return Run(what, peers, timeout, traffic, [&] {
      if (bytes == 0) return;
      if (size() == 1) {
        std::memcpy(recv, send, bytes);
        return;
      }
      gloo::AllgatherOptions options(context_);
      options.setInput(static_cast<char*>(const_cast<void*>(send)), bytes);
      options.setOutput(static_cast<char*>(recv), bytes * size());
      options.setTimeout(timeout);
      gloo::allgather(options);
    });
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root, milliseconds timeout) override {
    const std::string what = absl::StrCat("Broadcast of ", bytes, " bytes from root ", root);
    if (absl::Status s = CheckArgs(what, bytes, timeout); !s.ok()) return s;
    if (root < 0 || root >= size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gloo ", what, ": root must be in [0, ", size(), ")"));
    }
    if (bytes > 0 && data == nullptr) return NullBuffer(what);
    std::lock_guard<std::mutex> lock(collective_mu_);
    return Run(what, "", timeout, BroadcastTraffic(rank(), size(), root, bytes), [&] {
      if (bytes == 0 || size() == 1) return;
      gloo::BroadcastOptions options(context_);
      options.setOutput(static_cast<char*>(data), bytes);
      options.setRoot(root);
      options.setTimeout(timeout);
      gloo::broadcast(options);
    });
  }

  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    const std::string what = absl::StrCat("Send of ", bytes, " bytes with tag ", tag);
    if (absl::Status s = CheckPeer(what, bytes, peer, tag, timeout); !s.ok()) return s;
    if (bytes > 0 && data == nullptr) return NullBuffer(what);
    return Run(what, absl::StrCat("peer ", peer), timeout, Traffic{bytes, 0}, [&] {
      if (bytes == 0) return;
      auto buffer = context_->createUnboundBuffer(const_cast<void*>(data), bytes);
      InFlight in_flight(*this, buffer.get(), /*send=*/true);
      buffer->send(peer, Slot(tag));
      if (!buffer->waitSend(timeout)) throw EndedByFailure{};
    });
  }

  absl::Status Recv(void* data, int64_t bytes, int peer, int tag, milliseconds timeout) override {
    const std::string what = absl::StrCat("Recv of ", bytes, " bytes with tag ", tag);
    if (absl::Status s = CheckPeer(what, bytes, peer, tag, timeout); !s.ok()) return s;
    if (bytes > 0 && data == nullptr) return NullBuffer(what);
    return Run(what, absl::StrCat("peer ", peer), timeout, Traffic{0, bytes}, [&] {
      if (bytes == 0) return;
      auto buffer = context_->createUnboundBuffer(data, bytes);
      InFlight in_flight(*this, buffer.get(), /*send=*/false);
      buffer->recv(peer, Slot(tag));
      if (!buffer->waitRecv(timeout)) throw EndedByFailure{};
    });
  }

  absl::Status Barrier(milliseconds timeout) override {
    if (absl::Status s = CheckArgs("Barrier", 0, timeout); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(collective_mu_);
    return Run("Barrier", "", timeout, Traffic{}, [&] {
      if (size() == 1) return;
      // Point to point through registered buffers rather than gloo::barrier, whose buffers are
      // Gloo's own: Abort (or another call's failure) then ends a barrier in flight as it ends
      // Send and Recv; a group forming on a rank that stalled would otherwise hold its caller for
      // the whole timeout. Every rank tells rank 0 it has arrived; rank 0, once all have, tells
      // each to go on.
      // One deadline for the whole barrier, as gloo::barrier's timeout was.
      uint64_t word = 0;
      const auto deadline = Clock::now() + timeout;
      const auto step = [&](int peer, bool send) {
        const milliseconds left = std::max(
            milliseconds(1), std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
        auto buffer = context_->createUnboundBuffer(&word, sizeof(word));
        const InFlight in_flight(*this, buffer.get(), send);
        if (send) {
          buffer->send(peer, kBarrierSlot);
          if (!buffer->waitSend(left)) throw EndedByFailure{};
        } else {
          buffer->recv(peer, kBarrierSlot);
          if (!buffer->waitRecv(left)) throw EndedByFailure{};
        }
      };
      if (rank() == 0) {
        for (int r = 1; r < size(); ++r) step(r, /*send=*/false);
        for (int r = 1; r < size(); ++r) step(r, /*send=*/true);
      } else {
        step(0, /*send=*/true);
        step(0, /*send=*/false);
      }
    });
  }

  Counters counters() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return counters_;
  }
  void Abort(const std::string& why) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_.ok()) return;
    broken_ = absl::UnavailableError(why);
    Break();
  }

 private:
  static uint64_t Slot(int tag) {
    return (kPointToPointSlotPrefix << 56) | static_cast<uint32_t>(tag);
  }

  std::string Where() const { return absl::StrCat("rank ", rank(), " of ", size()); }

  absl::Status NullBuffer(const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("Gloo ", what, " on ", Where(), ": null buffer"));
  }

  absl::Status CheckArgs(const std::string& what, int64_t bytes, milliseconds timeout) const {
    if (bytes < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gloo ", what, " on ", Where(), ": byte count must be >= 0"));
    }
    if (timeout.count() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("Gloo ", what, " on ", Where(), ": timeout ",
                                                     timeout.count(), " ms must be positive"));
    }
    return absl::OkStatus();
  }

  absl::Status CheckPeer(const std::string& what, int64_t bytes, int peer, int tag,
                         milliseconds timeout) const {
    if (absl::Status s = CheckArgs(what, bytes, timeout); !s.ok()) return s;
    if (peer < 0 || peer >= size() || peer == rank()) {
      return absl::InvalidArgumentError(absl::StrCat("Gloo ", what, " on ", Where(), ": peer ",
                                                     peer, " must be another rank in [0, ", size(),
                                                     ")"));
    }
    if (tag < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gloo ", what, " on ", Where(), ": tag must be >= 0"));
    }
    return absl::OkStatus();
  }

  // A point-to-point call's buffer while it waits, so that a failure elsewhere ends the wait
  // (Break). Registered before the buffer is posted: an abort that comes first ends the wait at
  // once.
  class InFlight {
   public:
    InFlight(GlooCommunicator& comm, gloo::transport::UnboundBuffer* buffer, bool send)
        : comm_(comm), entry_(buffer, send) {
      std::lock_guard<std::mutex> lock(comm_.mu_);
      comm_.in_flight_.insert(entry_);
      if (!comm_.broken_.ok()) Abort(entry_);
    }
    ~InFlight() {
      std::lock_guard<std::mutex> lock(comm_.mu_);
      comm_.in_flight_.erase(entry_);
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;

   private:
    GlooCommunicator& comm_;
    const std::pair<gloo::transport::UnboundBuffer*, bool> entry_;
  };

  static void Abort(const std::pair<gloo::transport::UnboundBuffer*, bool>& entry) {
    if (entry.second) {
      entry.first->abortWaitSend();
    } else {
      entry.first->abortWaitRecv();
    }
  }

  // Under mu_, at the group's first failure: closes every connection, so that every peer hears
  // of it at once (its calls with this rank fail; a worker that computes stops, rank 0 gathers no
  // more), and ends every point-to-point call in flight here (they return UNAVAILABLE quoting
  // the failure instead of waiting for a peer that will never answer). Closed first, so that no
  // data lands in a buffer whose call has returned.
  void Break() {
    for (int r = 0; r < size(); ++r) {
      if (r == rank()) continue;
      try {
        if (auto& pair = context_->getPair(r); pair) pair->close();
      } catch (const std::exception&) {
        // Closed already, or never made: nothing more to close.
      }
    }
    for (const auto& entry : in_flight_) Abort(entry);
  }

  // Runs one Gloo call: refuses when the group already failed, converts Gloo's exceptions,
  // counts the traffic of successful calls and the time of every call. The first failure breaks
  // the group (Break).
  template <typename Fn>
  absl::Status Run(const std::string& what, const std::string& peer, milliseconds timeout,
                   Traffic traffic, Fn&& fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!broken_.ok()) {
        return absl::UnavailableError(absl::StrCat("Gloo ", what, " on ", Where(),
                                                   " refused: the group failed earlier (",
                                                   broken_.message(), ")"));
      }
    }
    const auto start = Clock::now();
    absl::Status status;
    try {
      fn();
    } catch (const EndedByFailure&) {
      // Aborted by Break: the group failed already, which the tail below reports.
      status = absl::AbortedError("ended by the group's failure");
    } catch (const gloo::IoException& e) {
      status = IoError(what, peer, timeout, start, e.what());
    } catch (const gloo::EnforceNotMet& e) {
      status = Failure(absl::StatusCode::kInternal, what, peer, timeout, start,
                       absl::StrCat("Gloo invariant failed: ", e.what()));
    } catch (const std::exception& e) {
      status = IoError(what, peer, timeout, start, e.what());
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    std::lock_guard<std::mutex> lock(mu_);
    counters_.seconds += seconds;
    if (status.ok()) {
      counters_.bytes_sent += traffic.sent;
      counters_.bytes_received += traffic.received;
      ++counters_.operations;
    } else if (broken_.ok()) {
      broken_ = status;
      Break();
    } else if (!absl::IsDeadlineExceeded(status)) {
      // Another call's failure broke the group while this one ran (its wait aborted, or its
      // connection closed under it): that failure is the cause. A timeout is a cause of its own
      // (Gloo closes every connection as it times out, so a bystander's failure may be recorded
      // first).
      return absl::UnavailableError(absl::StrCat(
          "Gloo ", what, " on ", Where(), " ended: the group failed (", broken_.message(), ")"));
    }
    return status;
  }

  // Gloo reports timeouts and lost connections with the same exception type; its timeout
  // messages start with "Timed out". Time spent counts too: a call that used up its timeout
  // timed out, whatever the text.
  absl::Status IoError(const std::string& what, const std::string& peer, milliseconds timeout,
                       Clock::time_point start, const std::string& message) const {
    const bool timed_out = absl::StrContains(message, "Timed out") ||
                           absl::StrContains(message, "timed out") ||
                           Clock::now() - start >= timeout;
    return Failure(timed_out ? absl::StatusCode::kDeadlineExceeded : absl::StatusCode::kUnavailable,
                   what, peer, timeout, start,
                   absl::StrCat(timed_out ? "timed out" : "lost a peer", " (Gloo: ", message, ")"));
  }

  absl::Status Failure(absl::StatusCode code, const std::string& what, const std::string& peer,
                       milliseconds timeout, Clock::time_point start,
                       const std::string& why) const {
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    return absl::Status(
        code, absl::StrCat("Gloo ", what, " on ", Where(),
                           peer.empty() ? "" : absl::StrCat(" with ", peer), " failed after ",
                           elapsed.count(), " ms (timeout ", timeout.count(), " ms): ", why));
  }

  std::shared_ptr<gloo::rendezvous::Context> context_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::mutex collective_mu_;  // One collective at a time, in program order.
  mutable std::mutex mu_;
  Counters counters_;    // Guarded by mu_.
  absl::Status broken_;  // Guarded by mu_; the first failure.
  // Guarded by mu_: the buffers of point-to-point calls in flight, and whether each sends.
  std::set<std::pair<gloo::transport::UnboundBuffer*, bool>> in_flight_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(KeyValueStore& store,
                                                                   const GlooOptions& options) {
  const std::string where = absl::StrCat("Gloo rendezvous of rank ", options.rank, " of ",
                                         options.size, " (prefix '", options.prefix, "')");
  if (options.size < 1 || options.rank < 0 || options.rank >= options.size) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": rank must be in [0, size) and size >= 1"));
  }
  if (options.timeout.count() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": timeout ", options.timeout.count(), " ms must be positive"));
  }
  IgnoreSigpipeOnce();
  std::shared_ptr<gloo::transport::Device> device;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.interface_address;
    device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {  // gloo::EnforceNotMet derives from std::exception only.
    return absl::InvalidArgumentError(absl::StrCat(where, ": cannot listen on interface address '",
                                                   options.interface_address, "': ", e.what()));
  }
  auto context = std::make_shared<gloo::rendezvous::Context>(options.rank, options.size);
  context->setTimeout(options.timeout);
  internal::GlooStoreAdapter adapter(store, options.prefix, options.timeout);
  const auto start = Clock::now();
  auto failed = [&](const std::string& message) -> absl::Status {
    if (!adapter.error().ok()) {
      return absl::Status(adapter.error().code(),
                          absl::StrCat(where, " (timeout ", options.timeout.count(),
                                       " ms): ", adapter.error().message()));
    }
    const bool timed_out = Clock::now() - start >= options.timeout ||
                           absl::StrContains(message, "Timed out") ||
                           absl::StrContains(message, "timed out");
    return absl::Status(
        timed_out ? absl::StatusCode::kDeadlineExceeded : absl::StatusCode::kUnavailable,
        absl::StrCat(where, " (timeout ", options.timeout.count(), " ms): ", message));
  };
  try {
    context->connectFullMesh(adapter, device);
  } catch (const std::exception& e) {  // gloo::IoException, gloo::EnforceNotMet, ...
    return failed(e.what());
  }
  return std::unique_ptr<Communicator>(new GlooCommunicator(context, device));
}

}  // namespace da::dist
