// The stream watch: a stream idle past the limit is ended (CheckIdle, then EndIdle outside the
// watch's lock), an active one is left alone, and memory is trimmed once the last stream is gone.
#include "server/stream_watch.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>

#include "server/test_util.h"

namespace da::server {
namespace {

using std::chrono::milliseconds;

// A stream whose client was last active at `last`.
class FakeStream final : public StreamWatch::Watched {
 public:
  explicit FakeStream(StreamWatch::Clock::time_point last) : last_(last) {}
  bool CheckIdle(StreamWatch::Clock::time_point now, milliseconds idle_timeout) override {
    ++checks_;
    return !ended_.load() && now - last_ > idle_timeout;
  }
  void EndIdle() override { ended_.store(true); }
  bool ended() const { return ended_.load(); }
  int checks() const { return checks_.load(); }

 private:
  StreamWatch::Clock::time_point last_;
  std::atomic<bool> ended_{false};
  std::atomic<int> checks_{0};
};

TEST(StreamWatchTest, EndsAStreamIdlePastTheLimitAndLeavesAnActiveOne) {
  StreamWatch watch(milliseconds(50));
  FakeStream idle(StreamWatch::Clock::now() - milliseconds(1000));
  FakeStream active(StreamWatch::Clock::now() + std::chrono::hours(1));
  watch.Add(&idle);
  watch.Add(&active);
  EXPECT_TRUE(testing::WaitFor([&] { return idle.ended(); }, milliseconds(5000)));
  EXPECT_TRUE(testing::WaitFor([&] { return active.checks() >= 3; }, milliseconds(5000)));
  EXPECT_FALSE(active.ended());
  watch.Remove(&idle);
  watch.Remove(&active);
}

TEST(StreamWatchTest, TrimsOnceAfterTheLastStreamEnds) {
  StreamWatch watch(milliseconds(40));  // Checks every 10 ms.
  const auto never_idle = StreamWatch::Clock::now() + std::chrono::hours(1);
  FakeStream a(never_idle);
  FakeStream b(never_idle);
  watch.Add(&a);
  watch.Add(&b);
  watch.Remove(&a);
  // b is still open: several periods pass (b is checked in each) without a trim.
  ASSERT_TRUE(testing::WaitFor([&] { return b.checks() >= 5; }, milliseconds(5000)));
  EXPECT_EQ(watch.trims(), 0);
  watch.Remove(&b);
  EXPECT_TRUE(testing::WaitFor([&] { return watch.trims() == 1; }, milliseconds(5000)));
  EXPECT_FALSE(a.ended() || b.ended());
}

}  // namespace
}  // namespace da::server
