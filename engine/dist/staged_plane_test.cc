// The staged data plane (staged_plane.h) over real Gloo groups of three ranks, one thread each
// (through the coordinator's store on loopback), held to NCCL's terms: every operation with
// messages cut into many chunks, byte for byte, and the staging's buffers bounded by the chunk.
#include "engine/dist/staged_plane.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/dist/data_plane.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/store.h"

namespace da::dist {
namespace {

using std::chrono::milliseconds;

constexpr milliseconds kTimeout{20000};
constexpr int kRanks = 3;
constexpr int64_t kChunk = 7;  // Bytes: every message below spans several chunks, with a tail.

// Host staging that records the largest and smallest buffers asked for and the bytes copied each
// way; `fail` makes every Buffer fail (a device without room).
class CountingStaging final : public PlaneStaging {
 public:
  struct Tally {
    int64_t largest_outgoing = 0, largest_incoming = 0, to_device = 0, to_host = 0;
    int64_t smallest_asked = INT64_MAX;
    bool fail = false;
  };
  explicit CountingStaging(Tally* tally) : inner_(MakeHostStaging()), tally_(tally) {}
  std::string name() const override { return "counted host"; }
  absl::StatusOr<void*> Buffer(int slot, int64_t bytes) override {
    if (tally_->fail) return absl::ResourceExhaustedError("out of device memory");
    int64_t& largest = slot == kOutgoing ? tally_->largest_outgoing : tally_->largest_incoming;
    largest = std::max(largest, bytes);
    tally_->smallest_asked = std::min(tally_->smallest_asked, bytes);
    return inner_->Buffer(slot, bytes);
  }
  absl::Status ToDevice(void* device, const void* host, int64_t bytes) override {
    tally_->to_device += bytes;
    return inner_->ToDevice(device, host, bytes);
  }
  absl::Status ToHost(void* host, const void* device, int64_t bytes) override {
    tally_->to_host += bytes;
    return inner_->ToHost(host, device, bytes);
  }

 private:
  std::unique_ptr<PlaneStaging> inner_;
  Tally* tally_;
};

// Bytes rank r contributes to a test: distinct per rank and per use, never all zero.
std::vector<uint8_t> RankBytes(int rank, int64_t n, int salt) {
  std::mt19937 rng(1000 * salt + rank + 1);
  std::vector<uint8_t> bytes(n);
  for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng() | 1);
  return bytes;
}

// Runs body(rank, plane) on kRanks threads, each with its own staged plane over Gloo.
template <typename Body>
void OnEveryRank(const std::string& prefix, std::vector<CountingStaging::Tally>& tallies,
                 Body body) {
  auto server = CoordinatorStoreServer::Start("127.0.0.1:0");
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string address = absl::StrCat("127.0.0.1:", (*server)->port());
  tallies.assign(kRanks, {});
  std::vector<std::string> failures(kRanks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kRanks; ++rank) {
    threads.emplace_back([&, rank] {
      auto store = ConnectCoordinatorStore(address, kTimeout);
      if (!store.ok()) {
        failures[rank] = store.status().ToString();
        return;
      }
      GlooOptions options{.rank = rank, .size = kRanks, .prefix = prefix, .timeout = kTimeout};
      auto gloo = MakeGlooCommunicator(**store, options);
      if (!gloo.ok()) {
        failures[rank] = gloo.status().ToString();
        return;
      }
      std::unique_ptr<Communicator> plane =
          MakeStagedPlane(HoldToNcclTerms(*std::move(gloo)),
                          std::make_unique<CountingStaging>(&tallies[rank]), kChunk);
      failures[rank] = body(rank, *plane);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int rank = 0; rank < kRanks; ++rank) EXPECT_EQ(failures[rank], "") << "rank " << rank;
}

TEST(StagedPlaneTest, SendAndRecvCarryEveryByteInChunksAndEmptyMessagesStillMatch) {
  std::vector<CountingStaging::Tally> tallies;
  constexpr int64_t kBytes = 45;  // 6 chunks of 7 and a tail of 3.
  OnEveryRank("p2p", tallies, [&](int rank, Communicator& plane) -> std::string {
    // A ring, even ranks sending first (a Send blocks until the peer receives).
    const int next = (rank + 1) % kRanks;
    const int prev = (rank + kRanks - 1) % kRanks;
    const std::vector<uint8_t> mine = RankBytes(rank, kBytes, 1);
    std::vector<uint8_t> got(kBytes, 0);
    const auto send = [&] { return plane.Send(mine.data(), kBytes, next, 5, kTimeout); };
    const auto recv = [&] { return plane.Recv(got.data(), kBytes, prev, 5, kTimeout); };
    absl::Status first = rank % 2 == 0 ? send() : recv();
    if (!first.ok()) return first.ToString();
    absl::Status second = rank % 2 == 0 ? recv() : send();
    if (!second.ok()) return second.ToString();
    if (got != RankBytes(prev, kBytes, 1)) return "received bytes differ from the sender's";
    // An empty message is one matched operation: the next message still lines up.
    uint8_t one = static_cast<uint8_t>(rank + 10);
    uint8_t other = 0;
    if (rank == 0) {
      if (!plane.Send(nullptr, 0, 1, 0, kTimeout).ok()) return "empty send";
      if (!plane.Send(&one, 1, 1, 0, kTimeout).ok()) return "send after empty";
    } else if (rank == 1) {
      if (!plane.Recv(nullptr, 0, 0, 0, kTimeout).ok()) return "empty recv";
      if (!plane.Recv(&other, 1, 0, 0, kTimeout).ok()) return "recv after empty";
      if (other != 10) return absl::StrCat("byte after the empty message is ", other);
    }
    if (plane.Send(mine.data(), -1, next, 0, kTimeout).code() !=
        absl::StatusCode::kInvalidArgument) {
      return "a negative size was not refused";
    }
    return "";
  });
  for (int rank = 0; rank < kRanks; ++rank) {
    EXPECT_EQ(tallies[rank].largest_outgoing, kChunk) << rank;
    EXPECT_EQ(tallies[rank].largest_incoming, kChunk) << rank;
    // Whole chunks, even for the 1-byte and empty messages: a reserved staging never grows.
    EXPECT_EQ(tallies[rank].smallest_asked, kChunk) << rank;
    EXPECT_GE(tallies[rank].to_device, kBytes) << rank;
    EXPECT_GE(tallies[rank].to_host, kBytes) << rank;
  }
}

TEST(StagedPlaneTest, AllGatherAndBroadcastPutEveryRanksBytesInPlace) {
  std::vector<CountingStaging::Tally> tallies;
  constexpr int64_t kBytes = 30;  // 4 chunks of 7 and a tail of 2.
  OnEveryRank("collectives", tallies, [&](int rank, Communicator& plane) -> std::string {
    const std::vector<uint8_t> mine = RankBytes(rank, kBytes, 2);
    std::vector<uint8_t> all(kRanks * kBytes, 0);
    absl::Status gathered = plane.AllGather(mine.data(), all.data(), kBytes, kTimeout);
    if (!gathered.ok()) return gathered.ToString();
    for (int r = 0; r < kRanks; ++r) {
      const std::vector<uint8_t> want = RankBytes(r, kBytes, 2);
      if (!std::equal(want.begin(), want.end(), all.begin() + r * kBytes)) {
        return absl::StrCat("AllGather: rank ", r, "'s block differs");
      }
    }
    std::vector<uint8_t> data = rank == 1 ? RankBytes(1, kBytes, 3) : std::vector<uint8_t>(kBytes);
    absl::Status broadcast = plane.Broadcast(data.data(), kBytes, 1, kTimeout);
    if (!broadcast.ok()) return broadcast.ToString();
    if (data != RankBytes(1, kBytes, 3)) return "Broadcast: bytes differ from the root's";
    absl::Status barrier = plane.Barrier(kTimeout);
    return barrier.ok() ? "" : barrier.ToString();
  });
  for (int rank = 0; rank < kRanks; ++rank) {
    EXPECT_EQ(tallies[rank].largest_outgoing, kChunk) << rank;
    EXPECT_EQ(tallies[rank].largest_incoming, kChunk * kRanks) << rank;
  }
}

// The staging a data plane forms with is taken whole at once (both buffers, a chunk each), and a
// device without room for it fails the formation with its error.
TEST(StagedPlaneTest, ReservingTakesBothBuffersAtTheChunkOrFails) {
  CountingStaging::Tally tally;
  CountingStaging staging(&tally);
  ASSERT_TRUE(ReservePlaneStaging(staging, kChunk).ok());
  EXPECT_EQ(tally.largest_outgoing, kChunk);
  EXPECT_EQ(tally.largest_incoming, kChunk);
  tally.fail = true;
  const absl::Status refused = ReservePlaneStaging(staging, kChunk);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
}

}  // namespace
}  // namespace da::dist
