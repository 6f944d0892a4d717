// How a client reaches da-server: plaintext or TLS (optionally with a client certificate for
// mutual TLS), and a bearer token sent with every call.
//
//   ConnectionFiles files{.tls_ca = "ca.pem", .token_file = "token.txt"};
//   absl::StatusOr<ConnectionOptions> options = LoadConnectionOptions(files);
//   if (!options.ok()) return options.status();  // Names the flag and the file.
//   std::shared_ptr<grpc::Channel> channel = MakeChannel("db.example:50051", *options);
//   AttentionClient client(channel);  // Every call on channel carries the token.
//
// The token travels as `authorization: Bearer <token>` metadata, added by a channel interceptor
// rather than call credentials: gRPC refuses call credentials on an insecure channel, and a
// server may ask for a token without TLS (e.g. behind a TLS-terminating proxy). Without TLS the
// token crosses the network in the clear.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace da::client {

// The longest deadline a flag may ask for (--timeout-ms, --deadline-ms): a year. Far past it the
// deadline, a nanosecond count, overflows into the past; 0 asks for none.
inline constexpr int64_t kMaxTimeoutMs = int64_t{365} * 24 * 3600 * 1000;

// What the channel uses: PEM contents and the token, already read.
struct ConnectionOptions {
  bool tls = false;
  std::string tls_root_certs_pem;   // Verifies the server; empty with tls: the system's roots.
  std::string tls_cert_chain_pem;   // Client certificate for mutual TLS; empty: none.
  std::string tls_private_key_pem;  // Its key; set exactly when tls_cert_chain_pem is.
  // Name checked against the server's certificate instead of the target's host (tests, or an
  // address that is not in the certificate). Empty: the target's host.
  std::string tls_server_name = {};
  std::string bearer_token;  // Empty: no authorization metadata.
  int64_t max_message_bytes = 1LL << 30;
  // Channels whose options are equal share one connection; a distinct id gives a channel its own
  // (the load generator's --channels).
  int channel_id = 0;
};

// The paths as given on da-client's command line (--tls-ca, --tls-cert, --tls-key,
// --tls-server-name, --token-file). Any TLS field set turns TLS on.
struct ConnectionFiles {
  std::string tls_ca = {};
  std::string tls_cert = {};
  std::string tls_key = {};
  std::string tls_server_name;
  std::string token_file = {};
};

// Reads the files of `files`. InvalidArgument naming the flag and the path when a file cannot be
// read, when only one of --tls-cert and --tls-key is given, or when the token file holds no token
// (the token is its first line that is neither blank nor a '#' comment, trimmed).
absl::StatusOr<ConnectionOptions> LoadConnectionOptions(const ConnectionFiles& files);

// A channel to target (not yet connected) with DefaultChannelArguments(max_message_bytes),
// TLS when options.tls, and the bearer token on every call when set.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           const ConnectionOptions& options);

// Makes channels to target with options, each with a connection of its own (a channel_id no
// other channel has): what AttentionClient sends a retry on (client/retry.h). Thread safe.
std::function<std::shared_ptr<grpc::Channel>()> FreshChannels(const std::string& target,
                                                              const ConnectionOptions& options);

}  // namespace da::client
