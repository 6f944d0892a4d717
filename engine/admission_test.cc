// Engine admission: memory estimates and the budget, the queue limit, priorities, deadlines
// (queued, up front, during compute) and prompt cancellation, with the statistics that report them.
#include "engine/admission.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/cpu_plan.h"
#include "engine/engine.h"
#include "engine/shard_group.h"
#include "engine/status_macros.h"
#include "engine/test_tensors.h"

namespace da::engine {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using testing::OwnedTensor;

bool Contains(absl::string_view text, absl::string_view part) {
  return text.find(part) != absl::string_view::npos;
}

double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

struct Problem {
  OwnedTensor q, k, v, out;
  AttentionSpec spec;
  std::atomic<bool> cancelled{false};

  Problem(Shape4 shape, std::vector<Pattern> patterns, uint32_t seed) {
    std::mt19937 rng(seed);
    q = testing::RandomTensor(DType::kFloat32, shape, rng);
    k = testing::RandomTensor(DType::kFloat32, shape, rng);
    v = testing::RandomTensor(DType::kFloat32, shape, rng);
    out = testing::PoisonedTensor(DType::kFloat32, shape);
    spec.patterns = std::move(patterns);
    spec.precision = Precision::kFloat32;
  }
  RunRequest Request() {
    RunRequest r;
    r.q = q.view();
    r.k = k.view();
    r.v = v.view();
    r.out = out.mutable_view();
    r.spec = spec;
    r.cancelled = &cancelled;
    return r;
  }
  ProblemShape shape() const {
    const Shape4& s = q.shape;
    return {s.batch, s.seq_len, s.heads, k.shape.heads, s.head_dim};
  }
};

std::unique_ptr<Problem> SmallProblem(uint32_t seed) {
  return std::make_unique<Problem>(Shape4{1, 64, 2, 8}, std::vector<Pattern>{{16, 1}, {32, 2}},
                                   seed);
}

// One dense segment of 16384 tokens, 4 heads of 64: about 275 GFLOP, around a second on this
// machine's two cores; long enough to be stopped in the middle.
std::unique_ptr<Problem> LongProblem(uint32_t seed) {
  return std::make_unique<Problem>(Shape4{1, 16384, 4, 64}, std::vector<Pattern>{{16384, 1}}, seed);
}

// A result delivered to a Submit callback, with when it came.
struct Outcome {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  absl::StatusOr<ExecutionInfo> result = absl::UnknownError("not run");
  Clock::time_point at;

  RunCallback Callback() {
    return [this](absl::StatusOr<ExecutionInfo> info) {
      std::lock_guard<std::mutex> lock(mutex);
      result = std::move(info);
      at = Clock::now();
      done = true;
      cv.notify_all();
    };
  }
  bool Wait(milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex);
    return cv.wait_for(lock, timeout, [&] { return done; });
  }
};

bool WaitFor(const std::function<bool()>& predicate, milliseconds timeout) {
  const Clock::time_point end = Clock::now() + timeout;
  while (!predicate()) {
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

EngineOptions Options() {
  EngineOptions options;
  options.threads = 2;
  return options;
}

// An engine whose memory budget is `budget_bytes`.
absl::StatusOr<std::unique_ptr<Engine>> EngineWithBudget(int64_t budget_bytes) {
  EngineOptions options = Options();
  options.memory_budget_bytes = budget_bytes;
  return Engine::Create(options);
}

// Occupies the engine's single dispatcher with a long run until Release.
class Busy {
 public:
  explicit Busy(Engine& engine) : engine_(engine), problem_(LongProblem(99)) {
    engine.Submit(problem_->Request(), outcome_.Callback());
  }
  bool WaitRunning() {
    return WaitFor([&] { return engine_.stats().running == 1; }, milliseconds(10000));
  }
  void Release() {
    problem_->cancelled = true;
    outcome_.Wait(milliseconds(10000));
  }
  ~Busy() { Release(); }

 private:
  Engine& engine_;
  std::unique_ptr<Problem> problem_;
  Outcome outcome_;
};

TEST(AdmissionTest, EstimateIsInputsOutputsAndTheBuiltPlansWorkspace) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok()) << engine.status();
  struct Case {
    ProblemShape shape;
    std::vector<Pattern> patterns;
    CombineMode mode;
    DType dtype, out_dtype;
  };
  const std::vector<Case> cases = {
      {{1, 1000, 4, 4, 64},
       {{256, 1}, {512, 2}},
       CombineMode::kLongNet,
       DType::kFloat32,
       DType::kFloat32},
      {{2, 4096, 8, 2, 32},
       {{2048, 1}, {4096, 4}},
       CombineMode::kLongNet,
       DType::kFloat16,
       DType::kFloat16},  // fp16 output: LONGNET keeps its own fp32 accumulator.
      {{1, 777, 6, 3, 16},
       {{100, 1}, {300, 3}, {777, 7}},
       CombineMode::kGrouped,
       DType::kBFloat16,
       DType::kFloat32},
      {{1, 40000, 2, 2, 128},
       {{32768, 4}},
       CombineMode::kLongNet,
       DType::kFloat32,
       DType::kBFloat16},  // Huge-page buffers, rounded to 2 MiB.
  };
  CpuBackend backend;
  for (const Case& c : cases) {
    AttentionSpec spec;
    spec.patterns = c.patterns;
    spec.mode = c.mode;
    absl::StatusOr<MemoryEstimate> estimate =
        (*engine)->EstimateMemory(c.shape, c.dtype, c.out_dtype, spec);
    ASSERT_TRUE(estimate.ok()) << estimate.status();
    const int64_t q = c.shape.QueryShape().elements();
    const int64_t kv = c.shape.KeyShape().elements();
    EXPECT_EQ(estimate->inputs, (q + 2 * kv) * DTypeSize(c.dtype));
    EXPECT_EQ(estimate->outputs, q * DTypeSize(c.out_dtype));
    EXPECT_EQ(estimate->total, estimate->inputs + estimate->outputs + estimate->workspace);

    // The plan the engine would build (same precision, device and thread count), built for real.
    absl::StatusOr<PrecisionChoice> precision = backend.ChoosePrecision(spec);
    ASSERT_TRUE(precision.ok());
    const TensorView qv{c.dtype, c.shape.QueryShape(), nullptr, 0};
    const TensorView kview{c.dtype, c.shape.KeyShape(), nullptr, 0};
    const PlanKey key = MakePlanKey(qv, kview, c.out_dtype, spec, precision->precision, "cpu:0",
                                    (*engine)->threads());
    absl::StatusOr<std::shared_ptr<cpu::CpuPlan>> plan = cpu::BuildCpuPlan(key);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_GT((*plan)->workspace_bytes(), 0);
    // The workspace exactly, and the task table at most as the estimate says.
    const int64_t table = cpu::TaskTableBytes(key.shape, spec, key.ShareOrWhole(), key.threads);
    EXPECT_EQ(estimate->workspace, (*plan)->workspace_bytes() + table) << key.ToString();
    EXPECT_EQ(backend.PlanWorkspaceBytes(key), (*plan)->workspace_bytes() + table);
    EXPECT_LE((*plan)->bytes(), backend.PlanWorkspaceBytes(key));
    EXPECT_GT((*plan)->bytes(), (*plan)->workspace_bytes());
  }
}

// LONGNET folds several patterns' rows in a running state per output row (max LSE and weight,
// and an fp32 accumulator for a bf16 output); one pattern's rows go straight to the output, so its
// plan holds no state and the estimate counts none: the same workspace as GROUPED's.
TEST(AdmissionTest, OnlyALongNetOfSeveralPatternsHoldsFoldState) {
  const ProblemShape shape{2, 4096, 4, 2, 64};
  auto workspace = [&](std::vector<Pattern> patterns, CombineMode mode) -> int64_t {
    AttentionSpec spec;
    spec.patterns = std::move(patterns);
    spec.mode = mode;
    const TensorView q{DType::kBFloat16, shape.QueryShape(), nullptr, 0};
    const TensorView k{DType::kBFloat16, shape.KeyShape(), nullptr, 0};
    const PlanKey key =
        MakePlanKey(q, k, DType::kBFloat16, spec, Precision::kFloat32, "cpu:0", /*threads=*/2);
    absl::StatusOr<std::shared_ptr<cpu::CpuPlan>> plan = cpu::BuildCpuPlan(key);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return -1;
    EXPECT_EQ((*plan)->workspace_bytes(), cpu::WorkspaceBytes(cpu::SizesFor(key)));
    return (*plan)->workspace_bytes();
  };
  const std::vector<Pattern> one = {{1024, 2}};
  const std::vector<Pattern> two = {{512, 1}, {1024, 2}};
  EXPECT_EQ(workspace(one, CombineMode::kLongNet), workspace(one, CombineMode::kGrouped));
  // max LSE and weight (one float each) and the accumulator (64 floats) per output row.
  const int64_t rows = shape.batch * shape.seq_len * shape.heads;
  EXPECT_GE(workspace(two, CombineMode::kLongNet) - workspace(two, CombineMode::kGrouped),
            rows * (2 + 64) * static_cast<int64_t>(sizeof(float)));
}

TEST(AdmissionTest, OverBudgetIsRefusedWithTheNumbersAndMemoryReturnsToZero) {
  auto small = SmallProblem(1);
  auto probe = Engine::Create(Options());
  ASSERT_TRUE(probe.ok());
  absl::StatusOr<MemoryEstimate> estimate =
      (*probe)->EstimateMemory(small->shape(), DType::kFloat32, DType::kFloat32, small->spec);
  ASSERT_TRUE(estimate.ok()) << estimate.status();

  EngineOptions options = Options();
  options.memory_budget_bytes = estimate->total - 1;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  absl::StatusOr<ExecutionInfo> run = (*engine)->Run(small->Request());
  EXPECT_EQ(run.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(RejectReasonOf(run.status()), RejectReason::kMemory);
  const std::string message(run.status().message());
  EXPECT_TRUE(
      Contains(message, absl::StrCat("request needs an estimated ", estimate->total,
                                     " bytes (inputs ", estimate->inputs, ", outputs ",
                                     estimate->outputs, ", workspace ", estimate->workspace, ")")))
      << message;
  EXPECT_TRUE(Contains(
      message, absl::StrCat("the memory budget is ", estimate->total - 1, " bytes with 0 in use")))
      << message;

  Outcome submitted;
  (*engine)->Submit(small->Request(), submitted.Callback());
  ASSERT_TRUE(submitted.Wait(milliseconds(0)));  // Refused before Submit returned.
  EXPECT_EQ(RejectReasonOf(submitted.result.status()), RejectReason::kMemory);
  EXPECT_EQ((*engine)->stats().rejected_memory, 2);

  // Exactly the estimate fits, and is all returned afterwards.
  options.memory_budget_bytes = estimate->total;
  auto fits = Engine::Create(options);
  ASSERT_TRUE(fits.ok());
  ASSERT_TRUE((*fits)->Run(small->Request()).ok());
  Outcome queued;
  (*fits)->Submit(small->Request(), queued.Callback());
  ASSERT_TRUE(queued.Wait(milliseconds(10000)));
  ASSERT_TRUE(queued.result.ok()) << queued.result.status();
  const EngineStats stats = (*fits)->stats();
  EXPECT_EQ(stats.memory_reserved_bytes, 0);
  EXPECT_EQ(stats.memory_budget_bytes, estimate->total);
  EXPECT_EQ(stats.rejected_memory, 0);
  EXPECT_EQ(stats.runs_completed, 2);
}

TEST(AdmissionTest, ReservationsHoldBytesUntilDestroyedAndMove) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = EngineWithBudget(1000);
  ASSERT_TRUE(engine.ok());
  absl::StatusOr<MemoryReservation> a = (*engine)->ReserveMemory(600, "");
  ASSERT_TRUE(a.ok());
  absl::StatusOr<MemoryReservation> b = (*engine)->ReserveMemory(500, "a stream of 500 bytes");
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().message(),
            "request needs an estimated a stream of 500 bytes but the memory budget is 1000 "
            "bytes with 600 in use");
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 600);
  {
    MemoryReservation moved = *std::move(a);
    EXPECT_EQ(moved.bytes(), 600);
    EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 600);
  }
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);
  EXPECT_TRUE((*engine)->ReserveMemory(1000, "").ok());
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);  // The temporary is gone.
}

// The warm-up's wait for room: it reserves nothing, ends once the room is there or once it is no
// longer needed (the plan got cached meanwhile), refuses at once what could never fit, and gives
// up at its deadline with the refusal.
TEST(AdmissionTest, WaitForRoomReservesNothingAndEndsWhenTheRoomOrTheNeedGoes) {
  auto account = std::make_shared<MemoryAccount>(1000);
  const Clock::time_point far = Clock::now() + std::chrono::seconds(30);
  ASSERT_TRUE(account->Reserve(900, "").ok());
  std::atomic<bool> cached{false};
  std::thread cache([&] {
    std::this_thread::sleep_for(milliseconds(100));
    cached = true;
  });
  Clock::time_point start = Clock::now();
  EXPECT_TRUE(WaitForRoom(*account, 500, "", nullptr, far, [&] { return cached.load(); }).ok());
  cache.join();
  EXPECT_GE(MillisSince(start), 90);
  EXPECT_EQ(account->reserved_bytes(), 900);
  // The room comes back.
  std::thread release([&] {
    std::this_thread::sleep_for(milliseconds(100));
    account->Release(900);
  });
  EXPECT_TRUE(WaitForRoom(*account, 500, "", nullptr, far).ok());
  release.join();
  EXPECT_EQ(account->reserved_bytes(), 0);
  // Never fits: at once.
  start = Clock::now();
  EXPECT_EQ(WaitForRoom(*account, 1001, "", nullptr, far).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_LT(MillisSince(start), 1000);
  // The deadline: the refusal, once it has passed.
  ASSERT_TRUE(account->Reserve(900, "").ok());
  start = Clock::now();
  const absl::Status late =
      WaitForRoom(*account, 500, "", nullptr, Clock::now() + milliseconds(100));
  EXPECT_EQ(late.code(), absl::StatusCode::kResourceExhausted) << late;
  EXPECT_EQ(RejectReasonOf(late), RejectReason::kMemory);
  EXPECT_GE(MillisSince(start), 90);
}

TEST(AdmissionTest, AShrunkReservationKeepsOnlyWhatItWasShrunkTo) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = EngineWithBudget(1000);
  ASSERT_TRUE(engine.ok());
  absl::StatusOr<MemoryReservation> a = (*engine)->ReserveMemory(900, "");
  ASSERT_TRUE(a.ok());
  a->ShrinkTo(1200);  // Never grows.
  EXPECT_EQ(a->bytes(), 900);
  a->ShrinkTo(100);
  EXPECT_EQ(a->bytes(), 100);
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 100);
  EXPECT_TRUE((*engine)->ReserveMemory(900, "").ok());  // The rest is free again.
  a->ShrinkTo(-5);
  EXPECT_EQ(a->bytes(), 0);
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);
  a->Reset();  // Releases nothing twice.
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);
  EXPECT_TRUE((*engine)->ReserveMemory(1000, "").ok());
}

// Bytes that exist already (an answer waiting on its client) are counted even past the budget,
// and what is reserved meanwhile sees them.
TEST(AdmissionTest, HeldBytesCountPastTheBudgetUntilReleased) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = EngineWithBudget(1000);
  ASSERT_TRUE(engine.ok());
  absl::StatusOr<MemoryReservation> reserved = (*engine)->ReserveMemory(700, "");
  ASSERT_TRUE(reserved.ok());
  {
    MemoryReservation held = (*engine)->HoldMemory(500);
    EXPECT_EQ(held.bytes(), 500);
    EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 1200);
    absl::StatusOr<MemoryReservation> refused = (*engine)->ReserveMemory(1, "");
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().message(),
              "request needs an estimated 1 bytes but the memory budget is 1000 bytes with 1200 in "
              "use");
    EXPECT_EQ((*engine)->HoldMemory(-3).bytes(), 0);  // Nothing negative is held.
    EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 1200);
  }
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 700);
  EXPECT_TRUE((*engine)->ReserveMemory(300, "").ok());
}

TEST(AdmissionTest, QueueFullIsRefusedAndAStreamHoldsOnePlaceForAllItsChunks) {
  EngineOptions options = Options();
  options.max_queue = 3;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  Busy busy(**engine);
  ASSERT_TRUE(busy.WaitRunning());

  // A stream takes its place when it is admitted, before it has a chunk to run.
  absl::StatusOr<QueuePlace> place = (*engine)->TakeQueuePlace();
  ASSERT_TRUE(place.ok()) << place.status();
  EXPECT_EQ((*engine)->stats().queue_places_held, 1);

  std::vector<std::unique_ptr<Problem>> problems;
  std::vector<std::unique_ptr<Outcome>> outcomes;
  for (int i = 0; i < 5; ++i) {
    problems.push_back(SmallProblem(10 + i));
    outcomes.push_back(std::make_unique<Outcome>());
  }
  (*engine)->Submit(problems[0]->Request(), outcomes[0]->Callback());
  (*engine)->Submit(problems[1]->Request(), outcomes[1]->Callback());
  (*engine)->Submit(problems[2]->Request(), outcomes[2]->Callback());
  ASSERT_TRUE(outcomes[2]->Wait(milliseconds(0)));  // Refused at once.
  EXPECT_EQ(outcomes[2]->result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(RejectReasonOf(outcomes[2]->result.status()), RejectReason::kQueueFull);
  EXPECT_EQ(outcomes[2]->result.status().message(),
            "queue full: 3 requests wait for 1 busy dispatcher(s) and max_queue is 3 (1 of them "
            "open streams, one place each)");
  // No place for another stream either.
  EXPECT_EQ(RejectReasonOf((*engine)->TakeQueuePlace().status()), RejectReason::kQueueFull);

  // The stream's chunk uses the place it holds: queued, and the queue stays within max_queue.
  absl::StatusOr<MemoryReservation> reservation = (*engine)->ReserveMemory(4096, "");
  ASSERT_TRUE(reservation.ok());
  RunRequest chunk = problems[3]->Request();
  chunk.reservation = &*reservation;
  chunk.queue_place = &*place;
  (*engine)->Submit(chunk, outcomes[3]->Callback());
  EXPECT_FALSE(outcomes[3]->Wait(milliseconds(0)));
  EngineStats stats = (*engine)->stats();
  EXPECT_EQ(stats.queued, 3);
  EXPECT_LE(stats.queued, stats.max_queue);
  EXPECT_EQ(stats.running, 1);
  EXPECT_EQ(stats.rejected_queue_full, 2);

  busy.Release();
  for (int i : {0, 1, 3}) {
    ASSERT_TRUE(outcomes[i]->Wait(milliseconds(10000)));
    EXPECT_TRUE(outcomes[i]->result.ok()) << i << ": " << outcomes[i]->result.status();
  }
  // Only the caller's reservation and place are left; the place, given back, makes room.
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 4096);
  place->Reset();
  EXPECT_EQ((*engine)->stats().queue_places_held, 0);
  (*engine)->Submit(problems[4]->Request(), outcomes[4]->Callback());
  ASSERT_TRUE(outcomes[4]->Wait(milliseconds(10000)));
  EXPECT_TRUE(outcomes[4]->result.ok()) << outcomes[4]->result.status();
}

// Requests queued behind a busy dispatcher, in the order the engine takes them.
std::vector<std::string> QueueOrderOf(QueueOrder order,
                                      const std::vector<std::pair<std::string, Shape4>>& requests) {
  EngineOptions options = Options();
  options.queue_order = order;
  auto engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok());
  Busy busy(**engine);
  EXPECT_TRUE(busy.WaitRunning());
  std::mutex mutex;
  std::vector<std::string> taken;
  std::vector<std::unique_ptr<Problem>> problems;
  std::vector<std::unique_ptr<Outcome>> outcomes;
  for (const auto& [name, shape] : requests) {  // All made first: they arrive close together.
    problems.push_back(std::make_unique<Problem>(shape, std::vector<Pattern>{{1024, 1}}, 5));
    outcomes.push_back(std::make_unique<Outcome>());
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::string name = requests[i].first;
    RunCallback record = outcomes[i]->Callback();
    (*engine)->Submit(problems[i]->Request(),
                      [&, name, record](absl::StatusOr<ExecutionInfo> info) {
                        {
                          std::lock_guard<std::mutex> lock(mutex);
                          taken.push_back(name);
                        }
                        record(std::move(info));
                      });
  }
  busy.Release();
  for (auto& outcome : outcomes) {
    EXPECT_TRUE(outcome->Wait(milliseconds(10000)));
    EXPECT_TRUE(outcome->result.ok()) << outcome->result.status();
  }
  return taken;
}

TEST(AdmissionTest, FairQueueServesTheLeastWorkFirstAndArrivalOrderWhenAsked) {
  const Shape4 large{1, 1024, 4, 16};
  const Shape4 small{1, 64, 1, 16};
  const std::vector<std::pair<std::string, Shape4>> requests = {
      {"large-a", large}, {"large-b", large}, {"small", small}, {"large-c", large}};
  EXPECT_EQ(QueueOrderOf(QueueOrder::kFair, requests),
            (std::vector<std::string>{"small", "large-a", "large-b", "large-c"}));
  EXPECT_EQ(QueueOrderOf(QueueOrder::kArrival, requests),
            (std::vector<std::string>{"large-a", "large-b", "small", "large-c"}));
}

TEST(AdmissionTest, NoQueueMeansOnlyImmediateRuns) {
  EngineOptions options = Options();
  options.max_queue = 0;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok());
  auto small = SmallProblem(3);
  Outcome first;
  (*engine)->Submit(small->Request(), first.Callback());  // The idle dispatcher takes it.
  ASSERT_TRUE(first.Wait(milliseconds(10000)));
  EXPECT_TRUE(first.result.ok()) << first.result.status();

  Busy busy(**engine);
  ASSERT_TRUE(busy.WaitRunning());
  Outcome refused;
  (*engine)->Submit(small->Request(), refused.Callback());
  ASSERT_TRUE(refused.Wait(milliseconds(0)));
  EXPECT_EQ(RejectReasonOf(refused.result.status()), RejectReason::kQueueFull);
}

// With several devices there are max_concurrent_runs dispatchers per device, and an idle device's
// dispatcher takes a request at once: max_queue 0 refuses only what would have to wait. Before,
// the queue counted one device's dispatchers, and refused a request while a device idled.
TEST(AdmissionTest, AnIdleDeviceTakesARequestWithNoQueue) {
  EngineOptions options = Options();
  options.cpu_devices = 2;  // One thread each.
  options.max_queue = 0;
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  // A long run bound to `device`, running when this returns true.
  const auto occupy = [&](Problem& problem, const char* device, Outcome& outcome, int running) {
    RunRequest request = problem.Request();
    request.device = device;
    (*engine)->Submit(request, outcome.Callback());
    return WaitFor([&] { return (*engine)->stats().running == running; }, milliseconds(10000));
  };
  std::unique_ptr<Problem> long_problem = LongProblem(98);
  Outcome busy;
  ASSERT_TRUE(occupy(*long_problem, "cpu:0", busy, 1));

  auto small = SmallProblem(4);
  RunRequest request = small->Request();
  request.device = "cpu:1";
  Outcome taken;
  (*engine)->Submit(request, taken.Callback());
  ASSERT_TRUE(taken.Wait(milliseconds(10000)));
  EXPECT_TRUE(taken.result.ok()) << taken.result.status();
  if (taken.result.ok()) {
    EXPECT_EQ(taken.result->devices, std::vector<std::string>{"cpu:1"});
  }
  EXPECT_FALSE(busy.Wait(milliseconds(0))) << "the long run ended first; the test proves nothing";

  // Both devices busy: the next would wait, and there is no queue.
  Outcome refused;
  auto other = SmallProblem(5);
  std::unique_ptr<Problem> second_long = LongProblem(97);
  Outcome busy_too;
  ASSERT_TRUE(occupy(*second_long, "cpu:1", busy_too, 2));
  (*engine)->Submit(other->Request(), refused.Callback());
  ASSERT_TRUE(refused.Wait(milliseconds(0)));
  EXPECT_EQ(RejectReasonOf(refused.result.status()), RejectReason::kQueueFull);
  EXPECT_EQ(refused.result.status().message(),
            "queue full: 0 requests wait for 2 busy dispatcher(s) and max_queue is 0");
  long_problem->cancelled = true;
  second_long->cancelled = true;
  ASSERT_TRUE(busy.Wait(milliseconds(10000)));
  ASSERT_TRUE(busy_too.Wait(milliseconds(10000)));
}

TEST(AdmissionTest, HigherPriorityRunsFirstAndEqualPrioritiesInArrivalOrder) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  Busy busy(**engine);
  ASSERT_TRUE(busy.WaitRunning());

  std::mutex mutex;
  std::vector<std::string> order;
  const std::vector<std::pair<std::string, int>> submitted = {
      {"low", -1}, {"high-a", 10}, {"medium", 5}, {"high-b", 10}, {"default", 0}};
  std::vector<std::unique_ptr<Problem>> problems;
  std::vector<std::unique_ptr<Outcome>> outcomes;
  for (const auto& [name, priority] : submitted) {
    problems.push_back(SmallProblem(static_cast<uint32_t>(priority + 50)));
    outcomes.push_back(std::make_unique<Outcome>());
    RunRequest request = problems.back()->Request();
    request.priority = priority;
    RunCallback record = outcomes.back()->Callback();
    (*engine)->Submit(request, [&, name, record](absl::StatusOr<ExecutionInfo> info) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        order.push_back(name);
      }
      record(std::move(info));
    });
  }
  EXPECT_EQ((*engine)->stats().queued, 5);
  busy.Release();
  for (auto& outcome : outcomes) {
    ASSERT_TRUE(outcome->Wait(milliseconds(10000)));
    EXPECT_TRUE(outcome->result.ok()) << outcome->result.status();
  }
  EXPECT_EQ(order, (std::vector<std::string>{"high-a", "high-b", "medium", "default", "low"}));
}

TEST(AdmissionTest, QueuedRequestPastItsDeadlineLeavesTheQueuePromptly) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  Busy busy(**engine);
  ASSERT_TRUE(busy.WaitRunning());

  auto small = SmallProblem(4);
  RunRequest request = small->Request();
  const Clock::time_point deadline = Clock::now() + milliseconds(50);
  request.deadline = deadline;
  Outcome outcome;
  (*engine)->Submit(request, outcome.Callback());
  // Bound: the watchdog looks every 2 ms; 50 ms leaves room for a loaded machine, and the long
  // run ahead of it takes about a second, so waiting for the head of the queue would fail.
  ASSERT_TRUE(outcome.Wait(milliseconds(2000)));
  const double late_ms = std::chrono::duration<double, std::milli>(outcome.at - deadline).count();
  EXPECT_GE(late_ms, 0);
  EXPECT_LT(late_ms, 50) << outcome.result.status();
  EXPECT_EQ(outcome.result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(RejectReasonOf(outcome.result.status()), RejectReason::kDeadline);
  EXPECT_TRUE(Contains(outcome.result.status().message(),
                       "deadline passed in the queue, after "
                       "waiting "))
      << outcome.result.status();
  EXPECT_EQ((*engine)->stats().running, 1);  // The long run is still going.
  EXPECT_EQ((*engine)->stats().queued, 0);
  EXPECT_EQ((*engine)->stats().rejected_deadline, 1);
}

TEST(AdmissionTest, CancellationDuringComputeStopsWithin100Ms) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  auto long_problem = LongProblem(5);
  Outcome outcome;
  (*engine)->Submit(long_problem->Request(), outcome.Callback());
  ASSERT_TRUE(WaitFor([&] { return (*engine)->stats().running == 1; }, milliseconds(10000)));
  // Into the kernel (the plan is built in a few milliseconds); the run takes about a second.
  std::this_thread::sleep_for(milliseconds(100));
  const Clock::time_point cancelled_at = Clock::now();
  long_problem->cancelled = true;
  ASSERT_TRUE(outcome.Wait(milliseconds(5000)));
  const double stop_ms =
      std::chrono::duration<double, std::milli>(outcome.at - cancelled_at).count();
  EXPECT_LT(stop_ms, 100);
  EXPECT_EQ(outcome.result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(RejectReasonOf(outcome.result.status()), RejectReason::kNone);  // Not a refusal.
  EXPECT_TRUE(Contains(outcome.result.status().message(), "request cancelled during compute"))
      << outcome.result.status();

  const EngineStats stats = (*engine)->stats();
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.memory_reserved_bytes, 0);
  EXPECT_EQ(stats.runs_cancelled, 1);
  EXPECT_EQ(stats.stop_latency.count, 1);
  EXPECT_LT(stats.stop_latency.max_seconds, 0.1);
  EXPECT_EQ(stats.stop_latency.cumulative.back(), 1);
}

// A cold plan whose workspace takes a while to allocate and touch: LONGNET into fp16 keeps an
// fp32 accumulator for every output element (256 MiB here), and its build, not its compute, is
// what a cancellation has to stop.
TEST(AdmissionTest, CancellationDuringAColdPlanBuildStopsWithin100Ms) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  const Shape4 shape{1, 65536, 16, 64};
  std::mt19937 rng(41);
  // Values play no part (the run is stopped before it computes); random all the same, one tensor
  // for q, k and v (generating three of 64M values costs seconds, more under TSan).
  const OwnedTensor qkv = testing::RandomTensor(DType::kFloat16, shape, rng);
  OwnedTensor out = testing::PoisonedTensor(DType::kFloat16, shape);
  std::atomic<bool> cancelled{false};
  RunRequest request;
  request.q = qkv.view();
  request.k = qkv.view();
  request.v = qkv.view();
  request.out = out.mutable_view();
  request.spec.patterns = {{2048, 1}, {4096, 2}};
  request.spec.mode = CombineMode::kLongNet;
  request.spec.precision = Precision::kFloat32;
  request.cancelled = &cancelled;

  Outcome outcome;
  (*engine)->Submit(request, outcome.Callback());
  // Running, past the check of its inputs' values: the plan build has begun.
  ASSERT_TRUE(
      WaitFor([&] { return (*engine)->plan_cache_stats().builds == 1; }, milliseconds(10000)));
  const Clock::time_point cancelled_at = Clock::now();
  cancelled = true;
  ASSERT_TRUE(outcome.Wait(milliseconds(10000)));
  const double stop_ms =
      std::chrono::duration<double, std::milli>(outcome.at - cancelled_at).count();
  EXPECT_LT(stop_ms, 100);
  EXPECT_EQ(outcome.result.status().code(), absl::StatusCode::kCancelled);
  // Stopped in the build (the plan cache has no plan for the key), not after it.
  EXPECT_TRUE(Contains(outcome.result.status().message(), "request cancelled during compute"))
      << outcome.result.status();
  EXPECT_TRUE(Contains(outcome.result.status().message(), "while its plan was being built"))
      << outcome.result.status();
  const EngineStats stats = (*engine)->stats();
  EXPECT_EQ((*engine)->plan_cache_stats().entries, 0);
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.memory_reserved_bytes, 0);
  EXPECT_EQ(stats.runs_cancelled, 1);
  EXPECT_LT(stats.stop_latency.max_seconds, 0.1);

  // The key is not poisoned: the same problem's plan still builds (and is not found cached).
  absl::StatusOr<WarmUpResult> warm =
      (*engine)->WarmUp({1, 65536, 16, 16, 64}, DType::kFloat16, DType::kFloat16, request.spec);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_FALSE(warm->already_warm);
  std::printf("cold plan build: %.1f ms; stopped %.1f ms after the cancellation\n",
              warm->build_time_us / 1e3, stop_ms);
}

// A warm-up whose plan workspace is held by calls in flight (requests that reached a server
// before it was ready) waits for them to end; before, it failed at once, and a start-up warm-up
// ended the server. A stopped wait is CANCELLED; a workspace past the budget is refused at once.
TEST(AdmissionTest, AWarmUpWaitsForMemoryThatCallsInFlightHold) {
  const ProblemShape shape{1, 16384, 4, 4, 64};
  AttentionSpec spec;
  spec.patterns = {{4096, 1}, {8192, 2}};
  spec.precision = Precision::kFloat32;
  int64_t workspace = 0;
  {
    auto probe = Engine::Create(Options());
    ASSERT_TRUE(probe.ok());
    absl::StatusOr<MemoryEstimate> estimate =
        (*probe)->EstimateMemory(shape, DType::kFloat32, DType::kFloat32, spec);
    ASSERT_TRUE(estimate.ok()) << estimate.status();
    workspace = estimate->workspace;
  }
  ASSERT_GT(workspace, 0);
  auto engine = EngineWithBudget(2 * workspace);
  ASSERT_TRUE(engine.ok());
  {
    // Held by "calls in flight" until 300 ms in.
    MemoryReservation held = (*engine)->HoldMemory(2 * workspace - workspace / 2);
    const Clock::time_point start = Clock::now();
    std::thread release([&] {
      std::this_thread::sleep_for(milliseconds(300));
      held.Reset();
    });
    absl::StatusOr<WarmUpResult> warm =
        (*engine)->WarmUp(shape, DType::kFloat32, DType::kFloat32, spec);
    const double waited_ms = MillisSince(start);
    release.join();
    ASSERT_TRUE(warm.ok()) << warm.status();
    EXPECT_FALSE(warm->already_warm);
    EXPECT_GE(waited_ms, 290);
    EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);
  }
  {
    // Stopped while it waits.
    spec.patterns = {{2048, 1}, {8192, 2}};  // Another plan.
    MemoryReservation held = (*engine)->HoldMemory(2 * workspace);
    std::atomic<bool> stop{false};
    std::thread stopper([&] {
      std::this_thread::sleep_for(milliseconds(100));
      stop = true;
    });
    absl::StatusOr<WarmUpResult> warm =
        (*engine)->WarmUp(shape, DType::kFloat32, DType::kFloat32, spec, &stop);
    stopper.join();
    EXPECT_EQ(warm.status().code(), absl::StatusCode::kCancelled) << warm.status();
    EXPECT_TRUE(Contains(warm.status().message(), "waiting for memory that calls in flight hold"))
        << warm.status();
  }
  // A budget the workspace can never fit: refused at once, naming the budget.
  auto small = EngineWithBudget(workspace / 2);
  ASSERT_TRUE(small.ok());
  const Clock::time_point start = Clock::now();
  absl::StatusOr<WarmUpResult> refused =
      (*small)->WarmUp(shape, DType::kFloat32, DType::kFloat32, spec);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_TRUE(Contains(refused.status().message(), "plan workspace to warm up"))
      << refused.status();
  EXPECT_LT(MillisSince(start), 1000);
}

TEST(AdmissionTest, DeadlineDuringComputeStopsWithin100Ms) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  auto long_problem = LongProblem(6);
  RunRequest request = long_problem->Request();
  const Clock::time_point deadline = Clock::now() + milliseconds(300);
  request.deadline = deadline;
  // No run has completed, so the engine has no throughput to refuse with: it starts the run.
  absl::StatusOr<ExecutionInfo> result = (*engine)->Run(request);
  const double late_ms = MillisSince(deadline);
  EXPECT_LT(late_ms, 100);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(Contains(result.status().message(), "deadline passed during compute after "))
      << result.status();
  const EngineStats stats = (*engine)->stats();
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.memory_reserved_bytes, 0);
  EXPECT_EQ(stats.runs_deadline_exceeded, 1);
  EXPECT_EQ(stats.rejected_deadline, 0);
  EXPECT_EQ(stats.stop_latency.count, 1);
}

TEST(AdmissionTest, RunThatCannotMeetItsDeadlineIsRefusedUpFrontOnceThroughputIsKnown) {
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  // About 8.6 GFLOP: long enough to measure the throughput.
  Problem measured({1, 4096, 2, 64}, {{4096, 1}}, 7);
  ASSERT_TRUE((*engine)->Run(measured.Request()).ok());
  const double flops_per_second = (*engine)->stats().measured_flops_per_second;
  ASSERT_GT(flops_per_second, 0);

  auto long_problem = LongProblem(8);
  RunRequest request = long_problem->Request();
  request.deadline = Clock::now() + milliseconds(100);
  const double needed_ms =
      EstimateFlops(long_problem->shape(), long_problem->spec) / flops_per_second * 1e3;
  ASSERT_GT(needed_ms, 100) << "the long problem is too fast on this machine for this test";
  Outcome outcome;
  const Clock::time_point submitted = Clock::now();
  (*engine)->Submit(request, outcome.Callback());
  ASSERT_TRUE(outcome.Wait(milliseconds(0)));
  EXPECT_LT(MillisSince(submitted), 50);
  EXPECT_EQ(outcome.result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(RejectReasonOf(outcome.result.status()), RejectReason::kDeadline);
  EXPECT_TRUE(Contains(outcome.result.status().message(), "request needs an estimated "))
      << outcome.result.status();
  EXPECT_TRUE(Contains(outcome.result.status().message(), "remain before its deadline"))
      << outcome.result.status();
  EXPECT_EQ((*engine)->stats().rejected_deadline, 1);
  EXPECT_EQ((*engine)->stats().memory_reserved_bytes, 0);
}

TEST(AdmissionTest, NeitherASmallRunNorASlowOneLowersTheThroughputDeadlinesAreJudgedBy) {
  // A small run is mostly fixed costs (on a loaded machine, whole scheduler slices): measured, it
  // would understate the throughput by orders of magnitude and make every later request with a
  // deadline look hopeless. Runs under 1e8 FLOP do not count, and the start-up figure stays the
  // floor of what deadlines are judged by.
  auto engine = Engine::Create(Options());
  ASSERT_TRUE(engine.ok());
  constexpr double kStartup = 1e15;  // Faster than any run here.
  (*engine)->SetStartupThroughput(kStartup);
  // 4 * 2048^2 * 4 = 67 MFLOP, but D = 4 pads to a vector's width: several milliseconds.
  Problem small({1, 2048, 1, 4}, {{2048, 1}}, 11);
  const absl::StatusOr<ExecutionInfo> ran = (*engine)->Run(small.Request());
  ASSERT_TRUE(ran.ok()) << ran.status();
  ASSERT_GE(ran->compute_time_us, 1000) << "the small run is too fast for this test";
  EXPECT_EQ((*engine)->stats().measured_flops_per_second, 0)
      << "a run of " << EstimateFlops(small.shape(), small.spec) << " FLOP was measured";
  EXPECT_EQ((*engine)->DeadlineThroughput(small.shape(), small.spec), kStartup);

  Problem measured({1, 4096, 2, 64}, {{4096, 1}}, 7);  // About 8.6 GFLOP: counted.
  ASSERT_TRUE((*engine)->Run(measured.Request()).ok());
  const double flops_per_second = (*engine)->stats().measured_flops_per_second;
  EXPECT_GT(flops_per_second, 0);
  EXPECT_LT(flops_per_second, kStartup);
  EXPECT_EQ((*engine)->DeadlineThroughput(measured.shape(), measured.spec), kStartup)
      << "a measured run slower than the start-up figure lowered it";
  EXPECT_EQ((*engine)->stats().deadline_flops_per_second, kStartup);
}

// A two-rank group whose runs are slower than this process alone: it computes the whole problem
// here, then waits as long again (at least 300 ms), as a group behind a slow network would; so
// its measured speed is at most half this process's, whatever the machine's (a sanitizer's) pace.
class SlowGroup : public ShardGroup {
 public:
  int world_size() const override { return 2; }
  ShardGroupStatus status() const override {
    ShardGroupStatus status;
    status.world_size = 2;
    return status;
  }
  absl::StatusOr<ShardGroupRunInfo> Run(const ShardedProblem& p) override {
    const Clock::time_point start = Clock::now();
    DA_RETURN_IF_ERROR(RunShareWithPlan(p.compute, WholeProblem(p.q, p.k, p.v, p.spec, p.out),
                                        p.precision, p.stop));
    std::this_thread::sleep_for(std::max<Clock::duration>(Clock::now() - start, milliseconds(300)));
    return ShardGroupRunInfo{.strategy = p.strategy, .devices = {"rank0:cpu", "rank1:cpu"}};
  }
  ShardGroupStats stats() const override { return {}; }
  void SetStatusListener(std::function<void(const ShardGroupStatus&)>) override {}
};

TEST(AdmissionTest, TheGroupsRunsAndThisProcesssOwnAreMeasuredApart) {
  // Deadlines of requests the group runs are judged by the group's speed, and those of requests
  // computed here by this process's: neither lends the other its figure.
  EngineOptions options = Options();
  options.shard_group = std::make_shared<SlowGroup>();
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Problem problem({1, 4096, 2, 64}, {{4096, 1}}, 7);  // About 8.6 GFLOP: counted.
  problem.spec.shard_policy = ShardPolicy::kHeads;
  AttentionSpec local = problem.spec;
  local.shard_policy = ShardPolicy::kNone;

  const absl::StatusOr<ExecutionInfo> grouped = (*engine)->Run(problem.Request());
  ASSERT_TRUE(grouped.ok()) << grouped.status();
  ASSERT_EQ(grouped->devices.size(), 2u) << "the request did not run on the group";
  const double group_rate = (*engine)->stats().measured_group_flops_per_second;
  EXPECT_GT(group_rate, 0);
  EXPECT_EQ((*engine)->stats().measured_flops_per_second, 0) << "the group's run was counted here";
  EXPECT_EQ((*engine)->DeadlineThroughput(problem.shape(), problem.spec), group_rate);
  EXPECT_EQ((*engine)->DeadlineThroughput(problem.shape(), local), 0);

  problem.spec = local;
  const absl::StatusOr<ExecutionInfo> alone = (*engine)->Run(problem.Request());
  ASSERT_TRUE(alone.ok()) << alone.status();
  ASSERT_EQ(alone->devices.size(), 1u);
  const double local_rate = (*engine)->stats().measured_flops_per_second;
  ASSERT_GT(local_rate, group_rate) << "the group is not slower than this process alone";
  EXPECT_EQ((*engine)->stats().measured_group_flops_per_second, group_rate)
      << "this process's run was counted as the group's";
  problem.spec.shard_policy = ShardPolicy::kHeads;
  EXPECT_EQ((*engine)->DeadlineThroughput(problem.shape(), problem.spec), group_rate);
  EXPECT_EQ((*engine)->DeadlineThroughput(problem.shape(), local), local_rate);
  EXPECT_EQ((*engine)->stats().deadline_flops_per_second, local_rate);
}

TEST(AdmissionTest, EstimateFlopsFollowsTheCostFormula) {
  AttentionSpec spec;
  spec.patterns = {{1024, 1}, {2048, 2}};
  const ProblemShape shape{2, 4096, 4, 4, 64};
  // 4 * N * D * w / r^2 per head and pattern when w divides N.
  const double per_head = 4.0 * 4096 * 64 * (1024 + 2048 / 4);
  EXPECT_DOUBLE_EQ(EstimateFlops(shape, spec), per_head * 4 * 2);
  spec.causal = true;
  EXPECT_DOUBLE_EQ(EstimateFlops(shape, spec), per_head * 4 * 2 / 2);
  spec.causal = false;
  spec.mode = CombineMode::kGrouped;  // Two heads per pattern.
  EXPECT_DOUBLE_EQ(EstimateFlops(shape, spec), 4.0 * 4096 * 64 * (1024 * 2 + 2048 / 4 * 2) * 2);
}

}  // namespace
}  // namespace da::engine
