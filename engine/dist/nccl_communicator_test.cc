// Tests of the NCCL communicator on real GPUs (ctest label `gpu`); every test skips, saying why,
// when the machine has fewer CUDA devices than it needs.
//
// Multi-process cases: the test binary spawns itself, once per rank, with DA_NCCL_CHILD_* in the
// environment; main() then runs one rank instead of the tests. The ranks meet through FileStore,
// a KeyValueStore over files in a fresh temporary folder (the coordinator's store lives elsewhere).
#include "engine/dist/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

extern char** environ;

namespace da::dist {
namespace {

using std::chrono::milliseconds;
constexpr milliseconds kTimeout(60000);
// Odd on purpose: no multiple of any vector width or NCCL chunk.
constexpr int64_t kBytes = (1 << 20) + 13;

// A KeyValueStore over files: Set writes key's file atomically (write, then rename); Get waits for
// it to appear. For tests on one machine only.
class FileStore final : public KeyValueStore {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}

  absl::Status Set(const std::string& key, const std::string& value) override {
    const std::string path = PathOf(key);
    const std::string temporary = absl::StrCat(path, ".tmp.", getpid());
    std::ofstream out(temporary, std::ios::binary);
    out.write(value.data(), static_cast<std::streamsize>(value.size()));
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("FileStore: writing ", temporary));
    std::error_code error;
    std::filesystem::rename(temporary, path, error);
    if (error) return absl::InternalError(absl::StrCat("FileStore: rename to ", path));
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Get(const std::string& key, milliseconds timeout) override {
    const std::string path = PathOf(key);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    // Polls: a file has nothing to wait on. Bounded by the timeout.
    while (!std::filesystem::exists(path)) {
      if (std::chrono::steady_clock::now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("FileStore: key '", key, "' not set within ", timeout.count(), " ms"));
      }
      std::this_thread::sleep_for(milliseconds(5));
    }
    std::ifstream in(path, std::ios::binary);
    std::stringstream content;
    content << in.rdbuf();
    return content.str();
  }

  absl::Status DeletePrefix(const std::string& prefix) override {
    const std::string name_prefix = std::filesystem::path(PathOf(prefix)).filename().string();
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(dir_, error)) {
      if (entry.path().filename().string().rfind(name_prefix, 0) == 0) {
        std::filesystem::remove(entry.path(), error);
      }
    }
    if (error) return absl::InternalError(absl::StrCat("FileStore: deleting '", prefix, "'"));
    return absl::OkStatus();
  }

 private:
  std::string PathOf(std::string key) const {
    for (char& c : key) {
      if (c == '/') c = '_';
    }
    return dir_ + "/" + key;
  }
  std::string dir_;
};

std::vector<uint8_t> RandomBytes(uint64_t seed, int64_t bytes) {
  std::mt19937_64 generator(seed);
  std::vector<uint8_t> data(bytes);
  for (auto& byte : data) byte = static_cast<uint8_t>(generator());
  return data;
}

// Device memory on the current device, freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&data_, bytes) != cudaSuccess) data_ = nullptr;
    Poison();
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return data_; }
  // Both wait for the device: cudaMemset is asynchronous and a cudaMemcpy from pageable memory
  // may return before its bytes land, both on the legacy stream, which NCCL's non-blocking
  // stream does not wait for.
  void Poison() {
    cudaMemset(data_, 0xA5, bytes_);
    cudaDeviceSynchronize();
  }
  void Upload(const std::vector<uint8_t>& host) {
    cudaMemcpy(data_, host.data(), host.size(), cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
  }
  std::vector<uint8_t> Download() const {
    std::vector<uint8_t> host(bytes_);
    cudaMemcpy(host.data(), data_, bytes_, cudaMemcpyDeviceToHost);
    return host;
  }

 private:
  void* data_ = nullptr;
  int64_t bytes_;
};

// "" when equal, else where the first difference is.
std::string Compare(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                    const std::string& what) {
  if (got.size() != want.size()) {
    return absl::StrCat(what, ": size ", got.size(), " != ", want.size());
  }
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      return absl::StrCat(what, ": byte ", i, " is ", int{got[i]}, ", expected ", int{want[i]});
    }
  }
  return "";
}

// Runs AllGather, Broadcast, a Send/Recv chain and Barrier on one rank (the caller has set the
// rank's device) and checks every byte; rank q's random block is RandomBytes(seed + q).
// Returns "" on success, else what went wrong.
std::string ExerciseRank(Communicator& comm, uint64_t seed) {
  const int rank = comm.rank();
  const int size = comm.size();
  auto block = [&](int q) { return RandomBytes(seed + q, kBytes); };

  DeviceBuffer send(kBytes), recv(kBytes * size);
  send.Upload(block(rank));
  absl::Status status = comm.AllGather(send.get(), recv.get(), kBytes, kTimeout);
  if (!status.ok()) return status.ToString();
  std::vector<uint8_t> gathered = recv.Download();
  for (int q = 0; q < size; ++q) {
    std::vector<uint8_t> part(gathered.begin() + q * kBytes, gathered.begin() + (q + 1) * kBytes);
    std::string error = Compare(part, block(q), absl::StrCat("AllGather block ", q));
    if (!error.empty()) return error;
  }

  // Non-root ranks start from their own data, so a Broadcast that does nothing fails.
  const int root = size - 1;
  DeviceBuffer data(kBytes);
  data.Upload(block(rank));
  status = comm.Broadcast(data.get(), kBytes, root, kTimeout);
  if (!status.ok()) return status.ToString();
  std::string error = Compare(data.Download(), block(root), "Broadcast");
  if (!error.empty()) return error;

  // A chain 0 -> 1 -> ... -> size-1 -> 0 that cannot deadlock: only rank 0 sends first.
  if (size > 1) {
    const int next = (rank + 1) % size;
    const int previous = (rank + size - 1) % size;
    DeviceBuffer received(kBytes);
    if (rank == 0) status = comm.Send(send.get(), kBytes, next, /*tag=*/7, kTimeout);
    if (status.ok()) status = comm.Recv(received.get(), kBytes, previous, /*tag=*/7, kTimeout);
    if (status.ok() && rank != 0) status = comm.Send(send.get(), kBytes, next, /*tag=*/7, kTimeout);
    if (!status.ok()) return status.ToString();
    error = Compare(received.Download(), block(previous), "Send/Recv");
    if (!error.empty()) return error;
  }

  status = comm.Barrier(kTimeout);
  if (!status.ok()) return status.ToString();

  const Communicator::Counters counters = comm.counters();
  const int64_t expected_ops = size > 1 ? 5 : 3;
  const int64_t expected_sent =
      kBytes * (size - 1) + (rank == root ? kBytes * (size - 1) : 0) + (size > 1 ? kBytes : 0);
  const int64_t expected_received =
      kBytes * (size - 1) + (rank == root ? 0 : kBytes) + (size > 1 ? kBytes : 0);
  if (counters.operations != expected_ops || counters.bytes_sent != expected_sent ||
      counters.bytes_received != expected_received || counters.seconds <= 0) {
    return absl::StrCat("counters: operations ", counters.operations, " (want ", expected_ops,
                        "), sent ", counters.bytes_sent, " (want ", expected_sent, "), received ",
                        counters.bytes_received, " (want ", expected_received, "), seconds ",
                        counters.seconds);
  }
  return "";
}

#define DA_REQUIRE_GPUS(n)                                                                    \
  do {                                                                                        \
    const int da_devices_ = CudaDeviceCount();                                                \
    if (da_devices_ < (n)) {                                                                  \
      GTEST_SKIP() << "needs " << (n) << " CUDA device(s); this machine has " << da_devices_; \
    }                                                                                         \
  } while (0)

uint64_t FreshSeed() { return std::random_device{}(); }

// A fresh directory under /tmp (for a test's FileStore, or its ranks'), removed at the end.
struct ScratchDir {
  ScratchDir() {
    char dir_template[] = "/tmp/da_nccl_test_XXXXXX";
    path = mkdtemp(dir_template);
  }
  ~ScratchDir() { std::filesystem::remove_all(path); }
  std::string path;
};

// Runs everywhere, GPUs or not: arguments are checked before any device is touched.
TEST(NcclCommunicatorTest, ValidatesArgumentsBeforeTouchingADevice) {
  FileStore store(testing::TempDir());
  auto no_devices = CreateLocalNcclCommunicators({});
  EXPECT_EQ(no_devices.status().code(), absl::StatusCode::kInvalidArgument);
  auto bad_size = CreateNcclCommunicator(store, 0, 0, NcclOptions{});
  EXPECT_EQ(bad_size.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_size.status().message().find("got 0"), absl::string_view::npos)
      << bad_size.status();
  auto bad_rank = CreateNcclCommunicator(store, 3, 2, NcclOptions{});
  EXPECT_EQ(bad_rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_rank.status().message().find("rank 3"), absl::string_view::npos)
      << bad_rank.status();
  NcclOptions options;
  options.device = CudaDeviceCount();  // One past the last device.
  auto bad_device = CreateNcclCommunicator(store, 0, 1, options);
  EXPECT_EQ(bad_device.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_device.status().message().find(absl::StrCat("CUDA device ", options.device)),
            absl::string_view::npos)
      << bad_device.status();
}

TEST(NcclCommunicatorTest, OneGpuGroupCopiesItsOwnBytes) {
  DA_REQUIRE_GPUS(1);
  auto comms = CreateLocalNcclCommunicators({0});
  ASSERT_TRUE(comms.ok()) << comms.status();
  ASSERT_EQ(comms->size(), 1u);
  Communicator& comm = *(*comms)[0];
  EXPECT_EQ(comm.backend(), "nccl");
  // One thread at a time, messages in issue order: what the sharded protocol refuses.
  EXPECT_FALSE(comm.capabilities().concurrent_calls);
  EXPECT_FALSE(comm.capabilities().tagged_messages);
  EXPECT_EQ(comm.size(), 1);
  EXPECT_EQ(ExerciseRank(comm, FreshSeed()), "");
}

// The multi-process path (id through the store, nonblocking init) with a group of one.
TEST(NcclCommunicatorTest, GroupOfOneThroughTheStore) {
  DA_REQUIRE_GPUS(1);
  const ScratchDir dir;
  FileStore store(dir.path);
  NcclOptions options;
  options.key_prefix = "one";
  auto comm = CreateNcclCommunicator(store, 0, 1, options);
  ASSERT_TRUE(comm.ok()) << comm.status();
  absl::StatusOr<std::string> id = store.Get("one/nccl_id", milliseconds(0));
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->size(), 128u);
  EXPECT_EQ(ExerciseRank(**comm, FreshSeed()), "");
}

#if DA_HAVE_STAGED_PLANE
// The nccl data plane's staging (MakeCudaStaging) under a staged plane over a group of one:
// host bytes through device buffers and NCCL, in chunks of 5 bytes, byte for byte.
TEST(NcclCommunicatorTest, AStagedPlaneOfOneMovesHostBytesThroughTheGpu) {
  DA_REQUIRE_GPUS(1);
  const ScratchDir dir;
  FileStore store(dir.path);
  NcclOptions options;
  options.key_prefix = "staged";
  auto comm = CreateNcclCommunicator(store, 0, 1, options);
  ASSERT_TRUE(comm.ok()) << comm.status();
  std::unique_ptr<Communicator> plane =
      MakeStagedPlane(*std::move(comm), MakeCudaStaging(0), /*chunk_bytes=*/5);
  EXPECT_EQ(plane->backend(), "nccl via cuda:0");
  std::mt19937 rng(FreshSeed());
  std::vector<uint8_t> mine(23);
  for (uint8_t& b : mine) b = static_cast<uint8_t>(rng() | 1);
  std::vector<uint8_t> gathered(23, 0);
  ASSERT_TRUE(plane->AllGather(mine.data(), gathered.data(), 23, milliseconds(10000)).ok());
  EXPECT_EQ(gathered, mine);
  std::vector<uint8_t> root = mine;
  ASSERT_TRUE(plane->Broadcast(root.data(), 23, 0, milliseconds(10000)).ok());
  EXPECT_EQ(root, mine);
  // The staging itself, both ways.
  std::unique_ptr<PlaneStaging> staging = MakeCudaStaging(0);
  absl::StatusOr<void*> device = staging->Buffer(PlaneStaging::kOutgoing, 1000);
  ASSERT_TRUE(device.ok()) << device.status();
  std::vector<uint8_t> out(1000), back(1000, 0);
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng() | 1);
  ASSERT_TRUE(staging->ToDevice(*device, out.data(), 1000).ok());
  ASSERT_TRUE(staging->ToHost(back.data(), *device, 1000).ok());
  EXPECT_EQ(back, out);
}
#endif

// Rank 0 of two, with rank 1 never started: init gives up at its timeout and says so.
TEST(NcclCommunicatorTest, InitWithoutPeersTimesOut) {
  DA_REQUIRE_GPUS(1);
  const ScratchDir dir;
  FileStore store(dir.path);
  NcclOptions options;
  options.init_timeout = milliseconds(500);
  const auto start = std::chrono::steady_clock::now();
  auto comm = CreateNcclCommunicator(store, 0, 2, options);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded) << comm.status();
  EXPECT_NE(comm.status().message().find("500 ms"), absl::string_view::npos) << comm.status();
  EXPECT_LT(elapsed, std::chrono::seconds(10));
  // A rank other than 0 waits for the id and times out naming the key.
  options.init_timeout = milliseconds(100);
  options.key_prefix = "never_published";
  auto waiting = CreateNcclCommunicator(store, 1, 2, options);
  EXPECT_EQ(waiting.status().code(), absl::StatusCode::kDeadlineExceeded) << waiting.status();
  EXPECT_NE(waiting.status().message().find("never_published/nccl_id"), absl::string_view::npos)
      << waiting.status();
}

TEST(NcclCommunicatorTest, RejectsBadArgumentsNamingTheValue) {
  DA_REQUIRE_GPUS(1);
  const int devices = CudaDeviceCount();
  auto twice = CreateLocalNcclCommunicators({0, 0});
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  auto missing = CreateLocalNcclCommunicators({devices});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find(absl::StrCat(devices)), absl::string_view::npos);
  FileStore store(testing::TempDir());
  auto bad_rank = CreateNcclCommunicator(store, 2, 2, NcclOptions{});
  EXPECT_EQ(bad_rank.status().code(), absl::StatusCode::kInvalidArgument);

  auto comms = CreateLocalNcclCommunicators({0});
  ASSERT_TRUE(comms.ok()) << comms.status();
  Communicator& comm = *(*comms)[0];
  DeviceBuffer buffer(64);
  absl::Status status = comm.Broadcast(buffer.get(), 64, /*root=*/1, kTimeout);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("root 1"), absl::string_view::npos) << status;
  EXPECT_EQ(comm.Send(buffer.get(), 64, /*peer=*/0, 0, kTimeout).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comm.AllGather(buffer.get(), buffer.get(), -1, kTimeout).code(),
            absl::StatusCode::kInvalidArgument);
  // Still usable: argument errors never abort the communicator.
  EXPECT_TRUE(comm.Barrier(kTimeout).ok());
}

// One thread per device, each driving its own communicator.
TEST(NcclCommunicatorTest, LocalGroupOneThreadPerDevice) {
  DA_REQUIRE_GPUS(2);
  std::vector<int> devices;
  for (int d = 0; d < std::min(CudaDeviceCount(), 8); ++d) devices.push_back(d);
  auto comms = CreateLocalNcclCommunicators(devices);
  ASSERT_TRUE(comms.ok()) << comms.status();
  const uint64_t seed = FreshSeed();
  std::vector<std::string> errors(devices.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < devices.size(); ++i) {
    threads.emplace_back([&, i] {
      cudaSetDevice(devices[i]);
      errors[i] = ExerciseRank(*(*comms)[i], seed);
    });
  }
  for (auto& thread : threads) thread.join();
  for (size_t i = 0; i < devices.size(); ++i) EXPECT_EQ(errors[i], "") << "rank " << i;
}

// All devices from one thread, through ncclGroupStart/End.
TEST(NcclCommunicatorTest, LocalGroupFromOneThread) {
  DA_REQUIRE_GPUS(2);
  const int size = std::min(CudaDeviceCount(), 8);
  std::vector<int> devices;
  for (int d = 0; d < size; ++d) devices.push_back(d);
  auto comms = CreateLocalNcclCommunicators(devices);
  ASSERT_TRUE(comms.ok()) << comms.status();
  std::vector<Communicator*> group;
  for (auto& comm : *comms) group.push_back(comm.get());

  const uint64_t seed = FreshSeed();
  std::vector<std::unique_ptr<DeviceBuffer>> send, recv, data;
  std::vector<const void*> send_ptrs;
  std::vector<void*> recv_ptrs, data_ptrs;
  for (int r = 0; r < size; ++r) {
    cudaSetDevice(r);
    send.push_back(std::make_unique<DeviceBuffer>(kBytes));
    send.back()->Upload(RandomBytes(seed + r, kBytes));
    recv.push_back(std::make_unique<DeviceBuffer>(kBytes * size));
    data.push_back(std::make_unique<DeviceBuffer>(kBytes));
    data.back()->Upload(RandomBytes(seed + r, kBytes));
    send_ptrs.push_back(send.back()->get());
    recv_ptrs.push_back(recv.back()->get());
    data_ptrs.push_back(data.back()->get());
  }
  ASSERT_TRUE(NcclLocalAllGather(group, send_ptrs, recv_ptrs, kBytes, kTimeout).ok());
  const int root = 1;
  ASSERT_TRUE(NcclLocalBroadcast(group, data_ptrs, kBytes, root, kTimeout).ok());

  std::vector<uint8_t> expected_gather;
  for (int q = 0; q < size; ++q) {
    std::vector<uint8_t> block = RandomBytes(seed + q, kBytes);
    expected_gather.insert(expected_gather.end(), block.begin(), block.end());
  }
  for (int r = 0; r < size; ++r) {
    cudaSetDevice(r);
    EXPECT_EQ(Compare(recv[r]->Download(), expected_gather, "grouped AllGather"), "") << r;
    EXPECT_EQ(Compare(data[r]->Download(), RandomBytes(seed + root, kBytes), "grouped Broadcast"),
              "")
        << r;
    EXPECT_EQ(group[r]->counters().operations, 2);
  }
}

// A collective that its peers never join times out, aborts, and names the operation and timeout.
TEST(NcclCommunicatorTest, CollectiveWithoutPeersTimesOutAndAborts) {
  DA_REQUIRE_GPUS(2);
  auto comms = CreateLocalNcclCommunicators({0, 1});
  ASSERT_TRUE(comms.ok()) << comms.status();
  cudaSetDevice(0);
  DeviceBuffer send(kBytes), recv(2 * kBytes);
  const auto start = std::chrono::steady_clock::now();
  absl::Status status = (*comms)[0]->AllGather(send.get(), recv.get(), kBytes, milliseconds(300));
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_NE(status.message().find("AllGather"), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find("300 ms"), absl::string_view::npos) << status;
  EXPECT_LT(elapsed, std::chrono::seconds(10));
  // Later calls are refused as the communicator contract says: UNAVAILABLE, quoting the failure.
  const absl::Status refused = (*comms)[0]->Barrier(kTimeout);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_NE(refused.message().find("did not complete within 300 ms"), absl::string_view::npos)
      << refused;
}

// Abort from another thread (the Communicator contract: a stop watch giving up on a stalled run)
// ends a call in flight at once, not at its timeout, and later calls are refused quoting it.
TEST(NcclCommunicatorTest, AbortFromAnotherThreadEndsTheCallInFlight) {
  DA_REQUIRE_GPUS(2);
  auto comms = CreateLocalNcclCommunicators({0, 1});
  ASSERT_TRUE(comms.ok()) << comms.status();
  cudaSetDevice(0);
  DeviceBuffer send(kBytes), recv(2 * kBytes);
  Communicator& comm = *(*comms)[0];
  std::thread aborter([&comm] {
    std::this_thread::sleep_for(milliseconds(200));
    comm.Abort("the test gave up on the run");
  });
  const auto start = std::chrono::steady_clock::now();
  // Rank 1 never joins: without the abort this waits out its 20 s.
  const absl::Status status = comm.AllGather(send.get(), recv.get(), kBytes, milliseconds(20000));
  const auto elapsed = std::chrono::steady_clock::now() - start;
  aborter.join();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_NE(status.message().find("the test gave up on the run"), absl::string_view::npos)
      << status;
  EXPECT_LT(elapsed, std::chrono::seconds(3));
  const absl::Status refused = comm.Barrier(kTimeout);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_NE(refused.message().find("the test gave up on the run"), absl::string_view::npos)
      << refused;
}

// Spawns this binary once per rank with the child environment; returns the ranks' exit codes.
std::vector<int> RunRanks(int size, const std::string& mode, uint64_t seed) {
  const ScratchDir scratch;
  const std::string& dir = scratch.path;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < size; ++rank) {
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::strncmp(*e, "DA_NCCL_CHILD_", 14) != 0) env.push_back(*e);
    }
    env.push_back(absl::StrCat("DA_NCCL_CHILD_RANK=", rank));
    env.push_back(absl::StrCat("DA_NCCL_CHILD_SIZE=", size));
    env.push_back(absl::StrCat("DA_NCCL_CHILD_STORE=", dir));
    env.push_back(absl::StrCat("DA_NCCL_CHILD_SEED=", seed));
    env.push_back(absl::StrCat("DA_NCCL_CHILD_MODE=", mode));
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::string self = "/proc/self/exe";
    char* argv[] = {self.data(), nullptr};
    pid_t pid = 0;
    if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()) != 0) pid = -1;
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int wstatus = 0;
    // Each child bounds itself (operation timeouts, and alarm() as a last resort).
    if (pid <= 0 || waitpid(pid, &wstatus, 0) != pid) {
      codes.push_back(-1);
    } else {
      codes.push_back(WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus));
    }
  }
  return codes;
}

TEST(NcclCommunicatorTest, ProcessesMeetThroughTheStore) {
  DA_REQUIRE_GPUS(2);
  const int size = std::min(CudaDeviceCount(), 4);
  std::vector<int> codes = RunRanks(size, "exercise", FreshSeed());
  for (int rank = 0; rank < size; ++rank) EXPECT_EQ(codes[rank], 0) << "rank " << rank;
}

// Rank 1 exits after joining; rank 0's next collective fails (UNAVAILABLE or DEADLINE_EXCEEDED)
// within its timeout instead of hanging. Rank 0 exits 0 when that holds.
TEST(NcclCommunicatorTest, LostPeerFailsWithinTheTimeout) {
  DA_REQUIRE_GPUS(2);
  std::vector<int> codes = RunRanks(2, "lose_peer", FreshSeed());
  EXPECT_EQ(codes[0], 0) << "rank 0";
  EXPECT_EQ(codes[1], 0) << "rank 1";
}

int RunChild() {
  const int rank = std::atoi(std::getenv("DA_NCCL_CHILD_RANK"));
  const int size = std::atoi(std::getenv("DA_NCCL_CHILD_SIZE"));
  const uint64_t seed = std::strtoull(std::getenv("DA_NCCL_CHILD_SEED"), nullptr, 10);
  const std::string mode = std::getenv("DA_NCCL_CHILD_MODE");
  alarm(240);  // Last resort against a hang; every operation has its own timeout.
  FileStore store(std::getenv("DA_NCCL_CHILD_STORE"));
  NcclOptions options;
  options.device = rank;
  options.key_prefix = "test";
  options.init_timeout = kTimeout;
  auto comm = CreateNcclCommunicator(store, rank, size, options);
  if (!comm.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, comm.status().ToString().c_str());
    return 1;
  }
  if (mode == "exercise") {
    std::string error = ExerciseRank(**comm, seed);
    if (!error.empty()) std::fprintf(stderr, "rank %d: %s\n", rank, error.c_str());
    return error.empty() ? 0 : 1;
  }
  // lose_peer: both ranks pass a barrier; then rank 1 leaves without a word.
  absl::Status status = (*comm)->Barrier(kTimeout);
  if (!status.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, status.ToString().c_str());
    return 1;
  }
  if (rank == 1) _exit(0);
  DeviceBuffer send(kBytes), recv(2 * kBytes);
  const auto start = std::chrono::steady_clock::now();
  status = (*comm)->AllGather(send.get(), recv.get(), kBytes, milliseconds(3000));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const bool failed_as_promised = status.code() == absl::StatusCode::kUnavailable ||
                                  status.code() == absl::StatusCode::kDeadlineExceeded;
  std::fprintf(stderr, "rank 0 after losing rank 1: %s in %.2f s\n", status.ToString().c_str(),
               seconds);
  return failed_as_promised && seconds < 10 ? 0 : 1;
}

}  // namespace
}  // namespace da::dist

int main(int argc, char** argv) {
  if (std::getenv("DA_NCCL_CHILD_RANK") != nullptr) return da::dist::RunChild();
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
