// StagedCopier against a fake device whose transfers run late (at the wait for their buffer, or
// at random later points, as a CUDA stream may): every byte arrives both ways, for sizes that are
// and are not multiples of the chunk, with 2 and 3 buffers, with and without a thread pool, and no
// buffer is written while a transfer queued on it is still to run (each queued transfer
// remembers its buffer's bytes and checks them when it runs).
#include "engine/cuda/staged_copy.h"

#include <gtest/gtest.h>

#include <deque>
#include <random>
#include <tuple>

namespace da::engine::cuda {
namespace {

struct FakeDevice {
  struct Transfer {
    int buffer;
    int64_t offset, bytes;
    std::vector<uint8_t> staged;  // To the device: the buffer's bytes when queued.
  };
  std::vector<uint8_t> memory;
  std::vector<std::vector<uint8_t>>* buffers = nullptr;
  bool to_device = true;
  std::deque<Transfer> pending;
  std::mt19937 rng{7};
  bool random_order = false;
  int overwritten = 0;      // Transfers that found their buffer changed since queued.
  int64_t stop_after = -1;  // The stop turns on after this many transfers were queued (-1: never).
  int64_t queued = 0;

  void Run(const Transfer& t) {
    std::vector<uint8_t>& buffer = (*buffers)[t.buffer];
    if (to_device) {
      if (!std::equal(t.staged.begin(), t.staged.end(), buffer.begin())) ++overwritten;
      std::copy(buffer.begin(), buffer.begin() + t.bytes, memory.begin() + t.offset);
    } else {
      std::copy(memory.begin() + t.offset, memory.begin() + t.offset + t.bytes, buffer.begin());
    }
  }
  // Runs the pending transfers of one buffer (all of them, in queue order).
  void Drain(int buffer) {
    for (auto it = pending.begin(); it != pending.end();) {
      if (it->buffer == buffer) {
        Run(*it);
        it = pending.erase(it);
      } else {
        ++it;
      }
    }
  }
  StagedCopier::Ops Ops() {
    return {[this](int b, int64_t offset, int64_t bytes) {
              std::vector<uint8_t> staged;
              if (to_device) staged.assign((*buffers)[b].begin(), (*buffers)[b].begin() + bytes);
              pending.push_back({b, offset, bytes, std::move(staged)});
              ++queued;
              // A stream may also have got round to some earlier transfers by now.
              if (random_order && rng() % 2 == 0) {
                Run(pending.front());
                pending.pop_front();
              }
              return absl::OkStatus();
            },
            [this](int b) {
              Drain(b);
              return absl::OkStatus();
            },
            [this] { return stop_after >= 0 && queued >= stop_after; }};
  }
};

using Param = std::tuple<int64_t /*bytes*/, int /*buffers*/, bool /*pool*/, bool /*random*/>;
class StagedCopyTest : public ::testing::TestWithParam<Param> {};

TEST_P(StagedCopyTest, EveryByteArrivesBothWaysAndNoBufferIsReusedEarly) {
  const auto& [bytes, buffer_count, with_pool, random_order] = GetParam();
  constexpr int64_t kChunk = (int64_t{1} << 20) + 4096;  // Pieces split unevenly.
  std::vector<std::vector<uint8_t>> buffers(buffer_count, std::vector<uint8_t>(kChunk, 0));
  std::vector<uint8_t*> pointers;
  for (auto& b : buffers) pointers.push_back(b.data());
  ThreadPool pool(3);
  StagedCopier copier(pointers, kChunk, with_pool ? &pool : nullptr);

  std::mt19937_64 rng(static_cast<uint64_t>(bytes) * 31 + buffer_count);
  std::vector<uint8_t> src(bytes);
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  FakeDevice device;
  device.memory.assign(bytes, 0xA5);
  device.buffers = &buffers;
  device.random_order = random_order;
  ASSERT_TRUE(copier.ToDevice(src.data(), bytes, device.Ops()).ok());
  // The caller synchronises the stream before reading what arrived.
  while (!device.pending.empty()) {
    device.Run(device.pending.front());
    device.pending.pop_front();
  }
  EXPECT_EQ(device.overwritten, 0) << "a buffer was refilled before its transfer ran";
  ASSERT_TRUE(device.memory == src) << "to the device";

  // Back, into a poisoned host buffer, from device memory that now holds other bytes.
  for (auto& x : device.memory) x = static_cast<uint8_t>(rng());
  const std::vector<uint8_t> expected = device.memory;
  std::vector<uint8_t> dst(bytes, 0x5A);
  device.to_device = false;
  ASSERT_TRUE(copier.ToHost(dst.data(), bytes, device.Ops()).ok());
  EXPECT_TRUE(dst == expected) << "to the host";
}

INSTANTIATE_TEST_SUITE_P(
    Sizes, StagedCopyTest,
    ::testing::Combine(::testing::Values<int64_t>(0, 1, 4096, (int64_t{1} << 20) + 4096,
                                                  5 * ((int64_t{1} << 20) + 4096),
                                                  7 * ((int64_t{1} << 20) + 4096) + 123),
                       ::testing::Values(2, 3), ::testing::Bool(), ::testing::Bool()));

// A stop polled between chunks ends either copy with CANCELLED after the chunks queued so far;
// the copier is usable at once: the next copies carry every byte, and no buffer is refilled
// before a transfer left in flight by the stopped copy has run.
TEST(StagedCopyTest, AStopEndsTheCopyBetweenChunksAndTheNextCopyIsWhole) {
  constexpr int64_t kChunk = 4096;
  constexpr int64_t kBytes = 10 * kChunk + 77;
  std::vector<std::vector<uint8_t>> buffers(3, std::vector<uint8_t>(kChunk, 0));
  std::vector<uint8_t*> pointers;
  for (auto& b : buffers) pointers.push_back(b.data());
  StagedCopier copier(pointers, kChunk, nullptr);
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> src(kBytes);
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  FakeDevice device;
  device.memory.assign(kBytes, 0xA5);
  device.buffers = &buffers;
  device.stop_after = 4;
  const absl::Status stopped = copier.ToDevice(src.data(), kBytes, device.Ops());
  EXPECT_EQ(stopped.code(), absl::StatusCode::kCancelled) << stopped;
  EXPECT_EQ(device.queued, 4);
  EXPECT_NE(stopped.message().find("after 16384 of 41037 bytes"), std::string::npos) << stopped;

  device.stop_after = -1;
  ASSERT_TRUE(copier.ToDevice(src.data(), kBytes, device.Ops()).ok());
  while (!device.pending.empty()) {
    device.Run(device.pending.front());
    device.pending.pop_front();
  }
  EXPECT_EQ(device.overwritten, 0);
  EXPECT_TRUE(device.memory == src);

  device.to_device = false;
  device.queued = 0;
  device.stop_after = 2;
  std::vector<uint8_t> dst(kBytes, 0x5A);
  EXPECT_EQ(copier.ToHost(dst.data(), kBytes, device.Ops()).code(), absl::StatusCode::kCancelled);
  device.stop_after = -1;
  ASSERT_TRUE(copier.ToHost(dst.data(), kBytes, device.Ops()).ok());
  EXPECT_TRUE(dst == src);
}

TEST(StagedCopyTest, OneBufferIsRefused) {
  std::vector<uint8_t> buffer(64);
  StagedCopier copier({buffer.data()}, 64, nullptr);
  FakeDevice device;
  std::vector<std::vector<uint8_t>> buffers{buffer};
  device.buffers = &buffers;
  uint8_t byte = 1;
  EXPECT_EQ(copier.ToDevice(&byte, 1, device.Ops()).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(copier.ToHost(&byte, 1, device.Ops()).code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace da::engine::cuda
