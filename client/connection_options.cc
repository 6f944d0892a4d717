#include "client/connection_options.h"

#include <grpcpp/support/client_interceptor.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/attention_client.h"

namespace da::client {
namespace {

absl::StatusOr<std::string> ReadFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": cannot read: ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A TLS file's PEM text. An empty or unreadable one (a directory, /dev/null, a file that failed to
// generate) is refused: an empty CA would make gRPC trust the system's public roots instead.
absl::StatusOr<std::string> ReadPem(const char* flag, const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(flag, path);
  if (!text.ok()) return text.status();
  if (text->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " ", path, ": no PEM block ('-----BEGIN') in its ", text->size(), " bytes"));
  }
  return text;
}

absl::StatusOr<std::string> ReadToken(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile("--token-file", path);
  if (!text.ok()) return text.status();
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (!line.empty() && line[0] != '#') return std::string(line);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--token-file ", path, ": no token in the file (blank lines and # comments are ignored)"));
}

// Adds the authorization metadata to every call of the channel.
class BearerTokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptor(const std::string* authorization)
      : authorization_(authorization) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *authorization_);
    }
    methods->Proceed();
  }

 private:
  const std::string* authorization_;  // Owned by the factory, which the channel keeps.
};

class BearerTokenInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenInterceptorFactory(const std::string& token)
      : authorization_("Bearer " + token) {}

  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new BearerTokenInterceptor(&authorization_);
  }

 private:
  const std::string authorization_;
};

}  // namespace

absl::StatusOr<ConnectionOptions> LoadConnectionOptions(const ConnectionFiles& files) {
  ConnectionOptions options;
  if (files.tls_cert.empty() != files.tls_key.empty()) {
    return absl::InvalidArgumentError(
        files.tls_cert.empty()
            ? absl::StrCat("--tls-key ", files.tls_key, " needs --tls-cert as well")
            : absl::StrCat("--tls-cert ", files.tls_cert, " needs --tls-key as well"));
  }
  options.tls = !files.tls_ca.empty() || !files.tls_cert.empty() || !files.tls_server_name.empty();
  for (auto [flag, path, pem] : {std::tuple{"--tls-ca", &files.tls_ca, &options.tls_root_certs_pem},
                                 {"--tls-cert", &files.tls_cert, &options.tls_cert_chain_pem},
                                 {"--tls-key", &files.tls_key, &options.tls_private_key_pem}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> text = ReadPem(flag, *path);
    if (!text.ok()) return text.status();
    *pem = *std::move(text);
  }
  options.tls_server_name = files.tls_server_name;
  if (!files.token_file.empty()) {
    absl::StatusOr<std::string> token = ReadToken(files.token_file);
    if (!token.ok()) return token.status();
    options.bearer_token = *std::move(token);
  }
  return options;
}

std::function<std::shared_ptr<grpc::Channel>()> FreshChannels(const std::string& target,
                                                              const ConnectionOptions& options) {
  return [target, options] {
    // Negative: never an id of the channels a caller numbers from 0 (parallel streams).
    static std::atomic<int> made{0};
    ConnectionOptions fresh = options;
    fresh.channel_id = -1 - made.fetch_add(1) % (1 << 30);
    return MakeChannel(target, fresh);
  };
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           const ConnectionOptions& options) {
  grpc::ChannelArguments arguments = DefaultChannelArguments(options.max_message_bytes);
  if (options.channel_id != 0) arguments.SetInt("da.channel_id", options.channel_id);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs_pem;
    ssl.pem_cert_chain = options.tls_cert_chain_pem;
    ssl.pem_private_key = options.tls_private_key_pem;
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      arguments.SetSslTargetNameOverride(options.tls_server_name);
    }
  }
  if (options.bearer_token.empty()) {
    return grpc::CreateCustomChannel(target, credentials, arguments);
  }
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<BearerTokenInterceptorFactory>(options.bearer_token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, arguments,
                                                                 std::move(interceptors));
}

}  // namespace da::client
