// The engine: validates a problem, queues it, runs it on a backend and reports how it ran.
// Plain C++; no gRPC, protobuf or logging library inside.
//
//   auto engine = Engine::Create({.threads = 2});
//   RunRequest request{q, k, v, spec, out};
//   absl::StatusOr<ExecutionInfo> info = (*engine)->Run(request);       // blocking
//   (*engine)->Submit(request, [](absl::StatusOr<ExecutionInfo> info) { ... });  // queued
//
// Thread safety: Run and Submit may be called from any thread. Submit's callback runs on an engine
// dispatcher thread, except for a request that fails validation: then it runs before Submit
// returns, on the caller's thread (no compute happens there). The views in a request must stay
// valid until Run returns or the callback has been called.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/device.h"
#include "engine/plan_cache.h"
#include "engine/precision_policy.h"
#include "engine/tensor.h"

namespace da::engine {

struct EngineOptions {
  int threads = 0;              // Compute threads; 0 means every core.
  int max_concurrent_runs = 1;  // Requests computed at once (each uses the whole pool).
  std::string backend = "cpu";  // "cpu" or "reference".
  Limits limits;
  int64_t plan_cache_bytes = int64_t{1} << 30;  // Budget of the warm plan cache (LRU).
  PrecisionPolicyOptions precision;             // Fallback for unsupported wishes, tolerance.
};

struct RunRequest {
  TensorView q;
  TensorView k;
  TensorView v;
  AttentionSpec spec;
  MutableTensorView out;  // [B, N, H, D], the dtype the caller wants back.
  std::string request_id;
  const std::atomic<bool>* cancelled = nullptr;  // Optional; true stops the run with CANCELLED.
};

struct ExecutionInfo {
  Precision precision_used = Precision::kFloat32;
  std::string precision_reason;
  ShardPolicy shard_strategy = ShardPolicy::kNone;
  std::string backend;
  std::vector<std::string> devices;
  int64_t queue_time_us = 0;
  int64_t compute_time_us = 0;
  bool plan_cache_hit = false;  // Filled once the plan cache exists.
  int64_t plan_build_time_us = 0;
};

using RunCallback = std::function<void(absl::StatusOr<ExecutionInfo>)>;

// What warming one problem's plan did.
struct WarmUpResult {
  bool already_warm = false;  // The plan was in the cache already.
  int64_t plan_bytes = 0;
  int64_t build_time_us = 0;
  Precision precision = Precision::kFloat32;
  std::string plan_key;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();  // Finishes queued work first.

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates and computes on the calling thread (and the compute pool).
  absl::StatusOr<ExecutionInfo> Run(const RunRequest& request);

  // Validates, then queues; done runs on a dispatcher thread with the result. A validation error
  // is reported through done too, before Submit returns.
  void Submit(const RunRequest& request, RunCallback done);

  // Builds (or finds) the plan of a problem without running it, so that the first real request
  // of this shape is a cache hit. out_dtype is the dtype the requests will want back.
  absl::StatusOr<WarmUpResult> WarmUp(const ProblemShape& shape, DType dtype, DType out_dtype,
                                      const AttentionSpec& spec);

  PlanCacheStats plan_cache_stats() const;

  // Requests queued or running.
  int64_t pending() const;

  const std::vector<DeviceInfo>& devices() const;
  const Limits& limits() const;
  int threads() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace da::engine
