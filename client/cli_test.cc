// Runs the built da-client binary: the failures it must report in one stderr line with a non-zero
// exit and within a time bound (bad files, bad flags, an unreachable server), and its output
// against the echo stand-in server. Runs against the real server live with the server tests.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "client/echo_server_test_util.h"
#include "client/npy.h"
#include "client/tensor_io.h"

extern char** environ;

namespace da::client {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr auto kTimeLimit = std::chrono::seconds(20);

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  double seconds = 0;
};

std::string ReadFile(const std::string& path) {
  std::ifstream file(path);
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

// A folder of this process's own, so that tests run in parallel by ctest never share files.
const std::string& ScratchDir() {
  static const struct Scratch {
    Scratch() {
      std::string pattern = testing::TempDir() + "/da_cli_test.XXXXXX";
      if (mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp: " << std::strerror(errno);
      path = pattern;
    }
    ~Scratch() { std::filesystem::remove_all(path); }
    std::string path;
  } scratch;
  return scratch.path;
}

// Runs da-client with args; kills it (and fails the test) when it runs past kTimeLimit.
RunResult RunClient(std::vector<std::string> args) {
  const std::string out_path = ScratchDir() + "/stdout";
  const std::string err_path = ScratchDir() + "/stderr";
  args.insert(args.begin(), DA_CLIENT_BINARY);
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const auto start = std::chrono::steady_clock::now();
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  RunResult result;
  if (spawned != 0) {
    ADD_FAILURE() << "cannot start " << argv[0] << ": " << std::strerror(spawned);
    return result;
  }
  int wait_status = 0;
  while (waitpid(pid, &wait_status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() - start > kTimeLimit) {
      kill(pid, SIGKILL);
      waitpid(pid, &wait_status, 0);
      ADD_FAILURE() << "da-client still ran after " << kTimeLimit.count() << " s: it hangs";
      return result;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // Polls the exit with a bound.
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (WIFEXITED(wait_status)) {
    result.exit_code = WEXITSTATUS(wait_status);
  } else {
    ADD_FAILURE() << "da-client died with signal " << WTERMSIG(wait_status);
  }
  result.out = ReadFile(out_path);
  result.err = ReadFile(err_path);
  return result;
}

// One line on stderr, starting with prefix; a non-zero exit.
void ExpectOneErrorLine(const RunResult& result, int exit_code, const std::string& prefix) {
  EXPECT_EQ(result.exit_code, exit_code) << result.err;
  EXPECT_THAT(result.err, StartsWith(prefix));
  ASSERT_FALSE(result.err.empty());
  EXPECT_EQ(result.err.find('\n'), result.err.size() - 1) << "more than one line:\n" << result.err;
}

class CliTest : public testing::Test {
 protected:
  void SetUp() override {
    NpyArray array;
    array.shape = {1, 8, 2, 4};
    array.data.assign(array.elements() * 4, '\0');
    ASSERT_TRUE(WriteNpy(Path("q.npy"), array).ok());
    array.shape = {8, 2, 4};
    ASSERT_TRUE(WriteNpy(Path("rank3.npy"), array).ok());
    std::ofstream f8(Path("f8.npy"), std::ios::binary);
    const std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1, 1, 1), }";
    f8 << std::string("\x93NUMPY\x01\x00", 8) << static_cast<char>(header.size() + 1) << '\0'
       << header << '\n'
       << std::string(8, '\0');
  }

  std::string Path(const std::string& name) const { return ScratchDir() + "/" + name; }

  std::vector<std::string> Attend(const std::string& q, const std::string& server) const {
    return {"attend",      "--server",   server, "--q",         q,  "--k", Path("q.npy"), "--v",
            Path("q.npy"), "--segments", "4",    "--dilations", "1"};
  }
};

TEST_F(CliTest, MissingFileIsOneErrorLine) {
  const RunResult result = RunClient(Attend(Path("missing.npy"), "127.0.0.1:1"));
  ExpectOneErrorLine(result, 1, "da-client: error: " + Path("missing.npy") + ": cannot open");
}

TEST_F(CliTest, ADirectoryIsNotAnInputFile) {
  const RunResult result = RunClient(Attend(ScratchDir(), "127.0.0.1:1"));
  ExpectOneErrorLine(result, 1, "da-client: error: " + ScratchDir() + ": not a regular file");
}

// A TLS file without a PEM block (empty, a directory, /dev/null) is refused before anything is
// sent: an empty CA would have gRPC trust the system's public roots instead of the user's CA.
TEST_F(CliTest, ATlsFileWithoutPemIsRefused) {
  std::ofstream(Path("empty.pem")).flush();
  for (const std::string& path : {std::string("/dev/null"), Path("empty.pem"), ScratchDir()}) {
    SCOPED_TRACE(path);
    const RunResult result = RunClient({"info", "--server", "127.0.0.1:1", "--tls-ca", path});
    EXPECT_EQ(result.exit_code, 1) << result.err;
    EXPECT_THAT(result.err, HasSubstr("--tls-ca " + path + ": "));
    EXPECT_THAT(result.err, Not(HasSubstr("UNAVAILABLE")));
  }
}

TEST_F(CliTest, UnsupportedDtypeIsOneErrorLine) {
  const RunResult result = RunClient(Attend(Path("f8.npy"), "127.0.0.1:1"));
  ExpectOneErrorLine(result, 1,
                     "da-client: error: " + Path("f8.npy") +
                         ": unsupported dtype '<f8' (expected '<f4', '<f2' or bfloat16 as '<V2')");
}

TEST_F(CliTest, WrongRankIsOneErrorLine) {
  const RunResult result = RunClient(Attend(Path("rank3.npy"), "127.0.0.1:1"));
  ExpectOneErrorLine(result, 1, "da-client: error: " + Path("rank3.npy") + ": expected rank 4");
}

TEST_F(CliTest, UnreachableServerFailsFastWithUnavailable) {
  std::vector<std::string> stream_args = Attend(Path("q.npy"), "127.0.0.1:1");
  stream_args.push_back("--stream");
  const std::vector<std::vector<std::string>> commands = {
      Attend(Path("q.npy"), "127.0.0.1:1"),
      stream_args,
      {"random", "--server", "127.0.0.1:1", "--seq-len", "8", "--heads", "2", "--head-dim", "4",
       "--segments", "4", "--dilations", "1"},
      {"info", "--server", "127.0.0.1:1"},
      {"health", "--server", "127.0.0.1:1"},
  };
  for (const std::vector<std::string>& args : commands) {
    SCOPED_TRACE(args[0]);
    const RunResult result = RunClient(args);
    ExpectOneErrorLine(result, 1, "da-client: UNAVAILABLE: ");
    EXPECT_THAT(result.err, HasSubstr("127.0.0.1:1"));
    EXPECT_LT(result.seconds, 10.0);
  }
}

TEST_F(CliTest, BadFlagValuesAreOneErrorLineWithUsageExit) {
  struct Case {
    std::vector<std::string> args;
    std::string prefix;
  } cases[] = {
      {{"random", "--seq-len", "8", "--heads", "2", "--head-dim", "4", "--segments", "4,x",
        "--dilations", "1"},
       "da-client: error: --segments: 'x' is not an integer"},
      {{"random", "--seq-len", "8", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1", "--mode", "dense"},
       "da-client: error: --mode: 'dense' is not longnet or grouped"},
      {{"random", "--seq-len", "8", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1", "--dtype", "fp64"},
       "da-client: error: --dtype: 'fp64' is not fp32, fp16 or bf16"},
      {{"random", "--seq-len", "0", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1"},
       "da-client: error: --seq-len must be >= 1, got 0"},
      {{"random", "--seq-len", "abc", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1"},
       "da-client: error: "},
      {{"attend", "--k", "k.npy", "--v", "v.npy", "--segments", "4", "--dilations", "1"},
       "da-client: error: --q is required"},
      {{"random", "--seq-len", "8", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1", "--timeout-ms", "9999999999999"},
       "da-client: error: --timeout-ms: 9999999999999 is above the limit of 31536000000 (a year; "
       "0: no deadline)"},
      // Integer flags are decimal: hexadecimal and values past int64 are refused, naming them.
      {{"random", "--seq-len", "0x10", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1"},
       "da-client: error: --seq-len: '0x10' is not a decimal integer"},
      {{"random", "--seq-len", "8", "--heads", "2", "--head-dim", "4", "--segments", "4",
        "--dilations", "1", "--repeat", "99999999999999999999"},
       "da-client: error: --repeat: '99999999999999999999' is not a decimal integer"},
      {{"frobnicate"}, "da-client: error: unknown subcommand 'frobnicate'"},
      {{}, "da-client: error: A subcommand is required"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.prefix);
    ExpectOneErrorLine(RunClient(c.args), 2, c.prefix);
  }
}

TEST_F(CliTest, HelpGoesToStdoutAndSucceeds) {
  const RunResult result = RunClient({"--help"});
  EXPECT_EQ(result.exit_code, 0);
  EXPECT_THAT(result.out, HasSubstr("attend"));
  EXPECT_THAT(result.out, HasSubstr("random"));
  EXPECT_THAT(result.out, HasSubstr("health"));
  EXPECT_EQ(result.err, "");
}

// Against a server that returns the query as the output.
class CliEchoTest : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    q_ = RandomTensor(v1::DTYPE_FP16, {2, 16, 2, 4}, 3, 0);
    ASSERT_TRUE(WriteTensorNpy(Path("q16.npy"), q_).ok());
    ASSERT_TRUE(
        WriteTensorNpy(Path("kv16.npy"), RandomTensor(v1::DTYPE_FP16, {2, 16, 1, 4}, 3, 1)).ok());
  }

  std::vector<std::string> Attend(std::vector<std::string> extra) const {
    std::vector<std::string> args = {"attend",
                                     "--server",
                                     server_.address(),
                                     "--q",
                                     Path("q16.npy"),
                                     "--k",
                                     Path("kv16.npy"),
                                     "--v",
                                     Path("kv16.npy"),
                                     "--segments",
                                     "8",
                                     "--dilations",
                                     "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  EchoServer server_;
  v1::Tensor q_;
};

TEST_F(CliEchoTest, AttendWritesTheOutputInTheInputDtypeAndPrintsOneJsonObject) {
  for (const char* mode : {"--stream", "--json"}) {  // --json twice is harmless.
    SCOPED_TRACE(mode);
    std::remove(Path("out.npy").c_str());
    const RunResult result =
        RunClient(Attend({"--out", Path("out.npy"), "--json", mode, "--request-id", "cli-1"}));
    ASSERT_EQ(result.exit_code, 0) << result.err;
    EXPECT_EQ(result.err, "");
    EXPECT_EQ(result.out.find('\n'), result.out.size() - 1) << result.out;
    const nlohmann::json json = nlohmann::json::parse(result.out);
    for (const char* key :
         {"request_id", "precision_used", "precision_reason", "backend", "devices", "queue_time_us",
          "compute_time_us", "total_time_us", "plan_cache_hit", "shape", "client_latency_ms"}) {
      EXPECT_TRUE(json.contains(key)) << key;
    }
    EXPECT_EQ(json["request_id"], "cli-1");
    EXPECT_EQ(json["backend"], "echo");
    EXPECT_EQ(json["shape"], nlohmann::json({2, 16, 2, 4}));
    EXPECT_EQ(json["dtype"], "fp16");
    absl::StatusOr<NpyArray> out = ReadNpy(Path("out.npy"));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->dtype, NpyDType::kFloat16);
    EXPECT_EQ(out->shape, std::vector<int64_t>({2, 16, 2, 4}));
    EXPECT_EQ(out->data, q_.data());
  }
}

TEST_F(CliEchoTest, StreamedAttendPrintsProgressOnStderrWhenAsked) {
  // stderr is a file here, so progress is off by default (the test above expects no stderr).
  const RunResult result = RunClient(Attend({"--stream", "--parallel-streams", "2", "--progress"}));
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_THAT(result.out, HasSubstr("backend             echo"));
  // q is [2, 16, 2, 4] fp16 (512 bytes), k and v the same: the last line says all of it moved.
  EXPECT_THAT(result.err,
              testing::MatchesRegex("(da-client: sent [^\n]*\n)*da-client: sent 0.00 of 0.00 GiB "
                                    "\\(100%\\), received 0.00 of 0.00 GiB \\(100%\\), [0-9.]+ "
                                    "GB/s, [0-9.]+ s\n"));
  const RunResult quiet = RunClient(Attend({"--stream", "--no-progress"}));
  ASSERT_EQ(quiet.exit_code, 0) << quiet.err;
  EXPECT_EQ(quiet.err, "");
}

TEST_F(CliEchoTest, AttendPrintsExecutionInfoAsText) {
  const RunResult result = RunClient(Attend({}));
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_THAT(result.out, HasSubstr("backend             echo"));
  EXPECT_THAT(result.out, HasSubstr("client_latency_ms"));
}

TEST_F(CliEchoTest, RandomPrintsEveryCallAndASummary) {
  const RunResult result = RunClient({"random",      "--server",   server_.address(),
                                      "--batch",     "2",          "--seq-len",
                                      "100",         "--heads",    "4",
                                      "--kv-heads",  "2",          "--head-dim",
                                      "8",           "--segments", "16,32",
                                      "--dilations", "1,2",        "--dtype",
                                      "bf16",        "--stream",   "--repeat",
                                      "3",           "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  const nlohmann::json json = nlohmann::json::parse(result.out);
  ASSERT_EQ(json["calls"].size(), 3u);
  EXPECT_GT(json["calls"][0]["latency_ms"].get<double>(), 0);
  EXPECT_EQ(json["calls"][2]["info"]["backend"], "echo");
  EXPECT_EQ(json["summary"]["calls"], 3);
  EXPECT_EQ(json["summary"]["tokens_per_call"], 200);
  EXPECT_GT(json["summary"]["tokens_per_s"].get<double>(), 0);
  EXPECT_EQ(json["shape"], nlohmann::json({2, 100, 4, 8}));
  EXPECT_EQ(json["kv_heads"], 2);
}

// CLI11 alone reads integers in base 0: "0100" tokens would be 64 and "010" calls 8.
TEST_F(CliEchoTest, IntegerFlagsWithLeadingZerosAreDecimal) {
  const RunResult result =
      RunClient({"random", "--server", server_.address(), "--batch", "02", "--seq-len", "0100",
                 "--heads", "2", "--head-dim", "8", "--segments", "16", "--dilations", "1",
                 "--repeat", "010", "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  const nlohmann::json json = nlohmann::json::parse(result.out);
  EXPECT_EQ(json["calls"].size(), 10u);
  EXPECT_EQ(json["shape"], nlohmann::json({2, 100, 2, 8}));
}

TEST_F(CliEchoTest, HealthExitsZeroOnlyWhenServing) {
  RunResult result = RunClient({"health", "--server", server_.address()});
  EXPECT_EQ(result.exit_code, 0);
  EXPECT_EQ(result.out, "SERVING\n");
  result = RunClient(
      {"health", "--server", server_.address(), "--service", "da.v1.AttentionService", "--json"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_EQ(nlohmann::json::parse(result.out)["status"], "NOT_SERVING");
  ExpectOneErrorLine(RunClient({"health", "--server", server_.address(), "--service", "nope"}), 1,
                     "da-client: NOT_FOUND: unknown service nope");
}

TEST_F(CliEchoTest, InfoPrintsTheServer) {
  RunResult result = RunClient({"info", "--server", server_.address(), "--json"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  const nlohmann::json json = nlohmann::json::parse(result.out);
  EXPECT_EQ(json["version"], "echo-1");
  EXPECT_EQ(json["devices"][0]["precisions"], nlohmann::json({"fp32"}));
  EXPECT_EQ(json["limits"]["max_priority"], kEchoMaxPriority);
  result = RunClient({"info", "--server", server_.address()});
  EXPECT_THAT(result.out, HasSubstr("version         echo-1"));
  EXPECT_THAT(result.out, HasSubstr("max_priority 3"));
}

// --priority reaches the server on every path: the echo server refuses one above its cap.
TEST_F(CliEchoTest, PriorityIsSentUnaryAndStreamed) {
  for (const std::vector<std::string>& mode :
       {std::vector<std::string>{}, {"--stream"}, {"--parallel-streams", "2"}}) {
    SCOPED_TRACE(mode.empty() ? "unary" : mode[0]);
    std::vector<std::string> allowed = mode;
    allowed.insert(allowed.end(), {"--priority", "3"});
    const RunResult ok = RunClient(Attend(allowed));
    EXPECT_EQ(ok.exit_code, 0) << ok.err;
    std::vector<std::string> above = mode;
    above.insert(above.end(), {"--priority", "4"});
    const RunResult refused = RunClient(Attend(above));
    EXPECT_NE(refused.exit_code, 0);
    EXPECT_THAT(refused.err, HasSubstr("PERMISSION_DENIED"));
    EXPECT_THAT(refused.err, HasSubstr("priority 4 is above 3"));
  }
  const RunResult random = RunClient({"random", "--server", server_.address(), "--batch", "1",
                                      "--seq-len", "16", "--heads", "1", "--head-dim", "4",
                                      "--segments", "8", "--dilations", "1", "--priority", "9"});
  EXPECT_NE(random.exit_code, 0);
  EXPECT_THAT(random.err, HasSubstr("priority 9 is above 3"));
}

}  // namespace
}  // namespace da::client
