// Multi-process serving through the real binary (issue #6): a da-server rank 0 and worker ranks
// on loopback, real Gloo, real gRPC. A group answers like one process; a worker SIGKILLed
// mid-request fails that request with UNAVAILABLE within the collective timeout, rank 0 stays up
// with readiness NOT_SERVING, and the group re-forms when the worker is back; bad flags exit 1
// naming the flag, the value and the limit.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/attention_client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/attention_service.h"
#include "server/proc_stats.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using grpc::health::v1::HealthCheckResponse;
using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

constexpr int kCollectiveTimeoutMs = 10000;
constexpr int kHeartbeatMs = 100;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Rank 0 (a SpawnedServer: gRPC and /metrics on loopback) and its workers, whose logs go to a
// directory of the group's own.
class Group {
 public:
  // every_rank: extra flags for every rank (the data plane). shard_min_flops: rank 0's
  // --shard-min-flops; 0 by default, so that the small problems here are sharded.
  explicit Group(int world_size, std::vector<std::string> every_rank = {},
                 int heartbeat_ms = kHeartbeatMs, const std::string& shard_min_flops = "0")
      : world_size_(world_size),
        heartbeat_ms_(heartbeat_ms),
        every_rank_(std::move(every_rank)),
        dir_(testing::MakeTempDir()),
        rank0_(DA_SERVER_BINARY,
               Concat({"--world-size", std::to_string(world_size), "--rank", "0", "--coordinator",
                       "127.0.0.1:0", "--coordinator-port-file", dir_ + "/coordinator_port",
                       "--heartbeat-ms", std::to_string(heartbeat_ms), "--collective-timeout-ms",
                       std::to_string(kCollectiveTimeoutMs), "--shard-min-flops", shard_min_flops},
                      every_rank_)) {}
  ~Group() { std::filesystem::remove_all(dir_); }

  // Flags for the workers only (before Start).
  void SetWorkerFlags(std::vector<std::string> flags) { worker_flags_ = std::move(flags); }

  // Waits for rank 0's ports, then starts every worker.
  bool Start() {
    if (!rank0_.WaitForPorts(seconds(30))) return false;
    coordinator_port_ = testing::ReadPortFile(dir_ + "/coordinator_port", seconds(10));
    if (coordinator_port_ == 0) return false;
    workers_.resize(world_size_);
    for (int r = 1; r < world_size_; ++r) StartWorker(r);
    channel_ = testing::ChannelTo(rank0_.port());
    return true;
  }

  void StartWorker(int rank) {
    workers_[rank] = testing::ChildProcess::Spawn(
        DA_SERVER_BINARY,
        Concat({"--world-size", std::to_string(world_size_), "--rank", std::to_string(rank),
                "--coordinator", "127.0.0.1:" + std::to_string(coordinator_port_), "--threads", "1",
                "--heartbeat-ms", std::to_string(heartbeat_ms_), "--collective-timeout-ms",
                std::to_string(kCollectiveTimeoutMs), "--metrics-listen", "127.0.0.1:0",
                "--metrics-port-file", WorkerMetricsPortFile(rank)},
               Concat(every_rank_, worker_flags_)),
        WorkerLog(rank));
  }

  // The worker's /metrics port (0 when it has not written it within 10 s).
  int WorkerMetricsPort(int rank) {
    return testing::ReadPortFile(WorkerMetricsPortFile(rank), seconds(10));
  }

  HealthCheckResponse::ServingStatus Readiness() {
    auto stub = grpc::health::v1::Health::NewStub(channel_);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + seconds(5));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(kServiceName);
    HealthCheckResponse response;
    if (!stub->Check(&context, request, &response).ok()) return HealthCheckResponse::UNKNOWN;
    return response.status();
  }

  bool WaitForReadiness(HealthCheckResponse::ServingStatus status, milliseconds timeout) {
    return testing::WaitFor([&] { return Readiness() == status; }, timeout);
  }

  std::string Metrics() { return testing::HttpGet(rank0_.metrics_port(), "/metrics").value_or(""); }

  std::string Logs() {
    std::string logs = "--- rank 0 ---\n" + rank0_.Log();
    for (int r = 1; r < world_size_; ++r) {
      logs += "--- rank " + std::to_string(r) + " ---\n" + ReadFile(WorkerLog(r));
    }
    return logs;
  }

  testing::SpawnedServer& rank0() { return rank0_; }
  int coordinator_port() const { return coordinator_port_; }
  std::unique_ptr<testing::ChildProcess>& worker(int rank) { return workers_[rank]; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  std::string WorkerLog(int rank) const { return dir_ + "/worker" + std::to_string(rank) + ".log"; }
  std::string WorkerMetricsPortFile(int rank) const {
    return dir_ + "/worker" + std::to_string(rank) + ".metrics_port";
  }

  static std::vector<std::string> Concat(std::vector<std::string> a,
                                         const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  const int world_size_;
  const int heartbeat_ms_;
  const std::vector<std::string> every_rank_;
  std::vector<std::string> worker_flags_;
  const std::string dir_;
  testing::SpawnedServer rank0_;
  int coordinator_port_ = 0;
  std::vector<std::unique_ptr<testing::ChildProcess>> workers_;
  std::shared_ptr<grpc::Channel> channel_;
};

int PromtoolCheck(const std::string& text, std::string* output) {
  return testing::PromtoolCheck(DA_PROMTOOL, text, output);
}

double MaxRelativeError(const std::string& got, const std::string& want) {
  EXPECT_EQ(got.size(), want.size());
  const size_t n = std::min(got.size(), want.size()) / sizeof(float);
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    float a, b;
    std::memcpy(&a, got.data() + i * sizeof(float), sizeof(float));
    std::memcpy(&b, want.data() + i * sizeof(float), sizeof(float));
    worst = std::max(worst, std::abs(double{a} - b) / std::max(1e-6, std::abs(double{b})));
  }
  return worst;
}

// total_ms of rank 0's log line for the first request that ended with one of `codes` (waits up
// to 15 s for it); -1 when none came.
double ServerTotalMs(Group& group, const std::vector<std::string>& codes) {
  std::string line;
  testing::WaitFor(
      [&] {
        const std::string log = group.rank0().Log();
        size_t at = std::string::npos;
        for (const std::string& code : codes) at = std::min(at, log.find("code=" + code + " "));
        if (at == std::string::npos) return false;
        const size_t begin = log.rfind('\n', at) + 1;
        line = log.substr(begin, log.find('\n', at) - begin);
        return true;
      },
      seconds(15));
  const size_t total = line.find("total_ms=");
  return total == std::string::npos ? -1 : std::stod(line.substr(total + 9));
}

v1::AttendRequest Fp32Request(const testing::ProblemConfig& config, v1::ShardPolicy policy) {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest(config, rng);
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  request.mutable_spec()->set_shard_policy(policy);
  return request;
}

TEST(MultiProcessServingTest, ThreeRanksAnswerLikeOneProcess) {
  Group group(3);
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  // Every worker rank can be probed and scraped: ready once in the group, its build and process
  // metrics on /metrics.
  for (int rank = 1; rank < 3; ++rank) {
    const int port = group.WorkerMetricsPort(rank);
    ASSERT_GT(port, 0) << group.Logs();
    EXPECT_TRUE(testing::WaitFor(
        [&] {
          const std::optional<testing::HttpAnswer> ready = testing::HttpRequest(port, "/readyz");
          return ready.has_value() && ready->status == 200;
        },
        seconds(10)))
        << "rank " << rank << "\n"
        << group.Logs();
    EXPECT_EQ(testing::HttpRequest(port, "/livez")->status, 200);
    const std::string metrics = testing::HttpGet(port, "/metrics").value_or("");
    EXPECT_NE(metrics.find("da_build_info{features=\""), std::string::npos) << metrics;
    EXPECT_GT(testing::MetricValue(metrics, "process_resident_memory_bytes").value_or(0), 0)
        << metrics;
  }
  client::AttentionClient client(group.channel());

  struct Case {
    testing::ProblemConfig config;
    v1::ShardPolicy policy;
    v1::ShardPolicy expected;
  };
  const std::vector<Case> cases = {
      // AUTO with heads >= ranks: HEADS. GQA, two patterns.
      {{.seq_len = 200, .heads = 6, .kv_heads = 2, .patterns = {{32, 1}, {64, 2}}},
       v1::SHARD_POLICY_AUTO,
       v1::SHARD_POLICY_HEADS},
      // SEQUENCE with segments spanning ranks, N not divisible by 3, causal, GROUPED.
      {{.seq_len = 301,
        .heads = 4,
        .kv_heads = 4,
        .patterns = {{64, 1}, {256, 4}},
        .causal = true,
        .mode = v1::COMBINE_MODE_GROUPED},
       v1::SHARD_POLICY_SEQUENCE,
       v1::SHARD_POLICY_SEQUENCE},
      // AUTO with fewer heads than ranks: SEQUENCE.
      {{.batch = 2, .seq_len = 150, .heads = 2, .kv_heads = 1, .patterns = {{150, 3}}},
       v1::SHARD_POLICY_AUTO,
       v1::SHARD_POLICY_SEQUENCE},
      // AUTO with fewer heads and fewer tokens than ranks: rank 0 alone, where sharding could
      // only refuse it.
      {{.seq_len = 2, .heads = 2, .kv_heads = 2, .patterns = {{2, 1}}},
       v1::SHARD_POLICY_AUTO,
       v1::SHARD_POLICY_NONE},
  };
  for (const Case& c : cases) {
    const v1::AttendRequest request = Fp32Request(c.config, c.policy);
    const std::string expected = testing::InProcessOutput(request, 2);
    v1::AttendResponse response;
    grpc::Status status = client.Attend(request, &response, testing::WithTimeout(20000));
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
    EXPECT_LE(MaxRelativeError(response.output().data(), expected), 1e-6);
    EXPECT_EQ(response.info().shard_strategy(), c.expected);
    EXPECT_EQ(response.info().precision_used(), v1::PRECISION_FP32);
    if (c.expected == v1::SHARD_POLICY_NONE) {
      EXPECT_EQ(response.info().devices_size(), 1);
      continue;
    }
    ASSERT_EQ(response.info().devices_size(), 3);
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(response.info().devices(r), "rank" + std::to_string(r) + ":cpu");
    }
  }
  // AttendStream runs each chunk of whole segments across the group too.
  {
    const v1::AttendRequest request = Fp32Request(cases[1].config, v1::SHARD_POLICY_SEQUENCE);
    v1::AttendResponse streamed;
    grpc::Status status =
        client.AttendStream(request, &streamed, testing::WithTimeout(20000), {.block_tokens = 50});
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
    EXPECT_LE(MaxRelativeError(streamed.output().data(), testing::InProcessOutput(request, 2)),
              1e-6);
    EXPECT_EQ(streamed.info().shard_strategy(), v1::SHARD_POLICY_SEQUENCE);
  }
  // NONE keeps a request on rank 0 alone.
  const v1::AttendRequest local = Fp32Request(cases[0].config, v1::SHARD_POLICY_NONE);
  v1::AttendResponse response;
  ASSERT_TRUE(client.Attend(local, &response, testing::WithTimeout(20000)).ok());
  EXPECT_EQ(response.info().shard_strategy(), v1::SHARD_POLICY_NONE);
  EXPECT_EQ(response.output().data(), testing::InProcessOutput(local, 2));

  // Every rank's traffic and compute time, collected by rank 0.
  const std::string text = group.Metrics();
  std::string promtool_output;
  EXPECT_EQ(PromtoolCheck(text, &promtool_output), 0) << promtool_output << "\n" << text;
  EXPECT_EQ(testing::MetricValue(text, "da_group_world_size"), 3) << text;
  EXPECT_EQ(testing::MetricValue(text, "da_group_whole"), 1) << text;
  EXPECT_GE(testing::MetricValue(text, "da_group_runs_total{outcome=\"completed\"}"), 4) << text;
  for (int r = 0; r < 3; ++r) {
    const std::string rank = "{rank=\"" + std::to_string(r) + "\"}";
    EXPECT_GT(testing::MetricValue(text, "da_rank_bytes_sent_total" + rank).value_or(0), 0) << r;
    EXPECT_GT(testing::MetricValue(text, "da_rank_bytes_received_total" + rank).value_or(0), 0)
        << r;
    EXPECT_GT(testing::MetricValue(text, "da_rank_compute_seconds_total" + rank).value_or(0), 0)
        << r;
    EXPECT_GT(testing::MetricValue(text, "da_rank_collective_seconds_total" + rank).value_or(0), 0)
        << r;
  }
  // The SEQUENCE cases exchanged kept K/V rows of spanning segments.
  EXPECT_GT(testing::MetricValue(text, "da_rank_exchange_bytes_total{rank=\"1\"}").value_or(0), 0);

  // Each worker exports its own device and plan cache: a share of every group run computed there
  // (reported as its run ends, which may be just after rank 0 answered).
  const double group_runs =
      testing::MetricValue(text, "da_group_runs_total{outcome=\"completed\"}").value_or(0);
  for (int rank = 1; rank < 3; ++rank) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank);
    const int port = group.WorkerMetricsPort(rank);
    std::string worker;
    EXPECT_TRUE(testing::WaitFor(
        [&] {
          worker = testing::HttpGet(port, "/metrics").value_or("");
          return testing::MetricValue(worker, "da_device_runs_total{device=\"cpu:0\"}") ==
                 group_runs;
        },
        seconds(5)))
        << group_runs << " group runs\n"
        << worker;
    EXPECT_EQ(PromtoolCheck(worker, &promtool_output), 0) << promtool_output << "\n" << worker;
    EXPECT_NE(worker.find("da_device_info{capability=\""), std::string::npos) << worker;
    EXPECT_EQ(testing::MetricValue(worker, "da_device_up{device=\"cpu:0\"}"), 1) << worker;
    EXPECT_GT(
        testing::MetricValue(worker, "da_device_busy_seconds_total{device=\"cpu:0\"}").value_or(0),
        0)
        << worker;
    EXPECT_GT(testing::MetricValue(worker, "da_device_memory_bytes{device=\"cpu:0\"}").value_or(0),
              0)
        << worker;
    // Its shares' plans: built on first sight, warm for the repeated stream shape.
    EXPECT_GE(testing::MetricValue(worker, "da_plan_cache_builds_total").value_or(0), 3) << worker;
    EXPECT_GE(testing::MetricValue(worker, "da_plan_cache_hits_total").value_or(0), 1) << worker;
    EXPECT_GT(testing::MetricValue(worker, "da_plan_cache_bytes").value_or(0), 0) << worker;
    EXPECT_EQ(worker.find("da_device_memory_reserved_bytes{"), std::string::npos)
        << "a worker has no memory account of its own\n"
        << worker;
  }
}

// An AUTO request below --shard-min-flops runs on rank 0 alone, side by side with others, not
// across the group (one run at a time, its tensors moved to every rank); one at or above it is
// sharded, as are HEADS and SEQUENCE requests of any size.
TEST(MultiProcessServingTest, AutoRequestsBelowTheShardMinimumRunOnRankZeroAlone) {
  Group group(2, {}, kHeartbeatMs, "1e7");
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());
  // About 3.7 MFLOP (6 heads of 4 * 200 * 16 * (32 + 64 / 4)) and 134 MFLOP.
  const testing::ProblemConfig small{
      .seq_len = 200, .heads = 6, .kv_heads = 2, .patterns = {{32, 1}, {64, 2}}};
  const testing::ProblemConfig large{
      .seq_len = 2048, .heads = 4, .kv_heads = 4, .patterns = {{256, 1}}};
  struct Case {
    testing::ProblemConfig config;
    v1::ShardPolicy policy;
    bool sharded;
  };
  const Case cases[] = {{small, v1::SHARD_POLICY_AUTO, false},
                        {large, v1::SHARD_POLICY_AUTO, true},
                        {small, v1::SHARD_POLICY_HEADS, true}};
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "seq_len " << c.config.seq_len << ", policy "
                                      << v1::ShardPolicy_Name(c.policy));
    const double runs_before =
        testing::MetricValue(group.Metrics(), "da_group_runs_total{outcome=\"completed\"}")
            .value_or(0);
    const v1::AttendRequest request = Fp32Request(c.config, c.policy);
    v1::AttendResponse response;
    const grpc::Status status = client.Attend(request, &response, testing::WithTimeout(20000));
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
    EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(request, 2)),
              1e-6);
    const double runs =
        testing::MetricValue(group.Metrics(), "da_group_runs_total{outcome=\"completed\"}")
            .value_or(0);
    if (c.sharded) {
      EXPECT_NE(response.info().shard_strategy(), v1::SHARD_POLICY_NONE);
      EXPECT_EQ(response.info().devices_size(), 2);
      EXPECT_EQ(runs, runs_before + 1);
    } else {
      EXPECT_EQ(response.info().shard_strategy(), v1::SHARD_POLICY_NONE);
      EXPECT_EQ(response.info().devices_size(), 1);
      EXPECT_EQ(runs, runs_before);
    }
  }
  // Without the group (its worker lost), requests for the group are refused and the others are
  // still answered.
  ASSERT_EQ(kill(group.worker(1)->pid(), SIGKILL), 0);
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::NOT_SERVING, seconds(10)))
      << group.Logs();
  v1::AttendResponse response;
  const grpc::Status refused = client.Attend(Fp32Request(small, v1::SHARD_POLICY_HEADS), &response,
                                             testing::WithTimeout(10000));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  const v1::AttendRequest request = Fp32Request(small, v1::SHARD_POLICY_AUTO);
  const grpc::Status answered = client.Attend(request, &response, testing::WithTimeout(10000));
  ASSERT_TRUE(answered.ok()) << answered.error_message();
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(request, 2)), 1e-6);
}

// The nccl data plane's path (staged_plane.h: host shares staged through "device" buffers, a
// plane held to NCCL's terms) with Gloo and host staging in NCCL's place, across real da-server
// ranks: SEQUENCE with spanning segments and HEADS equal one process, the workers say which plane
// they formed, and the bulk bytes crossed it.
TEST(MultiProcessServingTest, AStagedDataPlaneCarriesTheRunsAndTheyAnswerLikeOneProcess) {
  Group group(3, {"--data-plane", "gloo-staged"});
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());
  const std::vector<std::pair<testing::ProblemConfig, v1::ShardPolicy>> cases = {
      {{.seq_len = 301, .heads = 4, .kv_heads = 2, .patterns = {{64, 1}, {256, 4}}, .causal = true},
       v1::SHARD_POLICY_SEQUENCE},
      {{.seq_len = 200, .heads = 6, .kv_heads = 3, .patterns = {{32, 1}, {64, 2}}},
       v1::SHARD_POLICY_HEADS},
  };
  for (const auto& [config, policy] : cases) {
    const v1::AttendRequest request = Fp32Request(config, policy);
    v1::AttendResponse response;
    grpc::Status status = client.Attend(request, &response, testing::WithTimeout(20000));
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
    EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(request, 2)),
              1e-6);
    EXPECT_EQ(response.info().shard_strategy(), policy);
    EXPECT_EQ(response.info().devices_size(), 3);
  }
  const std::string logs = group.Logs();
  for (int rank = 1; rank < 3; ++rank) {
    EXPECT_NE(logs.find("rank " + std::to_string(rank) +
                        " joined generation 1; data plane: gloo held to nccl's terms via host"),
              std::string::npos)
        << logs;
  }
  const std::string text = group.Metrics();
  EXPECT_GT(testing::MetricValue(text, "da_rank_exchange_bytes_total{rank=\"1\"}").value_or(0), 0)
      << text;
  EXPECT_GE(testing::MetricValue(text, "da_group_runs_total{outcome=\"completed\"}"), 2) << text;
}

// --data-plane nccl where no process can see a GPU (or the build has no NCCL) is refused at
// start-up by rank 0 and by a worker, naming the flag and why.
TEST(MultiProcessServingTest, AnNcclDataPlaneWithoutAGpuIsRefusedAtStartNamingTheFlag) {
  if (std::filesystem::exists("/dev/nvidia0")) {
    GTEST_SKIP() << "this machine has a GPU: the nccl data plane can form here";
  }
  const std::string dir = testing::MakeTempDir();
  const std::vector<std::vector<std::string>> ranks = {
      {"--world-size", "2", "--rank", "0", "--coordinator", "127.0.0.1:0", "--data-plane", "nccl"},
      {"--world-size", "2", "--rank", "1", "--coordinator", "127.0.0.1:1", "--data-plane", "nccl"},
  };
  for (size_t i = 0; i < ranks.size(); ++i) {
    const std::string log = dir + "/rank" + std::to_string(i);
    auto child = testing::ChildProcess::Spawn(DA_SERVER_BINARY, ranks[i], log);
    ASSERT_NE(child, nullptr);
    const std::optional<int> status = child->WaitForExit(seconds(10));
    ASSERT_TRUE(status.has_value()) << "rank " << i << " still running";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "rank " << i;
    EXPECT_NE(ReadFile(log).find("--data-plane nccl: the nccl data plane needs"), std::string::npos)
        << "rank " << i << ": " << ReadFile(log);
  }
  std::filesystem::remove_all(dir);
}

// The data plane: none (Gloo carries everything) or gloo-staged, which re-forms with the group.
class LostWorkerTest : public ::testing::TestWithParam<std::string> {};

TEST_P(LostWorkerTest, LostWorkerFailsTheRequestAndTheGroupReformsWhenItReturns) {
  Group group(2, {"--data-plane", GetParam()});
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());

  // One segment over 40960 tokens and one head: SEQUENCE, about a second of compute per rank.
  v1::AttendRequest request = testing::LongRequest(40960);
  std::future<grpc::Status> call = std::async(std::launch::async, [&] {
    v1::AttendResponse response;
    return client.Attend(request, &response, testing::WithTimeout(60000));
  });
  // Mid-request, in the compute: the worker has its share (a few MB, milliseconds) and has
  // burnt well over what receiving it costs.
  const double idle_cpu = ProcessCpuSeconds(group.worker(1)->pid());
  ASSERT_GE(idle_cpu, 0);
  ASSERT_TRUE(testing::WaitFor(
      [&] { return ProcessCpuSeconds(group.worker(1)->pid()) - idle_cpu >= 0.3; }, seconds(20)))
      << group.Logs();
  ASSERT_EQ(call.wait_for(milliseconds(0)), std::future_status::timeout) << "finished too soon";
  ASSERT_EQ(kill(group.worker(1)->pid(), SIGKILL), 0);
  const Clock::time_point killed = Clock::now();
  ASSERT_EQ(call.wait_for(milliseconds(kCollectiveTimeoutMs + 2000)), std::future_status::ready)
      << group.Logs();
  const grpc::Status failed = call.get();
  const double failed_after_ms =
      std::chrono::duration<double, std::milli>(Clock::now() - killed).count();
  EXPECT_EQ(failed.error_code(), grpc::StatusCode::UNAVAILABLE) << failed.error_message();
  EXPECT_LT(failed_after_ms, kCollectiveTimeoutMs) << failed.error_message();
  EXPECT_NE(failed.error_message().find("rank 1"), std::string::npos) << failed.error_message();
  EXPECT_NE(failed.error_message().find("re-forming"), std::string::npos) << failed.error_message();
  std::printf("the request failed %.0f ms after the kill: %s\n", failed_after_ms,
              failed.error_message().c_str());

  // Rank 0 is alive, not ready, and refuses sharded work at once while the group is broken.
  EXPECT_FALSE(group.rank0().process().WaitForExit(milliseconds(0)).has_value());
  EXPECT_EQ(group.Readiness(), HealthCheckResponse::NOT_SERVING);
  const v1::AttendRequest small =
      Fp32Request({.seq_len = 128, .heads = 4, .kv_heads = 4}, v1::SHARD_POLICY_AUTO);
  v1::AttendResponse response;
  grpc::Status refused = client.Attend(small, &response, testing::WithTimeout(10000));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  // Before the loop opens the next generation the reason is the loss ("rank 1 lost ..."); after,
  // the wait for it ("rank 1 missing; waiting ..."). Either way it names the rank.
  EXPECT_NE(refused.error_message().find("not whole"), std::string::npos)
      << refused.error_message();
  EXPECT_NE(refused.error_message().find("rank 1 "), std::string::npos) << refused.error_message();
  const std::string broken = group.Metrics();
  EXPECT_EQ(testing::MetricValue(broken, "da_group_whole"), 0) << broken;
  EXPECT_EQ(testing::MetricValue(broken, "da_group_runs_total{outcome=\"failed\"}"), 1) << broken;
  // The refusal above is a rejection; the run that failed mid-way is not.
  EXPECT_EQ(testing::MetricValue(broken, "da_requests_rejected_total{reason=\"unavailable\"}"), 1)
      << broken;

  // The worker comes back: the group re-forms and serves again.
  group.StartWorker(1);
  const Clock::time_point restarted = Clock::now();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(15))) << group.Logs();
  std::printf("ready again %.0f ms after the worker restarted\n",
              std::chrono::duration<double, std::milli>(Clock::now() - restarted).count());
  grpc::Status status = client.Attend(small, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
  EXPECT_EQ(response.info().devices_size(), 2);
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(small, 2)), 1e-6);
  EXPECT_GE(testing::MetricValue(group.Metrics(), "da_group_generation").value_or(0), 2);
  if (GetParam() != "none") {
    EXPECT_NE(
        group.Logs().find("rank 1 joined generation 2; data plane: gloo held to nccl's terms"),
        std::string::npos)
        << group.Logs();
  }

  // A worker's SIGTERM ends it with 0, and rank 0 is not ready without it.
  ASSERT_EQ(kill(group.worker(1)->pid(), SIGTERM), 0);
  const std::optional<int> exited = group.worker(1)->WaitForExit(seconds(10));
  ASSERT_TRUE(exited.has_value()) << group.Logs();
  EXPECT_TRUE(WIFEXITED(*exited) && WEXITSTATUS(*exited) == 0) << group.Logs();
  EXPECT_TRUE(group.WaitForReadiness(HealthCheckResponse::NOT_SERVING, seconds(5))) << group.Logs();
}

INSTANTIATE_TEST_SUITE_P(DataPlanes, LostWorkerTest, ::testing::Values("none", "gloo-staged"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param == "none" ? std::string("None")
                                                       : std::string("GlooStaged");
                         });

// A request that is no longer wanted (here its deadline passes mid-compute) stops on every rank:
// rank 0 sends the workers a stop word, their compute stops, and the group stays whole.
TEST(MultiProcessServingTest, ACancelledRequestStopsTheWorkersAndTheGroupStaysWhole) {
  // Heartbeats of 400 ms: a stopped run has 2 s to end in step before rank 0 aborts the group
  // under it (a loaded machine may take more than the least grace, 1 s).
  Group group(2, {}, /*heartbeat_ms=*/400);
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());

  // About a second of compute per rank (see the test above); the deadline passes 500 ms in.
  const v1::AttendRequest request = testing::LongRequest(40960);
  v1::AttendResponse response;
  const double worker_cpu_before = ProcessCpuSeconds(group.worker(1)->pid());
  const grpc::Status expired = client.Attend(request, &response, testing::WithTimeout(500));
  EXPECT_EQ(expired.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << expired.error_message();
  // The worker had started (it burnt CPU) and then stopped: it burns nothing more while idle.
  std::this_thread::sleep_for(milliseconds(150));
  const double worker_cpu_after_stop = ProcessCpuSeconds(group.worker(1)->pid());
  std::this_thread::sleep_for(milliseconds(700));
  const double worker_cpu_later = ProcessCpuSeconds(group.worker(1)->pid());
  std::printf("worker CPU: %.2f s for the request, %.2f s in the 700 ms after it ended\n",
              worker_cpu_after_stop - worker_cpu_before, worker_cpu_later - worker_cpu_after_stop);
  EXPECT_GE(worker_cpu_after_stop - worker_cpu_before, 0.1) << group.Logs();
  EXPECT_LT(worker_cpu_later - worker_cpu_after_stop, 0.1) << "the worker kept computing\n"
                                                           << group.Logs();

  // Still one group, still generation 1: the next request is sharded and exact.
  EXPECT_EQ(group.Readiness(), HealthCheckResponse::SERVING);
  const v1::AttendRequest small =
      Fp32Request({.seq_len = 128, .heads = 4, .kv_heads = 4}, v1::SHARD_POLICY_AUTO);
  const grpc::Status status = client.Attend(small, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
  EXPECT_EQ(response.info().devices_size(), 2);
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(small, 2)), 1e-6);
  const std::string metrics = group.Metrics();
  EXPECT_EQ(testing::MetricValue(metrics, "da_group_generation"), 1) << metrics;
  EXPECT_EQ(testing::MetricValue(metrics, "da_group_whole"), 1) << metrics;
  EXPECT_NE(group.Logs().find("run ended early"), std::string::npos) << group.Logs();
}

// A worker's --memory-budget-bytes bounds its part of a run and reaches rank 0 when it joins: a
// request whose part there does not fit is refused before anything is sent to it, naming the
// rank and both numbers, the group stays whole, and a request that fits is computed exactly.
TEST(MultiProcessServingTest, ARequestWhosePartDoesNotFitAWorkersBudgetIsRefusedNamingIt) {
  Group group(2);
  group.SetWorkerFlags({"--memory-budget-bytes", "1048576"});
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());

  // Half of 16384 tokens x 4 heads x 16 x 4 bytes is 2 MiB for each of q, k, v and the output.
  const v1::AttendRequest large =
      Fp32Request({.seq_len = 16384, .heads = 4, .kv_heads = 4}, v1::SHARD_POLICY_SEQUENCE);
  v1::AttendResponse response;
  const grpc::Status refused = client.Attend(large, &response, testing::WithTimeout(20000));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  for (const char* said : {"rank 1's part of this run needs ", "its memory budget is 1048576 bytes",
                           "--memory-budget-bytes on that rank"}) {
    EXPECT_NE(refused.error_message().find(said), std::string::npos)
        << said << " in " << refused.error_message();
  }

  // The same request with AUTO (the group takes AUTO requests of any size here) is computed on
  // rank 0 alone, which admitted it.
  v1::AttendRequest automatic = large;
  automatic.mutable_spec()->set_shard_policy(v1::SHARD_POLICY_AUTO);
  grpc::Status status = client.Attend(automatic, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
  ASSERT_EQ(response.info().devices_size(), 1);
  EXPECT_EQ(response.info().devices(0), "cpu:0");
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(automatic, 1)),
            1e-6);

  const v1::AttendRequest small =
      Fp32Request({.seq_len = 128, .heads = 4, .kv_heads = 4}, v1::SHARD_POLICY_SEQUENCE);
  status = client.Attend(small, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
  EXPECT_EQ(response.info().devices_size(), 2);
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(small, 2)), 1e-6);
  const std::string metrics = group.Metrics();
  EXPECT_EQ(testing::MetricValue(metrics, "da_group_generation"), 1) << metrics;
  EXPECT_EQ(testing::MetricValue(metrics, "da_group_whole"), 1) << metrics;
  const std::string logs = group.Logs();
  // The worker said its budget, and never saw the refused run (it ended no run early).
  EXPECT_NE(logs.find("its part of a run may hold 1048576 bytes (--memory-budget-bytes)"),
            std::string::npos)
      << logs;
  EXPECT_EQ(logs.find("run ended early"), std::string::npos) << logs;
}

// A stalled worker (SIGSTOP) holds rank 0's heartbeat to it: a request waiting for the group
// meanwhile is answered when its deadline passes, not when the heartbeat gives up, and the worker
// is lost after kIdleHeartbeats heartbeats (3.5 s here), not after the collective timeout (10 s).
TEST(MultiProcessServingTest,
     AStalledWorkerHoldsNoRequestPastItsDeadlineAndIsLostWithinHeartbeats) {
  // Heartbeats of 700 ms: one held by the stalled worker gives up 3.5 s after it began.
  Group group(2, {}, /*heartbeat_ms=*/700);
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());
  const v1::AttendRequest small =
      Fp32Request({.seq_len = 128, .heads = 4, .kv_heads = 4}, v1::SHARD_POLICY_AUTO);
  v1::AttendResponse response;
  ASSERT_TRUE(client.Attend(small, &response, testing::WithTimeout(20000)).ok()) << group.Logs();

  ASSERT_EQ(kill(group.worker(1)->pid(), SIGSTOP), 0);
  // A heartbeat held by the worker: rank 0's count of sent ones stands still for 3 periods (an
  // idle group sends one every second period: the loop wakes each period and sends when the last
  // one is a whole period old; the worker may take one more after it stopped, for a receive it
  // had posted).
  std::optional<double> sent;
  Clock::time_point since = Clock::now();
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        const std::optional<double> now =
            testing::MetricValue(group.Metrics(), "da_group_heartbeats_total");
        if (now != sent) {
          sent = now;
          since = Clock::now();
        }
        return Clock::now() - since > milliseconds(2100);
      },
      seconds(10)))
      << group.Logs();
  const Clock::time_point held = Clock::now();
  const grpc::Status expired = client.Attend(small, &response, testing::WithTimeout(300));
  EXPECT_EQ(expired.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << expired.error_message();
  // When the server answered: its request log line.
  // The server's deadline or the client's cancel at its deadline, whichever it heard first.
  const double total_ms = ServerTotalMs(group, {"DEADLINE_EXCEEDED", "CANCELLED"});
  ASSERT_GE(total_ms, 0) << group.Logs();
  EXPECT_LT(total_ms, 700) << group.Logs();
  // The held heartbeat began 0.7-1.4 s before `held` and gives up 3.5 s after it began; the
  // collective timeout (10 s) would be far later.
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::NOT_SERVING, seconds(6))) << group.Logs();
  const double lost_ms = std::chrono::duration<double, std::milli>(Clock::now() - held).count();
  std::printf(
      "the server answered in %.0f ms (deadline 300 ms); not ready %.0f ms after a heartbeat was "
      "seen held\n",
      total_ms, lost_ms);
  kill(group.worker(1)->pid(), SIGKILL);
}

// A worker stalled in the middle of a run (SIGSTOP) cannot hear its stop word: once the request
// is cancelled, rank 0 fails the group under the run after a grace (kMinStopGrace here), so the
// server answers then rather than after the collective timeout (10 s), and the group re-forms
// when the worker runs again.
TEST(MultiProcessServingTest, AWorkerStalledMidRunHoldsItsStoppedRequestOnlyForTheGrace) {
  Group group(2);  // Heartbeats of 100 ms: the least grace, 1 s.
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());
  const v1::AttendRequest request = testing::LongRequest(40960);  // About a second per rank.
  const double idle_cpu = ProcessCpuSeconds(group.worker(1)->pid());
  auto stub = v1::AttentionService::NewStub(group.channel());
  grpc::ClientContext context;
  const Clock::time_point sent = Clock::now();
  std::future<grpc::Status> call = std::async(std::launch::async, [&] {
    v1::AttendResponse response;
    return stub->Attend(&context, request, &response);
  });
  ASSERT_TRUE(testing::WaitFor(
      [&] { return ProcessCpuSeconds(group.worker(1)->pid()) - idle_cpu >= 0.2; }, seconds(20)))
      << group.Logs();
  ASSERT_EQ(call.wait_for(milliseconds(0)), std::future_status::timeout) << "finished too soon";
  ASSERT_EQ(kill(group.worker(1)->pid(), SIGSTOP), 0);
  // The client gives up: the server's stop reaches rank 0 at once, the stalled worker never.
  const double cancelled_ms =
      std::chrono::duration<double, std::milli>(Clock::now() - sent).count();
  context.TryCancel();
  EXPECT_EQ(call.get().error_code(), grpc::StatusCode::CANCELLED);
  // The run ended a grace after the cancel, not at the collective timeout (10 s).
  const double total_ms = ServerTotalMs(group, {"CANCELLED"});
  ASSERT_GE(total_ms, 0) << group.Logs();
  EXPECT_LT(total_ms, cancelled_ms + 4000) << group.Logs();
  std::printf("the server answered %.0f ms after the cancel (grace 1000 ms)\n",
              total_ms - cancelled_ms);
  EXPECT_TRUE(group.WaitForReadiness(HealthCheckResponse::NOT_SERVING, seconds(5))) << group.Logs();

  // The worker runs again: it finds its connections closed, re-joins, and the group serves.
  ASSERT_EQ(kill(group.worker(1)->pid(), SIGCONT), 0);
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  const v1::AttendRequest small =
      Fp32Request({.seq_len = 128, .heads = 4, .kv_heads = 4}, v1::SHARD_POLICY_AUTO);
  v1::AttendResponse response;
  const grpc::Status status = client.Attend(small, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << group.Logs();
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(small, 2)), 1e-6);
  EXPECT_GE(testing::MetricValue(group.Metrics(), "da_group_generation").value_or(0), 2);
}

// A worker with no coordinator to reach is live but not ready, and says why.
TEST(MultiProcessServingTest, AWorkerWithoutItsCoordinatorIsLiveButNotReady) {
  const std::string dir = testing::MakeTempDir();
  auto worker = testing::ChildProcess::Spawn(
      DA_SERVER_BINARY,
      {"--world-size", "2", "--rank", "1", "--coordinator", "127.0.0.1:1", "--threads", "1",
       "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", dir + "/metrics_port"},
      dir + "/log");
  const int port = testing::ReadPortFile(dir + "/metrics_port", seconds(10));
  ASSERT_GT(port, 0) << ReadFile(dir + "/log");
  std::optional<testing::HttpAnswer> ready;
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        ready = testing::HttpRequest(port, "/readyz");
        return ready.has_value() && ready->status == 503 && ready->body != "starting\n";
      },
      seconds(10)));
  EXPECT_EQ(ready->body.rfind("waiting for the coordinator at 127.0.0.1:1", 0), 0u) << ready->body;
  // Once a connection attempt has failed, the reason follows.
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        ready = testing::HttpRequest(port, "/readyz");
        return ready.has_value() && ready->body.find("not reachable") != std::string::npos;
      },
      seconds(30)))
      << (ready.has_value() ? ready->body : "no answer");
  EXPECT_EQ(ready->status, 503);
  EXPECT_EQ(ready->body.rfind("waiting for the coordinator at 127.0.0.1:1: ", 0), 0u)
      << ready->body;
  EXPECT_EQ(testing::HttpRequest(port, "/livez")->status, 200);
  worker.reset();
  std::filesystem::remove_all(dir);
}

// Every rank of the group has the secret file; a process with another secret is refused at the
// store, says why in its readiness, rank 0 logs it, and the group serves on.
TEST(MultiProcessServingTest, ASharedSecretFormsTheGroupAndAnotherSecretIsRefusedSayingWhy) {
  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/secret") << "3b0c1fd86a2e4c5f9d7e1a2b3c4d5e6f\n";  // echo's newline.
  std::ofstream(dir + "/other") << "00000000000000000000000000000000";
  Group group(2, {"--coordinator-secret-file", dir + "/secret"});
  ASSERT_TRUE(group.Start()) << group.Logs();
  ASSERT_TRUE(group.WaitForReadiness(HealthCheckResponse::SERVING, seconds(20))) << group.Logs();
  client::AttentionClient client(group.channel());
  // A sequence-sharded request: its exchange rides the group the tagged store formed.
  const v1::AttendRequest request =
      Fp32Request({.seq_len = 301, .heads = 4, .kv_heads = 2, .patterns = {{64, 1}, {256, 4}}},
                  v1::SHARD_POLICY_SEQUENCE);
  v1::AttendResponse response;
  const grpc::Status served = client.Attend(request, &response, testing::WithTimeout(20000));
  ASSERT_TRUE(served.ok()) << served.error_message() << group.Logs();
  EXPECT_EQ(response.info().devices_size(), 2);

  auto impostor = testing::ChildProcess::Spawn(
      DA_SERVER_BINARY,
      {"--world-size", "2", "--rank", "1", "--coordinator",
       "127.0.0.1:" + std::to_string(group.coordinator_port()), "--threads", "1",
       "--coordinator-secret-file", dir + "/other", "--metrics-listen", "127.0.0.1:0",
       "--metrics-port-file", dir + "/metrics_port"},
      dir + "/impostor.log");
  const int port = testing::ReadPortFile(dir + "/metrics_port", seconds(10));
  ASSERT_GT(port, 0) << ReadFile(dir + "/impostor.log");
  std::optional<testing::HttpAnswer> ready;
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        ready = testing::HttpRequest(port, "/readyz");
        return ready.has_value() &&
               ready->body.find("refused this rank's shared secret") != std::string::npos;
      },
      seconds(20)))
      << (ready.has_value() ? ready->body : "no answer") << ReadFile(dir + "/impostor.log");
  EXPECT_EQ(ready->status, 503);
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        return group.rank0().Log().find(
                   "refused a client at 127.0.0.1: its shared secret does "
                   "not match") != std::string::npos;
      },
      seconds(10)))
      << group.Logs();
  EXPECT_EQ(group.Readiness(), HealthCheckResponse::SERVING);
  const grpc::Status again = client.Attend(request, &response, testing::WithTimeout(20000));
  EXPECT_TRUE(again.ok()) << again.error_message();
  EXPECT_LE(MaxRelativeError(response.output().data(), testing::InProcessOutput(request, 2)), 1e-6);
  impostor.reset();
  std::filesystem::remove_all(dir);
}

TEST(MultiProcessServingTest, BadFlagsExitNamingTheFlagValueAndLimit) {
  const std::string dir = testing::MakeTempDir();
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--world-size", "0"}, "--world-size is 0; must be in [1, 1024]"},
      {{"--world-size", "3", "--rank", "3", "--coordinator", "127.0.0.1:1"},
       "--rank is 3; must be in [0, 3) (below --world-size 3)"},
      {{"--world-size", "2"}, "--coordinator HOST:PORT is required with --world-size 2"},
      {{"--world-size", "2", "--rank", "1", "--coordinator", "nohost"},
       "--coordinator is 'nohost'; expected HOST:PORT"},
      {{"--world-size", "2", "--coordinator", "127.0.0.1:0", "--heartbeat-ms", "500",
        "--collective-timeout-ms", "500"},
       "--heartbeat-ms is 500; must be in [1, --collective-timeout-ms 500)"},
      {{"--world-size", "2", "--coordinator", "127.0.0.1:0", "--data-plane", "rdma"},
       "--data-plane is 'rdma'; must be none, nccl or gloo-staged"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string log = dir + "/case" + std::to_string(i);
    auto child = testing::ChildProcess::Spawn(DA_SERVER_BINARY, cases[i].args, log);
    ASSERT_NE(child, nullptr);
    const std::optional<int> status = child->WaitForExit(seconds(10));
    ASSERT_TRUE(status.has_value()) << "case " << i << " still running";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "case " << i;
    EXPECT_NE(ReadFile(log).find(cases[i].message), std::string::npos)
        << "case " << i << ": " << ReadFile(log);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace da::server
