// Building plans ahead of requests: one shape at a time, logged and counted, and the worker
// thread that runs WarmUp RPCs so that no gRPC thread builds a plan.
//
//   DA_ASSIGN_OR_RETURN(engine::WarmUpResult result, WarmUpPlan(*engine, *metrics, shape));
//
//   WarmUpWorker worker;
//   worker.Post([] { ...; reactor->Finish(status); });  // Runs on the worker's thread, in order.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/conversion.h"
#include "server/metrics.h"

namespace da::server {

// What a warm-up names: a shape, an input dtype (the output has the same dtype) and a spec.
using WarmUpShape = StreamProblem;

// Builds (or finds) the plan of shape; Engine::WarmUp checks it first. Logs one line
// (plan key, bytes, build ms) and, when it built, observes da_plan_build_duration_seconds.
// Errors are the engine's (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED for a limit).
absl::StatusOr<engine::WarmUpResult> WarmUpPlan(engine::Engine& engine, Metrics& metrics,
                                                const WarmUpShape& shape,
                                                const std::atomic<bool>* stop = nullptr);

// "1x4096x8x64 kv_heads=8 fp32 (2048,1) longnet auto": a shape in error and log messages.
std::string DescribeWarmUpShape(const WarmUpShape& shape);

// One thread running posted jobs in order. The destructor runs the jobs still queued, then joins.
class WarmUpWorker {
 public:
  WarmUpWorker();
  ~WarmUpWorker();

  WarmUpWorker(const WarmUpWorker&) = delete;
  WarmUpWorker& operator=(const WarmUpWorker&) = delete;

  void Post(std::function<void()> job);

 private:
  void Loop();

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;  // Declared last: started once the members above exist.
};

}  // namespace da::server
