// Building plans ahead of requests: one shape at a time, logged and counted, and the worker
// thread that runs WarmUp RPCs so that no gRPC thread builds a plan.
//
//   DA_ASSIGN_OR_RETURN(engine::WarmUpResult result,
//                       WarmUpPlan(*engine, *metrics, shape, {.max_message_bytes = 64 << 20}));
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
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/conversion.h"
#include "server/metrics.h"

namespace da::server {

// What a warm-up names: a shape, an input and an output dtype, and a spec.
using WarmUpShape = StreamProblem;

// What decides the plans a shape's requests run: the server's message limit and stream chunks.
struct WarmUpTransport {
  int64_t max_message_bytes = 64LL << 20;  // A unary call sends q, k and v in one message.
  int64_t stream_min_chunk_tokens = 4096;  // A stream computes chunks (ChooseStreamChunking).
  bool stream_windows = true;  // Whether streams may compute windows (Engine::ComputesShares).
};

// The problem shapes whose plans requests of `shape` run, each once: the whole shape's for a
// unary call, where q, k and v fit in one message and so does the output; then a stream's chunks'
// (ChooseStreamChunking's tokens, and the last chunk's where it is shorter), which is the whole
// shape again when one chunk holds the sequence. A stream computes chunk by chunk, so without its
// chunk plans a warmed shape's first stream still builds. A stream of windows (segment lengths
// without a common chunk) builds a plan per window, which nothing can warm: none of its shapes.
std::vector<engine::ProblemShape> PlanShapes(const WarmUpShape& shape,
                                             const WarmUpTransport& transport);

// Builds (or finds) the plans of shape (PlanShapes); Engine::WarmUp checks each first. Logs one
// line per plan (plan key, bytes, build ms) and, for each it built, observes
// da_plan_build_duration_seconds. The result sums the plans' bytes and build times, is
// already_warm when every plan was, and lists every plan key (plan_key: the first).
// Errors are the engine's (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED for a limit).
absl::StatusOr<engine::WarmUpResult> WarmUpPlan(engine::Engine& engine, Metrics& metrics,
                                                const WarmUpShape& shape,
                                                const WarmUpTransport& transport,
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
