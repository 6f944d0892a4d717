// BlockCache over a fake allocator with a fixed capacity: a block of a size asked for again is
// reused (after the device is quiesced), other sizes are allocated, the cache stays within its
// bound, a failed allocation releases the cached blocks and succeeds where it would have without
// the cache (waiting for blocks on their way back), and many threads taking and giving blocks lose
// none.
#include "engine/cuda/block_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace da::engine::cuda {
namespace {

struct FakeDevice {
  int64_t capacity = 0;
  int64_t used = 0;
  std::multiset<std::pair<void*, int64_t>> live;
  std::mutex mutex;
  std::atomic<int> quiesced{0};
  int64_t next = 0x1000;

  BlockCache::Allocator Allocator() {
    return {[this](int64_t bytes) -> absl::StatusOr<void*> {
              std::lock_guard<std::mutex> lock(mutex);
              if (used + bytes > capacity) return absl::ResourceExhaustedError("out of memory");
              used += bytes;
              void* block = reinterpret_cast<void*>(next);
              next += bytes + 0x1000;
              live.insert({block, bytes});
              return block;
            },
            [this](void* block) {
              std::lock_guard<std::mutex> lock(mutex);
              for (auto it = live.begin(); it != live.end(); ++it) {
                if (it->first == block) {
                  used -= it->second;
                  live.erase(it);
                  return;
                }
              }
              ADD_FAILURE() << "released a block that is not live";
            },
            [this] { ++quiesced; }};
  }
};

TEST(BlockCacheTest, ASizeAskedForAgainReusesItsBlockAfterTheDeviceIsQuiet) {
  FakeDevice device;
  device.capacity = 1000;
  {
    BlockCache cache(device.Allocator(), 500);
    absl::StatusOr<void*> a = cache.Take(300);
    ASSERT_TRUE(a.ok());
    cache.Give(*a, 300);
    EXPECT_EQ(device.quiesced, 1);
    EXPECT_EQ(cache.cached_bytes(), 300);
    absl::StatusOr<void*> b = cache.Take(300);
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(*b, *a);
    EXPECT_EQ(cache.hits(), 1);
    absl::StatusOr<void*> c = cache.Take(200);  // Another size: allocated.
    ASSERT_TRUE(c.ok());
    EXPECT_NE(*c, *a);
    EXPECT_EQ(device.used, 500);
    cache.Give(*b, 300);
    cache.Give(*c, 200);
    EXPECT_EQ(cache.cached_bytes(), 500);
    absl::StatusOr<void*> d = cache.Take(100);
    ASSERT_TRUE(d.ok());
    cache.Give(*d, 100);  // Over the bound of 500: released, not cached.
    EXPECT_EQ(cache.cached_bytes(), 500);
    EXPECT_EQ(device.used, 500);
  }
  EXPECT_EQ(device.used, 0) << "the cache releases its blocks when destroyed";
}

TEST(BlockCacheTest, AFailedAllocationReleasesTheCacheAndTriesAgain) {
  FakeDevice device;
  device.capacity = 1000;
  BlockCache cache(device.Allocator(), 1000);
  absl::StatusOr<void*> a = cache.Take(600);
  ASSERT_TRUE(a.ok());
  cache.Give(*a, 600);
  // 700 fits the device only once the cached 600 are released.
  absl::StatusOr<void*> b = cache.Take(700);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(cache.cached_bytes(), 0);
  EXPECT_EQ(device.used, 700);
  // Beyond the device with nothing cached: the allocator's own error.
  absl::StatusOr<void*> c = cache.Take(400);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  cache.Give(*b, 700);
}

TEST(BlockCacheTest, ManyThreadsLoseNoBlock) {
  FakeDevice device;
  device.capacity = int64_t{1} << 40;
  BlockCache cache(device.Allocator(), 64 * 1024);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        const int64_t bytes = 1024 * (1 + (i + t) % 7);
        absl::StatusOr<void*> block = cache.Take(bytes);
        if (!block.ok()) {
          ++failures;
          continue;
        }
        cache.Give(*block, bytes);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures, 0);
  EXPECT_GT(cache.hits(), 0);
  EXPECT_EQ(device.used, cache.cached_bytes()) << "every live block is in the cache";
  cache.ReleaseAll();
  EXPECT_EQ(device.used, 0);
}

TEST(BlockCacheTest, ABlockGivenBackWhileTheCacheIsReleasedStaysCounted) {
  // Another thread releases the cache while Give waits for the device (here: inside quiesce).
  FakeDevice device;
  device.capacity = 1000;
  BlockCache* cache_seen = nullptr;
  BlockCache::Allocator allocator = device.Allocator();
  allocator.quiesce = [&] { cache_seen->ReleaseAll(); };
  BlockCache cache(allocator, 500);
  cache_seen = &cache;
  absl::StatusOr<void*> a = cache.Take(300);
  ASSERT_TRUE(a.ok());
  cache.Give(*a, 300);
  EXPECT_EQ(cache.cached_bytes(), 300);  // Kept: counted.
  absl::StatusOr<void*> b = cache.Take(300);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, *a);
  EXPECT_EQ(cache.cached_bytes(), 0);  // Not below zero.
  cache.Give(*b, 300);
  // A failed allocation finds the kept block and releases it: 300 + 800 > 1000 until then.
  absl::StatusOr<void*> big = cache.Take(800);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(cache.cached_bytes(), 0);
  cache.Give(*big, 800);  // Above the bound: released.
}

TEST(BlockCacheTest, AFailedTakeWaitsForABlockOnItsWayBackAndUsesItsMemory) {
  // Thread A gives a 300-byte block back and waits for the device (inside quiesce) until the
  // test lets it go; meanwhile thread B asks for 800 of the device's 1000 bytes. B's first
  // allocation fails; the block on its way back is what B lacks, so B waits for it, releases it
  // and succeeds.
  FakeDevice device;
  device.capacity = 1000;
  std::mutex mutex;
  std::condition_variable changed;
  bool quiescing = false, let_go = false;
  std::atomic<int> failed_allocations{0};
  BlockCache::Allocator allocator = device.Allocator();
  allocator.quiesce = [&] {
    std::unique_lock<std::mutex> lock(mutex);
    quiescing = true;
    changed.notify_all();
    changed.wait(lock, [&] { return let_go; });
  };
  const auto allocate = allocator.allocate;
  allocator.allocate = [&](int64_t bytes) {
    absl::StatusOr<void*> block = allocate(bytes);
    if (!block.ok()) ++failed_allocations;
    return block;
  };
  BlockCache cache(allocator, 500);
  absl::StatusOr<void*> small = cache.Take(300);
  ASSERT_TRUE(small.ok());
  std::thread giver([&] { cache.Give(*small, 300); });
  {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return quiescing; });
  }
  absl::StatusOr<void*> big = absl::UnknownError("not yet taken");
  std::atomic<bool> taken{false};
  std::thread taker([&] {
    big = cache.Take(800);
    taken = true;
  });
  while (failed_allocations.load() == 0) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(taken.load()) << "Take returned while a block was on its way back: " << big.status();
  {
    std::lock_guard<std::mutex> lock(mutex);
    let_go = true;
  }
  changed.notify_all();
  giver.join();
  taker.join();
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(failed_allocations.load(), 1);
  EXPECT_EQ(cache.cached_bytes(), 0);
  EXPECT_EQ(device.used, 800);
  cache.Give(*big, 800);  // Above the bound: released.
  EXPECT_EQ(device.used, 0);
}

}  // namespace
}  // namespace da::engine::cuda
