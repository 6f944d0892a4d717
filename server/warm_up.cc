#include "server/warm_up.h"

#include <spdlog/spdlog.h>

#include <utility>

#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace da::server {

absl::StatusOr<engine::WarmUpResult> WarmUpPlan(engine::Engine& engine, Metrics& metrics,
                                                const WarmUpShape& shape,
                                                const std::atomic<bool>* stop) {
  DA_ASSIGN_OR_RETURN(engine::WarmUpResult result,
                      engine.WarmUp(shape.shape, shape.dtype, shape.dtype, shape.spec, stop));
  if (!result.already_warm) metrics.PlanBuilt(result.build_time_us / 1e6);
  spdlog::info("warm-up plan=\"{}\" already_warm={} bytes={} build_ms={:.3f} shares={}",
               result.plan_key, result.already_warm ? 1 : 0, result.plan_bytes,
               result.build_time_us / 1e3, result.shares);
  return result;
}

std::string DescribeWarmUpShape(const WarmUpShape& shape) {
  const engine::ProblemShape& s = shape.shape;
  return absl::StrFormat("%dx%dx%dx%d kv_heads=%d %s %s %s%s %s", s.batch, s.seq_len, s.heads,
                         s.head_dim, s.kv_heads, engine::DTypeName(shape.dtype),
                         shape.spec.PatternsToString(), engine::CombineModeName(shape.spec.mode),
                         shape.spec.causal ? " causal" : "",
                         engine::PrecisionName(shape.spec.precision));
}

WarmUpWorker::WarmUpWorker() : thread_([this] { Loop(); }) {}

WarmUpWorker::~WarmUpWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

void WarmUpWorker::Post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

void WarmUpWorker::Loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // Stopping with nothing left to do.
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
  }
}

}  // namespace da::server
