#include "engine/dist/multi_process_test_util.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

extern char** environ;

namespace da::dist::testing {

std::optional<RankFlags> ParseRankFlags(int argc, char** argv) {
  RankFlags flags;
  bool is_rank = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const char* name) -> std::optional<std::string> {
      std::string prefix = absl::StrCat("--", name, "=");
      if (!absl::StartsWith(arg, prefix)) return std::nullopt;
      return arg.substr(prefix.size());
    };
    if (auto v = value("rank")) {
      is_rank = absl::SimpleAtoi(*v, &flags.rank);
    } else if (auto v = value("size")) {
      (void)absl::SimpleAtoi(*v, &flags.size);
    } else if (auto v = value("coordinator")) {
      flags.coordinator = *v;
    } else if (auto v = value("scenario")) {
      flags.scenario = *v;
    } else if (auto v = value("prefix")) {
      flags.prefix = *v;
    } else if (auto v = value("seed")) {
      (void)absl::SimpleAtoi(*v, &flags.seed);
    }
  }
  if (!is_rank) return std::nullopt;
  return flags;
}

int RankOrTestMain(int argc, char** argv, int (*run_rank)(const RankFlags&)) {
  if (std::optional<RankFlags> flags = ParseRankFlags(argc, argv)) return run_rank(*flags);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

pid_t SpawnRank(const RankFlags& flags) {
  std::vector<std::string> args = {
      "/proc/self/exe",
      absl::StrCat("--rank=", flags.rank),
      absl::StrCat("--size=", flags.size),
      absl::StrCat("--coordinator=", flags.coordinator),
      absl::StrCat("--scenario=", flags.scenario),
      absl::StrCat("--prefix=", flags.prefix),
      absl::StrCat("--seed=", flags.seed),
  };
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0) return -1;
  return pid;
}

int WaitForExit(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    int status = 0;
    pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) {
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (done < 0) return -1;
    if (std::chrono::steady_clock::now() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    // Polling a child's exit with a short period; waitpid has no timeout.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

std::string UniquePrefix(const std::string& name) {
  static std::atomic<int> counter{0};
  return absl::StrCat(name, "-", getpid(), "-", counter++);
}

RankGroup::RankGroup(int size, const std::string& scenario) {
  auto server = CoordinatorStoreServer::Start("127.0.0.1:0");
  EXPECT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  flags_.size = size;
  flags_.coordinator = absl::StrCat("127.0.0.1:", server_->port());
  flags_.scenario = scenario;
  flags_.prefix = UniquePrefix(scenario);
  flags_.seed = std::random_device{}();
  auto store = ConnectCoordinatorStore(flags_.coordinator, std::chrono::milliseconds(2000));
  EXPECT_TRUE(store.ok()) << store.status();
  store_ = *std::move(store);
  for (int rank = 0; rank < size; ++rank) {
    flags_.rank = rank;
    pids_.push_back(SpawnRank(flags_));
    EXPECT_GT(pids_.back(), 0);
  }
}

RankGroup::~RankGroup() {
  for (pid_t pid : pids_) WaitForExit(pid, std::chrono::milliseconds(1));
}

// 45 s: the plane sweeps take 5-8 s alone and about 16 s two at a time on 2 cores (their outputs go
// in 16 KiB pieces); under ctest -j2 beside other tests they reached 20 s, the earlier limit, and
// rank 0 was killed mid-run. ctest's own limit for these tests is 60 s.
int RankGroup::Wait(int rank) { return WaitForExit(pids_[rank], std::chrono::milliseconds(45000)); }

}  // namespace da::dist::testing
