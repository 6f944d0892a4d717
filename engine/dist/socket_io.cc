#include "engine/dist/socket_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace da::dist::internal {
namespace {

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) return 0;
  return left.count() > 1'000'000'000 ? 1'000'000'000 : static_cast<int>(left.count());
}

// Waits until fd has `events` (or wake_fd is readable). OK, DEADLINE_EXCEEDED or CANCELLED.
absl::Status WaitFd(int fd, short events, Clock::time_point deadline, int wake_fd,
                    const char* what) {
  while (true) {
    pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    int n = poll(fds, wake_fd >= 0 ? 2 : 1, RemainingMs(deadline));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("poll while ", what, ": ", std::strerror(errno)));
    }
    if (wake_fd >= 0 && (fds[1].revents & POLLIN)) {
      return absl::CancelledError(absl::StrCat(what, " cancelled: server stopping"));
    }
    if (n > 0) return absl::OkStatus();
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, " timed out"));
    }
  }
}

absl::StatusOr<addrinfo*> Resolve(const HostPort& address, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  std::string port = std::to_string(address.port);
  const char* host = address.host.empty() ? nullptr : address.host.c_str();
  if (passive && address.host.empty()) hints.ai_family = AF_INET;  // ListenTcp's fallback.
  addrinfo* result = nullptr;
  int rc = getaddrinfo(host, port.c_str(), &hints, &result);
  if (rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve host '", address.host, "': ", gai_strerror(rc)));
  }
  return result;
}

}  // namespace

absl::StatusOr<HostPort> ParseHostPort(const std::string& host_port) {
  size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("address '", host_port, "' is not host:port"));
  }
  HostPort out;
  out.host = host_port.substr(0, colon);
  if (out.host.size() >= 2 && out.host.front() == '[' && out.host.back() == ']') {
    out.host = out.host.substr(1, out.host.size() - 2);
  }
  if (!absl::SimpleAtoi(host_port.substr(colon + 1), &out.port) || out.port < 0 ||
      out.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("address '", host_port, "' has no valid port (0..65535)"));
  }
  return out;
}

absl::StatusOr<int> ConnectTcp(const HostPort& address, Clock::time_point deadline) {
  auto resolved = Resolve(address, /*passive=*/false);
  if (!resolved.ok()) return resolved.status();
  std::string last_error = "no address";
  for (addrinfo* ai = *resolved; ai != nullptr; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    int rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      absl::Status waited = WaitFd(fd, POLLOUT, deadline, -1, "connect");
      int error = 0;
      socklen_t len = sizeof(error);
      if (waited.ok() && getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0) {
        rc = 0;
      } else {
        last_error = waited.ok() ? std::strerror(error) : std::string(waited.message());
      }
    } else if (rc != 0) {
      last_error = std::strerror(errno);
    }
    if (rc == 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      freeaddrinfo(*resolved);
      return fd;
    }
    close(fd);
  }
  freeaddrinfo(*resolved);
  return absl::UnavailableError(
      absl::StrCat("connect to ", address.host, ":", address.port, " failed: ", last_error));
}

namespace {

// Every interface, IPv6 and IPv4 alike: one socket on "::" that also takes IPv4 (IPV6_V6ONLY
// off); -1 where the host has no IPv6 (the socket or the bind fails), for the IPv4 fallback.
int ListenDualStack(int port) {
  const int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in6 any{};
  any.sin6_family = AF_INET6;
  any.sin6_addr = in6addr_any;
  any.sin6_port = htons(static_cast<uint16_t>(port));
  if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) == 0 &&
      bind(fd, reinterpret_cast<const sockaddr*>(&any), sizeof(any)) == 0 && listen(fd, 128) == 0) {
    return fd;
  }
  close(fd);
  return -1;
}

}  // namespace

absl::Status EnableKeepAlive(int fd, std::chrono::seconds idle, std::chrono::seconds interval,
                             int probes) {
  const int on = 1;
  const int idle_s = static_cast<int>(idle.count());
  const int interval_s = static_cast<int>(interval.count());
  if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on)) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof(idle_s)) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof(interval_s)) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes)) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot turn on TCP keep-alive: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ListenTcp(const HostPort& address) {
  if (address.host.empty()) {
    if (const int fd = ListenDualStack(address.port); fd >= 0) return fd;
  }
  auto resolved = Resolve(address, /*passive=*/true);
  if (!resolved.ok()) return resolved.status();
  std::string last_error = "no address";
  for (addrinfo* ai = *resolved; ai != nullptr; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0) {
      freeaddrinfo(*resolved);
      return fd;
    }
    last_error = std::strerror(errno);
    close(fd);
  }
  freeaddrinfo(*resolved);
  return absl::UnavailableError(
      absl::StrCat("listen on ", address.host, ":", address.port, " failed: ", last_error));
}

absl::StatusOr<int> LocalPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return absl::InternalError(absl::StrCat("getsockname: ", std::strerror(errno)));
  }
  if (addr.ss_family == AF_INET6) {
    return ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  }
  return ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

absl::Status WriteAll(int fd, const void* data, size_t bytes, Clock::time_point deadline) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = send(fd, p, bytes, MSG_NOSIGNAL);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      absl::Status waited = WaitFd(fd, POLLOUT, deadline, -1, "write");
      if (!waited.ok()) return waited;
      continue;
    }
    return absl::UnavailableError(
        absl::StrCat("write failed: connection lost (", std::strerror(errno), ")"));
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, void* data, size_t bytes, Clock::time_point deadline, int wake_fd) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    ssize_t n = recv(fd, p, bytes, 0);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return absl::UnavailableError("read failed: connection closed by peer");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      absl::Status waited = WaitFd(fd, POLLIN, deadline, wake_fd, "read");
      if (!waited.ok()) return waited;
      continue;
    }
    return absl::UnavailableError(
        absl::StrCat("read failed: connection lost (", std::strerror(errno), ")"));
  }
  return absl::OkStatus();
}

absl::Status WriteFrame(int fd, const std::string& body, Clock::time_point deadline) {
  std::string frame;
  frame.reserve(4 + body.size());
  PutU32(frame, static_cast<uint32_t>(body.size()));
  frame += body;
  return WriteAll(fd, frame.data(), frame.size(), deadline);
}

absl::StatusOr<std::string> ReadFrame(int fd, size_t max_bytes, Clock::time_point deadline,
                                      int wake_fd, Clock::duration body_timeout) {
  unsigned char header[4];
  absl::Status status = ReadAll(fd, header, 4, deadline, wake_fd);
  if (!status.ok()) return status;
  uint32_t length = uint32_t{header[0]} | uint32_t{header[1]} << 8 | uint32_t{header[2]} << 16 |
                    uint32_t{header[3]} << 24;
  if (length > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame of ", length, " bytes exceeds the limit of ", max_bytes));
  }
  const Clock::time_point now = Clock::now();
  const Clock::time_point body_deadline =
      deadline - now > body_timeout ? now + body_timeout : deadline;
  std::string body;
  while (body.size() < length) {
    const size_t got = body.size();
    body.resize(got + std::min<size_t>(length - got, kFrameReadStep));
    status = ReadAll(fd, body.data() + got, body.size() - got, body_deadline, wake_fd);
    if (!status.ok()) return status;
  }
  return body;
}

void PutU32(std::string& out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

void PutI64(std::string& out, int64_t value) {
  uint64_t bits = static_cast<uint64_t>(value);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
}

void PutString(std::string& out, const std::string& value) {
  PutU32(out, static_cast<uint32_t>(value.size()));
  out += value;
}

bool GetU8(const std::string& in, size_t& pos, uint8_t& value) {
  if (pos + 1 > in.size()) return false;
  value = static_cast<uint8_t>(in[pos++]);
  return true;
}

bool GetI64(const std::string& in, size_t& pos, int64_t& value) {
  if (pos + 8 > in.size()) return false;
  uint64_t bits = 0;
  for (int i = 0; i < 8; ++i) bits |= uint64_t{static_cast<uint8_t>(in[pos + i])} << (8 * i);
  pos += 8;
  value = static_cast<int64_t>(bits);
  return true;
}

bool GetString(const std::string& in, size_t& pos, size_t max_bytes, std::string& value) {
  if (pos + 4 > in.size()) return false;
  uint32_t length = 0;
  for (int i = 0; i < 4; ++i) length |= uint32_t{static_cast<uint8_t>(in[pos + i])} << (8 * i);
  pos += 4;
  if (length > max_bytes || pos + length > in.size()) return false;
  value = in.substr(pos, length);
  pos += length;
  return true;
}

}  // namespace da::dist::internal
