// The real da-server binary and its start-up flags: --warmup builds every plan before readiness
// turns SERVING, and the first real request is a hit; a bad warm-up file exits non-zero naming
// the file, the entry and the field; --plan-cache-bytes 0 and --precision-fallback take effect;
// threads and memory come from the container (a mocked cgroup tree) and flags from DA_*
// environment variables.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "server/attention_service.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using grpc::health::v1::HealthCheckResponse;
using std::chrono::seconds;

// Small enough for a quick request, warmed together with larger shapes below.
constexpr char kSmallShape[] =
    R"({"batch": 1, "seq_len": 256, "heads": 4, "head_dim": 16, "segments": [64, 128],
        "dilations": [1, 2], "precision": "fp32"})";

v1::AttendRequest SmallRequest() {
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest(
      {.seq_len = 256, .heads = 4, .kv_heads = 4, .head_dim = 16, .patterns = {{64, 1}, {128, 2}}},
      rng);
  request.mutable_spec()->set_precision(v1::PRECISION_FP32);
  return request;
}

int CountOf(const std::string& text, const std::string& part) {
  int count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

TEST(StartupTest, WarmUpFileBuildsEveryPlanBeforeReadinessAndTheFirstRequestHits) {
  // Larger shapes first, so that the small one is warmed last and readiness has a while to wait.
  const std::string shapes =
      std::string("[") +
      R"({"batch": 1, "seq_len": 65536, "heads": 8, "head_dim": 64, "segments": [2048, 4096],
          "dilations": [1, 2], "precision": "fp32"},
         {"batch": 2, "seq_len": 32768, "heads": 8, "kv_heads": 2, "head_dim": 128,
          "dtype": "bf16", "segments": [4096], "dilations": [4], "causal": true,
          "mode": "grouped"},
         {"batch": 1, "seq_len": 16384, "heads": 16, "head_dim": 64, "dtype": "fp16",
          "segments": [1024, 2048], "dilations": [1, 2]}, )" +
      kSmallShape + "]";
  constexpr int kShapes = 4;
  const std::string dir = testing::MakeTempDir();
  const std::string warmup = dir + "/warmup.json";
  std::ofstream(warmup) << shapes;
  testing::SpawnedServer server(DA_SERVER_BINARY, {"--warmup", warmup});
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  client::AttentionClient client(testing::ChannelTo(server.port()));

  // Whenever readiness is first seen SERVING, every warm-up plan is already built.
  bool liveness_serving = false;
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        HealthCheckResponse::ServingStatus live = HealthCheckResponse::UNKNOWN;
        HealthCheckResponse::ServingStatus ready = HealthCheckResponse::UNKNOWN;
        if (!client.CheckHealth("", &live, testing::WithTimeout(5000)).ok()) return false;
        liveness_serving = live == HealthCheckResponse::SERVING;
        return client.CheckHealth(kServiceName, &ready, testing::WithTimeout(5000)).ok() &&
               ready == HealthCheckResponse::SERVING;
      },
      seconds(120)))
      << server.Log();
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client.GetServerInfo(&info, testing::WithTimeout(5000)).ok());
  EXPECT_EQ(info.plan_cache().entries(), kShapes);
  EXPECT_EQ(info.plan_cache().builds(), kShapes);
  EXPECT_EQ(info.plan_cache().hits(), 0);
  EXPECT_TRUE(liveness_serving);

  v1::AttendResponse response;
  const grpc::Status status = client.Attend(SmallRequest(), &response, testing::WithTimeout(60000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.info().plan_cache_hit());
  EXPECT_EQ(response.info().plan_build_time_us(), 0);

  const std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_plan_cache_hits_total"), 1) << *text;
  EXPECT_EQ(testing::MetricValue(*text, "da_plan_cache_builds_total"), kShapes) << *text;
  EXPECT_EQ(testing::MetricValue(*text, "da_plan_build_duration_seconds_count"), kShapes) << *text;

  const std::string log = server.Log();
  EXPECT_EQ(CountOf(log, "warm-up plan="), kShapes) << log;
  EXPECT_EQ(CountOf(log, "plan=hit"), 1) << log;  // The request's log line.
  std::filesystem::remove_all(dir);
}

struct BadFile {
  std::string name;
  std::string text;  // Empty: the file does not exist.
  std::vector<std::string> log_parts;
};

void PrintTo(const BadFile& c, std::ostream* os) { *os << c.name; }

class BadWarmUpFileTest : public ::testing::TestWithParam<BadFile> {};

TEST_P(BadWarmUpFileTest, ExitsNonZeroNamingTheFileTheEntryAndTheField) {
  const std::string dir = testing::MakeTempDir();
  const std::string warmup = dir + "/warmup.json";
  if (!GetParam().text.empty()) std::ofstream(warmup) << GetParam().text;
  testing::SpawnedServer server(DA_SERVER_BINARY, {"--warmup", warmup});
  const std::optional<int> wait_status = server.process().WaitForExit(seconds(60));
  ASSERT_TRUE(wait_status.has_value()) << "still running; log:\n" << server.Log();
  EXPECT_TRUE(WIFEXITED(*wait_status) && WEXITSTATUS(*wait_status) != 0);

  const std::string log = server.Log();
  std::string error_line;
  for (size_t start = 0, end; start < log.size(); start = end + 1) {
    end = log.find('\n', start);
    if (end == std::string::npos) end = log.size();
    const std::string line = log.substr(start, end - start);
    if (line.find("[error]") != std::string::npos) error_line = line;
  }
  ASSERT_FALSE(error_line.empty()) << log;
  // One line carries it all.
  EXPECT_NE(error_line.find("--warmup " + warmup), std::string::npos) << log;
  for (const std::string& part : GetParam().log_parts) {
    EXPECT_NE(error_line.find(part), std::string::npos) << "'" << part << "' not in: " << log;
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Files, BadWarmUpFileTest,
    ::testing::Values(
        BadFile{"Missing", "", {"cannot read"}}, BadFile{"NotJson", "[{]", {"not valid JSON"}},
        BadFile{"MissingField",
                std::string("[") + kSmallShape +
                    R"(, {"batch": 1, "heads": 4, "head_dim": 16, "segments": [64],
                          "dilations": [1]}])",
                {"entry 1", "\"seq_len\" is missing"}},
        BadFile{"InvalidValue",
                std::string("[") + kSmallShape +
                    R"(, {"batch": 1, "seq_len": 256, "heads": 4, "head_dim": 16,
                          "segments": [64], "dilations": [1], "mode": "dense"}])",
                {"entry 1", "\"mode\" is \"dense\""}},
        // Well formed, but the engine refuses it: found only when warming, after listening.
        BadFile{"RefusedByTheEngine",
                std::string("[") + kSmallShape +
                    R"(, {"batch": 1, "seq_len": 256, "heads": 4, "head_dim": 16,
                          "segments": [64], "dilations": [128]}])",
                {"entry 1", "spec.dilation_rates[0] is 128"}},
        BadFile{"UnsupportedPrecision",
                R"([{"batch": 1, "seq_len": 256, "heads": 4, "head_dim": 16, "segments": [64],
                     "dilations": [1], "precision": "fp8"}])",
                {"entry 0", "spec.precision fp8", "supported: "}}));

TEST(StartupTest, PlanCacheBytesZeroNeverHitsAndPrecisionFallbackReplacesFp8) {
  testing::SpawnedServer server(DA_SERVER_BINARY,
                                {"--plan-cache-bytes", "0", "--precision-fallback"});
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  client::AttentionClient client(testing::ChannelTo(server.port()));

  v1::AttendRequest request = SmallRequest();
  request.mutable_spec()->set_precision(v1::PRECISION_FP8);
  for (int i = 0; i < 3; ++i) {
    v1::AttendResponse response;
    const grpc::Status status = client.Attend(request, &response, testing::WithTimeout(60000));
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_FALSE(response.info().plan_cache_hit()) << "call " << i;
    EXPECT_EQ(response.info().precision_reason().rfind("fallback", 0), 0u)
        << response.info().precision_reason();
    EXPECT_NE(response.info().precision_used(), v1::PRECISION_FP8);
  }
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client.GetServerInfo(&info, testing::WithTimeout(5000)).ok());
  EXPECT_EQ(info.plan_cache().capacity_bytes(), 0);
  EXPECT_EQ(info.plan_cache().hits(), 0);
  EXPECT_EQ(info.plan_cache().entries(), 0);
}

// A stop signal during a long warm-up stops it and drains at once: before, the warm-up ran to its
// end first (in a pod, until the kubelet's SIGKILL).
TEST(StartupTest, SigtermDuringTheWarmUpStopsItAtOnce) {
  std::string shapes = "[";
  constexpr int kShapes = 16;  // Distinct plans, each of some 32 MiB buffers per thread.
  for (int i = 0; i < kShapes; ++i) {
    shapes += absl::StrCat(i == 0 ? "" : ",", R"({"batch": 1, "seq_len": )", 65536 + 256 * i,
                           R"(, "heads": 4, "head_dim": 128, "segments": [65536],
                              "dilations": [1], "precision": "fp32"})");
  }
  shapes += "]";
  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/warmup.json") << shapes;
  testing::SpawnedServer server(DA_SERVER_BINARY,
                                {"--warmup", dir + "/warmup.json", "--plan-cache-bytes", "0"});
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  ASSERT_TRUE(
      testing::WaitFor([&] { return CountOf(server.Log(), "warm-up plan=") >= 1; }, seconds(60)))
      << server.Log();
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server.process().pid(), SIGTERM), 0);
  const std::optional<int> status = server.process().WaitForExit(seconds(30));
  const double stop_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count();
  ASSERT_TRUE(status.has_value()) << server.Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << server.Log();
  const std::string log = server.Log();
  EXPECT_NE(log.find("Terminated during the warm-up: stopping it"), std::string::npos) << log;
  EXPECT_EQ(log.find("warm-up done"), std::string::npos) << log;
  // The rest of the warm-up was not built first (without the stop, all 16 plans were).
  EXPECT_LT(CountOf(log, "warm-up plan="), kShapes) << log;
  EXPECT_LT(stop_s, 2.0) << log;
}

// Warm-up plans that do not stay in the plan cache are named in a warning: readiness still turns
// SERVING, but the first requests of those shapes build them again.
TEST(StartupTest, AWarmUpWhosePlansDoNotStayCachedIsWarnedOf) {
  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/warmup.json") << "[" << kSmallShape << "]";
  testing::SpawnedServer server(DA_SERVER_BINARY,
                                {"--warmup", dir + "/warmup.json", "--plan-cache-bytes", "0"});
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  ASSERT_TRUE(testing::WaitFor(
      [&] { return server.Log().find("warm-up done") != std::string::npos; }, seconds(60)))
      << server.Log();
  EXPECT_NE(server.Log().find("warm-up: 1 plans were dropped from the plan cache while it ran, "
                              "to stay within its 0 bytes (--plan-cache-bytes)"),
            std::string::npos)
      << server.Log();
  std::filesystem::remove_all(dir);
}

// A SIGINT during the drain (an operator's second Ctrl-C) ends the process at once, instead of
// after the grace and the drain; a repeated SIGTERM, which supervisors send to ask for the same
// stop, does not cut the drain short.
// Sends `signal` to a listening server and waits until it says it is draining.
void StartDraining(testing::SpawnedServer& server, int signal) {
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  ASSERT_EQ(kill(server.process().pid(), signal), 0);
  ASSERT_TRUE(testing::WaitFor([&] { return server.Log().find("draining") != std::string::npos; },
                               seconds(10)))
      << server.Log();
}

TEST(StartupTest, ASecondCtrlCDuringTheDrainExitsAtOnceAndARepeatedSigtermDoesNot) {
  {
    testing::SpawnedServer server(DA_SERVER_BINARY, {"--drain-grace-ms", "1500"});
    ASSERT_NO_FATAL_FAILURE(StartDraining(server, SIGTERM));
    ASSERT_EQ(kill(server.process().pid(), SIGTERM), 0);
    // Still draining after the repeated SIGTERM, then a clean exit once the grace is over.
    EXPECT_FALSE(server.process().WaitForExit(std::chrono::milliseconds(300)).has_value());
    const std::optional<int> status = server.process().WaitForExit(seconds(30));
    ASSERT_TRUE(status.has_value()) << server.Log();
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status << server.Log();
  }
  testing::SpawnedServer server(DA_SERVER_BINARY, {"--drain-grace-ms", "30000"});
  ASSERT_NO_FATAL_FAILURE(StartDraining(server, SIGINT));
  // The first signal alone waits out the 30 s grace.
  EXPECT_FALSE(server.process().WaitForExit(std::chrono::milliseconds(300)).has_value());
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server.process().pid(), SIGINT), 0);
  const std::optional<int> status = server.process().WaitForExit(seconds(10));
  ASSERT_TRUE(status.has_value()) << server.Log();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count(),
            5.0);
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 128 + SIGINT) << *status;
  EXPECT_NE(server.Log().find("Interrupt while draining: exiting now, without the work in flight"),
            std::string::npos)
      << server.Log();
}

// DA_METRICS_LISTEN="" turns /metrics off as --metrics-listen "" does (CLI11 skips empty
// variables, so it used to leave the unauthenticated port open on 0.0.0.0:9464).
TEST(StartupTest, AnEmptyMetricsListenVariableTurnsMetricsOff) {
  const std::string dir = testing::MakeTempDir();
  setenv("DA_METRICS_LISTEN", "", 1);
  std::unique_ptr<testing::ChildProcess> child = testing::ChildProcess::Spawn(
      DA_SERVER_BINARY, {"--listen", "127.0.0.1:0", "--port-file", dir + "/port", "--threads", "1"},
      dir + "/log");
  unsetenv("DA_METRICS_LISTEN");
  ASSERT_GT(testing::ReadPortFile(dir + "/port", seconds(60)), 0);
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        std::ifstream log_file(dir + "/log");
        const std::string log((std::istreambuf_iterator<char>(log_file)),
                              std::istreambuf_iterator<char>());
        return log.find("listening on") != std::string::npos;
      },
      seconds(10)));
  std::ifstream log_file(dir + "/log");
  const std::string log((std::istreambuf_iterator<char>(log_file)),
                        std::istreambuf_iterator<char>());
  EXPECT_EQ(log.find("metrics on http://"), std::string::npos) << log;
  kill(child->pid(), SIGTERM);
  EXPECT_TRUE(child->WaitForExit(seconds(30)).has_value());
  std::filesystem::remove_all(dir);
}

// Integer flags are decimal whatever their leading zeros (CLI11 read "010" as octal 8), from the
// command line and the environment alike; hexadecimal and values past int64 are refused rather
// than read as 16 or saturated.
TEST(StartupTest, IntegerFlagsAreDecimal) {
  setenv("DA_PLAN_CACHE_BYTES", "04096", 1);
  testing::SpawnedServer server(DA_SERVER_BINARY, {"--max-queue", "010"});
  unsetenv("DA_PLAN_CACHE_BYTES");
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  const std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_queue_capacity"), 10.0);
  EXPECT_EQ(testing::MetricValue(*text, "da_plan_cache_capacity_bytes"), 4096.0);

  const std::string dir = testing::MakeTempDir();
  for (const std::vector<std::string>& args : {std::vector<std::string>{"--max-queue", "0x10"},
                                               {"--max-request-bytes", "99999999999999999999"},
                                               {"--max-queue", "12abc"}}) {
    std::vector<std::string> all = args;
    all.insert(all.end(), {"--listen", "127.0.0.1:0"});
    std::unique_ptr<testing::ChildProcess> child =
        testing::ChildProcess::Spawn(DA_SERVER_BINARY, all, dir + "/refused.log");
    const std::optional<int> status = child->WaitForExit(seconds(30));
    ASSERT_TRUE(status.has_value()) << args[1] << " was not refused";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) != 0) << args[1];
    std::ifstream log_file(dir + "/refused.log");
    const std::string log((std::istreambuf_iterator<char>(log_file)),
                          std::istreambuf_iterator<char>());
    EXPECT_NE(log.find("'" + args[1] + "' is not a decimal integer"), std::string::npos) << log;
  }
  std::filesystem::remove_all(dir);
}

// --config (or DA_CONFIG): flags from a TOML file by their long names. The command line wins over
// the file, the file over the other DA_* variables; a name that is no flag is refused, as a
// missing file is.
TEST(StartupTest, FlagsComeFromAConfigFile) {
  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/da.toml") << "# da-server flags\nmax-queue = 5\nplan-cache-bytes = 4096\n"
                                  << "log-level = \"warn\"\n";
  const auto serve = [&](const std::string& name, const std::vector<std::string>& args) {
    testing::SpawnedServer server(DA_SERVER_BINARY, args);
    EXPECT_TRUE(server.WaitForPorts(seconds(60))) << name << ": " << server.Log();
    const std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
    EXPECT_TRUE(text.has_value()) << name;
    return std::make_pair(testing::MetricValue(text.value_or(""), "da_queue_capacity"),
                          testing::MetricValue(text.value_or(""), "da_plan_cache_capacity_bytes"));
  };
  EXPECT_EQ(serve("file", {"--config", dir + "/da.toml"}),
            std::make_pair(std::optional<double>(5.0), std::optional<double>(4096.0)));
  setenv("DA_CONFIG", (dir + "/da.toml").c_str(), 1);
  setenv("DA_MAX_QUEUE", "9", 1);
  EXPECT_EQ(serve("env", {}).first, 5.0);
  EXPECT_EQ(serve("command-line", {"--max-queue", "3"}).first, 3.0);
  unsetenv("DA_MAX_QUEUE");
  unsetenv("DA_CONFIG");

  std::ofstream(dir + "/typo.toml") << "max-queu = 5\n";
  for (const std::string& file : {dir + "/typo.toml", dir + "/missing.toml"}) {
    std::unique_ptr<testing::ChildProcess> child = testing::ChildProcess::Spawn(
        DA_SERVER_BINARY, {"--config", file, "--listen", "127.0.0.1:0"}, dir + "/refused.log");
    const std::optional<int> status = child->WaitForExit(seconds(30));
    ASSERT_TRUE(status.has_value()) << file << " was not refused";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) != 0) << file;
  }
}

// A pod of one CPU and 2 GiB (cgroup v2 files under --resources-root), and DA_MAX_QUEUE in the
// environment: one compute thread, the memory limit for the CPU device, the plan cache and
// budget from it, the queue from the variable, and a log line that says where each came from.
void WritePodOfOneCpuAnd2GiB(const std::string& root) {
  std::filesystem::create_directories(root + "/proc/self");
  std::filesystem::create_directories(root + "/sys/fs/cgroup");
  std::ofstream(root + "/proc/self/cgroup") << "0::/\n";
  std::ofstream(root + "/sys/fs/cgroup/cpu.max") << "100000 100000\n";
  std::ofstream(root + "/sys/fs/cgroup/memory.max") << "2147483648\n";
}

TEST(StartupTest, ThreadsAndMemoryComeFromTheContainerAndFlagsFromTheEnvironment) {
  const std::string dir = testing::MakeTempDir();
  WritePodOfOneCpuAnd2GiB(dir + "/root");
  setenv("DA_MAX_QUEUE", "7", 1);
  std::unique_ptr<testing::ChildProcess> child = testing::ChildProcess::Spawn(
      DA_SERVER_BINARY,
      {"--listen", "127.0.0.1:0", "--port-file", dir + "/port", "--metrics-listen", "127.0.0.1:0",
       "--metrics-port-file", dir + "/metrics_port", "--resources-root", dir + "/root"},
      dir + "/log");
  unsetenv("DA_MAX_QUEUE");
  const int port = testing::ReadPortFile(dir + "/port", seconds(60));
  const int metrics_port = testing::ReadPortFile(dir + "/metrics_port", seconds(60));
  std::ifstream log_file(dir + "/log");
  const std::string log((std::istreambuf_iterator<char>(log_file)),
                        std::istreambuf_iterator<char>());
  ASSERT_GT(port, 0) << log;
  ASSERT_GT(metrics_port, 0) << log;
  EXPECT_NE(log.find("resources: 1 compute threads from the cgroup CPU quota of 1 CPUs"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("memory 2147483648 bytes from the cgroup memory limit"), std::string::npos)
      << log;
  // min(1 GiB, 2 GiB / 8) and max(2 GiB / 4, 3/4 * 2 GiB - 256 MiB - min(512 MiB, 2 GiB / 16)).
  EXPECT_NE(log.find("plan cache 268435456 bytes (min(1 GiB, memory / 8))"), std::string::npos)
      << log;
  EXPECT_NE(log.find("admission budget 1207959552 bytes"), std::string::npos) << log;

  client::AttentionClient client(testing::ChannelTo(port));
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client.GetServerInfo(&info, testing::WithTimeout(5000)).ok());
  ASSERT_GE(info.devices_size(), 1);
  EXPECT_EQ(info.devices(0).compute_units(), 1);
  EXPECT_EQ(info.plan_cache().capacity_bytes(), 268435456);
  const std::optional<std::string> text = testing::HttpGet(metrics_port, "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_device_memory_bytes{device=\"cpu:0\"}"), 2147483648.0);
  EXPECT_EQ(testing::MetricValue(*text, "da_memory_budget_bytes"), 1207959552.0);
  EXPECT_EQ(testing::MetricValue(*text, "da_queue_capacity"), 7.0);
  std::filesystem::remove_all(dir);
}

// The same pod with 1 GiB of it used elsewhere (a memory-backed /dev/shm): M is 1 GiB, and the
// budgets and the CPU device's memory follow from it; all of it used elsewhere is refused.
TEST(StartupTest, MemoryUsedElsewhereComesOffTheContainersLimit) {
  const std::string dir = testing::MakeTempDir();
  WritePodOfOneCpuAnd2GiB(dir + "/root");
  setenv("DA_MEMORY_ELSEWHERE_BYTES", "1073741824", 1);
  testing::SpawnedServer server(DA_SERVER_BINARY, {"--resources-root", dir + "/root"});
  unsetenv("DA_MEMORY_ELSEWHERE_BYTES");
  ASSERT_TRUE(server.WaitForPorts(seconds(60))) << server.Log();
  const std::string log = server.Log();
  EXPECT_NE(log.find("memory 1073741824 bytes from the cgroup memory limit"), std::string::npos)
      << log;
  EXPECT_NE(log.find("less 1073741824 bytes used elsewhere"), std::string::npos) << log;
  // min(1 GiB, 1 GiB / 8) and max(1 GiB / 4, 3/4 GiB - 128 MiB - min(512 MiB, 1 GiB / 16)).
  EXPECT_NE(log.find("plan cache 134217728 bytes"), std::string::npos) << log;
  EXPECT_NE(log.find("admission budget 603979776 bytes"), std::string::npos) << log;
  const std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_device_memory_bytes{device=\"cpu:0\"}"), 1073741824.0);
  EXPECT_EQ(testing::MetricValue(*text, "da_memory_budget_bytes"), 603979776.0);

  testing::SpawnedServer refused(DA_SERVER_BINARY, {"--resources-root", dir + "/root",
                                                    "--memory-elsewhere-bytes", "2147483648"});
  const std::optional<int> status = refused.process().WaitForExit(seconds(30));
  ASSERT_TRUE(status.has_value()) << "not refused: " << refused.Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) != 0);
  EXPECT_NE(refused.Log().find("--memory-elsewhere-bytes 2147483648 leaves no memory"),
            std::string::npos)
      << refused.Log();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace da::server
