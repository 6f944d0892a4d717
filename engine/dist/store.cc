#include "engine/dist/store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/dist/socket_io.h"
#include "engine/dist/store_auth.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

using internal::Clock;

constexpr uint8_t kOpSet = 1;
constexpr uint8_t kOpGet = 2;
constexpr uint8_t kOpDeletePrefix = 3;
constexpr uint8_t kReplyOk = 0;
constexpr uint8_t kReplyTimedOut = 1;
constexpr uint8_t kReplyFull = 2;
// A frame carries a key, a value, a few header bytes and (with a secret) its tag.
constexpr size_t kMaxFrameBytes =
    kMaxStoreKeyBytes + kMaxStoreValueBytes + 64 + internal::kStoreMacBytes;
// The hello's longest form, and the handshake's frames (store_auth.h).
constexpr size_t kHelloBytes = internal::kStoreHelloMagic.size() + 1 + internal::kStoreNonceBytes;
constexpr size_t kClientProofBytes = internal::kStoreNonceBytes + internal::kStoreMacBytes;
constexpr size_t kServerProofBytes = 1 + internal::kStoreMacBytes;
constexpr char kProofAccepted = 0;
constexpr char kProofRefused = 1;
// How often the coordinator logs refused secrets again while they keep coming.
constexpr std::chrono::seconds kRefusalLogPeriod{30};
// The client waits this much longer than a GET's own timeout for the server's answer.
constexpr std::chrono::seconds kGetReplyGrace{5};
// How long the accept loop rests after accept failed for want of a resource (descriptors,
// memory): the pending connection keeps the listening socket readable, so without a rest the loop
// would spin until the resource frees.
constexpr int kAcceptBackoffMs = 100;

bool IsOutOfResources(int error) {
  return error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM;
}

}  // namespace

class CoordinatorStoreServer::Impl {
 public:
  Impl(int listen_fd, int wake_fd, int port, const CoordinatorStoreOptions& options)
      : listen_fd_(listen_fd), wake_fd_(wake_fd), port_(port), options_(options) {
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }

  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    set_cv_.notify_all();
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
    accept_thread_.join();
    for (Connection& connection : connections_) connection.thread.join();
    for (Connection& connection : connections_) close(connection.fd);
    close(listen_fd_);
    close(wake_fd_);
  }

  int port() const { return port_; }

  int64_t refused_clients() {
    std::lock_guard<std::mutex> lock(mu_);
    return refused_clients_;
  }

 private:
  struct Connection {
    int fd = -1;
    std::thread thread;
    bool done = false;  // Guarded by mu_.
  };

  // A reply frame's body: a few header bytes, then (GET) the value, shared with the store so
  // that replies in flight never copy a value.
  struct Reply {
    std::string head;
    std::shared_ptr<const std::string> value;
  };

  void AcceptLoop() {
    while (true) {
      pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents & POLLIN) return;
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (IsOutOfResources(errno) && poll(&fds[1], 1, kAcceptBackoffMs) > 0) return;
        continue;
      }
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      // A client whose host vanished (no FIN, no RST) would hold its place until the process
      // ends: probes find it within a few minutes.
      (void)internal::EnableKeepAlive(fd);
      std::lock_guard<std::mutex> lock(mu_);
      ReapFinishedLocked();
      if (connections_.size() >= static_cast<size_t>(options_.max_connections)) {
        close(fd);  // Over the cap: the client sees its connection closed at once.
        continue;
      }
      connections_.emplace_back();
      Connection* connection = &connections_.back();
      connection->fd = fd;
      try {
        connection->thread = std::thread([this, connection] { Serve(connection); });
      } catch (const std::system_error&) {
        // No thread to be had (the process's limit): refuse this client, keep the others.
        connections_.pop_back();
        close(fd);
      }
    }
  }

  // Joins the threads of connections that have ended, so a long-lived coordinator with
  // reconnecting clients does not accumulate them.
  void ReapFinishedLocked() {
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (it->done) {
        it->thread.join();
        close(it->fd);
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Serve(Connection* connection) {
    const int fd = connection->fd;
    std::optional<internal::FrameTagger> tagger;
    const bool greeted = Greet(fd, tagger);
    while (greeted) {
      // Idle clients stay connected indefinitely; once a frame has begun, its body must come
      // within io_timeout. The thread ends when the client disconnects or the server stops.
      auto request = internal::ReadFrame(fd, kMaxFrameBytes, Clock::time_point::max(), wake_fd_,
                                         options_.io_timeout);
      if (!request.ok()) break;
      if (tagger.has_value() && !tagger->CheckReceived(*request)) break;
      Reply reply;
      if (!Handle(*request, reply)) break;
      if (!WriteReply(fd, reply, tagger.has_value() ? &*tagger : nullptr,
                      Clock::now() + options_.io_timeout)
               .ok()) {
        break;
      }
    }
    shutdown(fd, SHUT_RDWR);
    std::lock_guard<std::mutex> lock(mu_);
    connection->done = true;
  }

  // Sends the hello on a new connection and, with a secret, runs the handshake (store_auth.h);
  // true once the connection may carry requests. False when the client failed the handshake,
  // went away or took longer than io_timeout.
  bool Greet(int fd, std::optional<internal::FrameTagger>& tagger) {
    const auto deadline = Clock::now() + options_.handshake_timeout;
    std::string hello(internal::kStoreHelloMagic);
    hello.push_back(options_.secret.empty() ? 0 : 1);
    absl::StatusOr<std::string> server_nonce = std::string();
    if (!options_.secret.empty()) {
      server_nonce = internal::StoreRandomBytes(internal::kStoreNonceBytes);
      if (!server_nonce.ok()) return false;
      hello += *server_nonce;
    }
    if (!internal::WriteFrame(fd, hello, deadline).ok()) return false;
    if (!options_.secret.empty()) {
      auto answer = internal::ReadFrame(fd, kClientProofBytes, deadline, wake_fd_);
      if (!answer.ok()) return false;
      const std::string client_nonce = answer->substr(0, internal::kStoreNonceBytes);
      if (answer->size() != kClientProofBytes ||
          !internal::SameDigest(
              answer->substr(internal::kStoreNonceBytes),
              internal::StoreClientProof(options_.secret, *server_nonce, client_nonce))) {
        LogRefusal(fd);  // Counted before the client can hear it.
        (void)internal::WriteFrame(fd, std::string(1, kProofRefused), deadline);
        return false;
      }
      std::string proof(1, kProofAccepted);
      proof += internal::StoreServerProof(options_.secret, *server_nonce, client_nonce);
      if (!internal::WriteFrame(fd, proof, deadline).ok()) return false;
      tagger.emplace(internal::StoreSessionKey(options_.secret, *server_nonce, client_nonce),
                     /*server_end=*/true);
    }
    return true;
  }

  // A refused secret goes to the log, naming the peer, at most every kRefusalLogPeriod.
  void LogRefusal(int fd) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++refused_clients_;
      const auto now = Clock::now();
      if (refusal_logged_ != Clock::time_point() && now - refusal_logged_ < kRefusalLogPeriod) {
        return;
      }
      refusal_logged_ = now;
    }
    sockaddr_storage peer{};
    socklen_t length = sizeof(peer);
    char host[INET6_ADDRSTRLEN] = "?";
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) == 0) {
      if (peer.ss_family == AF_INET6) {
        const in6_addr& address = reinterpret_cast<sockaddr_in6*>(&peer)->sin6_addr;
        // An IPv4 client of the dual-stack socket is named as IPv4, not ::ffff:a.b.c.d.
        if (IN6_IS_ADDR_V4MAPPED(&address)) {
          inet_ntop(AF_INET, &address.s6_addr[12], host, sizeof(host));
        } else {
          inet_ntop(AF_INET6, &address, host, sizeof(host));
        }
      } else {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&peer)->sin_addr, host, sizeof(host));
      }
    }
    std::fprintf(stderr,
                 "[coordinator store] refused a client at %s: its shared secret does not match "
                 "(every rank needs the same --coordinator-secret-file)\n",
                 host);
  }

  static absl::Status WriteReply(int fd, const Reply& reply, internal::FrameTagger* tagger,
                                 Clock::time_point deadline) {
    std::string length_field;  // A value's length, before the value.
    if (reply.value != nullptr) {
      internal::PutU32(length_field, static_cast<uint32_t>(reply.value->size()));
    }
    const absl::string_view value = reply.value != nullptr ? *reply.value : absl::string_view();
    const std::string tag =
        tagger != nullptr ? tagger->NextSendTag({reply.head, length_field, value}) : "";
    std::string head;
    internal::PutU32(head, static_cast<uint32_t>(reply.head.size() + length_field.size() +
                                                 value.size() + tag.size()));
    head += reply.head;
    head += length_field;
    absl::Status status = internal::WriteAll(fd, head.data(), head.size(), deadline);
    if (status.ok()) status = internal::WriteAll(fd, value.data(), value.size(), deadline);
    if (status.ok()) status = internal::WriteAll(fd, tag.data(), tag.size(), deadline);
    return status;
  }

  // Returns false for a malformed request (the connection is then closed).
  bool Handle(const std::string& request, Reply& reply) {
    size_t pos = 0;
    uint8_t op = 0;
    std::string key;
    if (!internal::GetU8(request, pos, op) ||
        !internal::GetString(request, pos, kMaxStoreKeyBytes, key)) {
      return false;
    }
    if (op == kOpSet) {
      std::string value;
      if (!internal::GetString(request, pos, kMaxStoreValueBytes, value)) return false;
      return HandleSet(std::move(key), std::move(value), reply);
    }
    if (op == kOpGet) {
      int64_t timeout_ms = 0;
      if (!internal::GetI64(request, pos, timeout_ms) || timeout_ms < 0) return false;
      timeout_ms = std::min<int64_t>(timeout_ms, kMaxGetTimeout.count());
      auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
      std::unique_lock<std::mutex> lock(mu_);
      bool found =
          set_cv_.wait_until(lock, deadline, [&] { return stopping_ || values_.count(key) > 0; });
      if (stopping_) return false;
      reply.head.push_back(static_cast<char>(found ? kReplyOk : kReplyTimedOut));
      if (found) reply.value = values_.at(key);
      return true;
    }
    if (op == kOpDeletePrefix) {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = values_.lower_bound(key);
           it != values_.end() && it->first.compare(0, key.size(), key) == 0;) {
        held_bytes_ -= static_cast<int64_t>(it->first.size() + it->second->size());
        it = values_.erase(it);
      }
      reply.head.push_back(static_cast<char>(kReplyOk));
      return true;
    }
    return false;
  }

  bool HandleSet(std::string key, std::string value, Reply& reply) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = values_.find(key);
      const int64_t replaced =
          it == values_.end() ? 0 : static_cast<int64_t>(key.size() + it->second->size());
      const int64_t held = held_bytes_ - replaced + static_cast<int64_t>(key.size() + value.size());
      if (held > options_.max_bytes) {
        reply.head.push_back(static_cast<char>(kReplyFull));
        internal::PutI64(reply.head, held_bytes_);
        internal::PutI64(reply.head, options_.max_bytes);
        return true;
      }
      held_bytes_ = held;
      values_[std::move(key)] = std::make_shared<const std::string>(std::move(value));
    }
    set_cv_.notify_all();
    reply.head.push_back(static_cast<char>(kReplyOk));
    return true;
  }

  const int listen_fd_;
  const int wake_fd_;  // An eventfd: readable once the server is stopping.
  const int port_;
  const CoordinatorStoreOptions options_;
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable set_cv_;
  bool stopping_ = false;  // Guarded by mu_.
  // Guarded by mu_, as is held_bytes_ (the sum of its keys' and values' sizes).
  std::map<std::string, std::shared_ptr<const std::string>> values_;
  int64_t held_bytes_ = 0;
  int64_t refused_clients_ = 0;        // Guarded by mu_, as is refusal_logged_.
  Clock::time_point refusal_logged_;   // When a refusal was last logged (epoch: never).
  std::list<Connection> connections_;  // Guarded by mu_ (list: stable addresses).
};

CoordinatorStoreServer::CoordinatorStoreServer(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
CoordinatorStoreServer::~CoordinatorStoreServer() = default;
int CoordinatorStoreServer::port() const { return impl_->port(); }
int64_t CoordinatorStoreServer::refused_clients() const { return impl_->refused_clients(); }

absl::StatusOr<std::unique_ptr<CoordinatorStoreServer>> CoordinatorStoreServer::Start(
    const std::string& host_port, const CoordinatorStoreOptions& options) {
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError(absl::StrCat("coordinator store: max_connections is ",
                                                   options.max_connections, "; must be >= 1"));
  }
  if (options.max_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("coordinator store: max_bytes is ", options.max_bytes, "; must be >= 0"));
  }
  if (options.io_timeout.count() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "coordinator store: io_timeout is ", options.io_timeout.count(), " ms; must be >= 1 ms"));
  }
  if (options.handshake_timeout.count() < 1) {
    return absl::InvalidArgumentError(absl::StrCat("coordinator store: handshake_timeout is ",
                                                   options.handshake_timeout.count(),
                                                   " ms; must be >= 1 ms"));
  }
  DA_RETURN_IF_ERROR(internal::CheckStoreSecret(options.secret, "coordinator store: secret"));
  auto address = internal::ParseHostPort(host_port);
  if (!address.ok()) return address.status();
  if (address->host == "0.0.0.0") address->host.clear();
  auto listen_fd = internal::ListenTcp(*address);
  if (!listen_fd.ok()) {
    return absl::Status(listen_fd.status().code(),
                        absl::StrCat("coordinator store: ", listen_fd.status().message()));
  }
  auto port = internal::LocalPort(*listen_fd);
  int wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (!port.ok() || wake_fd < 0) {
    close(*listen_fd);
    if (wake_fd >= 0) close(wake_fd);
    return absl::InternalError(absl::StrCat("coordinator store on ", host_port, ": cannot set up (",
                                            std::strerror(errno), ")"));
  }
  return std::unique_ptr<CoordinatorStoreServer>(
      new CoordinatorStoreServer(std::make_unique<Impl>(*listen_fd, wake_fd, *port, options)));
}

namespace {

// Reads the coordinator's hello on a new connection and, when it or this client has a secret,
// runs the handshake (store_auth.h). Returns the connection's tagger (none without a secret).
// UNAUTHENTICATED when the secrets differ and FAILED_PRECONDITION when the peer is no store
// (retrying cannot help), UNAVAILABLE otherwise.
absl::StatusOr<std::optional<internal::FrameTagger>> Handshake(int fd, const std::string& secret,
                                                               Clock::time_point deadline,
                                                               const std::string& host_port) {
  const std::string where = absl::StrCat("coordinator store ", host_port);
  const char* const fix = "every rank needs the same --coordinator-secret-file";
  auto hello = internal::ReadFrame(fd, kHelloBytes, deadline);
  // Another protocol's first bytes read as a frame too long for a hello.
  if (!hello.ok() && !absl::IsInvalidArgument(hello.status())) {
    return absl::UnavailableError(
        absl::StrCat(where, ": no greeting (", hello.status().message(), ")"));
  }
  if (!hello.ok() || hello->size() <= internal::kStoreHelloMagic.size() ||
      !absl::StartsWith(*hello, internal::kStoreHelloMagic)) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, " did not greet as a da coordinator store: is it rank 0's port?"));
  }
  const bool authenticated = (*hello)[internal::kStoreHelloMagic.size()] != 0;
  if (authenticated && secret.empty()) {
    return absl::UnauthenticatedError(
        absl::StrCat(where, " has a shared secret and this rank has none: ", fix));
  }
  if (!authenticated && !secret.empty()) {
    return absl::UnauthenticatedError(
        absl::StrCat(where, " has no shared secret and this rank has one: ", fix));
  }
  if (!authenticated) return std::nullopt;
  if (hello->size() != kHelloBytes) {
    return absl::UnavailableError(absl::StrCat(where, ": malformed greeting"));
  }
  const std::string server_nonce = hello->substr(kHelloBytes - internal::kStoreNonceBytes);
  DA_ASSIGN_OR_RETURN(const std::string client_nonce,
                      internal::StoreRandomBytes(internal::kStoreNonceBytes));
  absl::Status sent = internal::WriteFrame(
      fd, client_nonce + internal::StoreClientProof(secret, server_nonce, client_nonce), deadline);
  auto answer = sent.ok() ? internal::ReadFrame(fd, kServerProofBytes, deadline)
                          : absl::StatusOr<std::string>(sent);
  if (!answer.ok()) {
    return absl::UnavailableError(
        absl::StrCat(where, ": handshake failed (", answer.status().message(), ")"));
  }
  if (*answer == std::string(1, kProofRefused)) {
    return absl::UnauthenticatedError(
        absl::StrCat(where, " refused this rank's shared secret: ", fix));
  }
  if (answer->size() != kServerProofBytes || (*answer)[0] != kProofAccepted ||
      !internal::SameDigest(answer->substr(1),
                            internal::StoreServerProof(secret, server_nonce, client_nonce))) {
    return absl::UnauthenticatedError(absl::StrCat(
        where,
        " could not prove it knows this rank's shared secret (another secret, or not the "
        "coordinator): ",
        fix));
  }
  return internal::FrameTagger(internal::StoreSessionKey(secret, server_nonce, client_nonce),
                               /*server_end=*/false);
}

class CoordinatorStoreClient : public KeyValueStore {
 public:
  CoordinatorStoreClient(std::string host_port, internal::HostPort address,
                         std::chrono::milliseconds io_timeout, std::string secret, int fd,
                         std::optional<internal::FrameTagger> tagger)
      : host_port_(std::move(host_port)),
        address_(std::move(address)),
        io_timeout_(io_timeout),
        secret_(std::move(secret)),
        fd_(fd),
        tagger_(std::move(tagger)) {}

  ~CoordinatorStoreClient() override {
    if (fd_ >= 0) close(fd_);
  }

  absl::Status Set(const std::string& key, const std::string& value) override {
    if (key.size() > kMaxStoreKeyBytes || value.size() > kMaxStoreValueBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("store Set of key '", key.substr(0, 64), "': key of ", key.size(),
                       " bytes (limit ", kMaxStoreKeyBytes, ") or value of ", value.size(),
                       " bytes (limit ", kMaxStoreValueBytes, ")"));
    }
    std::string request(1, static_cast<char>(kOpSet));
    internal::PutString(request, key);
    internal::PutString(request, value);
    const std::string what = absl::StrCat("Set of key '", key, "'");
    auto reply = Call(std::move(request), Clock::now() + io_timeout_, what, io_timeout_);
    if (!reply.ok()) return reply.status();
    size_t pos = 0;
    uint8_t code = 0;
    int64_t held_bytes = 0;
    int64_t max_bytes = 0;
    if (!internal::GetU8(*reply, pos, code)) return Broken(what, "empty reply");
    if (code == kReplyFull && internal::GetI64(*reply, pos, held_bytes) &&
        internal::GetI64(*reply, pos, max_bytes)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "coordinator store ", host_port_, ": ", what, " (", key.size() + value.size(),
          " bytes) refused: the store holds ", held_bytes, " bytes of its limit of ", max_bytes));
    }
    if (code != kReplyOk) return Broken(what, "malformed reply");
    return absl::OkStatus();
  }

  absl::Status DeletePrefix(const std::string& prefix) override {
    if (prefix.size() > kMaxStoreKeyBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "store DeletePrefix: prefix of ", prefix.size(), " bytes exceeds ", kMaxStoreKeyBytes));
    }
    std::string request(1, static_cast<char>(kOpDeletePrefix));
    internal::PutString(request, prefix);
    const std::string what = absl::StrCat("DeletePrefix of '", prefix, "'");
    auto reply = Call(std::move(request), Clock::now() + io_timeout_, what, io_timeout_);
    if (!reply.ok()) return reply.status();
    size_t pos = 0;
    uint8_t code = 0;
    if (!internal::GetU8(*reply, pos, code) || code != kReplyOk) {
      return Broken(what, "malformed reply");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Get(const std::string& key,
                                  std::chrono::milliseconds timeout) override {
    if (key.size() > kMaxStoreKeyBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("store Get: key of ", key.size(), " bytes exceeds ", kMaxStoreKeyBytes));
    }
    timeout = std::clamp(timeout, std::chrono::milliseconds(0), kMaxGetTimeout);
    std::string request(1, static_cast<char>(kOpGet));
    internal::PutString(request, key);
    internal::PutI64(request, timeout.count());
    std::string what = absl::StrCat("Get of key '", key, "'");
    auto reply = Call(std::move(request), Clock::now() + timeout + kGetReplyGrace, what, timeout);
    if (!reply.ok()) return reply.status();
    size_t pos = 0;
    uint8_t code = 0;
    std::string value;
    if (internal::GetU8(*reply, pos, code) && code == kReplyTimedOut) {
      return absl::DeadlineExceededError(absl::StrCat("coordinator store ", host_port_, ": ", what,
                                                      " not set within ", timeout.count(), " ms"));
    }
    if (code != kReplyOk || !internal::GetString(*reply, pos, kMaxStoreValueBytes, value)) {
      return Broken(what, "malformed reply");
    }
    return value;
  }

 private:
  // Sends one request and reads its reply on the shared connection, reconnecting first if an
  // earlier call lost it.
  absl::StatusOr<std::string> Call(std::string request, Clock::time_point deadline,
                                   const std::string& what, std::chrono::milliseconds timeout) {
    std::lock_guard<std::mutex> lock(mu_);
    if (fd_ < 0) {
      const auto connect_deadline = Clock::now() + io_timeout_;
      auto fd = internal::ConnectTcp(address_, connect_deadline);
      if (!fd.ok()) {
        return absl::UnavailableError(absl::StrCat("coordinator store ", host_port_, ": ", what,
                                                   ": ", fd.status().message()));
      }
      auto tagger = Handshake(*fd, secret_, connect_deadline, host_port_);
      if (!tagger.ok()) {
        close(*fd);
        return absl::Status(tagger.status().code(),
                            absl::StrCat(tagger.status().message(), " (", what, ")"));
      }
      (void)internal::EnableKeepAlive(*fd);
      fd_ = *fd;
      tagger_ = *std::move(tagger);
    }
    if (tagger_.has_value()) request += tagger_->NextSendTag({request});
    absl::Status status = internal::WriteFrame(fd_, request, deadline);
    absl::StatusOr<std::string> reply =
        status.ok() ? internal::ReadFrame(fd_, kMaxFrameBytes, deadline) : status;
    if (reply.ok() && (!tagger_.has_value() || tagger_->CheckReceived(*reply))) return reply;
    if (reply.ok()) {
      reply = absl::UnavailableError("the reply failed its authentication tag");
    }
    // The connection is in an unknown state (a reply may still come): drop it.
    close(fd_);
    fd_ = -1;
    auto code = reply.status().code() == absl::StatusCode::kDeadlineExceeded
                    ? absl::StatusCode::kDeadlineExceeded
                    : absl::StatusCode::kUnavailable;
    return absl::Status(code,
                        absl::StrCat("coordinator store ", host_port_, ": ", what, " (timeout ",
                                     timeout.count(), " ms): ", reply.status().message()));
  }

  absl::Status Broken(const std::string& what, const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    return absl::UnavailableError(
        absl::StrCat("coordinator store ", host_port_, ": ", what, ": ", why));
  }

  const std::string host_port_;
  const internal::HostPort address_;
  const std::chrono::milliseconds io_timeout_;
  const std::string secret_;  // Empty: no authentication.
  std::mutex mu_;
  int fd_;                                       // Guarded by mu_; -1 when disconnected.
  std::optional<internal::FrameTagger> tagger_;  // Guarded by mu_; fd_'s, with a secret.
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyValueStore>> ConnectCoordinatorStore(
    const std::string& host_port, std::chrono::milliseconds timeout, const std::string& secret) {
  DA_RETURN_IF_ERROR(internal::CheckStoreSecret(secret, "the coordinator store's secret"));
  auto address = internal::ParseHostPort(host_port);
  if (!address.ok()) return address.status();
  if (address->port == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("coordinator address '", host_port, "' needs a port"));
  }
  const auto deadline = Clock::now() + timeout;
  absl::Status last = absl::UnavailableError("no attempt");
  // Retry refused connections: the coordinator may not be listening yet.
  auto backoff = std::chrono::milliseconds(10);
  while (true) {
    auto fd = internal::ConnectTcp(*address, deadline);
    if (fd.ok()) {
      // A connection the coordinator closes at once (over its cap) is retried like a refused
      // one; another secret, or a peer that is no store, is not.
      auto tagger = Handshake(*fd, secret, deadline, host_port);
      if (tagger.ok()) {
        (void)internal::EnableKeepAlive(*fd);
        return std::unique_ptr<KeyValueStore>(new CoordinatorStoreClient(
            host_port, *address, timeout, secret, *fd, *std::move(tagger)));
      }
      close(*fd);
      if (!absl::IsUnavailable(tagger.status())) return tagger.status();
      last = tagger.status();
    } else {
      last = fd.status();
    }
    if (last.code() == absl::StatusCode::kInvalidArgument) return last;
    const auto now = Clock::now();
    if (now >= deadline) break;
    // Waiting for the coordinator to start listening: nothing to wait on but time.
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
  }
  return absl::UnavailableError(absl::StrCat("coordinator store at ", host_port,
                                             " not reachable within ", timeout.count(),
                                             " ms: ", last.message()));
}

}  // namespace da::dist
