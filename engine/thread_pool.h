// A persistent pool of compute threads running one parallel loop at a time.
//
//   ThreadPool pool(4);
//   pool.ParallelFor(tasks, [&](int64_t task, int thread) { ... });
//
// ParallelFor hands out task indices dynamically (an atomic counter), so uneven tasks balance.
// The calling thread takes part as thread 0; `thread` is in [0, size()). Calls to ParallelFor
// from different threads are serialised: one loop owns the pool at a time.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace da::engine {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // threads <= 0: one per hardware thread.
  // Worker t pinned to cpus[t % cpus.size()] (none pinned when empty). The calling thread, thread
  // 0, pins itself for a run with ScopedAffinity.
  ThreadPool(int threads, std::vector<int> cpus);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void ParallelFor(int64_t tasks, const std::function<void(int64_t task, int thread)>& body);

 private:
  void WorkerLoop(int thread);
  std::vector<int> cpus_;
  void RunTasks(int thread);

  std::mutex loop_mutex_;  // Serialises ParallelFor callers.
  std::mutex mutex_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* body_ = nullptr;
  int64_t tasks_ = 0;
  int64_t next_task_ = 0;  // Guarded by mutex_.
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  bool stopping_ = false;
};

// Pins the calling thread to `cpus` until destroyed, then restores its previous affinity; a no-op
// for an empty list (or where affinity cannot be set).
class ScopedAffinity {
 public:
  explicit ScopedAffinity(const std::vector<int>& cpus);
  ~ScopedAffinity();
  ScopedAffinity(const ScopedAffinity&) = delete;
  ScopedAffinity& operator=(const ScopedAffinity&) = delete;

 private:
  bool pinned_ = false;
  std::vector<int> previous_;
};

}  // namespace da::engine
