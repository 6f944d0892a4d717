#include "engine/local_shard.h"

#include <chrono>
#include <mutex>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/shard_data.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

absl::StatusOr<std::vector<GatheredKeys>> HostKeyExchange::Gather(
    const TensorView& whole_k, const TensorView& whole_v, const ShardLayout& layout,
    const std::vector<SpanningKeys>& sets, int device, const std::atomic<bool>* stop) {
  const Shape4& s = whole_k.shape;
  const ProblemShape shape{s.batch, s.seq_len, s.heads, s.heads, s.head_dim};
  const Share whole = WholeShare(shape);
  const int64_t row_bytes = s.head_dim * DTypeSize(whole_k.dtype);
  std::vector<GatheredKeys> views(sets.size());
  std::lock_guard<std::mutex> lock(mutex_);
  if (done_.size() != sets.size()) {
    k_.assign(sets.size(), {});
    v_.assign(sets.size(), {});
    done_.assign(sets.size(), false);
  }
  for (size_t i = 0; i < sets.size(); ++i) {
    const SpanningKeys& set = sets[i];
    const auto [begin, end] = RowsOf(set, layout, device);
    if (begin == end) continue;  // This share holds no rows of the set: it reads none.
    if (!done_[i]) {
      k_[i].resize(s.batch * set.kept.count * row_bytes);
      v_[i].resize(s.batch * set.kept.count * row_bytes);
      if (!CopyKeptRowsUnlessStopped(whole_k, whole, set, k_[i].data(), stop) ||
          !CopyKeptRowsUnlessStopped(whole_v, whole, set, v_[i].data(), stop)) {
        return absl::CancelledError("cancelled while gathering the kept rows of spanning segments");
      }
      done_[i] = true;
    }
    views[i] = {k_[i].data(), v_[i].data()};
  }
  return views;
}

int64_t HostKeyExchange::bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = 0;
  for (size_t i = 0; i < k_.size(); ++i) total += k_[i].size() + v_[i].size();
  return total;
}

int64_t LocalShardCopyBytes(const ProblemShape& shape, DType dtype, DType out_dtype,
                            const AttentionSpec& spec, const ShardLayout& layout, bool host) {
  int64_t bytes = 0;
  for (const Share& share : layout.shares) {
    if (host && ShareIsContiguous(shape, share)) continue;
    bytes += ShareBytes(shape.QueryShape(), share, dtype, false) +
             2 * ShareBytes(shape.KeyShape(), share, dtype, true) +
             ShareBytes(shape.QueryShape(), share, out_dtype, false);
  }
  for (const SpanningKeys& set : SpanningKeySets(shape, spec, layout)) {
    bytes += 2 * GatheredRowsBytes(shape, set, dtype);
  }
  return bytes;
}

absl::StatusOr<LocalShardStats> RunLocalSharded(const ShardedProblem& problem,
                                                const std::vector<ShareCompute>& devices,
                                                KeyExchange& exchange) {
  const int world = static_cast<int>(devices.size());
  const ProblemShape shape{problem.q.shape.batch, problem.q.shape.seq_len, problem.q.shape.heads,
                           problem.k.shape.heads, problem.q.shape.head_dim};
  DA_ASSIGN_OR_RETURN(const ShardLayout layout,
                      MakeShardLayout(shape, problem.spec, problem.strategy, world));
  const std::vector<SpanningKeys> sets = layout.strategy == ShardPolicy::kSequence
                                             ? SpanningKeySets(shape, problem.spec, layout)
                                             : std::vector<SpanningKeys>();
  LocalShardStats stats;
  stats.strategy = layout.strategy;
  stats.compute_seconds.assign(world, 0);
  stats.reports.assign(world, RunReport{});
  stats.copy_seconds.assign(world, 0);
  std::vector<absl::Status> results(world);
  std::vector<char> hits(world, 0);

  const auto run_share = [&](int r) -> absl::Status {
    const Share& share = layout.shares[r];
    const ScopedAffinity pinned(devices[r].cpus);  // NUMA: buffers first-touched on the node.
    Clock::time_point start = Clock::now();
    // The share's inputs and output in the device's memory, from its backend's allocator (host
    // memory for CPU devices: the copies out of the whole tensors land there directly).
    Backend& backend = *devices[r].backend;
    const RunContext io{devices[r].pool, problem.stop, nullptr};
    const int64_t q_bytes = ShareBytes(problem.q.shape, share, problem.q.dtype, false);
    const int64_t kv_bytes = ShareBytes(problem.k.shape, share, problem.k.dtype, true);
    const int64_t out_bytes = ShareBytes(problem.out.shape, share, problem.out.dtype, false);
    // A host device computes a contiguous share (SEQUENCE of one batch) in place in the whole
    // tensors; otherwise the share is copied into buffers from the device's allocator.
    const bool contiguous = ShareIsContiguous(shape, share);
    const bool in_place = backend.Space().host() && contiguous;
    DeviceBuffer q, k, v, out;
    std::vector<uint8_t> staging;
    const auto stopped_copying = [&] {
      return absl::CancelledError(
          absl::StrCat("cancelled while copying the inputs of ", devices[r].device, "'s share"));
    };
    const auto put = [&](const void* host, int64_t bytes, const DeviceBuffer& dst) {
      return backend.CopyToDevice(dst.data(), host, bytes, io);
    };
    if (!in_place) {
      DA_ASSIGN_OR_RETURN(q, backend.Allocate(q_bytes));
      DA_ASSIGN_OR_RETURN(k, backend.Allocate(kv_bytes));
      DA_ASSIGN_OR_RETURN(v, backend.Allocate(kv_bytes));
      DA_ASSIGN_OR_RETURN(out, backend.Allocate(out_bytes));
      for (auto [whole, kv, dst] :
           {std::tuple{&problem.q, false, &q}, std::tuple{&problem.k, true, &k},
            std::tuple{&problem.v, true, &v}}) {
        if (dst->space().host()) {
          if (!CopyShareOutUnlessStopped(*whole, share, kv, dst->data(), problem.stop)) {
            return stopped_copying();
          }
        } else if (contiguous) {  // Straight from the whole tensor: no staging.
          const int64_t heads = kv ? shape.kv_heads : shape.heads;
          DA_RETURN_IF_ERROR(
              put(ShareStart(whole->data, shape, share, heads, whole->dtype), dst->bytes(), *dst));
        } else {
          staging.resize(dst->bytes());
          if (!CopyShareOutUnlessStopped(*whole, share, kv, staging.data(), problem.stop)) {
            return stopped_copying();
          }
          DA_RETURN_IF_ERROR(put(staging.data(), dst->bytes(), *dst));
          DA_RETURN_IF_ERROR(backend.Synchronize(io));
        }
      }
      DA_RETURN_IF_ERROR(backend.Synchronize(io));
    }
    const auto at = [&](const DeviceBuffer& buffer, const void* whole, int64_t heads,
                        DType dtype) -> void* {
      if (!in_place) return buffer.data();
      return const_cast<uint8_t*>(ShareStart(whole, shape, share, heads, dtype));
    };
    ShareProblem p;
    p.shape = shape;
    p.spec = problem.spec;
    p.share = share;
    const MemorySpace space = in_place ? MemorySpace::Host() : q.space();
    p.q = {problem.q.dtype, share.QueryShape(shape),
           at(q, problem.q.data, shape.heads, problem.q.dtype), q_bytes, space};
    p.k = {problem.k.dtype, share.KeyShape(shape),
           at(k, problem.k.data, shape.kv_heads, problem.k.dtype), kv_bytes, space};
    p.v = {problem.v.dtype, share.KeyShape(shape),
           at(v, problem.v.data, shape.kv_heads, problem.v.dtype), kv_bytes, space};
    p.out = {problem.out.dtype, share.QueryShape(shape),
             at(out, problem.out.data, shape.heads, problem.out.dtype), out_bytes, space};
    std::vector<GatheredKeys> gathered;
    std::vector<DeviceBuffer> gathered_buffers;  // The rows in device memory, when not host.
    if (!sets.empty()) {
      DA_ASSIGN_OR_RETURN(gathered,
                          exchange.Gather(problem.k, problem.v, layout, sets, r, problem.stop));
      if (!backend.Space().host()) {
        DA_RETURN_IF_ERROR(CopyGatheredRowsIn(backend, shape, problem.k.dtype, sets, gathered, io,
                                              gathered_buffers));
        DA_RETURN_IF_ERROR(backend.Synchronize(io));
      }
      p.spanning = &sets;
      p.gathered = &gathered;
    }
    stats.copy_seconds[r] += SecondsSince(start);
    start = Clock::now();
    bool hit = false;
    absl::Status ran =
        RunShareWithPlan(devices[r], p, problem.precision, problem.stop, &hit, &stats.reports[r]);
    stats.compute_seconds[r] = SecondsSince(start);
    hits[r] = hit;
    if (!ran.ok()) {
      return absl::Status(ran.code(), absl::StrCat(devices[r].device, " (", share.ToString(),
                                                   "): ", ran.message()));
    }
    if (in_place) return absl::OkStatus();  // The rows are in the whole output already.
    start = Clock::now();
    const void* rows = out.data();
    if (!out.space().host() && contiguous) {  // Straight into the whole output.
      void* whole = const_cast<uint8_t*>(
          ShareStart(problem.out.data, shape, share, shape.heads, problem.out.dtype));
      DA_RETURN_IF_ERROR(backend.CopyToHost(whole, out.data(), out_bytes, io));
      DA_RETURN_IF_ERROR(backend.Synchronize(io));
      stats.copy_seconds[r] += SecondsSince(start);
      return absl::OkStatus();
    }
    if (!out.space().host()) {
      staging.resize(out_bytes);
      DA_RETURN_IF_ERROR(backend.CopyToHost(staging.data(), out.data(), out_bytes, io));
      DA_RETURN_IF_ERROR(backend.Synchronize(io));
      rows = staging.data();
    }
    CopyShareIn(rows, share, problem.out);  // Shares write disjoint rows.
    stats.copy_seconds[r] += SecondsSince(start);
    return absl::OkStatus();
  };

  std::vector<std::thread> threads;
  for (int r = 1; r < world; ++r) threads.emplace_back([&, r] { results[r] = run_share(r); });
  results[0] = run_share(0);
  for (std::thread& t : threads) t.join();
  // A stop is reported as such, whichever device noticed it first.
  for (const absl::Status& result : results) {
    if (absl::IsCancelled(result)) return result;
  }
  for (const absl::Status& result : results) DA_RETURN_IF_ERROR(result);
  for (const char hit : hits) stats.plan_cache_hits += hit;
  stats.exchange_bytes = exchange.bytes();
  return stats;
}

}  // namespace da::engine
