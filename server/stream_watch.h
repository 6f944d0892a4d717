// Housekeeping of open AttendStreams on one thread of its own: a stream that has waited on its
// client for longer than the idle limit is told to end, and once the last open stream has ended
// the memory malloc kept from the streams' messages is given back to the system.
//
//   StreamWatch watch(std::chrono::milliseconds(20000));
//   watch.Add(reactor);     // When the stream opens (reactor implements StreamWatch::Watched).
//   watch.Remove(reactor);  // In OnDone, before the reactor is deleted.
//
// Idle. Each period the watch calls CheckIdle(now) on every stream; the stream compares now with
// the last time its client made progress (a message read or written) while it was not computing,
// and when that is longer than the limit it records its error and stays open (returns true);
// the watch then calls EndIdle, outside its own lock, and the stream finishes. A client that
// sends its header and then nothing, or stops halfway, or never reads its answer, so cannot hold
// its memory reservation beyond the limit. Lock order: the watch's lock, then the stream's; a
// stream never calls the watch while it holds its own lock, and Remove waits for a CheckIdle in
// progress. A stream that returned true stays alive (does not finish) until its EndIdle.
//
// Unary answers. A unary Attend is watched too, from when its answer is ready until gRPC is done
// with it: a client that never takes its answer (granting no flow-control window) loses the call
// once the limit has passed since the answer was ready (server/attention_service.cc).
//
// Memory. The server keeps freed message memory in malloc's heaps while streams run
// (server/malloc_tuning.h); after the last stream ends, malloc_trim returns it, so an idle server
// comes back near its idle resident size instead of keeping the peak of its last burst.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>

namespace da::server {

class StreamWatch {
 public:
  using Clock = std::chrono::steady_clock;

  class Watched {
   public:
    virtual ~Watched() = default;
    // True when the client has been idle for longer than idle_timeout: the stream has recorded
    // why and waits for EndIdle (called once, without the watch's lock) to finish.
    virtual bool CheckIdle(Clock::time_point now, std::chrono::milliseconds idle_timeout) = 0;
    virtual void EndIdle() = 0;
  };

  // idle_timeout 0: streams are never ended for idleness (memory is still trimmed).
  explicit StreamWatch(std::chrono::milliseconds idle_timeout);
  ~StreamWatch();  // Joins the thread; every stream must have been removed.

  StreamWatch(const StreamWatch&) = delete;
  StreamWatch& operator=(const StreamWatch&) = delete;

  void Add(Watched* stream);
  void Remove(Watched* stream);

  std::chrono::milliseconds idle_timeout() const { return idle_timeout_; }
  int64_t trims() const;  // malloc_trim calls so far (for tests and logs).

 private:
  void Loop();

  const std::chrono::milliseconds idle_timeout_;
  const std::chrono::milliseconds period_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::set<Watched*> streams_;
  bool ended_since_trim_ = false;  // A stream ended and no trim has run since.
  int64_t trims_ = 0;
  bool stopping_ = false;
  std::thread thread_;  // Last: starts once the members above exist.
};

}  // namespace da::server
