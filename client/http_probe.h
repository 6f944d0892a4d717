// A plain HTTP GET of da-server's probes (/livez and /readyz on its metrics port), for health
// checks that cannot speak to the gRPC port: one that is TLS-only, or mutual TLS (DESIGN §5:
// probes that keep working when the gRPC port is TLS-only). The probes carry no data, so plain
// HTTP is what they serve.
//
//   absl::StatusOr<HttpAnswer> answer = HttpGet("127.0.0.1:9464", "/readyz", 5000);
//   // answer->status: 200 ready ("ok"), 503 not ready (the reason in answer->body)
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace da::client {

struct HttpAnswer {
  int status = 0;    // The status line's code.
  std::string body;  // At most kMaxHttpBody bytes of it.
};

inline constexpr int64_t kMaxHttpBody = 64 << 10;

// GET path from host:port ("[::1]:9464" for IPv6) over HTTP/1.1 with "Connection: close", the
// whole exchange within timeout_ms (> 0). Errors: INVALID_ARGUMENT for an address without a port,
// UNAVAILABLE naming the address when it cannot be resolved or connected to, DEADLINE_EXCEEDED
// when the answer does not come in time, INTERNAL for an answer that is not HTTP.
absl::StatusOr<HttpAnswer> HttpGet(const std::string& host_port, const std::string& path,
                                   int64_t timeout_ms);

}  // namespace da::client
