// The attention calls a service holds, each from its reactor's construction until gRPC is done
// with it (OnDone, once its last bytes have gone to the kernel). The drain waits for none before
// it lets gRPC close the connections (Server::Shutdown): gRPC closes a connection as soon as its
// last call has written its answer after the GOAWAY, and a client's frame arriving then (a window
// update for the answer it is reading) resets the connection and throws away the answer's bytes
// not yet delivered.
//
//   LiveCalls calls;
//   LiveCalls::Token token(&calls);  // A reactor's member: counted while the reactor lives.
//   calls.WaitForNone(deadline);
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace da::server {

class LiveCalls {
 public:
  class Token {
   public:
    explicit Token(LiveCalls* calls) : calls_(calls) {
      if (calls_ != nullptr) calls_->Enter();
    }
    ~Token() {
      if (calls_ != nullptr) calls_->Leave();
    }
    Token(const Token&) = delete;
    Token& operator=(const Token&) = delete;

   private:
    LiveCalls* const calls_;
  };

  int count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return count_;
  }

  // True once no call is held; false when `deadline` passes with some still held.
  bool WaitForNone(std::chrono::steady_clock::time_point deadline) const {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_until(lock, deadline, [&] { return count_ == 0; });
  }

 private:
  void Enter() {
    std::lock_guard<std::mutex> lock(mu_);
    ++count_;
  }
  void Leave() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--count_ == 0) cv_.notify_all();
  }

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  int count_ = 0;
};

}  // namespace da::server
