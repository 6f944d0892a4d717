#include "server/security.h"

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/request_record.h"

namespace da::server {
namespace {

constexpr char kCertFlag[] = "--tls-cert";
constexpr char kKeyFlag[] = "--tls-key";
constexpr char kClientCaFlag[] = "--tls-client-ca";
constexpr char kTokenFlag[] = "--auth-token-file";

absl::Status FileError(const char* flag, const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": ", what));
}

absl::StatusOr<std::string> ReadWholeFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return FileError(flag, path, absl::StrCat("cannot read: ", std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return FileError(flag, path, "cannot read");
  return text.str();
}

struct BioDeleter {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Deleter {
  void operator()(X509* x509) const { X509_free(x509); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};

using Digest = std::array<unsigned char, 32>;

Digest Sha256(absl::string_view text) {
  Digest digest{};
  unsigned int size = 0;
  EVP_Digest(text.data(), text.size(), digest.data(), &size, EVP_sha256(), nullptr);
  return digest;
}

// The passphrase callback of PEM reads: none. Without a callback OpenSSL would ask for an
// encrypted key's passphrase on the terminal (or read it from stdin), and the server would hang
// at start-up waiting for it.
int NoPassphrase(char* /*buffer*/, int /*size*/, int /*rwflag*/, void* /*userdata*/) { return 0; }

std::unique_ptr<BIO, BioDeleter> MemoryBio(const std::string& pem) {
  return std::unique_ptr<BIO, BioDeleter>(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// The first certificate of a PEM file (the leaf of a chain), or null when there is none.
std::unique_ptr<X509, X509Deleter> FirstCertificate(const std::string& pem) {
  auto bio = MemoryBio(pem);
  return std::unique_ptr<X509, X509Deleter>(
      bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
}

absl::StatusOr<std::string> ReadCertificateFile(const char* flag, const std::string& path) {
  absl::StatusOr<std::string> pem = ReadWholeFile(flag, path);
  if (!pem.ok()) return pem.status();
  if (FirstCertificate(*pem) == nullptr) {
    return FileError(flag, path, "no PEM certificate in the file");
  }
  return pem;
}

// gRPC would only find a mismatched or unreadable key at its first handshake (or refuse the port
// with no reason given); OpenSSL says which at start-up.
absl::Status CheckKeyMatchesCertificate(const std::string& key_path, const std::string& key_pem,
                                        const std::string& cert_path, const std::string& cert_pem) {
  auto bio = MemoryBio(key_pem);
  std::unique_ptr<EVP_PKEY, KeyDeleter> key(
      bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr) : nullptr);
  if (key == nullptr) {
    return FileError(kKeyFlag, key_path, "no unencrypted PEM private key in the file");
  }
  std::unique_ptr<X509, X509Deleter> certificate = FirstCertificate(cert_pem);
  if (X509_check_private_key(certificate.get(), key.get()) != 1) {
    return FileError(kKeyFlag, key_path,
                     absl::StrCat("the private key does not match the certificate of ", kCertFlag,
                                  " ", cert_path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TlsFilesState> CheckTlsFiles(const SecurityOptions& options) {
  absl::StatusOr<std::string> cert = ReadCertificateFile(kCertFlag, options.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadWholeFile(kKeyFlag, options.tls_key_file);
  if (!key.ok()) return key.status();
  if (absl::Status matched =
          CheckKeyMatchesCertificate(options.tls_key_file, *key, options.tls_cert_file, *cert);
      !matched.ok()) {
    return matched;
  }
  if (!options.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadCertificateFile(kClientCaFlag, options.tls_client_ca_file);
    if (!ca.ok()) return ca.status();
  }
  std::tm not_after{};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(FirstCertificate(*cert).get()), &not_after) != 1) {
    return FileError(kCertFlag, options.tls_cert_file, "the certificate's notAfter is unreadable");
  }
  return TlsFilesState{.certificate_not_after_unix_seconds = timegm(&not_after)};
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const SecurityOptions& options) {
  const bool has_cert = !options.tls_cert_file.empty();
  const bool has_key = !options.tls_key_file.empty();
  if (has_cert != has_key) {
    return absl::InvalidArgumentError(absl::StrCat(
        has_cert ? kCertFlag : kKeyFlag, " ",
        has_cert ? options.tls_cert_file : options.tls_key_file, " is set but ",
        has_cert ? kKeyFlag : kCertFlag, " is not: TLS needs both the certificate and the key"));
  }
  if (!options.tls_client_ca_file.empty() && !has_cert) {
    return absl::InvalidArgumentError(absl::StrCat(kClientCaFlag, " ", options.tls_client_ca_file,
                                                   " requires ", kCertFlag, " and ", kKeyFlag,
                                                   ": mutual TLS runs over TLS"));
  }
  if (!has_cert) return grpc::InsecureServerCredentials();
  if (options.tls_reload_seconds < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tls_reload_seconds is ", options.tls_reload_seconds, "; must be at least 1"));
  }
  if (absl::StatusOr<TlsFilesState> files = CheckTlsFiles(options); !files.ok()) {
    return files.status();
  }
  const bool mutual = !options.tls_client_ca_file.empty();

  // The files, not their contents, go to gRPC: its provider reads them again every
  // tls_reload_seconds on a thread of its own and serves what changed from the next handshake on
  // (connections already open keep the certificate they were made with), so a renewed
  // certificate (cert-manager, a Kubernetes Secret swapped in through its ..data symlink) is
  // served without a restart. What gRPC 1.51 does with files that are bad after start-up:
  // - missing or unreadable (also while being replaced, if not atomically): it logs "Reading file
  //   ... failed", keeps serving the pair it has, and tries again at the next interval;
  // - key or certificate changed while it read them (mtime before and after differs): it reads
  //   again, three times at most, then keeps the pair it has until the next interval;
  // - readable but wrong (not PEM, a key that does not match the certificate, e.g. a writer that
  //   replaces the certificate and the key one after the other without a symlink swap): it does
  //   NOT check them (grpc/grpc#26709, which would have, was never merged); the TLS context
  //   cannot be built ("Update handshaker factory failed" in the log) and every new handshake
  //   fails until good files are read at a later interval. Connections already open are not
  //   affected. Replace both files in one atomic step to avoid that window; TlsFileWatcher
  //   finds such files at the same interval, so that readiness can say so.
  // (Seen with the Debian build of 1.51.1: a mismatched key or a non-PEM certificate swapped in
  // refused every new connection; a deleted certificate left the old pair in use.)
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.tls_key_file, options.tls_cert_file, options.tls_client_ca_file,
      static_cast<unsigned int>(options.tls_reload_seconds));
  grpc::experimental::TlsServerCredentialsOptions tls(provider);
  tls.watch_identity_key_cert_pairs();
  if (mutual) {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

bool TlsFilesReadable(const SecurityOptions& options) {
  for (const std::string* path :
       {&options.tls_cert_file, &options.tls_key_file, &options.tls_client_ca_file}) {
    if (!path->empty() && !std::ifstream(*path, std::ios::binary)) return false;
  }
  return true;
}

TlsFileWatcher::TlsFileWatcher(const SecurityOptions& options,
                               std::function<void(const absl::StatusOr<TlsFilesState>&)> on_check)
    : options_(options), on_check_(std::move(on_check)) {
  on_check_(CheckTlsFiles(options_));
  thread_ = std::thread([this] { Run(); });
}

TlsFileWatcher::~TlsFileWatcher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  thread_.join();
}

void TlsFileWatcher::Run() {
  const auto interval = std::chrono::seconds(options_.tls_reload_seconds);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_cv_.wait_for(lock, interval, [this] { return stop_; })) {
    lock.unlock();  // The files are read, and on_check_ runs, without holding up the destructor.
    on_check_(CheckTlsFiles(options_));
    lock.lock();
  }
}

absl::StatusOr<std::vector<TokenEntry>> ReadTokenFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(kTokenFlag, path);
  if (!text.ok()) return text.status();
  std::vector<TokenEntry> tokens;
  std::map<std::string, int> line_of;  // Each token's line, to refuse one written twice.
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const auto line_error = [&](absl::string_view what) {
      return FileError(kTokenFlag, path, absl::StrCat("line ", line_number, ": ", what));
    };
    std::vector<absl::string_view> words =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r\f\v"), absl::SkipEmpty());
    for (char c : words[0]) {
      // What gRPC allows in a metadata value: printable ASCII. A token with anything else could
      // never be sent, so it is a mistake in the file.
      if (c < 0x21 || c > 0x7e) {
        return line_error("a token may hold only printable ASCII without spaces");
      }
    }
    // Twice, with two caps, one would silently win: the file is ambiguous.
    if (const auto [first, added] = line_of.emplace(std::string(words[0]), line_number); !added) {
      return line_error(absl::StrCat("the token of line ", first->second, " again"));
    }
    TokenEntry entry{.token = std::string(words[0]), .max_priority = std::nullopt};
    for (size_t i = 1; i < words.size(); ++i) {
      constexpr absl::string_view kMaxPriority = "max_priority=";
      if (!absl::StartsWith(words[i], kMaxPriority)) {
        // Named by its place only: the word may be half of a token written with a space, which
        // must not reach the log.
        return line_error(absl::StrCat("word ", i + 1,
                                       " of the line is not max_priority=N, the one option after "
                                       "a token (a token holds no spaces)"));
      }
      if (entry.max_priority.has_value()) return line_error("max_priority is given twice");
      int32_t value = 0;
      const absl::string_view number = words[i].substr(kMaxPriority.size());
      if (!absl::SimpleAtoi(number, &value)) {
        return line_error(absl::StrCat("max_priority '", number.size() <= 32 ? number : "...",
                                       "' is not an integer from -2147483648 to 2147483647"));
      }
      entry.max_priority = value;
    }
    tokens.push_back(std::move(entry));
  }
  if (tokens.empty()) {
    return FileError(kTokenFlag, path,
                     "no token in the file (blank lines and lines starting with # are ignored)");
  }
  return tokens;
}

absl::StatusOr<std::unique_ptr<BearerTokenAuthenticator>> BearerTokenAuthenticator::FromFile(
    const std::string& path) {
  absl::StatusOr<std::vector<TokenEntry>> tokens = ReadTokenFile(path);
  if (!tokens.ok()) return tokens.status();
  return std::make_unique<BearerTokenAuthenticator>(*tokens);
}

std::optional<absl::string_view> BearerTokenOf(absl::string_view authorization) {
  constexpr absl::string_view kScheme = "Bearer ";
  // The scheme is case-insensitive (RFC 7235).
  if (authorization.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(authorization.substr(0, kScheme.size()), kScheme)) {
    return std::nullopt;
  }
  return absl::StripAsciiWhitespace(authorization.substr(kScheme.size()));
}

std::string TokenFingerprint(absl::string_view token) {
  const Digest digest = Sha256(token);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest.data()), sizeof(uint64_t)));
}

BearerTokenAuthenticator::BearerTokenAuthenticator(const std::vector<TokenEntry>& tokens) {
  for (const TokenEntry& entry : tokens) {
    token_digests_.push_back(Sha256(entry.token));
    max_priorities_.push_back(entry.max_priority);
  }
}

BearerTokenAuthenticator::BearerTokenAuthenticator(const std::vector<std::string>& tokens)
    : BearerTokenAuthenticator([&] {
        std::vector<TokenEntry> entries;
        for (const std::string& token : tokens) entries.push_back({token, std::nullopt});
        return entries;
      }()) {}

int BearerTokenAuthenticator::Match(absl::string_view token) const {
  const Digest presented = Sha256(token);
  // No early exit: every digest is compared, whichever matches.
  int match = -1;
  for (size_t i = 0; i < token_digests_.size(); ++i) {
    const bool same =
        CRYPTO_memcmp(presented.data(), token_digests_[i].data(), presented.size()) == 0;
    match = same ? static_cast<int>(i) : match;
  }
  return match;
}

namespace {

// The call's authorization metadata, if it has one.
std::optional<absl::string_view> AuthorizationOf(const grpc::ServerContextBase& context) {
  const auto& metadata = context.client_metadata();
  const auto found = metadata.find("authorization");
  if (found == metadata.end()) return std::nullopt;
  return absl::string_view(found->second.data(), found->second.size());
}

}  // namespace

grpc::Status BearerTokenAuthenticator::Check(const grpc::ServerContextBase& context) const {
  const std::optional<absl::string_view> authorization = AuthorizationOf(context);
  return CheckAuthorization(authorization.has_value() ? &*authorization : nullptr);
}

grpc::Status BearerTokenAuthenticator::CheckAuthorization(
    const absl::string_view* authorization) const {
  if (authorization == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "no authorization metadata: this server requires "
                        "'authorization: Bearer <token>'");
  }
  const std::optional<absl::string_view> token = BearerTokenOf(*authorization);
  if (!token.has_value()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "the authorization metadata is not of the form 'Bearer <token>'");
  }
  if (Match(*token) < 0) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "the bearer token is not valid for this server");
  }
  return grpc::Status::OK;
}

std::optional<int32_t> BearerTokenAuthenticator::MaxPriorityOf(
    const grpc::ServerContextBase& context) const {
  const std::optional<absl::string_view> authorization = AuthorizationOf(context);
  return authorization.has_value() ? MaxPriorityOf(*authorization) : std::nullopt;
}

std::optional<int32_t> BearerTokenAuthenticator::MaxPriorityOf(
    absl::string_view authorization) const {
  const std::optional<absl::string_view> token = BearerTokenOf(authorization);
  if (!token.has_value()) return std::nullopt;
  const int match = Match(*token);
  return match < 0 ? std::nullopt : max_priorities_[static_cast<size_t>(match)];
}

std::optional<int32_t> PriorityCap::TokenCap(const grpc::ServerContextBase& context) const {
  return tokens_ != nullptr ? tokens_->MaxPriorityOf(context) : std::nullopt;
}

int32_t PriorityCap::CapOf(const grpc::ServerContextBase& context) const {
  return TokenCap(context).value_or(server_max_);
}

absl::Status PriorityCap::Check(const grpc::ServerContextBase& context, absl::string_view field,
                                int32_t priority) const {
  const std::optional<int32_t> token_max = TokenCap(context);
  const int32_t cap = token_max.value_or(server_max_);
  if (priority <= cap) return absl::OkStatus();
  return WithServerRejectReason(
      absl::PermissionDeniedError(absl::StrCat(
          field, " ", priority, " is above ", cap, ", the highest this client may ask for (",
          token_max.has_value() ? "max_priority of its token in --auth-token-file"
                                : "--max-priority",
          "); send a lower priority, or ask the operator for a higher cap")),
      "priority");
}

}  // namespace da::server
