// Tests of the Gloo communicator: 2, 3 and 4 real processes on loopback meet through the
// coordinator store (served by the test process) and check every operation's bytes, the
// counters, a SIGKILLed peer and timeouts. Ranks are copies of this binary (--rank=R).
#include "engine/dist/gloo_communicator.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/dist/multi_process_test_util.h"

namespace da::dist {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::RankFlags;

constexpr milliseconds kOpTimeout{10000};

std::vector<char> RandomBytes(uint64_t seed, size_t bytes) {
  std::mt19937_64 rng(seed);
  std::vector<char> out(bytes);
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

int64_t MsSince(Clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
}

absl::StatusOr<std::unique_ptr<Communicator>> Join(KeyValueStore& store, const RankFlags& flags,
                                                   const std::string& prefix) {
  GlooOptions options;
  options.rank = flags.rank;
  options.size = flags.size;
  options.prefix = prefix;
  options.timeout = milliseconds(10000);
  return MakeGlooCommunicator(store, options);
}

// AllGather, Broadcast from every root, a Send/Recv ring, tagged messages and Barrier, each
// checked against every rank's random data; then the counters.
int RunCollectives(const RankFlags& flags, KeyValueStore& store, Communicator& comm) {
  const int rank = flags.rank, size = flags.size;
  RANK_CHECK(comm.rank() == rank && comm.size() == size && comm.backend() == "gloo", "identity");
  RANK_CHECK(comm.capabilities().concurrent_calls && comm.capabilities().tagged_messages,
             "gloo takes concurrent calls and tagged messages");
  int64_t sent = 0, received = 0, operations = 0;

  // AllGather of an odd byte count (Gloo splits each block in two halves).
  const int64_t gather_bytes = (int64_t{1} << 16) + 13;
  auto block = [&](int r) { return RandomBytes(flags.seed * 1000 + r, gather_bytes); };
  std::vector<char> gathered(size * gather_bytes, '\xcd');
  RANK_CHECK_OK(comm.AllGather(block(rank).data(), gathered.data(), gather_bytes, kOpTimeout));
  for (int r = 0; r < size; ++r) {
    RANK_CHECK(std::memcmp(gathered.data() + r * gather_bytes, block(r).data(), gather_bytes) == 0,
               "AllGather block of rank ", r);
  }
  sent += (size - 1) * gather_bytes;
  received += (size - 1) * gather_bytes;
  ++operations;

  // Broadcast from each root; the binomial tree sends 1..log2 copies, receives one.
  const int64_t broadcast_bytes = 100003;
  for (int root = 0; root < size; ++root) {
    const auto expected = RandomBytes(flags.seed * 1000 + 500 + root, broadcast_bytes);
    std::vector<char> data = rank == root ? expected : std::vector<char>(broadcast_bytes, '\xab');
    RANK_CHECK_OK(comm.Broadcast(data.data(), broadcast_bytes, root, kOpTimeout));
    RANK_CHECK(data == expected, "Broadcast from root ", root);
    if (rank != root) received += broadcast_bytes;
    ++operations;
  }
  int64_t broadcast_sent = comm.counters().bytes_sent - sent;
  // Over all roots every rank but the root receives one copy, so the ranks together send
  // size*(size-1) copies; each rank reports its share to rank 0 through the store.
  RANK_CHECK_OK(
      store.Set(absl::StrCat(flags.prefix, "/bsent/", rank), std::to_string(broadcast_sent)));
  sent += broadcast_sent;
  if (rank == 0) {
    int64_t total = 0;
    for (int r = 0; r < size; ++r) {
      auto value = store.Get(absl::StrCat(flags.prefix, "/bsent/", r), kOpTimeout);
      int64_t part = 0;
      RANK_CHECK(value.ok() && absl::SimpleAtoi(*value, &part), "broadcast share of rank ", r);
      total += part;
    }
    RANK_CHECK(total == int64_t{size} * (size - 1) * broadcast_bytes, "broadcast bytes sent ",
               total);
  }

  // Ring: every rank sends right on one thread while it receives from the left.
  const int right = (rank + 1) % size, left = (rank + size - 1) % size;
  const int64_t ring_bytes = 262147;
  auto ring_data = [&](int r) { return RandomBytes(flags.seed * 1000 + 900 + r, ring_bytes); };
  const auto mine = ring_data(rank);
  absl::Status send_status;
  std::thread sender(
      [&] { send_status = comm.Send(mine.data(), ring_bytes, right, 5, kOpTimeout); });
  std::vector<char> from_left(ring_bytes, '\x11');
  absl::Status recv_status = comm.Recv(from_left.data(), ring_bytes, left, 5, kOpTimeout);
  sender.join();
  RANK_CHECK_OK(send_status);
  RANK_CHECK_OK(recv_status);
  RANK_CHECK(from_left == ring_data(left), "ring message from rank ", left);
  sent += ring_bytes;
  received += ring_bytes;
  operations += 2;

  // Ring again on one thread: even ranks send first, odd ranks receive first.
  std::vector<char> again(ring_bytes, '\x22');
  for (int step = 0; step < 2; ++step) {
    if ((step == 0) == (rank % 2 == 0)) {
      RANK_CHECK_OK(comm.Send(mine.data(), ring_bytes, right, 6, kOpTimeout));
    } else {
      RANK_CHECK_OK(comm.Recv(again.data(), ring_bytes, left, 6, kOpTimeout));
    }
  }
  RANK_CHECK(again == ring_data(left), "second ring message from rank ", left);
  sent += ring_bytes;
  received += ring_bytes;
  operations += 2;

  // Tags: rank 0 sends tags 7 and 8 at once; rank 1 takes 8 first.
  const auto tag7 = RandomBytes(flags.seed + 7, 4099), tag8 = RandomBytes(flags.seed + 8, 8191);
  if (rank == 0) {
    absl::Status s7, s8;
    std::thread t7([&] { s7 = comm.Send(tag7.data(), tag7.size(), 1, 7, kOpTimeout); });
    std::thread t8([&] { s8 = comm.Send(tag8.data(), tag8.size(), 1, 8, kOpTimeout); });
    t7.join();
    t8.join();
    RANK_CHECK_OK(s7);
    RANK_CHECK_OK(s8);
    sent += tag7.size() + tag8.size();
    operations += 2;
  } else if (rank == 1) {
    std::vector<char> got8(tag8.size()), got7(tag7.size());
    RANK_CHECK_OK(comm.Recv(got8.data(), got8.size(), 0, 8, kOpTimeout));
    RANK_CHECK_OK(comm.Recv(got7.data(), got7.size(), 0, 7, kOpTimeout));
    RANK_CHECK(got7 == tag7 && got8 == tag8, "tagged messages");
    received += tag7.size() + tag8.size();
    operations += 2;
  }

  // Barrier: once it returns, every rank has passed the line before it.
  RANK_CHECK_OK(store.Set(absl::StrCat(flags.prefix, "/arrived/", rank), "1"));
  RANK_CHECK_OK(comm.Barrier(kOpTimeout));
  ++operations;
  for (int r = 0; r < size; ++r) {
    auto arrived = store.Get(absl::StrCat(flags.prefix, "/arrived/", r), milliseconds(0));
    RANK_CHECK(arrived.ok(), "rank ", r,
               " had not arrived when Barrier returned: ", arrived.status().ToString());
  }

  const Communicator::Counters counters = comm.counters();
  RANK_CHECK(counters.bytes_sent == sent, "bytes_sent ", counters.bytes_sent, " want ", sent);
  RANK_CHECK(counters.bytes_received == received, "bytes_received ", counters.bytes_received,
             " want ", received);
  RANK_CHECK(counters.operations == operations, "operations ", counters.operations, " want ",
             operations);
  RANK_CHECK(counters.seconds > 0, "seconds ", counters.seconds);
  // Leave together: a rank that exits early would break its peers' last operation.
  RANK_CHECK_OK(comm.Barrier(kOpTimeout));
  return 0;
}

int64_t SteadyNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// Rank size-1 is SIGKILLed by the parent. With `in_operation` the others are blocked inside an
// AllGather it never joins when that happens; otherwise they are idle and learn of the kill
// from the parent. Either way their call must return UNAVAILABLE well within the timeout, and
// so must the call after it. They report when they saw it (steady clock, shared by processes).
int RunKilledPeer(const RankFlags& flags, KeyValueStore& store, Communicator& comm,
                  bool in_operation) {
  const int victim = flags.size - 1;
  std::vector<char> one(64), all(64 * flags.size);
  RANK_CHECK_OK(comm.AllGather(one.data(), all.data(), 64, kOpTimeout));  // All connected.
  if (flags.rank == victim) {
    RANK_CHECK_OK(store.Set(absl::StrCat(flags.prefix, "/victim_ready"), "1"));
    auto never = store.Get(absl::StrCat(flags.prefix, "/never"), milliseconds(30000));
    return 1;  // The parent kills this rank before that.
  }
  RANK_CHECK(store.Get(absl::StrCat(flags.prefix, "/victim_ready"), kOpTimeout).ok(), "victim");
  const int64_t bytes = int64_t{4} << 20;
  std::vector<char> send = RandomBytes(flags.seed + flags.rank, bytes);
  std::vector<char> recv(bytes * flags.size);
  RANK_CHECK_OK(store.Set(absl::StrCat(flags.prefix, "/entering/", flags.rank), "1"));
  if (!in_operation) {
    RANK_CHECK(store.Get(absl::StrCat(flags.prefix, "/killed"), kOpTimeout).ok(), "kill");
  }
  auto start = Clock::now();
  absl::Status status = in_operation ? comm.AllGather(send.data(), recv.data(), bytes, kOpTimeout)
                                     : comm.Barrier(kOpTimeout);
  const int64_t failed_at_ns = SteadyNowNs();
  const int64_t call_ms = MsSince(start);
  RANK_CHECK(status.code() == absl::StatusCode::kUnavailable, status.ToString());
  RANK_CHECK(call_ms < kOpTimeout.count(), "took ", call_ms, " ms");
  RANK_CHECK(status.message().find(in_operation ? "AllGather" : "Barrier") != std::string::npos &&
                 status.message().find("10000 ms") != std::string::npos,
             status.ToString());
  start = Clock::now();
  absl::Status next = comm.Barrier(kOpTimeout);
  const int64_t next_ms = MsSince(start);
  RANK_CHECK(next.code() == absl::StatusCode::kUnavailable, next.ToString());
  RANK_CHECK(next_ms < 1000, "next call took ", next_ms, " ms");
  RANK_CHECK_OK(store.Set(absl::StrCat(flags.prefix, "/failed_at_ns/", flags.rank),
                          absl::StrCat(failed_at_ns)));
  RANK_CHECK_OK(
      store.Set(absl::StrCat(flags.prefix, "/call_ms/", flags.rank), absl::StrCat(call_ms)));
  std::fprintf(stderr, "rank %d: %s\n", flags.rank, status.ToString().c_str());
  return 0;
}

// Rank 2 ends while rank 0 waits, on two threads, for a message from rank 1 (which never sends)
// and one from rank 2, and rank 1 waits for one from rank 0: rank 0's failure with rank 2 ends
// its other wait at once and closes its connection to rank 1, whose wait fails at once too, all
// long before their 10 s timeout.
int RunFailureReachesEveryone(const RankFlags& flags, KeyValueStore& /*store*/,
                              Communicator& comm) {
  std::vector<char> one(64), all(64 * flags.size);
  RANK_CHECK_OK(comm.AllGather(one.data(), all.data(), 64, kOpTimeout));  // All connected.
  if (flags.rank == 2) {
    std::this_thread::sleep_for(milliseconds(300));  // The others are waiting by then.
    std::_Exit(0);
  }
  std::vector<char> data(64);
  const auto start = Clock::now();
  if (flags.rank == 1) {
    const absl::Status waited = comm.Recv(data.data(), data.size(), 0, 7, kOpTimeout);
    const int64_t ms = MsSince(start);
    RANK_CHECK(waited.code() == absl::StatusCode::kUnavailable, waited.ToString());
    RANK_CHECK(ms < 2000, "rank 1 heard of the failure after ", ms, " ms");
    std::fprintf(stderr, "rank 1: %lld ms: %s\n", static_cast<long long>(ms),
                 waited.ToString().c_str());
    return 0;
  }
  absl::Status from_1;
  int64_t from_1_ms = 0;
  std::thread waiter([&] {
    from_1 = comm.Recv(data.data(), data.size(), 1, 7, kOpTimeout);
    from_1_ms = MsSince(start);
  });
  std::vector<char> more(64);
  const absl::Status from_2 = comm.Recv(more.data(), more.size(), 2, 7, kOpTimeout);
  const int64_t from_2_ms = MsSince(start);
  waiter.join();
  RANK_CHECK(from_2.code() == absl::StatusCode::kUnavailable &&
                 from_2.message().find("with peer 2") != std::string::npos,
             from_2.ToString());
  RANK_CHECK(from_1.code() == absl::StatusCode::kUnavailable &&
                 from_1.message().find("ended: the group failed (") != std::string::npos &&
                 from_1.message().find("with peer 2") != std::string::npos,
             from_1.ToString());
  RANK_CHECK(from_1_ms - from_2_ms < 500, "the wait for rank 1 ended ", from_1_ms - from_2_ms,
             " ms after the failure");
  std::fprintf(stderr, "rank 0: %lld ms: %s\n", static_cast<long long>(from_1_ms),
               from_1.ToString().c_str());
  return 0;
}

// Rank 1 never takes part: rank 0's Recv and then (in a re-formed group) AllGather must return
// DEADLINE_EXCEEDED close to their 300 ms timeout.
int RunTimeout(const RankFlags& flags, KeyValueStore& store, Communicator& comm) {
  const milliseconds timeout(300);
  const std::string release = absl::StrCat(flags.prefix, "/release");
  if (flags.rank == 1) {
    RANK_CHECK(store.Get(release, milliseconds(20000)).ok(), "release");
    auto second = Join(store, flags, flags.prefix + "/second");
    RANK_CHECK(second.ok(), second.status().ToString());
    RANK_CHECK(store.Get(release + "2", milliseconds(20000)).ok(), "release 2");
    return 0;
  }
  std::vector<char> data(1000);
  auto start = Clock::now();
  absl::Status status = comm.Recv(data.data(), data.size(), 1, 3, timeout);
  int64_t elapsed_ms = MsSince(start);
  RANK_CHECK(status.code() == absl::StatusCode::kDeadlineExceeded, status.ToString());
  RANK_CHECK(elapsed_ms >= 290 && elapsed_ms < 1500, "Recv returned after ", elapsed_ms, " ms");
  RANK_CHECK(status.message().find("peer 1") != std::string::npos &&
                 status.message().find("300 ms") != std::string::npos,
             status.ToString());
  RANK_CHECK(comm.Barrier(timeout).code() == absl::StatusCode::kUnavailable, "broken group");
  RANK_CHECK_OK(store.Set(release, "1"));

  // A fresh group with a new prefix works again (how a group re-forms).
  auto second = Join(store, flags, flags.prefix + "/second");
  RANK_CHECK(second.ok(), second.status().ToString());
  std::vector<char> gathered(2 * data.size());
  start = Clock::now();
  status = (*second)->AllGather(data.data(), gathered.data(), data.size(), timeout);
  elapsed_ms = MsSince(start);
  RANK_CHECK(status.code() == absl::StatusCode::kDeadlineExceeded, status.ToString());
  RANK_CHECK(elapsed_ms >= 290 && elapsed_ms < 1500, "AllGather returned after ", elapsed_ms);
  RANK_CHECK_OK(store.Set(release + "2", "1"));
  std::fprintf(stderr, "rank 0: AllGather (re-formed group) timed out after %lld ms: %s\n",
               static_cast<long long>(elapsed_ms), status.ToString().c_str());
  return 0;
}

int RunRank(const RankFlags& flags) {
  auto store = ConnectCoordinatorStore(flags.coordinator, milliseconds(5000));
  RANK_CHECK(store.ok(), store.status().ToString());
  auto comm = Join(**store, flags, flags.prefix);
  RANK_CHECK(comm.ok(), comm.status().ToString());
  if (flags.scenario == "collectives") return RunCollectives(flags, **store, **comm);
  if (flags.scenario == "killed_in_operation") return RunKilledPeer(flags, **store, **comm, true);
  if (flags.scenario == "killed_while_idle") return RunKilledPeer(flags, **store, **comm, false);
  if (flags.scenario == "timeout") return RunTimeout(flags, **store, **comm);
  if (flags.scenario == "failure_reaches_everyone") {
    return RunFailureReachesEveryone(flags, **store, **comm);
  }
  RANK_CHECK(false, "unknown scenario ", flags.scenario);
}

using Group = testing::RankGroup;

class GlooGroupTest : public ::testing::TestWithParam<int> {};

TEST_P(GlooGroupTest, CollectivesAndSendRecvGiveEveryRanksBytesAndCountThem) {
  Group group(GetParam(), "collectives");
  for (int rank = 0; rank < GetParam(); ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

INSTANTIATE_TEST_SUITE_P(Ranks, GlooGroupTest, ::testing::Values(2, 3, 4));

void KillOneRankAndCheckTheOthers(bool in_operation) {
  const int size = 3, victim = 2;
  Group group(size, in_operation ? "killed_in_operation" : "killed_while_idle");
  for (int rank = 0; rank < victim; ++rank) {
    auto entering =
        group.store().Get(absl::StrCat(group.prefix(), "/entering/", rank), milliseconds(15000));
    ASSERT_TRUE(entering.ok()) << entering.status();
  }
  // Deliberate delay, not a wait for a condition: the survivors are then surely blocked inside
  // the AllGather (they check they spent at least this long in it).
  if (in_operation) std::this_thread::sleep_for(milliseconds(200));
  const int64_t killed_at_ns = SteadyNowNs();
  ASSERT_EQ(kill(group.pid(victim), SIGKILL), 0);
  EXPECT_EQ(group.Wait(victim), 128 + SIGKILL);
  ASSERT_TRUE(group.store().Set(absl::StrCat(group.prefix(), "/killed"), "1").ok());
  for (int rank = 0; rank < victim; ++rank) {
    EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
    auto failed_at =
        group.store().Get(absl::StrCat(group.prefix(), "/failed_at_ns/", rank), milliseconds(0));
    auto call_ms =
        group.store().Get(absl::StrCat(group.prefix(), "/call_ms/", rank), milliseconds(0));
    ASSERT_TRUE(failed_at.ok() && call_ms.ok()) << failed_at.status() << call_ms.status();
    int64_t failed_at_ns = 0, call_time_ms = 0;
    ASSERT_TRUE(absl::SimpleAtoi(*failed_at, &failed_at_ns));
    ASSERT_TRUE(absl::SimpleAtoi(*call_ms, &call_time_ms));
    const double after_kill_ms = (failed_at_ns - killed_at_ns) / 1e6;
    if (in_operation) {
      EXPECT_GE(call_time_ms, 150) << "rank " << rank << " was not blocked in the AllGather";
    }
    EXPECT_LT(after_kill_ms, kOpTimeout.count());
    std::printf(
        "rank %d: %s call returned UNAVAILABLE %.1f ms after the SIGKILL (%lld ms in "
        "the call)\n",
        rank, in_operation ? "AllGather" : "next", after_kill_ms,
        static_cast<long long>(call_time_ms));
  }
}

TEST(GlooCommunicatorTest, AFailureEndsTheCallsInFlightAndReachesEveryPeer) {
  Group group(3, "failure_reaches_everyone");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(GlooCommunicatorTest, PeerKilledDuringAllGatherMakesTheOthersFailWithUnavailable) {
  KillOneRankAndCheckTheOthers(/*in_operation=*/true);
}

TEST(GlooCommunicatorTest, PeerKilledBetweenCallsMakesTheNextCallFailWithUnavailable) {
  KillOneRankAndCheckTheOthers(/*in_operation=*/false);
}

TEST(GlooCommunicatorTest, OperationsAndRendezvousTimeOutInTime) {
  Group group(2, "timeout");
  EXPECT_EQ(group.Wait(0), 0);
  EXPECT_EQ(group.Wait(1), 0);
}

// A coordinator store in this process and one client of it.
struct LocalStore {
  LocalStore() {
    auto started = CoordinatorStoreServer::Start("127.0.0.1:0");
    if (!started.ok()) return;
    server = *std::move(started);
    auto connected =
        ConnectCoordinatorStore(absl::StrCat("127.0.0.1:", server->port()), milliseconds(2000));
    if (connected.ok()) store = *std::move(connected);
  }
  bool ok() const { return store != nullptr; }
  std::unique_ptr<CoordinatorStoreServer> server;
  std::unique_ptr<KeyValueStore> store;
};

TEST(GlooCommunicatorTest, RendezvousWithoutTheOtherRanksTimesOutNamingTheKey) {
  LocalStore local;
  ASSERT_TRUE(local.ok());
  auto& store = local.store;
  GlooOptions options;
  options.rank = 0;
  options.size = 2;
  options.prefix = testing::UniquePrefix("alone");
  options.timeout = milliseconds(300);
  const auto start = Clock::now();
  auto comm = MakeGlooCommunicator(*store, options);
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded) << comm.status();
  EXPECT_NE(comm.status().message().find(options.prefix), std::string::npos) << comm.status();
  EXPECT_NE(comm.status().message().find("300 ms"), std::string::npos) << comm.status();
  EXPECT_LT(MsSince(start), 2000);
  std::printf("%s\n", comm.status().ToString().c_str());
}

TEST(GlooCommunicatorTest, SingleRankGroupCopiesAndRejectsBadArguments) {
  LocalStore local;
  ASSERT_TRUE(local.ok());
  auto& store = local.store;
  GlooOptions options;
  options.prefix = testing::UniquePrefix("single");
  auto comm = MakeGlooCommunicator(*store, options);
  ASSERT_TRUE(comm.ok()) << comm.status();
  const auto data = RandomBytes(std::random_device{}(), 777);
  std::vector<char> out(777, '\x5a');
  ASSERT_TRUE((*comm)->AllGather(data.data(), out.data(), 777, kOpTimeout).ok());
  EXPECT_EQ(out, data);
  EXPECT_TRUE((*comm)->Broadcast(out.data(), 777, 0, kOpTimeout).ok());
  EXPECT_TRUE((*comm)->Barrier(kOpTimeout).ok());
  EXPECT_EQ((*comm)->Send(out.data(), 777, 0, 1, kOpTimeout).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Recv(out.data(), 777, 1, 1, kOpTimeout).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Broadcast(out.data(), 777, 1, kOpTimeout).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->AllGather(data.data(), out.data(), -1, kOpTimeout).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Barrier(milliseconds(0)).code(), absl::StatusCode::kInvalidArgument);
  GlooOptions bad = options;
  bad.rank = 3;
  EXPECT_EQ(MakeGlooCommunicator(*store, bad).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace da::dist

int main(int argc, char** argv) {
  return da::dist::testing::RankOrTestMain(argc, argv, da::dist::RunRank);
}
