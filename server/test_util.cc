#include "server/test_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "client/stream_blocks.h"
#include "engine/test_tensors.h"
#include "server/conversion.h"

namespace da::server::testing {
namespace {

v1::Tensor RandomProtoTensor(v1::DType dtype, engine::Shape4 shape, std::mt19937& rng) {
  const engine::DType engine_dtype = DTypeFromProto(dtype, "dtype").value();
  engine::testing::OwnedTensor owned = engine::testing::RandomTensor(engine_dtype, shape, rng);
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (int64_t dim : {shape.batch, shape.seq_len, shape.heads, shape.head_dim}) {
    tensor.add_shape(dim);
  }
  tensor.set_data(owned.bytes.data(), owned.bytes.size());
  return tensor;
}

}  // namespace

v1::AttendRequest RandomRequest(const ProblemConfig& config, std::mt19937& rng) {
  v1::AttendRequest request;
  for (const auto& [segment_len, dilation] : config.patterns) {
    request.mutable_spec()->add_segment_lengths(segment_len);
    request.mutable_spec()->add_dilation_rates(dilation);
  }
  request.mutable_spec()->set_causal(config.causal);
  request.mutable_spec()->set_combine_mode(config.mode);
  const engine::Shape4 q_shape{config.batch, config.seq_len, config.heads, config.head_dim};
  const engine::Shape4 kv_shape{config.batch, config.seq_len, config.kv_heads, config.head_dim};
  *request.mutable_query() = RandomProtoTensor(config.dtype, q_shape, rng);
  *request.mutable_key() = RandomProtoTensor(config.dtype, kv_shape, rng);
  *request.mutable_value() = RandomProtoTensor(config.dtype, kv_shape, rng);
  return request;
}

v1::StreamHeader HeaderFor(const v1::AttendRequest& request) {
  client::StreamPlan plan;
  const grpc::Status status = client::MakeStreamPlan(request, 0, &plan);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return plan.header;
}

v1::AttendRequest LongRequest(int64_t seq_len) {
  std::mt19937 rng(std::random_device{}());
  ProblemConfig config;
  config.seq_len = seq_len;
  config.heads = 1;
  config.kv_heads = 1;
  config.head_dim = 32;
  config.patterns = {{seq_len, 1}};
  v1::AttendRequest request = RandomRequest(config, rng);
  // fp32 products: AUTO may pick bf16, which is about twice as fast.
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  return request;
}

std::string InProcessOutput(const v1::AttendRequest& request, int threads) {
  absl::StatusOr<UnaryProblem> problem = ProblemFromRequest(request);
  EXPECT_TRUE(problem.ok()) << problem.status();
  if (!problem.ok()) return "";
  engine::EngineOptions options;
  options.threads = threads;
  auto engine = engine::Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return "";
  const int64_t out_bytes = problem->q.shape.elements() * engine::DTypeSize(problem->out_dtype);
  std::string out(static_cast<size_t>(out_bytes), '\xff');
  engine::RunRequest run;
  run.q = problem->q;
  run.k = problem->k;
  run.v = problem->v;
  run.spec = problem->spec;
  run.out = {problem->out_dtype, problem->q.shape, out.data(), out_bytes};
  absl::StatusOr<engine::ExecutionInfo> info = (*engine)->Run(run);
  EXPECT_TRUE(info.ok()) << info.status();
  return out;
}

ServerOptions WithoutStartupThroughput(ServerOptions options) {
  options.self_check = [](engine::Engine&) { return absl::OkStatus(); };
  return options;
}

ServerOptions LoopbackOptions() {
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_address = "";
  options.threads = 2;
  return options;
}

std::unique_ptr<Server> StartServer(const ServerOptions& options) {
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

std::shared_ptr<grpc::Channel> ChannelTo(int port) {
  return client::MakeChannel("127.0.0.1:" + std::to_string(port));
}

client::CallOptions WithTimeout(int64_t timeout_ms) {
  client::CallOptions options;
  options.timeout_ms = timeout_ms;
  return options;
}

bool WaitFor(const std::function<bool()>& predicate, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!predicate()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

std::optional<std::string> HttpGet(int port, const std::string& path) {
  std::optional<HttpAnswer> answer = HttpRequest(port, path);
  if (!answer || answer->status != 200) return std::nullopt;
  return std::move(answer->body);
}

int ConnectLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::optional<HttpAnswer> HttpRequest(int port, const std::string& path) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return std::nullopt;
  // HTTP/1.0: the server closes the connection after the answer, which ends the read loop.
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (send(fd, request.data(), request.size(), 0) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return std::nullopt;
  }
  std::string answer;
  char buffer[16384];
  for (ssize_t n; (n = recv(fd, buffer, sizeof(buffer), 0)) > 0;) answer.append(buffer, n);
  close(fd);
  const size_t body = answer.find("\r\n\r\n");
  const size_t space = answer.find(' ');
  if (answer.rfind("HTTP/1.", 0) != 0 || body == std::string::npos || space == std::string::npos) {
    return std::nullopt;
  }
  return HttpAnswer{std::atoi(answer.c_str() + space + 1), answer.substr(body + 4)};
}

std::optional<double> MetricValue(const std::string& text, const std::string& series) {
  const std::string prefix = series + " ";
  for (size_t start = 0; start < text.size();) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    if (text.compare(start, prefix.size(), prefix) == 0) {
      return std::strtod(text.substr(start + prefix.size(), end - start - prefix.size()).c_str(),
                         nullptr);
    }
    start = end + 1;
  }
  return std::nullopt;
}

std::unique_ptr<ChildProcess> ChildProcess::Spawn(const std::string& binary,
                                                  const std::vector<std::string>& args,
                                                  const std::string& stderr_path) {
  // argv is built before fork: the child of a multithreaded parent may only call
  // async-signal-safe functions (open, dup2, exec).
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    if (!stderr_path.empty()) {
      const int fd = open(stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd < 0 || dup2(fd, STDERR_FILENO) < 0) _exit(126);
    }
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  EXPECT_GT(pid, 0) << "fork failed";
  return pid > 0 ? std::unique_ptr<ChildProcess>(new ChildProcess(pid)) : nullptr;
}

ChildProcess::~ChildProcess() {
  if (exited_) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
}

std::optional<int> ChildProcess::WaitForExit(std::chrono::milliseconds timeout) {
  int status = 0;
  const bool done = WaitFor([&] { return waitpid(pid_, &status, WNOHANG) == pid_; }, timeout);
  if (!done) return std::nullopt;
  exited_ = true;
  return status;
}

int ReadPortFile(const std::string& path, std::chrono::milliseconds timeout) {
  int port = 0;
  WaitFor(
      [&] {
        std::ifstream in(path);
        return static_cast<bool>(in >> port) && port > 0;
      },
      timeout);
  return port;
}

std::string MakeTempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/da-server-test-XXXXXX";
  const char* made = mkdtemp(pattern.data());
  EXPECT_NE(made, nullptr) << "mkdtemp " << pattern;
  return pattern;
}

SpawnedServer::SpawnedServer(const std::string& binary, const std::vector<std::string>& extra_args)
    : dir_(MakeTempDir()) {
  std::vector<std::string> args = {"--listen",
                                   "127.0.0.1:0",
                                   "--port-file",
                                   dir_ + "/port",
                                   "--metrics-listen",
                                   "127.0.0.1:0",
                                   "--metrics-port-file",
                                   dir_ + "/metrics_port",
                                   "--threads",
                                   "2"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  child_ = ChildProcess::Spawn(binary, args, dir_ + "/log");
}

SpawnedServer::~SpawnedServer() {
  child_.reset();
  std::filesystem::remove_all(dir_);
}

bool SpawnedServer::WaitForPorts(std::chrono::milliseconds timeout) {
  if (child_ == nullptr) return false;
  port_ = ReadPortFile(dir_ + "/port", timeout);
  metrics_port_ = ReadPortFile(dir_ + "/metrics_port", timeout);
  return port_ > 0 && metrics_port_ > 0;
}

std::string SpawnedServer::Log() const {
  std::ifstream in(dir_ + "/log");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

HealthWatch::HealthWatch(std::shared_ptr<grpc::Channel> channel, const std::string& service)
    : stub_(grpc::health::v1::Health::NewStub(channel)) {
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  reader_ = stub_->Watch(&context_, request);
  thread_ = std::thread([this] {
    grpc::health::v1::HealthCheckResponse response;
    while (reader_->Read(&response)) {
      std::lock_guard<std::mutex> lock(mutex_);
      statuses_.push_back(response.status());
      cv_.notify_all();
    }
    const grpc::Status status = reader_->Finish();
    std::lock_guard<std::mutex> lock(mutex_);
    final_ = status;
    done_ = true;
    cv_.notify_all();
  });
}

HealthWatch::~HealthWatch() {
  context_.TryCancel();
  thread_.join();
}

bool HealthWatch::WaitForLatest(ServingStatus status, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  return cv_.wait_for(lock, timeout,
                      [&] { return !statuses_.empty() && statuses_.back() == status; });
}

std::optional<grpc::Status> HealthWatch::WaitForEnd(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!cv_.wait_for(lock, timeout, [&] { return done_; })) return std::nullopt;
  return final_;
}

std::vector<HealthWatch::ServingStatus> HealthWatch::statuses() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return statuses_;
}

int PromtoolCheck(const std::string& promtool, const std::string& text, std::string* output) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/metrics.txt";
  std::ofstream(path) << text;
  const std::string command = promtool + " check metrics < " + path + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return -1;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) output->append(buffer, n);
  const int status = pclose(pipe);
  std::filesystem::remove_all(dir);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace da::server::testing
