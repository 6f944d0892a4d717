// Test helper: a gtest binary that starts copies of itself as the ranks of a group.
//
//   int main(int argc, char** argv) { return RankOrTestMain(argc, argv, RunRank); }
//   // a child (--rank=R) runs RunRank(flags); the parent runs the tests, which start a
//   // RankGroup(size, "scenario")
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/dist/store.h"

// Child-side checks (in a function returning the rank's exit code, with `flags` in scope):
// print what failed and make the rank exit non-zero.
#define RANK_CHECK(cond, ...)                                                              \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "rank %d: %s:%d: check failed: %s: %s\n", flags.rank, __FILE__, \
                   __LINE__, #cond, absl::StrCat(__VA_ARGS__).c_str());                    \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)
#define RANK_CHECK_OK(expr)                                 \
  do {                                                      \
    absl::Status rank_status_ = (expr);                     \
    RANK_CHECK(rank_status_.ok(), rank_status_.ToString()); \
  } while (0)

namespace da::dist::testing {

struct RankFlags {
  int rank = 0;
  int size = 1;
  std::string coordinator;  // host:port of the store.
  std::string scenario;
  std::string prefix;
  uint64_t seed = 0;
};

// Returns the flags when this process was started as a rank (argv has --rank=R).
std::optional<RankFlags> ParseRankFlags(int argc, char** argv);

// main() of a test binary whose ranks are copies of itself: run_rank(flags) when started as a
// rank, otherwise every gtest test.
int RankOrTestMain(int argc, char** argv, int (*run_rank)(const RankFlags&));

// Starts /proc/self/exe with the rank flags; returns the child's pid (or -1).
pid_t SpawnRank(const RankFlags& flags);

// Waits for pid to end within timeout. Returns the exit code, 128+signal when killed by a
// signal, or -1 when it did not end in time (the child is then SIGKILLed and reaped).
int WaitForExit(pid_t pid, std::chrono::milliseconds timeout);

// A fresh store prefix per call: the store keeps keys forever.
std::string UniquePrefix(const std::string& name);

// The parent side of a group: serves the coordinator store on loopback and starts `size` ranks
// running `scenario` (with a fresh prefix and a random seed). The destructor reaps the ranks,
// SIGKILLing any still running.
class RankGroup {
 public:
  RankGroup(int size, const std::string& scenario);
  ~RankGroup();
  KeyValueStore& store() { return *store_; }
  const std::string& prefix() const { return flags_.prefix; }
  pid_t pid(int rank) const { return pids_[rank]; }
  // The rank's exit code (WaitForExit) within 45 s.
  int Wait(int rank);

 private:
  std::unique_ptr<CoordinatorStoreServer> server_;
  std::unique_ptr<KeyValueStore> store_;
  RankFlags flags_;
  std::vector<pid_t> pids_;
};

}  // namespace da::dist::testing
