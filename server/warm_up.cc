#include "server/warm_up.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <utility>

#include "absl/numeric/int128.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"
#include "server/stream_assembler.h"

namespace da::server {

std::vector<engine::ProblemShape> PlanShapes(const WarmUpShape& shape,
                                             const WarmUpTransport& transport) {
  const engine::ProblemShape& whole = shape.shape;
  std::vector<engine::ProblemShape> shapes;
  const auto add = [&](int64_t seq_len) {
    engine::ProblemShape s = whole;
    s.seq_len = seq_len;
    const auto same = [&](const engine::ProblemShape& t) { return t.seq_len == seq_len; };
    if (std::none_of(shapes.begin(), shapes.end(), same)) shapes.push_back(s);
  };
  // In 128 bits: a validated shape's tensors are within int64, their sum need not be.
  const absl::int128 unary_bytes =
      (absl::int128(whole.QueryShape().elements()) + 2 * whole.KeyShape().elements()) *
      engine::DTypeSize(shape.dtype);
  const absl::int128 answer_bytes =
      absl::int128(whole.QueryShape().elements()) * engine::DTypeSize(shape.out_dtype);
  if (unary_bytes <= transport.max_message_bytes && answer_bytes <= transport.max_message_bytes) {
    add(whole.seq_len);
  }
  const StreamChunking chunking = ChooseStreamChunking(
      shape.spec, whole.seq_len, std::max<int64_t>(1, transport.stream_min_chunk_tokens),
      transport.stream_windows);
  // A windowed stream's chunks are shares of the whole, each with a plan built for it alone:
  // nothing of theirs can be warmed.
  if (chunking.windowed) return shapes;
  const int64_t chunk = chunking.chunk_tokens;
  add(chunk);
  if (chunk > 0 && whole.seq_len % chunk != 0) add(whole.seq_len % chunk);
  return shapes;
}

absl::StatusOr<engine::WarmUpResult> WarmUpPlan(engine::Engine& engine, Metrics& metrics,
                                                const WarmUpShape& shape,
                                                const WarmUpTransport& transport,
                                                const std::atomic<bool>* stop) {
  engine::WarmUpResult result;
  result.already_warm = true;
  const std::vector<engine::ProblemShape> plan_shapes = PlanShapes(shape, transport);
  if (plan_shapes.empty()) {
    spdlog::info(
        "warm-up {}: no plan to build: too large for one message, it streams in windows, "
        "each with a plan of its own",
        DescribeWarmUpShape(shape));
  }
  for (const engine::ProblemShape& plan_shape : plan_shapes) {
    DA_ASSIGN_OR_RETURN(engine::WarmUpResult one,
                        engine.WarmUp(plan_shape, shape.dtype, shape.out_dtype, shape.spec, stop));
    if (!one.already_warm) metrics.PlanBuilt(one.build_time_us / 1e6);
    spdlog::info("warm-up plan=\"{}\" for={} already_warm={} bytes={} build_ms={:.3f} shares={}",
                 one.plan_key,
                 plan_shape.seq_len == shape.shape.seq_len ? "the whole sequence" : "stream chunks",
                 one.already_warm ? 1 : 0, one.plan_bytes, one.build_time_us / 1e3, one.shares);
    if (result.plan_keys.empty()) {
      result.plan_key = one.plan_key;
      result.precision = one.precision;
      result.shares = one.shares;
    }
    result.already_warm = result.already_warm && one.already_warm;
    result.plan_bytes += one.plan_bytes;
    result.build_time_us += one.build_time_us;
    result.plan_keys.insert(result.plan_keys.end(), one.plan_keys.begin(), one.plan_keys.end());
  }
  return result;
}

std::string DescribeWarmUpShape(const WarmUpShape& shape) {
  const engine::ProblemShape& s = shape.shape;
  return absl::StrFormat(
      "%dx%dx%dx%d kv_heads=%d %s%s %s %s%s %s", s.batch, s.seq_len, s.heads, s.head_dim,
      s.kv_heads, engine::DTypeName(shape.dtype),
      shape.out_dtype == shape.dtype ? std::string()
                                     : absl::StrCat("->", engine::DTypeName(shape.out_dtype)),
      shape.spec.PatternsToString(), engine::CombineModeName(shape.spec.mode),
      shape.spec.causal ? " causal" : "", engine::PrecisionName(shape.spec.precision));
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
