// Plans and the cache that keeps them warm.
//
// A Plan holds everything derivable from a problem's key (shapes, dtypes, patterns, precision,
// devices): the backend's work decomposition and its pooled workspaces, already touched, so a
// request that finds its plan pays neither planning nor page faults.
//
//   PlanCache cache(1 << 30);
//   bool hit = false;
//   absl::StatusOr<std::shared_ptr<Plan>> plan =
//       cache.GetOrBuild(key, [&] { return backend.BuildPlan(key); }, &hit);
//
// PlanCache is an LRU bounded by bytes (Plan::bytes). It is thread-safe; concurrent misses on
// one key build once (the others wait for that build); and it never drops a plan while a caller
// holds it: entries in use are skipped by eviction (the cache may then sit above its budget until
// they are released and Trim runs).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/share.h"
#include "engine/tensor.h"

namespace da::engine {

// What a plan depends on. The softmax scale and request ids do not change a plan.
struct PlanKey {
  ProblemShape shape;
  DType dtype = DType::kFloat32;      // q, k, v
  DType out_dtype = DType::kFloat32;  // output
  std::vector<Pattern> patterns;
  bool causal = false;
  CombineMode mode = CombineMode::kLongNet;
  Precision precision = Precision::kFloat32;  // The chosen compute precision, never kAuto.
  std::string devices;                        // e.g. "cpu:0".
  int threads = 1;                            // Compute threads the work is cut for.
  // The share of the problem the plan computes (engine/share.h); unset: the whole problem.
  std::optional<Share> share;

  Share ShareOrWhole() const { return share.value_or(WholeShare(shape)); }

  std::string ToString() const;  // Stable and unique: the cache's map key.
};

class Plan {
 public:
  virtual ~Plan() = default;
  // Memory the plan holds (tables and workspaces), as counted against the cache budget.
  virtual int64_t bytes() const = 0;
  int64_t build_time_us = 0;
};

struct PlanCacheStats {
  int64_t hits = 0;       // Lookups that found a ready plan.
  int64_t misses = 0;     // Lookups that did not (they built, or waited for another's build).
  int64_t builds = 0;     // Plans built (successfully or not).
  int64_t evictions = 0;  // Plans dropped to stay within the budget.
  int64_t bytes = 0;      // Bytes of the plans cached now.
  // Of bytes, per device (PlanKey::devices): each device's share of the cache.
  std::map<std::string, int64_t> bytes_by_device = {};
  int64_t entries = 0;  // Plans cached now.
  int64_t capacity_bytes = 0;
};

class PlanCache {
 public:
  using Builder = std::function<absl::StatusOr<std::shared_ptr<Plan>>()>;

  // Marks a builder's error as its own caller's only (a warm-up that could not reserve its
  // workspace): GetOrBuild returns it to that caller, but the callers waiting for that build look
  // again (and one of them builds the plan) instead of taking it as their answer.
  static absl::Status BuilderOnly(absl::Status status);

  explicit PlanCache(int64_t capacity_bytes);
  ~PlanCache();

  PlanCache(const PlanCache&) = delete;
  PlanCache& operator=(const PlanCache&) = delete;

  // The plan for key: from the cache (hit), or from build() on a miss, which is then cached. A
  // failed build is returned to every waiter and not cached. *hit may be null.
  //
  // `stop` (optional) is the caller's: when it turns true, a caller waiting for another's build
  // of the same key returns CANCELLED within a few milliseconds, and a build of the caller's own
  // that returns CANCELLED while `stop` is set (the builder honoured it) is not handed to the
  // waiters: they build the plan themselves instead.
  absl::StatusOr<std::shared_ptr<Plan>> GetOrBuild(const PlanKey& key, const Builder& build,
                                                   bool* hit,
                                                   const std::atomic<bool>* stop = nullptr);

  // Evicts least-recently-used plans nobody holds until the cache fits its budget.
  void Trim();

  PlanCacheStats stats() const;
  // Whether key's plan is cached now (a build in flight is not); does not touch its recency.
  bool Contains(const PlanKey& key) const;
  // Keys from most to least recently used (for tests and diagnostics).
  std::vector<std::string> KeysByRecency() const;

 private:
  struct Entry;
  struct Flight;
  void TrimLocked();

  const int64_t capacity_bytes_;
  mutable std::mutex mutex_;
  std::list<std::string> recency_;  // Front: most recently used.
  std::unordered_map<std::string, Entry> entries_;
  std::unordered_map<std::string, std::shared_ptr<Flight>> flights_;
  PlanCacheStats stats_;
};

}  // namespace da::engine
