// PlanCache: LRU order within a byte budget, plans in use never dropped, single-flight builds.
// CI also runs this file under ThreadSanitizer (make test -> tsan).
#include "engine/plan_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

namespace da::engine {
namespace {

class FakePlan : public Plan {
 public:
  explicit FakePlan(int64_t bytes) : bytes_(bytes) {}
  int64_t bytes() const override { return bytes_; }

 private:
  int64_t bytes_;
};

PlanKey Key(int64_t seq_len) {
  PlanKey key;
  key.shape = {1, seq_len, 1, 1, 8};
  key.patterns = {{8, 1}};
  key.devices = "cpu:0";
  return key;
}

PlanCache::Builder Makes(int64_t bytes) {
  return [bytes]() -> absl::StatusOr<std::shared_ptr<Plan>> {
    return std::make_shared<FakePlan>(bytes);
  };
}

TEST(PlanCacheTest, SecondLookupIsAHit) {
  PlanCache cache(1000);
  bool hit = true;
  auto first = cache.GetOrBuild(Key(1), Makes(10), &hit);
  ASSERT_TRUE(first.ok());
  EXPECT_FALSE(hit);
  auto second = cache.GetOrBuild(Key(1), Makes(10), &hit);
  EXPECT_TRUE(hit);
  EXPECT_EQ(first->get(), second->get());
  const PlanCacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 1);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.builds, 1);
  EXPECT_EQ(s.bytes, 10);
  EXPECT_EQ(s.entries, 1);
}

TEST(PlanCacheTest, EvictsLeastRecentlyUsedWhenOverBudget) {
  PlanCache cache(300);
  for (int64_t n : {1, 2, 3}) ASSERT_TRUE(cache.GetOrBuild(Key(n), Makes(100), nullptr).ok());
  ASSERT_TRUE(cache.GetOrBuild(Key(1), Makes(100), nullptr).ok());  // 1 is now the most recent.
  ASSERT_TRUE(cache.GetOrBuild(Key(4), Makes(100), nullptr).ok());  // Over budget: 2 goes.
  EXPECT_EQ(cache.KeysByRecency(),
            (std::vector<std::string>{Key(4).ToString(), Key(1).ToString(), Key(3).ToString()}));
  PlanCacheStats s = cache.stats();
  EXPECT_EQ(s.evictions, 1);
  EXPECT_EQ(s.bytes, 300);
  EXPECT_EQ(s.entries, 3);
  // A plan bigger than half the budget pushes out two.
  ASSERT_TRUE(cache.GetOrBuild(Key(5), Makes(200), nullptr).ok());
  s = cache.stats();
  EXPECT_EQ(s.evictions, 3);
  EXPECT_LE(s.bytes, 300);
  EXPECT_EQ(cache.KeysByRecency(),
            (std::vector<std::string>{Key(5).ToString(), Key(4).ToString()}));
}

TEST(PlanCacheTest, APlanInUseSurvivesEviction) {
  PlanCache cache(100);
  auto held = cache.GetOrBuild(Key(1), Makes(100), nullptr);
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(cache.GetOrBuild(Key(2), Makes(100), nullptr).ok());  // Over budget; 1 is in use.
  bool hit = false;
  ASSERT_TRUE(cache.GetOrBuild(Key(1), Makes(100), &hit).ok());
  EXPECT_TRUE(hit) << "the held plan was dropped";
  EXPECT_EQ((*held)->bytes(), 100);
  // Released, it becomes evictable; Trim brings the cache back within budget.
  held->reset();
  cache.Trim();
  EXPECT_LE(cache.stats().bytes, 100);
}

TEST(PlanCacheTest, FailedBuildIsReturnedAndNotCached) {
  PlanCache cache(100);
  auto failing = []() -> absl::StatusOr<std::shared_ptr<Plan>> {
    return absl::ResourceExhaustedError("no memory for the workspace");
  };
  auto result = cache.GetOrBuild(Key(1), failing, nullptr);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache.stats().entries, 0);
  bool hit = true;
  EXPECT_TRUE(cache.GetOrBuild(Key(1), Makes(10), &hit).ok());
  EXPECT_FALSE(hit);
}

// A builder that throws ends its build like one that fails: the caller gets a status, and the key
// is built again by the next caller instead of waiting for a build that never ends.
TEST(PlanCacheTest, ABuilderThatThrowsFailsItsBuildAndTheKeyBuildsAgain) {
  PlanCache cache(100);
  auto out_of_memory = []() -> absl::StatusOr<std::shared_ptr<Plan>> { throw std::bad_alloc(); };
  auto result = cache.GetOrBuild(Key(1), out_of_memory, nullptr);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted) << result.status();
  EXPECT_NE(result.status().message().find("std::bad_alloc"), std::string::npos);
  auto throws = []() -> absl::StatusOr<std::shared_ptr<Plan>> {
    throw std::runtime_error("table too large");
  };
  result = cache.GetOrBuild(Key(1), throws, nullptr);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal) << result.status();
  EXPECT_NE(result.status().message().find("table too large"), std::string::npos);
  EXPECT_EQ(cache.stats().entries, 0);
  // No build is left in flight: a waiter without a stop flag would otherwise wait for ever.
  bool hit = true;
  EXPECT_TRUE(cache.GetOrBuild(Key(1), Makes(10), &hit).ok());
  EXPECT_FALSE(hit);
}

TEST(PlanCacheTest, ConcurrentMissesOnOneKeyBuildOnce) {
  PlanCache cache(1 << 20);
  std::atomic<int> builds{0};
  std::atomic<int> started{0};
  auto slow = [&]() -> absl::StatusOr<std::shared_ptr<Plan>> {
    ++builds;
    // Hold the build open until every thread has asked, so all 16 lookups overlap it.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.load() < 16 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    return std::make_shared<FakePlan>(64);
  };
  std::vector<std::thread> threads;
  std::vector<Plan*> seen(16, nullptr);
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      ++started;
      auto plan = cache.GetOrBuild(Key(7), slow, nullptr);
      if (plan.ok()) seen[t] = plan->get();
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(builds.load(), 1);
  for (Plan* p : seen) EXPECT_EQ(p, seen[0]);
  EXPECT_NE(seen[0], nullptr);
  EXPECT_EQ(cache.stats().builds, 1);
  EXPECT_EQ(cache.stats().entries, 1);
}

// A builder that runs until released (or until its caller's stop flag is raised, when it
// honours it as a backend does: CANCELLED).
struct HeldBuild {
  std::atomic<bool> started{false};
  std::atomic<bool> release{false};
  std::atomic<int> builds{0};

  PlanCache::Builder For(const std::atomic<bool>* stop) {
    return [this, stop]() -> absl::StatusOr<std::shared_ptr<Plan>> {
      ++builds;
      started = true;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!release.load() && std::chrono::steady_clock::now() < deadline) {
        if (stop != nullptr && stop->load()) return absl::CancelledError("build stopped");
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      return std::make_shared<FakePlan>(32);
    };
  }
  void WaitStarted() {
    while (!started.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
};

TEST(PlanCacheTest, AStoppedWaiterLeavesPromptlyAndTheBuildGoesOn) {
  PlanCache cache(1 << 20);
  HeldBuild held;
  std::thread builder(
      [&] { EXPECT_TRUE(cache.GetOrBuild(Key(3), held.For(nullptr), nullptr).ok()); });
  held.WaitStarted();
  std::atomic<bool> stop{false};
  absl::StatusOr<std::shared_ptr<Plan>> waited = absl::UnknownError("not returned");
  std::chrono::steady_clock::time_point returned;
  std::thread waiter([&] {
    waited = cache.GetOrBuild(Key(3), held.For(&stop), nullptr, &stop);
    returned = std::chrono::steady_clock::now();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // The waiter is waiting.
  const auto stopped_at = std::chrono::steady_clock::now();
  stop = true;
  waiter.join();
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kCancelled) << waited.status();
  const double left_ms = std::chrono::duration<double, std::milli>(returned - stopped_at).count();
  EXPECT_LT(left_ms, 50);
  held.release = true;
  builder.join();
  EXPECT_EQ(held.builds.load(), 1);
  EXPECT_EQ(cache.stats().entries, 1);  // The first caller's build finished and was cached.
}

TEST(PlanCacheTest, AStoppedBuilderIsNotTheWaitersAnswerTheyBuildAgain) {
  PlanCache cache(1 << 20);
  HeldBuild held;
  std::atomic<bool> stop{false};
  absl::StatusOr<std::shared_ptr<Plan>> first = absl::UnknownError("not returned");
  std::thread builder([&] { first = cache.GetOrBuild(Key(5), held.For(&stop), nullptr, &stop); });
  held.WaitStarted();
  constexpr int kWaiters = 4;
  std::vector<absl::StatusOr<std::shared_ptr<Plan>>> waited(kWaiters,
                                                            absl::UnknownError("not returned"));
  std::vector<std::thread> waiters;
  for (int i = 0; i < kWaiters; ++i) {
    waiters.emplace_back(
        [&, i] { waited[i] = cache.GetOrBuild(Key(5), held.For(nullptr), nullptr); });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // They wait for the first build.
  stop = true;
  builder.join();
  EXPECT_EQ(first.status().code(), absl::StatusCode::kCancelled);
  held.release = true;  // The waiters' own build (one of them) may finish now.
  for (std::thread& t : waiters) t.join();
  for (const auto& result : waited) {
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->get(), waited[0]->get());
  }
  EXPECT_EQ(held.builds.load(), 2);  // The stopped one, then one for all the waiters.
  const PlanCacheStats s = cache.stats();
  EXPECT_EQ(s.builds, 2);
  EXPECT_EQ(s.misses, 1 + kWaiters);
  EXPECT_EQ(s.entries, 1);
}

// A warm-up that could not reserve its workspace fails its own build; the request that waited
// for that build builds the plan itself instead of taking the warm-up's refusal as its answer.
TEST(PlanCacheTest, ABuilderOnlyErrorIsNotTheWaitersAnswerTheyBuildAgain) {
  PlanCache cache(1 << 20);
  std::atomic<bool> started{false};
  std::atomic<bool> release{false};
  absl::StatusOr<std::shared_ptr<Plan>> first = absl::UnknownError("not returned");
  std::thread builder([&] {
    first = cache.GetOrBuild(
        Key(7),
        [&]() -> absl::StatusOr<std::shared_ptr<Plan>> {
          started = true;
          while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
          return PlanCache::BuilderOnly(absl::ResourceExhaustedError("no room for its workspace"));
        },
        nullptr);
  });
  while (!started.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  absl::StatusOr<std::shared_ptr<Plan>> waited = absl::UnknownError("not returned");
  std::thread waiter([&] { waited = cache.GetOrBuild(Key(7), Makes(32), nullptr); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // It waits for the first build.
  release = true;
  builder.join();
  waiter.join();
  EXPECT_EQ(first.status().code(), absl::StatusCode::kResourceExhausted) << first.status();
  ASSERT_TRUE(waited.ok()) << waited.status();
  const PlanCacheStats s = cache.stats();
  EXPECT_EQ(s.builds, 2);
  EXPECT_EQ(s.entries, 1);
}

TEST(PlanCacheTest, ACancelledBuildWithoutAStopIsEveryWaitersAnswer) {
  // CANCELLED from a builder whose caller did not stop is an ordinary failure, shared as such.
  PlanCache cache(1 << 20);
  std::atomic<bool> stop{false};
  auto cancelled = []() -> absl::StatusOr<std::shared_ptr<Plan>> {
    return absl::CancelledError("the device went away");
  };
  EXPECT_EQ(cache.GetOrBuild(Key(6), cancelled, nullptr, &stop).status().code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(cache.stats().entries, 0);
}

TEST(PlanCacheTest, DifferentKeysBuildConcurrently) {
  PlanCache cache(1 << 20);
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        ASSERT_TRUE(cache.GetOrBuild(Key((t + i) % 8), Makes(16), nullptr).ok());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const PlanCacheStats s = cache.stats();
  EXPECT_EQ(s.entries, 8);
  EXPECT_EQ(s.builds, 8);
  EXPECT_EQ(s.hits + s.misses, 16 * 50);
}

TEST(PlanCacheTest, KeyNamesEverythingThePlanDependsOn) {
  PlanKey a = Key(1);
  PlanKey b = a;
  b.causal = true;
  EXPECT_NE(a.ToString(), b.ToString());
  b = a;
  b.precision = Precision::kBFloat16;
  EXPECT_NE(a.ToString(), b.ToString());
  b = a;
  b.patterns = {{8, 2}};
  EXPECT_NE(a.ToString(), b.ToString());
  b = a;
  b.shape.kv_heads = 2;
  EXPECT_NE(a.ToString(), b.ToString());
}

}  // namespace
}  // namespace da::engine
