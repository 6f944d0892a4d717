// Transport security and bearer-token authentication of the gRPC port.
//
//   SecurityOptions security{.tls_cert_file = "server.pem", .tls_key_file = "server.key",
//                            .auth_token_file = "tokens.txt"};
//   DA_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
//                       MakeServerCredentials(security));
//   DA_ASSIGN_OR_RETURN(std::unique_ptr<BearerTokenAuthenticator> auth,
//                       BearerTokenAuthenticator::FromFile(security.auth_token_file));
//   grpc::Status allowed = auth->Check(*context);  // In each protected handler.
//
// Every file is read and checked when the server starts, so that a bad file stops the server
// instead of failing the first handshake or call. Error messages name the flag and the file
// (the fields below mirror da-server's flags) and never contain key material or tokens.
// The TLS files are read again every tls_reload_seconds while the server runs, so that a renewed
// certificate (or client CA) is served from the next handshake on without a restart; gRPC does
// not check what it reloads, so TlsFileWatcher runs the start-up checks again at the same
// interval (the server turns readiness off while they fail). The token file is read only at
// start.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include <array>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace da::server {

// "= {}" on every field keeps -Wextra quiet about designated initializers that leave some out.
struct SecurityOptions {
  // PEM certificate chain and private key of the server: both or neither. Both: TLS on the gRPC
  // port; neither: plaintext.
  std::string tls_cert_file = {};
  std::string tls_key_file = {};
  // PEM CA certificate(s): mutual TLS, every client must present a certificate signed by one of
  // them. Requires tls_cert_file and tls_key_file.
  std::string tls_client_ca_file = {};
  // How often the three TLS files are read again for a renewed certificate, key or client CA
  // (seconds, at least 1). Files are compared by content; a change takes effect from the next
  // handshake on.
  int tls_reload_seconds = 60;
  // Bearer tokens, one per line, each optionally followed by "max_priority=N" (TokenEntry); blank
  // lines and lines starting with '#' are ignored. Empty: no authentication.
  std::string auth_token_file = {};
};

// Insecure credentials when no TLS file is set, otherwise TLS (mutual with tls_client_ca_file)
// that watches the files (see tls_reload_seconds). InvalidArgument naming the flag and the file
// when a file is missing, unreadable or not PEM, when the key does not belong to the certificate,
// or when only one of cert and key is given; InvalidArgument when tls_reload_seconds < 1.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const SecurityOptions& options);

// What the TLS files hold, once they passed the checks.
struct TlsFilesState {
  // notAfter of the first certificate of tls_cert_file (the serving certificate), in Unix
  // seconds.
  int64_t certificate_not_after_unix_seconds = 0;
};

// The file checks MakeServerCredentials runs at start, run on the files as they are now: the
// certificate file holds a PEM certificate, the key file an unencrypted PEM key that belongs to
// its first certificate, and the client CA file (when set) a PEM certificate. InvalidArgument
// naming the flag, the file and what is wrong. Requires tls_cert_file and tls_key_file.
absl::StatusOr<TlsFilesState> CheckTlsFiles(const SecurityOptions& options);

// Whether every TLS file (certificate, key, client CA when set) can be opened now. gRPC keeps
// serving the pair it has while one cannot (a writer that is not atomic, a Secret being
// replaced), so such a moment is no reason to turn readiness off, unlike files it reads but
// cannot use.
bool TlsFilesReadable(const SecurityOptions& options);

// Runs CheckTlsFiles every tls_reload_seconds on a thread of its own and hands each result to
// on_check, so that files that went bad after start-up (gRPC 1.51 serves a reloaded pair
// without checking it) are seen while the server runs:
//
//   TlsFileWatcher watcher(security, [&](const absl::StatusOr<TlsFilesState>& files) { ... });
//
// The first check runs in the constructor, before it returns; the destructor stops the thread
// (at once, not at the next interval). on_check is called from one thread at a time.
class TlsFileWatcher {
 public:
  TlsFileWatcher(const SecurityOptions& options,
                 std::function<void(const absl::StatusOr<TlsFilesState>&)> on_check);
  ~TlsFileWatcher();

  TlsFileWatcher(const TlsFileWatcher&) = delete;
  TlsFileWatcher& operator=(const TlsFileWatcher&) = delete;

 private:
  void Run();

  const SecurityOptions options_;
  const std::function<void(const absl::StatusOr<TlsFilesState>&)> on_check_;
  std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  std::thread thread_;  // Last: starts once the members above exist.
};

// One line of a token file: "TOKEN" or "TOKEN max_priority=N", where N (an int32) is the highest
// request priority a call with this token may ask for (PriorityCap); without it the server's
// --max-priority applies.
struct TokenEntry {
  std::string token;
  std::optional<int32_t> max_priority;
};

// The tokens of a token file: each non-blank line that does not start with '#', trimmed, as a
// token and its options, separated by whitespace. InvalidArgument naming --auth-token-file and
// the file when it cannot be read or holds no token, or naming the line (never echoing a token)
// when a token has a character outside printable ASCII or is on an earlier line too, an option is
// unknown or given twice, or max_priority is not an int32.
absl::StatusOr<std::vector<TokenEntry>> ReadTokenFile(const std::string& path);

// The token of an `authorization` metadata value of the form "Bearer <token>": the scheme is
// case-insensitive (RFC 7235) and whitespace around the token is dropped, so "Bearer t",
// "bearer t" and "BEARER   t " all give "t". nullopt when the value is not of that form.
std::optional<absl::string_view> BearerTokenOf(absl::string_view authorization);

// A name for a token that does not contain it, the same for the same token: the first 64 bits of
// its SHA-256, as 16 hex digits. What per-client limits and logs call a token's client.
std::string TokenFingerprint(absl::string_view token);

// Checks the `authorization: Bearer <token>` metadata of a call. Only SHA-256 digests of the
// tokens are kept, and the presented token's digest is compared with every one of them in
// constant time, so neither the time taken nor the memory reveals where a guess differs.
// Thread safety: Check may be called from any number of threads.
class BearerTokenAuthenticator {
 public:
  static absl::StatusOr<std::unique_ptr<BearerTokenAuthenticator>> FromFile(
      const std::string& path);
  explicit BearerTokenAuthenticator(const std::vector<TokenEntry>& tokens);
  explicit BearerTokenAuthenticator(const std::vector<std::string>& tokens);  // No options.

  // OK, or UNAUTHENTICATED saying what was missing or wrong (never echoing what was sent).
  grpc::Status Check(const grpc::ServerContextBase& context) const;
  // The same check on the value of the authorization metadata (nullptr: absent).
  grpc::Status CheckAuthorization(const absl::string_view* authorization) const;

  // The max_priority of the call's token where its line gives one; nullopt where it gives none,
  // or the call has no valid token. Compared as Check compares, in constant time.
  std::optional<int32_t> MaxPriorityOf(const grpc::ServerContextBase& context) const;
  // The same on the value of the authorization metadata.
  std::optional<int32_t> MaxPriorityOf(absl::string_view authorization) const;

 private:
  // The index of the token whose digest is `presented`'s, or -1; every digest is compared.
  int Match(absl::string_view token) const;

  std::vector<std::array<unsigned char, 32>> token_digests_;  // SHA-256 of each token.
  std::vector<std::optional<int32_t>> max_priorities_;        // Of each token, as in its line.
};

// The highest priority a call may ask for: its bearer token's max_priority where the token file
// gives one (so an operator can give one client more, or less, than the rest), else the server's
// --max-priority. INT32_MAX: no cap, which is the default. Lower priorities are always allowed.
//
//   PriorityCap cap(/*server_max=*/0, authenticator.get());
//   DA_RETURN_IF_ERROR(cap.Check(*context, "priority", request.priority()));
class PriorityCap {
 public:
  // tokens: null where the server has no token file. Must outlive the cap.
  PriorityCap(int32_t server_max, const BearerTokenAuthenticator* tokens)
      : server_max_(server_max), tokens_(tokens) {}

  // OK, or PERMISSION_DENIED (reject reason "priority") naming `field`, the priority asked, the
  // cap and where the cap comes from.
  absl::Status Check(const grpc::ServerContextBase& context, absl::string_view field,
                     int32_t priority) const;
  // The cap for the call (what GetServerInfo reports to it).
  int32_t CapOf(const grpc::ServerContextBase& context) const;

 private:
  // The call's token's own cap, where the token file gives one.
  std::optional<int32_t> TokenCap(const grpc::ServerContextBase& context) const;

  const int32_t server_max_;
  const BearerTokenAuthenticator* const tokens_;
};

}  // namespace da::server
