#include "server/stream_watch.h"

#include <malloc.h>

#include <algorithm>
#include <vector>

namespace da::server {
namespace {

// Often enough that a stream ends within a quarter of its limit past it, rarely enough to cost
// nothing; a trim waits at most one period after the last stream.
std::chrono::milliseconds PeriodFor(std::chrono::milliseconds idle_timeout) {
  if (idle_timeout.count() <= 0) return std::chrono::milliseconds(250);
  return std::clamp(idle_timeout / 4, std::chrono::milliseconds(5), std::chrono::milliseconds(250));
}

}  // namespace

StreamWatch::StreamWatch(std::chrono::milliseconds idle_timeout)
    : idle_timeout_(idle_timeout), period_(PeriodFor(idle_timeout)), thread_([this] { Loop(); }) {}

StreamWatch::~StreamWatch() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void StreamWatch::Add(Watched* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.insert(stream);
}

void StreamWatch::Remove(Watched* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.erase(stream);
  ended_since_trim_ = true;
}

int64_t StreamWatch::trims() const {
  std::lock_guard<std::mutex> lock(mu_);
  return trims_;
}

void StreamWatch::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, period_);
    if (stopping_) return;
    if (idle_timeout_.count() > 0) {
      const Clock::time_point now = Clock::now();
      // Under mu_: Remove (from OnDone) waits, so no stream is deleted while it is checked. One
      // that returns true does not finish before its EndIdle, so it is still there after unlock.
      std::vector<Watched*> idle;
      for (Watched* stream : streams_) {
        if (stream->CheckIdle(now, idle_timeout_)) idle.push_back(stream);
      }
      if (!idle.empty()) {
        lock.unlock();
        for (Watched* stream : idle) stream->EndIdle();  // May finish and delete the stream.
        lock.lock();
      }
    }
    if (streams_.empty() && ended_since_trim_) {
      ended_since_trim_ = false;
      ++trims_;
      lock.unlock();
      malloc_trim(0);  // Every heap: the free memory at their tops and the free pages inside.
      lock.lock();
    }
  }
}

}  // namespace da::server
