// TLS, mutual TLS, bearer tokens and --max-concurrent-streams, end to end: a real server on a
// loopback port, the client library's channels (server/security.h, client/connection_options.h),
// certificates made by openssl at test time, and the real binaries for start-up failures and the
// CLI.
#include "server/security.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/str_replace.h"
#include "client/attention_client.h"
#include "client/connection_options.h"
#include "server/attention_service.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using grpc::StatusCode;
using grpc::health::v1::HealthCheckResponse;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "s3cr3t-token-9f2c1e";
constexpr char kOtherToken[] = "0ther-token-77ab";
constexpr int64_t kTimeoutMs = 20000;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void WriteFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A CA, a server certificate for localhost and 127.0.0.1 (and a renewed one, valid a day longer),
// a client certificate from that CA, and a server and a client certificate from another CA, made
// once per test program (EC P-256: fast to generate).
class Certificates {
 public:
  static const Certificates& Get() {
    static const Certificates certificates;
    return certificates;
  }
  ~Certificates() { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string Pem(const std::string& name) const { return ReadFile(Path(name)); }
  bool ok() const { return ok_; }

 private:
  Certificates() : dir_(testing::MakeTempDir()) {
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
    auto make_ca = [&](const std::string& name) {
      return "openssl req -x509 -new " + key + "-keyout " + name + ".key -out " + name +
             ".pem -days 2 -subj /CN=" + name +
             " -addext basicConstraints=critical,CA:TRUE"
             " -addext keyUsage=critical,keyCertSign,cRLSign";
    };
    auto make_leaf = [&](const std::string& name, const std::string& ca,
                         const std::string& extensions, const std::string& days = "2") {
      return "openssl req -new " + key + "-keyout " + name + ".key -out " + name +
             ".csr -subj /CN=" + name + " && printf '" + extensions + "' > " + name +
             ".ext && openssl x509 -req -in " + name + ".csr -CA " + ca + ".pem -CAkey " + ca +
             ".key -CAcreateserial -out " + name + ".pem -days " + days + " -extfile " + name +
             ".ext";
    };
    const std::string server_extensions =
        "subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n";
    const std::string script =
        "(cd " + dir_ + " && " + make_ca("ca") + " && " + make_ca("other_ca") + " && " +
        make_leaf("server", "ca", server_extensions) + " && " +
        make_leaf("renewed_server", "ca", server_extensions, "3") + " && " +
        make_leaf("other_server", "other_ca", server_extensions) + " && " +
        make_leaf("client", "ca", "extendedKeyUsage=clientAuth\\n") + " && " +
        make_leaf("other_client", "other_ca", "extendedKeyUsage=clientAuth\\n") + ") > " + dir_ +
        "/openssl.log 2>&1";
    ok_ = std::system(script.c_str()) == 0;
    EXPECT_TRUE(ok_) << script << "\n" << ReadFile(dir_ + "/openssl.log");
    WriteFile(Path("tokens.txt"),
              std::string("# da-server tokens\n\n  ") + kOtherToken + "  \n" + kToken + "\n");
  }

  std::string dir_;
  bool ok_ = false;
};

// A client of what the server on `port` expects, built from the library's options.
struct Client {
  Client(int port, client::ConnectionOptions options)
      : channel(client::MakeChannel("127.0.0.1:" + std::to_string(port), options)),
        client(channel) {}
  std::shared_ptr<grpc::Channel> channel;
  client::AttentionClient client;
};

client::ConnectionOptions Tls(const std::string& ca = "ca.pem") {
  const Certificates& certs = Certificates::Get();
  client::ConnectionOptions options;
  options.tls = true;
  options.tls_root_certs_pem = certs.Pem(ca);
  options.tls_server_name = "localhost";
  return options;
}

client::ConnectionOptions MutualTls(const std::string& client_name) {
  const Certificates& certs = Certificates::Get();
  client::ConnectionOptions options = Tls();
  options.tls_cert_chain_pem = certs.Pem(client_name + ".pem");
  options.tls_private_key_pem = certs.Pem(client_name + ".key");
  return options;
}

client::ConnectionOptions WithToken(client::ConnectionOptions options, const std::string& token) {
  options.bearer_token = token;
  return options;
}

v1::AttendRequest SmallRequest() {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest({}, rng);
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  return request;
}

grpc::Status CallInfo(Client& c) {
  v1::GetServerInfoResponse info;
  return c.client.GetServerInfo(&info, testing::WithTimeout(kTimeoutMs));
}

// Attend must also compute the right thing through the secured channel.
void ExpectAttendWorks(Client& c) {
  const v1::AttendRequest request = SmallRequest();
  v1::AttendResponse response;
  const grpc::Status status = c.client.Attend(request, &response, testing::WithTimeout(kTimeoutMs));
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  EXPECT_EQ(response.output().data(), testing::InProcessOutput(request, 2));
}

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(Certificates::Get().ok()); }

  std::unique_ptr<Server> Start(const SecurityOptions& security) {
    ServerOptions options = testing::LoopbackOptions();
    options.security = security;
    return testing::StartServer(options);
  }

  SecurityOptions TlsFiles() const {
    const Certificates& certs = Certificates::Get();
    return {.tls_cert_file = certs.Path("server.pem"), .tls_key_file = certs.Path("server.key")};
  }
};

TEST_F(SecurityTest, TlsServerAnswersTlsClientsAndRefusesPlaintextAndTheWrongCa) {
  std::unique_ptr<Server> server = Start(TlsFiles());
  ASSERT_NE(server, nullptr);

  Client tls(server->port(), Tls());
  ExpectAttendWorks(tls);
  EXPECT_TRUE(CallInfo(tls).ok());

  Client plaintext(server->port(), client::ConnectionOptions{});
  EXPECT_EQ(CallInfo(plaintext).error_code(), StatusCode::UNAVAILABLE);

  Client wrong_ca(server->port(), Tls("other_ca.pem"));
  EXPECT_EQ(CallInfo(wrong_ca).error_code(), StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  SecurityOptions security = TlsFiles();
  security.tls_client_ca_file = Certificates::Get().Path("ca.pem");
  std::unique_ptr<Server> server = Start(security);
  ASSERT_NE(server, nullptr);

  Client signed_by_ca(server->port(), MutualTls("client"));
  ExpectAttendWorks(signed_by_ca);

  Client no_certificate(server->port(), Tls());
  EXPECT_EQ(CallInfo(no_certificate).error_code(), StatusCode::UNAVAILABLE);

  Client other_ca(server->port(), MutualTls("other_client"));
  EXPECT_EQ(CallInfo(other_ca).error_code(), StatusCode::UNAVAILABLE);
}

// A folder laid out as the kubelet mounts a Secret: each file is a symlink into `..data`, itself a
// symlink to the folder of the current version. Update writes a new version beside it and swaps
// `..data` to it with one rename, so a reader sees the old files or the new ones, never a mix.
class SecretVolume {
 public:
  SecretVolume() : dir_(testing::MakeTempDir()) {}
  ~SecretVolume() { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Each name with its new content; names not given keep theirs.
  void Update(const std::map<std::string, std::string>& changed) {
    for (const auto& [name, text] : changed) files_[name] = text;
    const std::string version = "..v" + std::to_string(++version_);
    std::filesystem::create_directory(Path(version));
    for (const auto& [name, text] : files_) WriteFile(Path(version + "/" + name), text);
    std::filesystem::create_symlink(version, Path("..data_tmp"));
    std::filesystem::rename(Path("..data_tmp"), Path("..data"));
    for (const auto& [name, text] : files_) {
      if (!std::filesystem::is_symlink(Path(name))) {
        std::filesystem::create_symlink("..data/" + name, Path(name));
      }
    }
    if (version_ > 1) std::filesystem::remove_all(Path("..v" + std::to_string(version_ - 1)));
  }

 private:
  std::string dir_;
  std::map<std::string, std::string> files_;
  int version_ = 0;
};

class CertificateRenewalTest : public SecurityTest {
 protected:
  // GetServerInfo over a connection of its own: a channel argument no other channel has keeps
  // gRPC from reusing a connection made before the files changed.
  grpc::Status CallOnANewConnection(client::ConnectionOptions options) {
    options.channel_id = ++channels_;
    Client c(server_->port(), options);
    return CallInfo(c);
  }

  // Until a call on a new connection succeeds, for at most 30 reload intervals of 1 s.
  grpc::Status WaitForANewConnectionToSucceed(const client::ConnectionOptions& options) {
    const auto deadline = std::chrono::steady_clock::now() + seconds(30);
    grpc::Status status = CallOnANewConnection(options);
    while (!status.ok() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      status = CallOnANewConnection(options);
    }
    return status;
  }

  const Certificates& certs_ = Certificates::Get();
  SecretVolume secret_;
  std::unique_ptr<Server> server_;
  int channels_ = 0;
};

TEST_F(CertificateRenewalTest, ANewServerCertificateIsServedWithoutARestart) {
  secret_.Update({{"tls.crt", certs_.Pem("server.pem")}, {"tls.key", certs_.Pem("server.key")}});
  server_ = Start({.tls_cert_file = secret_.Path("tls.crt"),
                   .tls_key_file = secret_.Path("tls.key"),
                   .tls_reload_seconds = 1});
  ASSERT_NE(server_, nullptr);
  Client opened_before(server_->port(), Tls("ca.pem"));
  ASSERT_TRUE(CallInfo(opened_before).ok());
  ASSERT_EQ(CallOnANewConnection(Tls("other_ca.pem")).error_code(), StatusCode::UNAVAILABLE);

  secret_.Update(
      {{"tls.crt", certs_.Pem("other_server.pem")}, {"tls.key", certs_.Pem("other_server.key")}});
  const grpc::Status renewed = WaitForANewConnectionToSucceed(Tls("other_ca.pem"));
  EXPECT_TRUE(renewed.ok()) << renewed.error_code() << ": " << renewed.error_message();
  // The old certificate is no longer served; a connection made with it stays.
  EXPECT_EQ(CallOnANewConnection(Tls("ca.pem")).error_code(), StatusCode::UNAVAILABLE);
  EXPECT_TRUE(CallInfo(opened_before).ok());
}

TEST_F(CertificateRenewalTest, ANewClientCaIsTrustedWithoutARestart) {
  secret_.Update({{"tls.crt", certs_.Pem("server.pem")},
                  {"tls.key", certs_.Pem("server.key")},
                  {"ca.crt", certs_.Pem("ca.pem")}});
  server_ = Start({.tls_cert_file = secret_.Path("tls.crt"),
                   .tls_key_file = secret_.Path("tls.key"),
                   .tls_client_ca_file = secret_.Path("ca.crt"),
                   .tls_reload_seconds = 1});
  ASSERT_NE(server_, nullptr);
  ASSERT_TRUE(CallOnANewConnection(MutualTls("client")).ok());
  ASSERT_EQ(CallOnANewConnection(MutualTls("other_client")).error_code(), StatusCode::UNAVAILABLE);

  secret_.Update({{"ca.crt", certs_.Pem("other_ca.pem")}});
  const grpc::Status renewed = WaitForANewConnectionToSucceed(MutualTls("other_client"));
  EXPECT_TRUE(renewed.ok()) << renewed.error_code() << ": " << renewed.error_message();
  EXPECT_EQ(CallOnANewConnection(MutualTls("client")).error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(CallOnANewConnection(Tls()).error_code(), StatusCode::UNAVAILABLE);
}

// notAfter of the first certificate in a PEM file, in Unix seconds, as the openssl CLI prints it;
// -1 when it cannot be read.
int64_t NotAfterUnixSeconds(const std::string& pem_path) {
  const std::string command = "openssl x509 -noout -enddate -in " + pem_path;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return -1;
  char line[256] = {};
  const bool read = std::fgets(line, sizeof(line), pipe) != nullptr;
  pclose(pipe);
  std::tm not_after{};
  if (!read || strptime(line, "notAfter=%b %d %H:%M:%S %Y GMT", &not_after) == nullptr) return -1;
  return timegm(&not_after);
}

// Files that turn bad after start-up are served by gRPC unchecked (every new handshake fails):
// readiness goes NOT_SERVING naming the flag, the file and the fault, while liveness stays up,
// and comes back with good files; the expiry gauge follows the certificate served.
TEST_F(CertificateRenewalTest, BadFilesTurnReadinessOffUntilGoodOnesAreBack) {
  secret_.Update({{"tls.crt", certs_.Pem("server.pem")}, {"tls.key", certs_.Pem("server.key")}});
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  options.security = {.tls_cert_file = secret_.Path("tls.crt"),
                      .tls_key_file = secret_.Path("tls.key"),
                      .tls_reload_seconds = 1};
  server_ = testing::StartServer(options);
  ASSERT_NE(server_, nullptr);
  const int port = server_->metrics_port();
  auto probe = [port](const std::string& path) {
    return testing::HttpRequest(port, path).value_or(testing::HttpAnswer{});
  };
  auto expiry = [&] {
    return testing::MetricValue(server_->metrics().Scrape(),
                                "da_tls_certificate_expiry_timestamp_seconds");
  };
  // Ten reload intervals of 1 s: a busy machine may be late for a few.
  constexpr auto kWithinIntervals = std::chrono::milliseconds(10000);
  ASSERT_EQ(probe("/readyz").body, "ok\n");
  const int64_t not_after = NotAfterUnixSeconds(certs_.Path("server.pem"));
  ASSERT_GT(not_after, 0);
  EXPECT_EQ(expiry(), not_after);

  // The key of another certificate: the pair no longer matches.
  secret_.Update({{"tls.key", certs_.Pem("other_server.key")}});
  const std::string mismatch = "tls: --tls-key " + secret_.Path("tls.key") +
                               ": the private key does not match the certificate of --tls-cert " +
                               secret_.Path("tls.crt") + "\n";
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        const testing::HttpAnswer ready = probe("/readyz");
        return ready.status == 503 && ready.body == mismatch;
      },
      kWithinIntervals))
      << probe("/readyz").body;
  EXPECT_EQ(probe("/livez").status, 200);
  EXPECT_EQ(server_->health().Status(""), HealthCheckResponse::SERVING);
  EXPECT_EQ(server_->health().Status(kServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(expiry(), not_after);  // What was last served.

  // A certificate file that is not PEM.
  secret_.Update({{"tls.crt", "not a certificate\n"}, {"tls.key", certs_.Pem("server.key")}});
  const std::string not_pem =
      "tls: --tls-cert " + secret_.Path("tls.crt") + ": no PEM certificate in the file\n";
  EXPECT_TRUE(testing::WaitFor([&] { return probe("/readyz").body == not_pem; }, kWithinIntervals))
      << probe("/readyz").body;
  EXPECT_EQ(probe("/livez").status, 200);

  // A good pair again, renewed: ready, served, and its expiry exported.
  secret_.Update({{"tls.crt", certs_.Pem("renewed_server.pem")},
                  {"tls.key", certs_.Pem("renewed_server.key")}});
  EXPECT_TRUE(testing::WaitFor([&] { return probe("/readyz").status == 200; }, kWithinIntervals))
      << probe("/readyz").body;
  EXPECT_EQ(server_->health().NotReadyReason(), "");
  const int64_t renewed_not_after = NotAfterUnixSeconds(certs_.Path("renewed_server.pem"));
  ASSERT_GT(renewed_not_after, not_after);
  EXPECT_TRUE(testing::WaitFor([&] { return expiry() == renewed_not_after; }, kWithinIntervals))
      << expiry().value_or(-1);
  const grpc::Status served = WaitForANewConnectionToSucceed(Tls("ca.pem"));
  EXPECT_TRUE(served.ok()) << served.error_code() << ": " << served.error_message();

  // A key file that cannot be opened: gRPC keeps serving the pair it has, so readiness stays.
  ASSERT_TRUE(std::filesystem::remove(secret_.Path("tls.key")));
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));  // Three checks.
  EXPECT_EQ(probe("/readyz").body, "ok\n");
  const grpc::Status still = WaitForANewConnectionToSucceed(Tls("ca.pem"));
  EXPECT_TRUE(still.ok()) << still.error_code() << ": " << still.error_message();
}

TEST_F(SecurityTest, NoCertificateExpiryIsExportedWithoutTls) {
  std::unique_ptr<Server> server = Start({});
  ASSERT_NE(server, nullptr);
  EXPECT_THAT(server->metrics().Scrape(),
              Not(HasSubstr("da_tls_certificate_expiry_timestamp_seconds")));
  EXPECT_EQ(server->health().NotReadyReason(), "");
}

// Every AttentionService method, called with the given client; the statuses in method order.
std::vector<std::pair<std::string, grpc::Status>> CallEveryMethod(Client& c) {
  const v1::AttendRequest request = SmallRequest();
  std::vector<std::pair<std::string, grpc::Status>> statuses;
  v1::AttendResponse response;
  statuses.emplace_back("Attend",
                        c.client.Attend(request, &response, testing::WithTimeout(kTimeoutMs)));
  statuses.emplace_back(
      "AttendStream", c.client.AttendStream(request, &response, testing::WithTimeout(kTimeoutMs)));
  statuses.emplace_back("GetServerInfo", CallInfo(c));
  v1::WarmUpRequest warm_up;
  *warm_up.add_shapes() = testing::HeaderFor(request);
  v1::WarmUpResponse warmed;
  statuses.emplace_back("WarmUp",
                        c.client.WarmUp(warm_up, &warmed, testing::WithTimeout(kTimeoutMs)));
  return statuses;
}

TEST_F(SecurityTest, TokenIsRequiredOnEveryMethodButNotForHealth) {
  std::unique_ptr<Server> server =
      Start({.auth_token_file = Certificates::Get().Path("tokens.txt")});
  ASSERT_NE(server, nullptr);

  Client anonymous(server->port(), client::ConnectionOptions{});
  for (const auto& [method, status] : CallEveryMethod(anonymous)) {
    EXPECT_EQ(status.error_code(), StatusCode::UNAUTHENTICATED) << method;
    EXPECT_THAT(status.error_message(), HasSubstr("authorization: Bearer <token>")) << method;
  }

  const std::string wrong_token = "not-the-token-5d1e";
  Client wrong(server->port(), WithToken(client::ConnectionOptions{}, wrong_token));
  for (const auto& [method, status] : CallEveryMethod(wrong)) {
    EXPECT_EQ(status.error_code(), StatusCode::UNAUTHENTICATED) << method;
    EXPECT_THAT(status.error_message(), HasSubstr("bearer token is not valid")) << method;
    EXPECT_THAT(status.error_message(), Not(HasSubstr(wrong_token))) << method;
  }
  // Eight refusals (four methods, twice), each counted by reason and by method and code, but
  // none in the latency histogram: calls refused before they ran would pull it towards zero.
  const std::string scraped = server->metrics().Scrape();
  EXPECT_EQ(testing::MetricValue(scraped, "da_requests_rejected_total{reason=\"unauthenticated\"}"),
            8);
  for (const std::string method : {"Attend", "AttendStream", "GetServerInfo", "WarmUp"}) {
    EXPECT_EQ(testing::MetricValue(
                  scraped, "da_requests_total{code=\"UNAUTHENTICATED\",method=\"" + method + "\"}"),
              2)
        << scraped;
    EXPECT_EQ(testing::MetricValue(scraped,
                                   "da_request_duration_seconds_count{method=\"" + method + "\"}"),
              0)
        << scraped;
  }

  // Both tokens of the file are accepted (the first one is indented and commented around).
  for (const std::string token : {kToken, kOtherToken}) {
    Client authorized(server->port(), WithToken(client::ConnectionOptions{}, token));
    for (const auto& [method, status] : CallEveryMethod(authorized)) {
      EXPECT_TRUE(status.ok()) << method << ": " << status.error_message();
    }
    ExpectAttendWorks(authorized);
  }

  for (const std::string service : {"", kServiceName}) {
    HealthCheckResponse::ServingStatus serving = HealthCheckResponse::UNKNOWN;
    const grpc::Status status =
        anonymous.client.CheckHealth(service, &serving, testing::WithTimeout(kTimeoutMs));
    EXPECT_TRUE(status.ok()) << "'" << service << "': " << status.error_message();
    EXPECT_EQ(serving, HealthCheckResponse::SERVING) << "'" << service << "'";
  }
}

TEST_F(SecurityTest, TokenOverMutualTls) {
  SecurityOptions security = TlsFiles();
  security.tls_client_ca_file = Certificates::Get().Path("ca.pem");
  security.auth_token_file = Certificates::Get().Path("tokens.txt");
  std::unique_ptr<Server> server = Start(security);
  ASSERT_NE(server, nullptr);

  Client authorized(server->port(), WithToken(MutualTls("client"), kToken));
  ExpectAttendWorks(authorized);

  Client anonymous(server->port(), MutualTls("client"));
  const grpc::Status status = CallInfo(anonymous);
  EXPECT_EQ(status.error_code(), StatusCode::UNAUTHENTICATED) << status.error_message();
}

// An AttendStream call that has sent its header, with `authorization` as its metadata, and has
// asked to be told of its admission (da-stream-admission): admitted with its window, or refused
// with its status. Cancelled on destruction.
class HeaderOnlyStream {
 public:
  HeaderOnlyStream(int port, const std::string& authorization, const v1::StreamHeader& header)
      : stub_(v1::AttentionService::NewStub(testing::ChannelTo(port))) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(kTimeoutMs));
    context_.AddMetadata("authorization", authorization);
    context_.AddMetadata("da-stream-admission", "1");
    call_ = stub_->AttendStream(&context_);
    v1::AttendStreamRequest request;
    *request.mutable_header() = header;
    call_->Write(request);
    call_->WaitForInitialMetadata();  // Until the server admits the stream, or the call ends.
    const auto& metadata = context_.GetServerInitialMetadata();
    const auto window = metadata.find("da-stream-window-bytes");
    if (window != metadata.end()) {
      window_bytes_ = std::stoll(std::string(window->second.data(), window->second.size()));
    } else {
      status_ = Drain();
    }
  }
  ~HeaderOnlyStream() {
    if (!admitted()) return;
    context_.TryCancel();
    Drain();
  }

  bool admitted() const { return window_bytes_ > 0; }
  int64_t window_bytes() const { return window_bytes_; }
  const grpc::Status& status() const { return status_; }  // Of a refused stream.

 private:
  grpc::Status Drain() {
    v1::AttendStreamResponse response;
    while (call_->Read(&response)) {
    }
    return call_->Finish();
  }

  std::unique_ptr<v1::AttentionService::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AttendStreamRequest, v1::AttendStreamResponse>>
      call_;
  int64_t window_bytes_ = 0;
  grpc::Status status_;
};

// --max-client-stream-bytes counts a client's streams by its token as the authenticator reads it:
// the same token with the scheme in another case, or other spacing, is the same client and
// shares its cap; another token has a cap of its own.
TEST_F(SecurityTest, OneTokenHoweverWrittenIsOneClientOfTheStreamCap) {
  const v1::StreamHeader header = testing::HeaderFor(SmallRequest());
  ServerOptions options = testing::LoopbackOptions();
  options.security.auth_token_file = Certificates::Get().Path("tokens.txt");
  options.max_client_stream_bytes = 0;  // No cap: to learn how large one stream's window is.
  int64_t window_bytes = 0;
  {
    std::unique_ptr<Server> server = testing::StartServer(options);
    ASSERT_NE(server, nullptr);
    HeaderOnlyStream stream(server->port(), std::string("Bearer ") + kToken, header);
    ASSERT_TRUE(stream.admitted()) << stream.status().error_message();
    window_bytes = stream.window_bytes();
  }
  // A cap of one window: each client may have one such stream open.
  options.max_client_stream_bytes = window_bytes;
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  HeaderOnlyStream first(server->port(), std::string("Bearer ") + kToken, header);
  ASSERT_TRUE(first.admitted()) << first.status().error_message();
  for (const std::string scheme : {"bearer ", "BEARER   ", "bEaReR  "}) {
    for (const std::string trailing : {"", "  "}) {
      const std::string authorization = scheme + kToken + trailing;
      HeaderOnlyStream same_token(server->port(), authorization, header);
      EXPECT_FALSE(same_token.admitted()) << "'" << authorization << "' is another client";
      const grpc::Status& status = same_token.status();
      EXPECT_EQ(status.error_code(), StatusCode::RESOURCE_EXHAUSTED)
          << "'" << authorization << "': " << status.error_message();
      EXPECT_THAT(status.error_message(), HasSubstr("--max-client-stream-bytes"));
      EXPECT_THAT(status.error_message(), Not(HasSubstr(kToken)));
    }
  }
  HeaderOnlyStream other_token(server->port(), std::string("Bearer ") + kOtherToken, header);
  EXPECT_TRUE(other_token.admitted()) << other_token.status().error_message();
}

// --max-priority caps every client's request priority, and a token's max_priority=N in the token
// file replaces it for that token (higher or lower); above the cap a call is PERMISSION_DENIED
// naming the priority, the cap and where the cap comes from, and counted as reason "priority".
// Unary and streamed requests alike; GetServerInfo tells each caller its cap.
TEST_F(SecurityTest, PriorityAboveTheCallersCapIsRefusedNamingTheCap) {
  const std::string dir = testing::MakeTempDir();
  const std::string raised = "raised-token-7c1a";    // max_priority=5, above the server's 0.
  const std::string lowered = "lowered-token-2b9e";  // max_priority=-2, below it.
  const std::string plain = "plain-token-91fd";      // The server's cap.
  WriteFile(dir + "/tokens",
            raised + " max_priority=5\n" + lowered + "\tmax_priority=-2\n" + plain + "\n");
  ServerOptions options = testing::LoopbackOptions();
  options.security.auth_token_file = dir + "/tokens";
  options.max_priority = 0;
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);

  const auto attend = [&](const std::string& token, int priority) {
    Client c(server->port(), WithToken(client::ConnectionOptions{}, token));
    v1::AttendRequest request = SmallRequest();
    request.set_priority(priority);
    v1::AttendResponse response;
    const grpc::Status status =
        c.client.Attend(request, &response, testing::WithTimeout(kTimeoutMs));
    if (status.ok()) {
      EXPECT_EQ(response.output().data(), testing::InProcessOutput(request, 2));
    }
    return status;
  };
  const auto expect_refused = [&](const grpc::Status& status, const std::string& token,
                                  const std::string& what, const std::string& source) {
    EXPECT_EQ(status.error_code(), StatusCode::PERMISSION_DENIED) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(what));
    EXPECT_THAT(status.error_message(), HasSubstr(source));
    EXPECT_THAT(status.error_message(), Not(HasSubstr(token)));
  };
  const std::string token_source = "max_priority of its token in --auth-token-file";
  for (const int allowed : {5, 0, -100}) {
    const grpc::Status status = attend(raised, allowed);
    EXPECT_TRUE(status.ok()) << allowed << ": " << status.error_message();
  }
  expect_refused(attend(raised, 6), raised, "priority 6 is above 5", token_source);
  expect_refused(attend(raised, std::numeric_limits<int32_t>::max()), raised,
                 "priority 2147483647 is above 5", token_source);
  EXPECT_TRUE(attend(lowered, -2).ok());
  expect_refused(attend(lowered, 0), lowered, "priority 0 is above -2", token_source);
  EXPECT_TRUE(attend(plain, 0).ok());
  expect_refused(attend(plain, 1), plain, "priority 1 is above 0", "(--max-priority)");

  // A stream's header is held to the same cap before it is admitted.
  v1::StreamHeader header = testing::HeaderFor(SmallRequest());
  header.set_priority(6);
  HeaderOnlyStream refused_stream(server->port(), "Bearer " + raised, header);
  EXPECT_FALSE(refused_stream.admitted());
  expect_refused(refused_stream.status(), raised, "header: priority 6 is above 5", token_source);
  header.set_priority(5);
  HeaderOnlyStream admitted_stream(server->port(), "Bearer " + raised, header);
  EXPECT_TRUE(admitted_stream.admitted()) << admitted_stream.status().error_message();

  for (const auto& [token, cap] : {std::pair{raised, 5}, {lowered, -2}, {plain, 0}}) {
    Client c(server->port(), WithToken(client::ConnectionOptions{}, token));
    v1::GetServerInfoResponse info;
    ASSERT_TRUE(c.client.GetServerInfo(&info, testing::WithTimeout(kTimeoutMs)).ok());
    EXPECT_EQ(info.limits().max_priority(), cap) << token;
  }
  const std::string scraped = server->metrics().Scrape();
  EXPECT_EQ(testing::MetricValue(scraped, "da_requests_rejected_total{reason=\"priority\"}"), 5)
      << scraped;
  EXPECT_EQ(testing::MetricValue(scraped,
                                 "da_requests_total{code=\"PERMISSION_DENIED\",method=\"Attend\"}"),
            4)
      << scraped;
  std::filesystem::remove_all(dir);
}

// Without --max-priority or token caps, any priority is allowed, and GetServerInfo says so.
TEST_F(SecurityTest, PriorityIsUncappedByDefault) {
  std::unique_ptr<Server> server = testing::StartServer(testing::LoopbackOptions());
  ASSERT_NE(server, nullptr);
  Client c(server->port(), client::ConnectionOptions{});
  v1::AttendRequest request = SmallRequest();
  request.set_priority(std::numeric_limits<int32_t>::max());
  v1::AttendResponse response;
  const grpc::Status status = c.client.Attend(request, &response, testing::WithTimeout(kTimeoutMs));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.output().data(), testing::InProcessOutput(request, 2));
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(c.client.GetServerInfo(&info, testing::WithTimeout(kTimeoutMs)).ok());
  EXPECT_EQ(info.limits().max_priority(), std::numeric_limits<int32_t>::max());
}

TEST(BearerTokenAuthenticatorTest, MaxPriorityIsTheMatchedTokensOwn) {
  BearerTokenAuthenticator authenticator(std::vector<TokenEntry>{
      {.token = "alpha-1", .max_priority = 7}, {.token = "beta-2", .max_priority = std::nullopt}});
  EXPECT_EQ(authenticator.MaxPriorityOf("Bearer alpha-1"), 7);
  EXPECT_EQ(authenticator.MaxPriorityOf("bearer  alpha-1 "), 7);
  EXPECT_EQ(authenticator.MaxPriorityOf("Bearer beta-2"), std::nullopt);
  EXPECT_EQ(authenticator.MaxPriorityOf("Bearer alpha-2"), std::nullopt);
  EXPECT_EQ(authenticator.MaxPriorityOf("Basic alpha-1"), std::nullopt);
}

TEST(BearerTokenAuthenticatorTest, ChecksTheSchemeAndTheTokenWithoutEchoingIt) {
  BearerTokenAuthenticator authenticator(std::vector<std::string>{"alpha-1", "beta-2"});
  auto check = [&](absl::string_view value) { return authenticator.CheckAuthorization(&value); };
  EXPECT_TRUE(check("Bearer alpha-1").ok());
  EXPECT_TRUE(check("bearer beta-2").ok());
  EXPECT_TRUE(check("BEARER   beta-2  ").ok());
  EXPECT_EQ(authenticator.CheckAuthorization(nullptr).error_code(), StatusCode::UNAUTHENTICATED);
  for (absl::string_view refused : {"Bearer alpha-2", "Bearer alpha-1x", "Bearer alpha-", "Bearer ",
                                    "Basic alpha-1", "alpha-1"}) {
    const grpc::Status status = check(refused);
    EXPECT_EQ(status.error_code(), StatusCode::UNAUTHENTICATED) << refused;
    EXPECT_THAT(status.error_message(), Not(HasSubstr("alpha"))) << refused;
  }
  EXPECT_THAT(check("Basic alpha-1").error_message(), HasSubstr("'Bearer <token>'"));
}

TEST(BearerTokenOfTest, ReadsTheTokenAsTheAuthenticatorDoes) {
  EXPECT_EQ(BearerTokenOf("Bearer t-1"), "t-1");
  EXPECT_EQ(BearerTokenOf("bearer t-1"), "t-1");
  EXPECT_EQ(BearerTokenOf("BEARER   t-1  "), "t-1");
  EXPECT_EQ(BearerTokenOf("Basic t-1"), std::nullopt);
  EXPECT_EQ(BearerTokenOf("Bearer"), std::nullopt);
  EXPECT_EQ(BearerTokenOf("t-1"), std::nullopt);
  // 64 bits, the same for the same token, never the token itself.
  EXPECT_EQ(TokenFingerprint("t-1").size(), 16);
  EXPECT_EQ(TokenFingerprint("t-1"), TokenFingerprint("t-1"));
  EXPECT_NE(TokenFingerprint("t-1"), TokenFingerprint("t-2"));
}

TEST(ReadTokenFileTest, SkipsCommentsAndBlankLinesAndRefusesFilesWithoutTokens) {
  const std::string dir = testing::MakeTempDir();
  WriteFile(dir + "/tokens", "# comment\n\n  first\t\r\nsecond\n   # indented comment\n");
  const absl::StatusOr<std::vector<TokenEntry>> tokens = ReadTokenFile(dir + "/tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_EQ(tokens->size(), 2);
  EXPECT_EQ((*tokens)[0].token, "first");
  EXPECT_EQ((*tokens)[1].token, "second");
  EXPECT_EQ((*tokens)[0].max_priority, std::nullopt);

  WriteFile(dir + "/empty", "# only a comment\n\n \n");
  absl::StatusOr<std::vector<TokenEntry>> empty = ReadTokenFile(dir + "/empty");
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(std::string(empty.status().message()),
              HasSubstr("--auth-token-file " + dir + "/empty: no token"));

  WriteFile(dir + "/spaces", "ok-token\nhas a space\n");
  absl::StatusOr<std::vector<TokenEntry>> spaces = ReadTokenFile(dir + "/spaces");
  ASSERT_FALSE(spaces.ok());
  EXPECT_THAT(std::string(spaces.status().message()), HasSubstr("line 2"));
  EXPECT_THAT(std::string(spaces.status().message()), Not(HasSubstr("has a space")));

  absl::StatusOr<std::vector<TokenEntry>> missing = ReadTokenFile(dir + "/missing");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("--auth-token-file " + dir + "/missing: cannot read"));
  std::filesystem::remove_all(dir);
}

TEST(ReadTokenFileTest, ReadsEachTokensMaxPriorityAndRefusesWhatItCannotRead) {
  const std::string dir = testing::MakeTempDir();
  WriteFile(dir + "/tokens",
            "high max_priority=100\n low\tmax_priority=-5 \nplain\nedge max_priority=2147483647\n");
  const absl::StatusOr<std::vector<TokenEntry>> tokens = ReadTokenFile(dir + "/tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_EQ(tokens->size(), 4);
  EXPECT_EQ((*tokens)[0].token, "high");
  EXPECT_EQ((*tokens)[0].max_priority, 100);
  EXPECT_EQ((*tokens)[1].token, "low");
  EXPECT_EQ((*tokens)[1].max_priority, -5);
  EXPECT_EQ((*tokens)[2].token, "plain");
  EXPECT_EQ((*tokens)[2].max_priority, std::nullopt);
  EXPECT_EQ((*tokens)[3].max_priority, std::numeric_limits<int32_t>::max());

  // Each refusal names the file and the line and never repeats a token (nor a word that may be
  // half of one).
  for (const auto& [text, says] : std::vector<std::pair<std::string, std::string>>{
           {"ok\nsecret-part max_priority=high\n", "line 2: max_priority 'high' is not an integer"},
           {"secret-part max_priority=2147483648\n", "line 1: max_priority '2147483648' is not"},
           {"secret-part max_priority=\n", "line 1: max_priority '' is not an integer"},
           {"secret-part max_priority=1 max_priority=2\n", "line 1: max_priority is given twice"},
           {"secret-part priority=1\n", "line 1: word 2 of the line is not max_priority=N"},
           {"secret-part other-half\n", "line 1: word 2 of the line is not max_priority=N"},
           {"secret-part other=half\n", "line 1: word 2 of the line is not max_priority=N"},
           {"secret-part max_priority=1\n#\nsecret-part max_priority=9\n",
            "line 3: the token of line 1 again"}}) {
    WriteFile(dir + "/bad", text);
    const absl::StatusOr<std::vector<TokenEntry>> bad = ReadTokenFile(dir + "/bad");
    ASSERT_FALSE(bad.ok()) << text;
    const std::string message(bad.status().message());
    EXPECT_THAT(message, HasSubstr("--auth-token-file " + dir + "/bad: " + says)) << text;
    EXPECT_THAT(message, Not(HasSubstr("secret-part"))) << text;
    EXPECT_THAT(message, Not(HasSubstr("half"))) << text;
  }
  std::filesystem::remove_all(dir);
}

// The client waits for a free stream before sending a call, so a connection already holding
// max_concurrent_streams open streams cannot start another until one ends; another connection can.
TEST_F(SecurityTest, MaxConcurrentStreamsHoldsBackTheExtraCallOnTheSameConnection) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_concurrent_streams = 2;
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);

  Client c(server->port(), client::ConnectionOptions{});
  // A first call settles the connection, so the client knows the server's stream limit.
  ASSERT_TRUE(CallInfo(c).ok());
  std::unique_ptr<v1::AttentionService::Stub> stub = v1::AttentionService::NewStub(c.channel);
  grpc::ClientContext contexts[2];
  std::vector<
      std::unique_ptr<grpc::ClientReaderWriter<v1::AttendStreamRequest, v1::AttendStreamResponse>>>
      streams;
  for (grpc::ClientContext& context : contexts) {
    streams.push_back(stub->AttendStream(&context));  // Open; the server waits for a header.
  }

  v1::GetServerInfoResponse info;
  grpc::Status held = c.client.GetServerInfo(&info, testing::WithTimeout(500));
  EXPECT_EQ(held.error_code(), StatusCode::DEADLINE_EXCEEDED) << held.error_message();

  // Channels with equal arguments share one connection (gRPC's global subchannel pool); a local
  // pool gives this one its own.
  grpc::ChannelArguments arguments = client::DefaultChannelArguments();
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  client::AttentionClient other_connection(
      grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server->port()),
                                grpc::InsecureChannelCredentials(), arguments));
  v1::GetServerInfoResponse other_info;
  const grpc::Status other =
      other_connection.GetServerInfo(&other_info, testing::WithTimeout(kTimeoutMs));
  EXPECT_TRUE(other.ok()) << other.error_code() << ": " << other.error_message();

  contexts[0].TryCancel();
  EXPECT_FALSE(streams[0]->Finish().ok());
  const grpc::Status freed = CallInfo(c);
  EXPECT_TRUE(freed.ok()) << freed.error_code() << ": " << freed.error_message();
  contexts[1].TryCancel();
  streams[1]->Finish();
}

TEST(ServerOptionsTest, MaxConcurrentStreamsMustBePositive) {
  ServerOptions options = testing::LoopbackOptions();
  options.max_concurrent_streams = 0;
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()),
              HasSubstr("max_concurrent_streams is 0; must be at least 1"));
}

// The real binary with bad security flags: exit 1 and one error line naming the flag and file.
struct BadStart {
  std::string name;
  std::vector<std::string> args;  // "@name" stands for the path of a test certificate file.
  std::vector<std::string> log_parts;
};

void PrintTo(const BadStart& c, std::ostream* os) { *os << c.name; }

class BadStartTest : public ::testing::TestWithParam<BadStart> {};

TEST_P(BadStartTest, ExitsOneNamingTheFlagAndTheFile) {
  const Certificates& certs = Certificates::Get();
  ASSERT_TRUE(certs.ok());
  WriteFile(certs.Path("empty_tokens.txt"), "# no tokens yet\n\n");
  // Every '@' becomes the certificates' folder, in arguments and expected log parts alike.
  auto expand = [&](const std::string& text) {
    return absl::StrReplaceAll(text, {{"@", certs.Path("")}});
  };
  std::vector<std::string> args;
  for (const std::string& arg : GetParam().args) args.push_back(expand(arg));
  testing::SpawnedServer server(DA_SERVER_BINARY, args);
  const std::optional<int> wait_status = server.process().WaitForExit(seconds(60));
  ASSERT_TRUE(wait_status.has_value()) << "still running; log:\n" << server.Log();
  EXPECT_TRUE(WIFEXITED(*wait_status)) << *wait_status;
  EXPECT_EQ(WEXITSTATUS(*wait_status), 1) << server.Log();
  const std::string log = server.Log();
  for (const std::string& part : GetParam().log_parts) {
    EXPECT_THAT(log, HasSubstr(expand(part)));
  }
  EXPECT_THAT(log, Not(HasSubstr("listening on")));
}

INSTANTIATE_TEST_SUITE_P(
    Flags, BadStartTest,
    ::testing::Values(
        BadStart{"MissingCertificate",
                 {"--tls-cert", "@missing.pem", "--tls-key", "@server.key"},
                 {"--tls-cert @missing.pem: cannot read"}},
        BadStart{"KeyOfAnotherCertificate",
                 {"--tls-cert", "@server.pem", "--tls-key", "@client.key"},
                 {"--tls-key @client.key: the private key does not match the certificate of "
                  "--tls-cert @server.pem"}},
        BadStart{"CertificateWithoutKey",
                 {"--tls-cert", "@server.pem"},
                 {"--tls-cert @server.pem is set but --tls-key is not"}},
        BadStart{"NotACertificate",
                 {"--tls-cert", "@server.key", "--tls-key", "@server.key"},
                 {"--tls-cert @server.key: no PEM certificate"}},
        BadStart{"ClientCaWithoutCertificate",
                 {"--tls-client-ca", "@ca.pem"},
                 {"--tls-client-ca @ca.pem requires --tls-cert and --tls-key"}},
        BadStart{"MissingClientCa",
                 {"--tls-cert", "@server.pem", "--tls-key", "@server.key", "--tls-client-ca",
                  "@missing_ca.pem"},
                 {"--tls-client-ca @missing_ca.pem: cannot read"}},
        BadStart{"EmptyTokenFile",
                 {"--auth-token-file", "@empty_tokens.txt"},
                 {"--auth-token-file @empty_tokens.txt: no token"}},
        BadStart{"MissingTokenFile",
                 {"--auth-token-file", "@missing_tokens.txt"},
                 {"--auth-token-file @missing_tokens.txt: cannot read"}}));

TEST(StartupFlagsTest, MaxConcurrentStreamsBelowOneIsRefused) {
  testing::SpawnedServer server(DA_SERVER_BINARY, {"--max-concurrent-streams", "0"});
  const std::optional<int> wait_status = server.process().WaitForExit(seconds(60));
  ASSERT_TRUE(wait_status.has_value()) << server.Log();
  EXPECT_TRUE(WIFEXITED(*wait_status) && WEXITSTATUS(*wait_status) != 0) << *wait_status;
  EXPECT_THAT(server.Log(), HasSubstr("--max-concurrent-streams"));
}

// Runs command through the shell; its exit code and everything it printed.
std::pair<int, std::string> RunCommand(const std::string& command) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  std::string output;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) output.append(buffer, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

// An encrypted key is refused at start-up like any key the server cannot read. Given no
// passphrase callback, OpenSSL asks for the passphrase on the terminal, or reads it from stdin
// where there is none: the server would hang at start-up, or read a passphrase nobody meant for
// it. Here the server has no terminal (a session of its own) and the right passphrase on stdin, so
// it is refused only because it never asks.
TEST(StartupFlagsTest, AnEncryptedKeyIsRefusedWithoutAskingForItsPassphrase) {
  const Certificates& certs = Certificates::Get();
  ASSERT_TRUE(certs.ok());
  const std::string encrypted = certs.Path("server_encrypted.key");
  const auto [made_code, made_output] =
      RunCommand("openssl pkey -in " + certs.Path("server.key") +
                 " -aes256 -passout pass:da-test-passphrase -out " + encrypted);
  ASSERT_EQ(made_code, 0) << made_output;
  ASSERT_THAT(ReadFile(encrypted), HasSubstr("ENCRYPTED"));
  // `timeout` exits 124 when the server is still running: it read the passphrase and started.
  const auto [code, output] = RunCommand(
      "printf 'da-test-passphrase\\n' | timeout 60 setsid " + std::string(DA_SERVER_BINARY) +
      " --listen 127.0.0.1:0 --metrics-listen '' --threads 2 --tls-cert " +
      certs.Path("server.pem") + " --tls-key " + encrypted);
  EXPECT_EQ(code, 1) << output;
  EXPECT_THAT(output, HasSubstr("--tls-key " + encrypted + ": no unencrypted PEM private key"));
  EXPECT_THAT(output, Not(HasSubstr("pass phrase")));  // OpenSSL's prompt.
}

// The real da-server with TLS, mutual TLS and the test's token file.
std::vector<std::string> SecuredServerFlags(const Certificates& certs) {
  return {
      "--tls-cert",      certs.Path("server.pem"), "--tls-key",         certs.Path("server.key"),
      "--tls-client-ca", certs.Path("ca.pem"),     "--auth-token-file", certs.Path("tokens.txt")};
}

// da-client's flags to reach that server over mutual TLS (without a token). localhost is in the
// server certificate, so no --tls-server-name is needed.
std::string MutualTlsClientFlags(const Certificates& certs, int port) {
  return " --server localhost:" + std::to_string(port) + " --tls-ca " + certs.Path("ca.pem") +
         " --tls-cert " + certs.Path("client.pem") + " --tls-key " + certs.Path("client.key");
}

TEST(CliSecurityTest, InfoOverTlsWithATokenAndRefusedWithout) {
  const Certificates& certs = Certificates::Get();
  ASSERT_TRUE(certs.ok());
  testing::SpawnedServer server(DA_SERVER_BINARY, SecuredServerFlags(certs));
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  const std::string token_file = certs.Path("client_token.txt");
  WriteFile(token_file, std::string("# for da-client\n") + kToken + "\n");
  const std::string base =
      std::string(DA_CLIENT_BINARY) + " info --json" + MutualTlsClientFlags(certs, server.port());

  const auto [ok_code, ok_output] = RunCommand(base + " --token-file " + token_file);
  EXPECT_EQ(ok_code, 0) << ok_output;
  EXPECT_THAT(ok_output, HasSubstr("\"version\"")) << ok_output;

  const auto [refused_code, refused_output] = RunCommand(base);
  EXPECT_EQ(refused_code, 1) << refused_output;
  EXPECT_THAT(refused_output, HasSubstr("UNAUTHENTICATED")) << refused_output;

  const auto [missing_code, missing_output] =
      RunCommand(base + " --token-file " + certs.Path("no_such_token"));
  EXPECT_EQ(missing_code, 1) << missing_output;
  EXPECT_THAT(missing_output, HasSubstr("--token-file " + certs.Path("no_such_token")));

  const auto [usage_code, usage_output] =
      RunCommand(std::string(DA_CLIENT_BINARY) + " info --tls-cert " + certs.Path("client.pem"));
  EXPECT_EQ(usage_code, 2) << usage_output;
  EXPECT_THAT(usage_output, HasSubstr("--tls-cert needs --tls-key"));
}

// The load generator takes the same connection flags: over mTLS with the token every answer is
// OK; without the token every answer is UNAUTHENTICATED, which the report counts as unexpected.
TEST(CliSecurityTest, LoadOverMutualTlsWithAToken) {
  const Certificates& certs = Certificates::Get();
  ASSERT_TRUE(certs.ok());
  testing::SpawnedServer server(DA_SERVER_BINARY, SecuredServerFlags(certs));
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  const std::string token_file = certs.Path("load_token.txt");
  WriteFile(token_file, std::string(kToken) + "\n");
  const std::string base = std::string(DA_CLIENT_BINARY) +
                           " load --json --mix small --concurrency 2 --duration-s 1" +
                           MutualTlsClientFlags(certs, server.port());
  const auto [ok_code, ok_output] = RunCommand(base + " --token-file " + token_file);
  EXPECT_EQ(ok_code, 0) << ok_output;
  EXPECT_THAT(ok_output, HasSubstr("\"unexpected_errors\":0")) << ok_output;
  const auto [refused_code, refused_output] = RunCommand(base);
  EXPECT_EQ(refused_code, 1) << refused_output;
  EXPECT_THAT(refused_output, HasSubstr("UNAUTHENTICATED")) << refused_output;
}

}  // namespace
}  // namespace da::server
