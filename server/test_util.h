// Helpers for the server tests: random AttendRequests, the in-process engine's answer to them, an
// in-process server on a loopback port, a spawned da-server process, and a tiny HTTP GET.
// Test-only; not part of da_server.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/attention_client.h"
#include "da/v1/attention.pb.h"
#include "engine/engine.h"
#include "server/server.h"

namespace da::server::testing {

// What a random request looks like.
struct ProblemConfig {
  int64_t batch = 1;
  int64_t seq_len = 64;
  int64_t heads = 4;
  int64_t kv_heads = 4;
  int64_t head_dim = 16;
  std::vector<std::pair<int64_t, int64_t>> patterns = {{16, 1}, {32, 2}};  // (w, r)
  bool causal = false;
  v1::CombineMode mode = v1::COMBINE_MODE_LONGNET;
  v1::DType dtype = v1::DTYPE_FP32;
};

// A well-formed request with fresh random q, k, v in [-1, 1).
v1::AttendRequest RandomRequest(const ProblemConfig& config, std::mt19937& rng);

// The StreamHeader of request (its shape, dtype and spec): what WarmUp takes to warm its plan.
v1::StreamHeader HeaderFor(const v1::AttendRequest& request);

// fp32 [1, seq_len, 1, 32] with one segment covering everything (fp32 products): compute grows with
// seq_len^2 (4 * seq_len^2 * 32 FLOP) while the message grows with seq_len (384 bytes per token),
// so a long run fits in a small message. seq_len 40960: about 0.2 TFLOP, seconds on two cores;
// 131072: about 2.2 TFLOP, too long to finish before a test's deadline or drain bound.
v1::AttendRequest LongRequest(int64_t seq_len);

// The output bytes engine::Engine::Run (CPU backend, `threads` threads) gives for request.
std::string InProcessOutput(const v1::AttendRequest& request, int threads);

// ServerOptions for tests: 127.0.0.1:0, no metrics, 2 compute threads.
ServerOptions LoopbackOptions();

// options with the start-up self-check replaced by one that passes: no start-up throughput, so no
// request is refused up front for its deadline until a run has been measured (a test can then let
// a deadline pass during compute).
ServerOptions WithoutStartupThroughput(ServerOptions options);

// Starts an in-process server (fails the test and returns null on error).
std::unique_ptr<Server> StartServer(const ServerOptions& options);

std::shared_ptr<grpc::Channel> ChannelTo(int port);

// Call options with only a deadline.
client::CallOptions WithTimeout(int64_t timeout_ms);

// Polls predicate every few milliseconds until it holds or timeout passes; returns its last value.
bool WaitFor(const std::function<bool()>& predicate, std::chrono::milliseconds timeout);

// The body of GET http://127.0.0.1:port/path, or nullopt when the request fails or the status is
// not 200.
std::optional<std::string> HttpGet(int port, const std::string& path);

// GET http://127.0.0.1:port/path: the status code and the body, or nullopt when no HTTP answer
// came.
struct HttpAnswer {
  int status = 0;
  std::string body;
};
std::optional<HttpAnswer> HttpRequest(int port, const std::string& path);
// A TCP connection to 127.0.0.1:port (the caller closes it); -1 when it cannot connect.
int ConnectLoopback(int port);

// The value of the sample `series` (name plus labels, exactly as exposed, e.g.
// `da_plan_cache_hits_total`) in Prometheus text, or nullopt when absent.
std::optional<double> MetricValue(const std::string& text, const std::string& series);

// A child process running a binary; killed (SIGKILL) on destruction if still running.
class ChildProcess {
 public:
  // stderr_path: where the child's stderr goes; empty: inherited.
  static std::unique_ptr<ChildProcess> Spawn(const std::string& binary,
                                             const std::vector<std::string>& args,
                                             const std::string& stderr_path = "");
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  // Waits up to timeout for the exit; the raw wait status, or nullopt if still running.
  std::optional<int> WaitForExit(std::chrono::milliseconds timeout);

 private:
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  pid_t pid_;
  bool exited_ = false;
};

// The integer in a file that --port-file wrote, polled for until timeout; 0 on timeout.
int ReadPortFile(const std::string& path, std::chrono::milliseconds timeout);

// A fresh empty directory under TMPDIR for one test.
std::string MakeTempDir();

// `<promtool> check metrics` on text: its exit status (-1 when it could not run), with what it
// printed in *output.
int PromtoolCheck(const std::string& promtool, const std::string& text, std::string* output);

// A da-server process on loopback ports the kernel picks (2 compute threads), with its port files
// and its stderr (the log) in a temporary directory that goes away with it.
class SpawnedServer {
 public:
  SpawnedServer(const std::string& binary, const std::vector<std::string>& extra_args);
  ~SpawnedServer();

  // Waits up to timeout for both port files; true when the server is listening.
  bool WaitForPorts(std::chrono::milliseconds timeout);
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  ChildProcess& process() { return *child_; }
  // What the process has logged so far.
  std::string Log() const;
  // A path inside the server's temporary directory, for files to pass it.
  std::string PathFor(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
  std::unique_ptr<ChildProcess> child_;
  int port_ = 0;
  int metrics_port_ = 0;
};

// A grpc.health.v1.Health/Watch call read on its own thread: every status received, in order, and
// how the call ended. Cancelled (if still open) on destruction.
class HealthWatch {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  HealthWatch(std::shared_ptr<grpc::Channel> channel, const std::string& service);
  ~HealthWatch();

  // True once the latest status received is `status` (waits up to timeout).
  bool WaitForLatest(ServingStatus status, std::chrono::milliseconds timeout);
  // The call's final status once it has ended (waits up to timeout); nullopt while still open.
  std::optional<grpc::Status> WaitForEnd(std::chrono::milliseconds timeout);
  std::vector<ServingStatus> statuses() const;

 private:
  std::unique_ptr<grpc::health::v1::Health::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>> reader_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<ServingStatus> statuses_;
  grpc::Status final_;
  bool done_ = false;
  std::thread thread_;  // Last: starts once the members above exist.
};

}  // namespace da::server::testing
