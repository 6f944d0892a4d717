// Tests of the coordinator store: in-process, and across real processes on loopback.
#include "engine/dist/store.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/dist/multi_process_test_util.h"

namespace da::dist {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::RankFlags;

std::string RandomBytes(uint64_t seed, size_t bytes) {
  std::mt19937_64 rng(seed);
  std::string out(bytes, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

int64_t MsSince(Clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
}

std::unique_ptr<CoordinatorStoreServer> StartServer() {
  auto server = CoordinatorStoreServer::Start("127.0.0.1:0");
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

std::string Address(const CoordinatorStoreServer& server) {
  return absl::StrCat("127.0.0.1:", server.port());
}

TEST(CoordinatorStoreTest, SetThenGetReturnsTheValueAndOverwrites) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->port(), 0);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string value = RandomBytes(1, 1 << 20);  // Binary, with zero bytes, 1 MiB.
  ASSERT_TRUE((*store)->Set("big", value).ok());
  auto got = (*store)->Get("big", milliseconds(1000));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, value);
  ASSERT_TRUE((*store)->Set("big", "second").ok());
  EXPECT_EQ(*(*store)->Get("big", milliseconds(1000)), "second");
  ASSERT_TRUE((*store)->Set("empty", "").ok());
  EXPECT_EQ(*(*store)->Get("empty", milliseconds(1000)), "");
}

TEST(CoordinatorStoreTest, GetOfAMissingKeyTimesOutNamingKeyAndTimeout) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok()) << store.status();
  const auto start = Clock::now();
  auto got = (*store)->Get("never/set", milliseconds(250));
  const int64_t elapsed_ms = MsSince(start);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
  EXPECT_NE(got.status().message().find("never/set"), std::string::npos) << got.status();
  EXPECT_NE(got.status().message().find("250 ms"), std::string::npos) << got.status();
  EXPECT_GE(elapsed_ms, 250);
  EXPECT_LT(elapsed_ms, 1500);
  // The connection stays usable after a timed-out Get.
  ASSERT_TRUE((*store)->Set("after", "x").ok());
  EXPECT_EQ(*(*store)->Get("after", milliseconds(1000)), "x");
}

TEST(CoordinatorStoreTest, GetWaitsForASetFromAnotherClient) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto waiter = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  auto setter = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(waiter.ok() && setter.ok());
  absl::StatusOr<std::string> got;
  std::thread thread([&] { got = (*waiter)->Get("late", milliseconds(5000)); });
  const std::string value = RandomBytes(2, 333);
  ASSERT_TRUE((*setter)->Set("late", value).ok());
  thread.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, value);
}

TEST(CoordinatorStoreTest, StoppingTheServerEndsAWaitingGetWithUnavailable) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Set("ready", "1").ok());
  absl::StatusOr<std::string> got;
  const auto start = Clock::now();
  std::thread thread([&] { got = (*store)->Get("never", milliseconds(20000)); });
  server.reset();
  thread.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  EXPECT_LT(MsSince(start), 5000);
  // Later calls fail fast too: nobody is listening any more.
  EXPECT_EQ((*store)->Set("x", "y").code(), absl::StatusCode::kUnavailable);
}

TEST(CoordinatorStoreTest, ConnectToNobodyIsUnavailableAfterTheTimeout) {
  int port = 0;
  {
    auto server = StartServer();  // Find a port that is free once the server is gone.
    ASSERT_NE(server, nullptr);
    port = server->port();
  }
  const auto start = Clock::now();
  auto store = ConnectCoordinatorStore(absl::StrCat("127.0.0.1:", port), milliseconds(300));
  EXPECT_EQ(store.status().code(), absl::StatusCode::kUnavailable) << store.status();
  EXPECT_NE(store.status().message().find("300 ms"), std::string::npos) << store.status();
  EXPECT_GE(MsSince(start), 250);
  EXPECT_LT(MsSince(start), 2000);
  EXPECT_EQ(ConnectCoordinatorStore("no-port", milliseconds(10)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Child ranks: each publishes a random value, then reads every other rank's and checks it.
int RunRank(const RankFlags& flags) {
  auto store = ConnectCoordinatorStore(flags.coordinator, milliseconds(5000));
  if (!store.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", flags.rank, store.status().ToString().c_str());
    return 2;
  }
  auto key = [&](int rank) { return absl::StrCat(flags.prefix, "/value/", rank); };
  auto value = [&](int rank) { return RandomBytes(flags.seed * 100 + rank, 1000 + 17 * rank); };
  if (absl::Status s = (*store)->Set(key(flags.rank), value(flags.rank)); !s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", flags.rank, s.ToString().c_str());
    return 3;
  }
  for (int peer = 0; peer < flags.size; ++peer) {
    auto got = (*store)->Get(key(peer), milliseconds(10000));
    if (!got.ok() || *got != value(peer)) {
      std::fprintf(stderr, "rank %d: key of rank %d: %s\n", flags.rank, peer,
                   got.ok() ? "wrong value" : got.status().ToString().c_str());
      return 4;
    }
  }
  // The parent releases the ranks once it has read every value.
  auto answer = (*store)->Get(absl::StrCat(flags.prefix, "/answer"), milliseconds(10000));
  return answer.ok() && *answer == "done" ? 0 : 5;
}

TEST(CoordinatorStoreTest, ProcessesMeetThroughTheCoordinator) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  RankFlags flags;
  flags.size = 4;
  flags.coordinator = Address(*server);
  flags.prefix = testing::UniquePrefix("store");
  flags.seed = std::random_device{}();
  std::vector<pid_t> pids;
  for (int rank = 0; rank < flags.size; ++rank) {
    flags.rank = rank;
    pids.push_back(testing::SpawnRank(flags));
    ASSERT_GT(pids.back(), 0);
  }
  // The parent reads what the children set, then releases them.
  for (int rank = 0; rank < flags.size; ++rank) {
    auto got = (*store)->Get(absl::StrCat(flags.prefix, "/value/", rank), milliseconds(10000));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, RandomBytes(flags.seed * 100 + rank, 1000 + 17 * rank));
  }
  ASSERT_TRUE((*store)->Set(absl::StrCat(flags.prefix, "/answer"), "done").ok());
  for (int rank = 0; rank < flags.size; ++rank) {
    EXPECT_EQ(testing::WaitForExit(pids[rank], milliseconds(10000)), 0) << "rank " << rank;
  }
}

}  // namespace
}  // namespace da::dist

int main(int argc, char** argv) {
  return da::dist::testing::RankOrTestMain(argc, argv, da::dist::RunRank);
}
