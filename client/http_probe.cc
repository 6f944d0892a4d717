#include "client/http_probe.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace da::client {
namespace {

using Clock = std::chrono::steady_clock;

// Closes a descriptor when it goes out of scope.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

// Milliseconds left until deadline, at least 0.
int MillisLeft(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// Waits until fd is ready for events; false when the deadline passes first.
bool WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int ready = poll(&p, 1, MillisLeft(deadline));
    if (ready > 0) return true;
    if (ready == 0) return false;
    if (errno != EINTR) return true;  // The next call on fd says what is wrong.
  }
}

// A connected non-blocking socket to one of host:port's addresses.
absl::Status Connect(const std::string& host, const std::string& port, const std::string& address,
                     Clock::time_point deadline, Fd* out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int failed = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); failed != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", address, ": ", gai_strerror(failed)));
  }
  std::string last_error = "no address";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    Fd fd{socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol)};
    if (fd.fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    if (connect(fd.fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last_error = std::strerror(errno);
      continue;
    }
    if (!WaitFor(fd.fd, POLLOUT, deadline)) {
      freeaddrinfo(found);
      return absl::DeadlineExceededError(
          absl::StrCat("no connection to ", address, " within the timeout"));
    }
    int error = 0;
    socklen_t size = sizeof(error);
    getsockopt(fd.fd, SOL_SOCKET, SO_ERROR, &error, &size);
    if (error != 0) {
      last_error = std::strerror(error);
      continue;
    }
    std::swap(out->fd, fd.fd);
    freeaddrinfo(found);
    return absl::OkStatus();
  }
  freeaddrinfo(found);
  return absl::UnavailableError(absl::StrCat("cannot connect to ", address, ": ", last_error));
}

// The Content-Length of an answer's head (status line and headers); -1 when it has none.
int64_t ContentLength(const std::string& head) {
  for (absl::string_view line : absl::StrSplit(head, "\r\n")) {
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos ||
        !absl::EqualsIgnoreCase(line.substr(0, colon), "content-length")) {
      continue;
    }
    int64_t value = 0;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(colon + 1)), &value) &&
        value >= 0) {
      return value;
    }
  }
  return -1;
}

}  // namespace

absl::StatusOr<HttpAnswer> HttpGet(const std::string& host_port, const std::string& path,
                                   int64_t timeout_ms) {
  // "host:port" or "[v6]:port".
  std::string host;
  std::string port;
  const size_t colon = host_port.rfind(':');
  if (colon != std::string::npos && colon + 1 < host_port.size()) {
    host = host_port.substr(0, colon);
    port = host_port.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
  }
  int port_number = 0;
  if (host.empty() || !absl::SimpleAtoi(port, &port_number) || port_number < 1 ||
      port_number > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("the probe address must be HOST:PORT (port 1-65535), got '", host_port, "'"));
  }
  const Clock::time_point deadline =
      Clock::now() + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 1));
  Fd fd;
  if (absl::Status connected = Connect(host, port, host_port, deadline, &fd); !connected.ok()) {
    return connected;
  }

  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: ", host_port,
                   "\r\nUser-Agent: da-client\r\nConnection: close\r\n\r\n");
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = send(fd.fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!WaitFor(fd.fd, POLLOUT, deadline)) {
        return absl::DeadlineExceededError(absl::StrCat("sending to ", host_port, " timed out"));
      }
    } else {
      return absl::UnavailableError(
          absl::StrCat("cannot send to ", host_port, ": ", std::strerror(errno)));
    }
  }

  // Until the server closes (Connection: close), or the head and a body of its Content-Length
  // (or kMaxHttpBody) are in.
  std::string answer;
  size_t head_end = std::string::npos;
  int64_t content_length = -1;
  char buffer[4096];
  for (;;) {
    if (head_end != std::string::npos) {
      const int64_t body = static_cast<int64_t>(answer.size() - head_end - 4);
      if (body >= kMaxHttpBody || (content_length >= 0 && body >= content_length)) break;
    }
    const ssize_t n = recv(fd.fd, buffer, sizeof(buffer), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) {
        if (!WaitFor(fd.fd, POLLIN, deadline)) {
          return absl::DeadlineExceededError(
              absl::StrCat("no whole answer from ", host_port, " within the timeout"));
        }
        continue;
      }
      return absl::UnavailableError(
          absl::StrCat("cannot read from ", host_port, ": ", std::strerror(errno)));
    }
    answer.append(buffer, static_cast<size_t>(n));
    if (head_end == std::string::npos) {
      head_end = answer.find("\r\n\r\n");
      if (head_end == std::string::npos && answer.size() > kMaxHttpBody) break;
      if (head_end != std::string::npos) content_length = ContentLength(answer.substr(0, head_end));
    }
  }

  // "HTTP/1.1 503 Service Unavailable".
  HttpAnswer parsed;
  const size_t space = answer.find(' ');
  if (answer.rfind("HTTP/1.", 0) != 0 || space == std::string::npos ||
      !absl::SimpleAtoi(answer.substr(space + 1, 3), &parsed.status) || parsed.status < 100 ||
      parsed.status > 599 || head_end == std::string::npos) {
    return absl::InternalError(absl::StrCat("the answer from ", host_port, " is not HTTP: '",
                                            absl::CEscape(answer.substr(0, 64)), "'"));
  }
  parsed.body = answer.substr(head_end + 4, kMaxHttpBody);
  if (content_length >= 0 && static_cast<int64_t>(parsed.body.size()) > content_length) {
    parsed.body.resize(static_cast<size_t>(content_length));
  }
  return parsed;
}

}  // namespace da::client
