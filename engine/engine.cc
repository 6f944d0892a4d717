#include "engine/engine.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/reference/reference_backend.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using Clock = std::chrono::steady_clock;

int64_t MicrosSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
}

}  // namespace

struct Engine::Impl {
  EngineOptions options;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<Backend> backend;
  std::vector<DeviceInfo> devices;
  std::unique_ptr<PlanCache> plans;

  struct Job {
    RunRequest request;
    RunCallback done;
    Clock::time_point enqueued;
  };
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Job> queue;
  int64_t running = 0;
  bool stopping = false;
  std::vector<std::thread> dispatchers;

  absl::Status Validate(const RunRequest& request) const {
    DA_RETURN_IF_ERROR(
        ValidateProblem(request.q, request.k, request.v, request.spec, options.limits));
    const Shape4& qs = request.q.shape;
    const Shape4& os = request.out.shape;
    if (os.batch != qs.batch || os.seq_len != qs.seq_len || os.heads != qs.heads ||
        os.head_dim != qs.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("output shape ", os.ToString(), " must equal query shape ", qs.ToString()));
    }
    if (request.out.bytes != os.elements() * DTypeSize(request.out.dtype) ||
        request.out.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "output buffer has ", request.out.bytes, " bytes; shape ", os.ToString(), " of ",
          DTypeName(request.out.dtype), " needs ", os.elements() * DTypeSize(request.out.dtype)));
    }
    const ProblemShape shape{qs.batch, qs.seq_len, qs.heads, request.k.shape.heads, qs.head_dim};
    return backend->Supports(shape, request.q.dtype, request.spec);
  }

  absl::StatusOr<std::shared_ptr<Plan>> GetPlan(const PlanKey& key, bool* hit) {
    return plans->GetOrBuild(
        key, [&] { return backend->BuildPlan(key); }, hit);
  }

  // Runs a validated request on the calling thread and the pool.
  absl::StatusOr<ExecutionInfo> Compute(const RunRequest& request, int64_t queue_time_us) {
    const Clock::time_point start = Clock::now();
    DA_ASSIGN_OR_RETURN(const PrecisionChoice precision, backend->ChoosePrecision(request.spec));
    const PlanKey key = MakePlanKey(request.q, request.k, request.out.dtype, request.spec,
                                    precision.precision, devices.front().id, pool->size());
    bool hit = false;
    ExecutionInfo info;
    {
      DA_ASSIGN_OR_RETURN(const std::shared_ptr<Plan> plan, GetPlan(key, &hit));
      RunContext context{pool.get(), request.cancelled};
      DA_RETURN_IF_ERROR(backend->RunPlan(*plan, request.q, request.k, request.v, request.spec,
                                          request.out, context));
      info.plan_build_time_us = hit ? 0 : plan->build_time_us;
    }
    plans->Trim();  // The plan is released: bring the cache back within budget if it was over.
    info.plan_cache_hit = hit;
    info.precision_used = precision.precision;
    info.precision_reason = precision.reason;
    info.shard_strategy = ShardPolicy::kNone;
    info.backend = backend->Name();
    info.devices = {devices.front().id};
    info.queue_time_us = queue_time_us;
    info.compute_time_us = MicrosSince(start) - info.plan_build_time_us;
    return info;
  }

  void DispatchLoop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // Stopping with nothing left to do.
        job = std::move(queue.front());
        queue.pop_front();
      }
      const int64_t queue_time_us = MicrosSince(job.enqueued);
      absl::StatusOr<ExecutionInfo> result =
          job.request.cancelled != nullptr && job.request.cancelled->load()
              ? absl::StatusOr<ExecutionInfo>(absl::CancelledError("cancelled while queued"))
              : Compute(job.request, queue_time_us);
      job.done(std::move(result));
      std::lock_guard<std::mutex> lock(mutex);
      --running;
    }
  }
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.backend == "cpu") {
    DA_RETURN_IF_ERROR(options.precision.Validate());
    impl->backend = std::make_unique<CpuBackend>(cpu::SelectedIsa(), options.precision);
  } else if (options.backend == "reference") {
    impl->backend = std::make_unique<ReferenceBackend>();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("backend '", options.backend, "' is unknown; expected cpu or reference"));
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads is ", options.threads, "; must be >= 0 (0 = every core)"));
  }
  if (options.max_concurrent_runs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_concurrent_runs is ", options.max_concurrent_runs, "; must be >= 1"));
  }
  if (options.plan_cache_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("plan_cache_bytes is ", options.plan_cache_bytes,
                                                   "; must be >= 0 (0 caches nothing)"));
  }
  impl->plans = std::make_unique<PlanCache>(options.plan_cache_bytes);
  impl->pool = std::make_unique<ThreadPool>(options.threads);
  impl->devices = DiscoverDevices(impl->pool->size());
  for (int i = 0; i < options.max_concurrent_runs; ++i) {
    impl->dispatchers.emplace_back([raw = impl.get()] { raw->DispatchLoop(); });
  }
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  for (std::thread& t : impl_->dispatchers) t.join();
}

absl::StatusOr<ExecutionInfo> Engine::Run(const RunRequest& request) {
  DA_RETURN_IF_ERROR(impl_->Validate(request));
  return impl_->Compute(request, 0);
}

void Engine::Submit(const RunRequest& request, RunCallback done) {
  absl::Status valid = impl_->Validate(request);
  if (!valid.ok()) {
    done(valid);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->queue.push_back({request, std::move(done), Clock::now()});
    ++impl_->running;
  }
  impl_->cv.notify_one();
}

absl::StatusOr<WarmUpResult> Engine::WarmUp(const ProblemShape& shape, DType dtype, DType out_dtype,
                                            const AttentionSpec& spec) {
  DA_RETURN_IF_ERROR(ValidateShape(shape, dtype, spec, impl_->options.limits));
  DA_RETURN_IF_ERROR(impl_->backend->Supports(shape, dtype, spec));
  DA_ASSIGN_OR_RETURN(const PrecisionChoice precision, impl_->backend->ChoosePrecision(spec));
  const TensorView q{dtype, shape.QueryShape(), nullptr, 0};
  const TensorView k{dtype, shape.KeyShape(), nullptr, 0};
  const PlanKey key = MakePlanKey(q, k, out_dtype, spec, precision.precision,
                                  impl_->devices.front().id, impl_->pool->size());
  WarmUpResult result;
  {
    DA_ASSIGN_OR_RETURN(const std::shared_ptr<Plan> plan,
                        impl_->GetPlan(key, &result.already_warm));
    result.plan_bytes = plan->bytes();
    result.build_time_us = result.already_warm ? 0 : plan->build_time_us;
  }
  result.precision = precision.precision;
  result.plan_key = key.ToString();
  impl_->plans->Trim();  // Within budget even when this plan does not fit (it is not held now).
  return result;
}

PlanCacheStats Engine::plan_cache_stats() const { return impl_->plans->stats(); }

int64_t Engine::pending() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->running;
}

const std::vector<DeviceInfo>& Engine::devices() const { return impl_->devices; }
const Limits& Engine::limits() const { return impl_->options.limits; }
int Engine::threads() const { return impl_->pool->size(); }

}  // namespace da::engine
