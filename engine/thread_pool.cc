#include "engine/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <utility>

#include "engine/host_resources.h"

namespace da::engine {

namespace {

bool SetAffinity(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (const int cpu : cpus) {
    if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &set);
  }
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

}  // namespace

ThreadPool::ThreadPool(int threads) : ThreadPool(threads, {}) {}

ThreadPool::ThreadPool(int threads, std::vector<int> cpus) : cpus_(std::move(cpus)) {
  if (threads <= 0) threads = HostResourcesOfThisProcess().cpus;  // The container's CPUs.
  if (threads <= 0) threads = 1;
  for (int t = 1; t < threads; ++t) {
    workers_.emplace_back([this, t] {
      if (!cpus_.empty()) SetAffinity({cpus_[t % cpus_.size()]});
      WorkerLoop(t);
    });
  }
}

ScopedAffinity::ScopedAffinity(const std::vector<int>& cpus) {
  if (cpus.empty()) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (pthread_getaffinity_np(pthread_self(), sizeof(set), &set) != 0) return;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) previous_.push_back(cpu);
  }
  pinned_ = SetAffinity(cpus);
}

ScopedAffinity::~ScopedAffinity() {
  if (pinned_) SetAffinity(previous_);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  start_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::ParallelFor(int64_t tasks,
                             const std::function<void(int64_t task, int thread)>& body) {
  if (tasks <= 0) return;
  std::lock_guard<std::mutex> loop_lock(loop_mutex_);
  if (workers_.empty() || tasks == 1) {
    for (int64_t task = 0; task < tasks; ++task) body(task, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    body_ = &body;
    tasks_ = tasks;
    next_task_ = 0;
    busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  start_cv_.notify_all();
  RunTasks(0);
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [this] { return busy_workers_ == 0; });
  body_ = nullptr;
}

void ThreadPool::RunTasks(int thread) {
  for (;;) {
    int64_t task;
    {
      // Tasks are coarse (a segment of attention), so a mutex per hand-out costs nothing.
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_task_ >= tasks_) return;
      task = next_task_++;
    }
    (*body_)(task, thread);
  }
}

void ThreadPool::WorkerLoop(int thread) {
  uint64_t seen_generation = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      start_cv_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
      if (stopping_) return;
      seen_generation = generation_;
    }
    RunTasks(thread);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_workers_ == 0) done_cv_.notify_one();
    }
  }
}

}  // namespace da::engine
