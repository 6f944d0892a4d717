// Test helper: a gtest binary that starts copies of itself as the ranks of a group.
//
//   int main(int argc, char** argv) {
//     if (auto flags = ParseRankFlags(argc, argv)) return RunRank(*flags);  // a child
//     ...run the tests, which call SpawnRanks(...)...
//   }
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

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

// Starts /proc/self/exe with the rank flags; returns the child's pid (or -1).
pid_t SpawnRank(const RankFlags& flags);

// Waits for pid to end within timeout. Returns the exit code, 128+signal when killed by a
// signal, or -1 when it did not end in time (the child is then SIGKILLed and reaped).
int WaitForExit(pid_t pid, std::chrono::milliseconds timeout);

// A fresh store prefix per call: the store keeps keys forever.
std::string UniquePrefix(const std::string& name);

}  // namespace da::dist::testing
