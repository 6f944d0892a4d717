#include "engine/plan_cache.h"

#include <chrono>
#include <condition_variable>
#include <exception>
#include <new>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace da::engine {

struct PlanCache::Entry {
  std::shared_ptr<Plan> plan;
  int64_t bytes = 0;
  std::list<std::string>::iterator recency;
  std::string device;  // PlanKey::devices: whose memory the plan holds.
};

// One build in progress; waiters block on done.
struct PlanCache::Flight {
  std::condition_variable done_cv;
  bool done = false;
  // The builder was stopped: its result is its own, and the waiters build again.
  bool abandoned = false;
  absl::StatusOr<std::shared_ptr<Plan>> result = absl::UnknownError("plan build in progress");
};

namespace {

// How often a waiter with a stop flag looks at it.
constexpr std::chrono::milliseconds kStopPollPeriod(2);

bool Stopped(const std::atomic<bool>* stop) { return stop != nullptr && stop->load(); }

// The payload of PlanCache::BuilderOnly.
constexpr char kBuilderOnlyPayload[] = "da.engine/plan-cache-builder-only";

}  // namespace

std::string PlanKey::ToString() const {
  std::string patterns_text;
  for (const Pattern& p : patterns)
    absl::StrAppend(&patterns_text, p.segment_len, "/", p.dilation, ";");
  return absl::StrCat("b", shape.batch, " n", shape.seq_len, " h", shape.heads, " kv",
                      shape.kv_heads, " d", shape.head_dim, " ", DTypeName(dtype), "->",
                      DTypeName(out_dtype), " [", patterns_text, "] ", causal ? "causal " : "",
                      CombineModeName(mode), " ", PrecisionName(precision), " ", devices, "x",
                      threads, share.has_value() ? absl::StrCat(" ", share->ToString()) : "");
}

PlanCache::PlanCache(int64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {
  stats_.capacity_bytes = capacity_bytes;
}

PlanCache::~PlanCache() = default;

absl::Status PlanCache::BuilderOnly(absl::Status status) {
  if (!status.ok()) status.SetPayload(kBuilderOnlyPayload, absl::Cord("1"));
  return status;
}

absl::StatusOr<std::shared_ptr<Plan>> PlanCache::GetOrBuild(const PlanKey& key,
                                                            const Builder& build, bool* hit,
                                                            const std::atomic<bool>* stop) {
  const std::string id = key.ToString();
  std::shared_ptr<Flight> flight;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    bool counted = false;  // One hit or miss per call, however many builds it waits for.
    for (;;) {
      auto found = entries_.find(id);
      if (found != entries_.end()) {
        recency_.splice(recency_.begin(), recency_, found->second.recency);
        if (!counted) ++stats_.hits;
        if (hit != nullptr) *hit = !counted;
        return found->second.plan;
      }
      if (!counted) ++stats_.misses;
      counted = true;
      if (hit != nullptr) *hit = false;
      auto flying = flights_.find(id);
      if (flying == flights_.end()) break;
      flight = flying->second;  // Someone is building it: wait for that build.
      while (!flight->done) {
        if (Stopped(stop)) {
          return absl::CancelledError(
              absl::StrCat("stopped while waiting for another request's build of plan ", id));
        }
        if (stop == nullptr) {
          flight->done_cv.wait(lock);
        } else {
          flight->done_cv.wait_for(lock, kStopPollPeriod);
        }
      }
      if (!flight->abandoned) return flight->result;
      // Its builder was stopped: look again (another waiter may have started the build).
    }
    flight = std::make_shared<Flight>();
    flights_.emplace(id, flight);
    ++stats_.builds;
  }
  // Build outside the lock: other keys proceed meanwhile. A builder that throws (std::bad_alloc
  // from a plan's tables) must still end its flight, or every later request of the key would wait
  // for it.
  absl::StatusOr<std::shared_ptr<Plan>> result = absl::InternalError("not built");
  try {
    result = build();
  } catch (const std::bad_alloc&) {
    result = absl::ResourceExhaustedError(
        absl::StrCat("out of memory building plan ", id, " (std::bad_alloc)"));
  } catch (const std::exception& e) {
    result = absl::InternalError(absl::StrCat("building plan ", id, " threw: ", e.what()));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (result.ok() && *result != nullptr) {
    recency_.push_front(id);
    Entry entry{*result, (*result)->bytes(), recency_.begin(), key.devices};
    stats_.bytes += entry.bytes;
    stats_.bytes_by_device[entry.device] += entry.bytes;
    entries_.emplace(id, std::move(entry));
    TrimLocked();
  } else if (result.ok()) {
    result = absl::InternalError(absl::StrCat("plan builder returned no plan for ", id));
  }
  flight->abandoned = (absl::IsCancelled(result.status()) && Stopped(stop)) ||
                      result.status().GetPayload(kBuilderOnlyPayload).has_value();
  flight->result = result;
  flight->done = true;
  flight->done_cv.notify_all();
  flights_.erase(id);
  return result;
}

void PlanCache::Trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  TrimLocked();
}

void PlanCache::TrimLocked() {
  // From the least recently used end, drop plans nobody else holds until within budget.
  for (auto it = recency_.end(); stats_.bytes > capacity_bytes_ && it != recency_.begin();) {
    --it;
    auto entry = entries_.find(*it);
    if (entry->second.plan.use_count() > 1) continue;  // In use: never dropped.
    stats_.bytes -= entry->second.bytes;
    stats_.bytes_by_device[entry->second.device] -= entry->second.bytes;
    ++stats_.evictions;
    entries_.erase(entry);
    it = recency_.erase(it);
  }
  stats_.entries = static_cast<int64_t>(entries_.size());
}

PlanCacheStats PlanCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  PlanCacheStats s = stats_;
  s.entries = static_cast<int64_t>(entries_.size());
  return s;
}

bool PlanCache::Contains(const PlanKey& key) const {
  const std::string name = key.ToString();
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.count(name) > 0;
}

std::vector<std::string> PlanCache::KeysByRecency() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {recency_.begin(), recency_.end()};
}

}  // namespace da::engine
