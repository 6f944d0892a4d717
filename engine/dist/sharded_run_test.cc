// Sharded runs over real Gloo processes on loopback (ranks are copies of this binary, --rank=R):
// 1, 2, 3 and 4 ranks compute a sweep of problems and rank 0 compares each output with the
// single-process CPU backend's, and each rank's traffic with the geometry's exact byte count.
//
// Sweep (every case, every world size): N = 97 and 500 (not divisible by 2, 3 or 4), pattern
// sets whose segments span two or more ranks (up to w > N), r not dividing w, causal or not,
// LONGNET and GROUPED, GQA (H 8 / Hkv 2, 6 / 3) and MHA, HEADS and SEQUENCE. Bound: max |sharded -
// single| <= 1e-6 * max |single| (fp32).
//
// Data plane: the same sweep (and a cancellation) with the bulk bytes on a second Gloo
// communicator held to NCCL's terms (HoldToNcclTerms: one thread at a time, no tags, refusing
// anything else), as the NCCL data plane carries them; and once more through the staged plane
// (staged_plane.h) in 64 KiB chunks, the nccl data plane's own path with host staging, with the
// workers computing on a device with memory of its own (the staged test backend), as GPU workers.
// A worker whose output waits on the plane for a rank 0 that computes three timeouts longer
// still answers (its send may take as long as rank 0's compute may). A plane that fails on one
// rank only (rank 0, or a worker) ends the run on every rank within seconds, not the compute
// timeout.
//
// Volume: a worker receives exactly its control frame, its q/k/v share and, for SEQUENCE, the
// kept K/V rows ExchangeBytesReceived names (nothing else); the exchange of a long problem is
// within 5% of the kept K/V bytes of its spanning segments, and far below the sequence's K/V.
#include "engine/dist/sharded_run.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend_registry.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/dist/data_plane.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/multi_process_test_util.h"
#include "engine/dist/serving_group.h"
#include "engine/dist/staged_plane.h"
#include "engine/shard_data.h"
#include "engine/shard_plan.h"
#include "engine/status_macros.h"
#include "engine/test_tensors.h"
#include "engine/testing/staged_backend.h"
#include "engine/thread_pool.h"

namespace da::dist {
namespace {

using engine::AttentionSpec;
using engine::CombineMode;
using engine::DType;
using engine::ProblemShape;
using engine::ShardedProblem;
using engine::ShardPolicy;
using engine::testing::OwnedTensor;
using std::chrono::milliseconds;
using testing::RankFlags;

constexpr milliseconds kTimeout{20000};
// "worker_budget": rank 2's memory budget for its first run, far below its part.
constexpr int64_t kTinyBudget = 4096;

// A run's options: the timeout, for a worker what it computes with and its kept buffers, and the
// data plane when the scenario has one.
ShardRunOptions Options(const engine::ShareCompute* compute = nullptr,
                        RankBuffers* buffers = nullptr, Communicator* plane = nullptr) {
  ShardRunOptions options;
  options.timeout = kTimeout;
  if (compute != nullptr) options.compute = *compute;
  options.buffers = buffers;
  options.data_plane = plane;
  return options;
}

// "plane_slow_root": every point-to-point operation may take 1 s, and rank 0 computes 3 s
// longer than its worker (SlowShares), as a rank 0 whose GPU is busy with local requests does.
constexpr milliseconds kSlowRootTimeout{1000};
constexpr milliseconds kSlowRootDelay{3000};

// A backend that computes with `inner`, after `before_share` (a delay, a crash, a stall that
// ends with the run's stop) for each share, and then runs `after_share` (may be empty); a share
// whose hook fails fails with it.
class WrappedShares final : public engine::Backend {
 public:
  using BeforeShare = std::function<absl::Status(const engine::RunContext&)>;
  WrappedShares(engine::Backend& inner, BeforeShare before_share, BeforeShare after_share = nullptr)
      : inner_(inner),
        before_share_(std::move(before_share)),
        after_share_(std::move(after_share)) {}
  WrappedShares(engine::Backend& inner, std::function<void()> before_share)
      : WrappedShares(inner, [before_share = std::move(before_share)](const engine::RunContext&) {
          before_share();
          return absl::OkStatus();
        }) {}
  std::string Name() const override { return inner_.Name(); }
  std::vector<engine::Precision> Precisions() const override { return inner_.Precisions(); }
  absl::StatusOr<engine::PrecisionChoice> ChoosePrecision(
      const AttentionSpec& spec) const override {
    return inner_.ChoosePrecision(spec);
  }
  absl::Status Supports(const ProblemShape& shape, DType dtype,
                        const AttentionSpec& spec) const override {
    return inner_.Supports(shape, dtype, spec);
  }
  absl::StatusOr<std::shared_ptr<engine::Plan>> BuildPlan(const engine::PlanKey& key,
                                                          const std::atomic<bool>* stop) override {
    return inner_.BuildPlan(key, stop);
  }
  int64_t PlanWorkspaceBytes(const engine::PlanKey& key) const override {
    return inner_.PlanWorkspaceBytes(key);
  }
  absl::Status RunShare(engine::Plan& plan, const engine::ShareProblem& problem,
                        const engine::RunContext& context) override {
    DA_RETURN_IF_ERROR(before_share_(context));
    DA_RETURN_IF_ERROR(inner_.RunShare(plan, problem, context));
    return after_share_ ? after_share_(context) : absl::OkStatus();
  }

 private:
  engine::Backend& inner_;
  const BeforeShare before_share_;
  const BeforeShare after_share_;
};

// Waits `delay` before each share.
WrappedShares SlowShares(engine::Backend& inner, milliseconds delay) {
  return WrappedShares(inner, [delay] { std::this_thread::sleep_for(delay); });
}

// Its first share waits until the run is stopped (CANCELLED) or 20 s pass, as a rank busy with
// other work computes a long share; later shares compute at once.
WrappedShares StallsFirstShare(engine::Backend& inner) {
  auto first = std::make_shared<std::atomic<bool>>(true);
  return WrappedShares(
      inner, WrappedShares::BeforeShare([first](const engine::RunContext& context) {
        if (!first->exchange(false)) return absl::OkStatus();
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (std::chrono::steady_clock::now() < until) {
          if (context.cancelled != nullptr && context.cancelled->load()) {
            return absl::CancelledError("the stalled share was stopped");
          }
          std::this_thread::sleep_for(milliseconds(1));
        }
        return absl::OkStatus();
      }));
}

// Its first share fails with INVALID_ARGUMENT, as a rank that cannot compute a request does; later
// shares compute. (A failure from the CPU's own checks would depend on the build machine: bf16
// products, say, which only AVX512-BF16 CPUs have.)
WrappedShares FailsFirstShare(engine::Backend& inner) {
  auto first = std::make_shared<std::atomic<bool>>(true);
  return WrappedShares(inner, WrappedShares::BeforeShare([first](const engine::RunContext&) {
                         if (!first->exchange(false)) return absl::OkStatus();
                         return absl::InvalidArgumentError("this rank cannot compute its share");
                       }));
}

// Computes its first share, then returns OK only once the run is stopped (up to 20 s): a compute
// that ends just as the stop word comes; *saw_stop turns true when it did so. Later shares, and a
// first share whose compute was itself stopped, return at once.
WrappedShares EndsAsTheStopComes(engine::Backend& inner, std::atomic<bool>* saw_stop) {
  // 0: no share yet; 1: the first share computes; 2: past it.
  auto phase = std::make_shared<std::atomic<int>>(0);
  return WrappedShares(
      inner,
      [phase](const engine::RunContext&) {
        int none = 0;
        if (!phase->compare_exchange_strong(none, 1)) *phase = 2;
        return absl::OkStatus();
      },
      [phase, saw_stop](const engine::RunContext& context) {
        int first = 1;
        if (!phase->compare_exchange_strong(first, 2)) return absl::OkStatus();
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (std::chrono::steady_clock::now() < until) {
          if (context.cancelled != nullptr && context.cancelled->load()) {
            *saw_stop = true;
            break;
          }
          std::this_thread::sleep_for(milliseconds(1));
        }
        return absl::OkStatus();
      });
}

// Ends the process `delay` into each share, as a rank that crashes does.
WrappedShares ExitInCompute(engine::Backend& inner, milliseconds delay) {
  return WrappedShares(inner, [delay] {
    std::this_thread::sleep_for(delay);
    std::fprintf(stderr, "a rank ends in the middle of its compute, as planned\n");
    std::_Exit(0);
  });
}

// "plane_root_lost": rank 0's process ends in the middle of its compute, after its worker
// computed and while the worker waits to send its output over a plane that, as NCCL between
// processes on one node, does not hear of a lost peer (DeafToLostPeers).
constexpr milliseconds kRootLostTimeout{1000};
constexpr milliseconds kRootLostComputeTimeout{30000};

// "worker_lost" (3 ranks: rank 2 ends as it starts computing) and "root_lost" (2 ranks: rank 0
// ends 300 ms into its compute): the rank left computing, about 6 s of work alone (more under
// load), stops at once: within kLostRankLimitS of the run's start, scatter included, which the
// loaded CI machine needs (1.2 s seen under load; a 1 s limit failed 2 runs in 12).
// HEADS, two heads of one dense segment per rank.
constexpr double kLostRankLimitS = 2.5;
ProblemShape LostRankShape(int ranks) { return {1, 36864, 2 * ranks, 2 * ranks, 64}; }

// A plane whose failed point-to-point calls report only at their timeout, as NCCL's do where
// the peer is another process on the same node (shared memory: nothing tells it the peer died).
class DeafToLostPeers final : public Communicator {
 public:
  explicit DeafToLostPeers(std::unique_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                         milliseconds timeout) override {
    const auto begin = std::chrono::steady_clock::now();
    return Deaf(begin, inner_->AllGather(send, recv, bytes, timeout), timeout);
  }
  absl::Status Broadcast(void* data, int64_t bytes, int root, milliseconds timeout) override {
    const auto begin = std::chrono::steady_clock::now();
    return Deaf(begin, inner_->Broadcast(data, bytes, root, timeout), timeout);
  }
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    const auto begin = std::chrono::steady_clock::now();
    return Deaf(begin, inner_->Send(data, bytes, peer, tag, timeout), timeout);
  }
  absl::Status Recv(void* data, int64_t bytes, int peer, int tag, milliseconds timeout) override {
    const auto begin = std::chrono::steady_clock::now();
    return Deaf(begin, inner_->Recv(data, bytes, peer, tag, timeout), timeout);
  }
  absl::Status Barrier(milliseconds timeout) override {
    const auto begin = std::chrono::steady_clock::now();
    return Deaf(begin, inner_->Barrier(timeout), timeout);
  }
  Counters counters() const override { return inner_->counters(); }

 private:
  static absl::Status Deaf(std::chrono::steady_clock::time_point begin, absl::Status status,
                           milliseconds timeout) {
    if (status.ok()) return status;
    std::this_thread::sleep_until(begin + timeout);
    return absl::DeadlineExceededError(
        absl::StrCat("no answer within ", timeout.count(), " ms (", status.message(), ")"));
  }

  std::unique_ptr<Communicator> inner_;
};

// A problem with the default precision (fp32) and strategy (SEQUENCE), computed with nothing
// set yet (the caller sets compute).
ShardedProblem Problem(const engine::TensorView& q, const engine::TensorView& k,
                       const engine::TensorView& v, const AttentionSpec& spec,
                       const engine::MutableTensorView& out) {
  ShardedProblem problem;
  problem.q = q;
  problem.k = k;
  problem.v = v;
  problem.spec = spec;
  problem.out = out;
  return problem;
}

// A random problem of `shape` and `patterns` (p), its single-process output (single, once
// ComputeSingle ran) and p as a HEADS run writing p.out (problem; its compute is the caller's).
struct HeadsCase {
  HeadsCase(const ProblemShape& shape, decltype(AttentionSpec::patterns) patterns, uint32_t seed)
      : p(engine::testing::RandomProblem(shape, seed)),
        single(engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape())) {
    p.spec.patterns = std::move(patterns);
    problem = Problem(p.q.view(), p.k.view(), p.v.view(), p.spec, p.out.mutable_view());
    problem.strategy = ShardPolicy::kHeads;
  }
  absl::Status ComputeSingle(engine::Backend& backend, engine::ThreadPool* pool) {
    return backend.Run(p.q.view(), p.k.view(), p.v.view(), p.spec, single.mutable_view(), {pool});
  }
  engine::testing::OwnedProblem p;
  OwnedTensor single;
  ShardedProblem problem;
};

struct Case {
  ProblemShape shape;
  AttentionSpec spec;
  ShardPolicy strategy;
  std::string name;
};

std::vector<Case> SweepCases() {
  const std::vector<std::vector<engine::Pattern>> sets = {
      {{16, 1}, {32, 2}, {64, 4}}, {{10, 3}, {100, 7}}, {{64, 1}, {5000, 40}}};
  const std::vector<std::pair<int64_t, int64_t>> heads = {{8, 8}, {8, 2}, {6, 3}};
  std::vector<Case> cases;
  for (int64_t seq_len : {97, 500}) {
    for (size_t set = 0; set < sets.size(); ++set) {
      for (auto [h, kv] : heads) {
        for (bool causal : {false, true}) {
          for (CombineMode mode : {CombineMode::kLongNet, CombineMode::kGrouped}) {
            for (ShardPolicy strategy : {ShardPolicy::kHeads, ShardPolicy::kSequence}) {
              Case c;
              c.shape = {2, seq_len, h, kv, 24};
              c.spec.patterns = sets[set];
              c.spec.causal = causal;
              c.spec.mode = mode;
              c.spec.precision = engine::Precision::kFloat32;
              c.strategy = strategy;
              c.name = absl::StrCat("N", seq_len, " set", set, " H", h, "/", kv,
                                    causal ? " causal " : " ", engine::CombineModeName(mode), " ",
                                    engine::ShardPolicyName(strategy));
              cases.push_back(c);
            }
          }
        }
      }
    }
  }
  return cases;
}

// The long problem of the volume test: 2 ranks, N = 65536, segments up to the whole sequence;
// the boundary at 32768 cuts a (3000, 2) segment and the (65536, 16) one.
Case VolumeCase() {
  Case c;
  c.shape = {1, 65536, 4, 4, 16};
  c.spec.patterns = {{2048, 1}, {3000, 2}, {8192, 4}, {65536, 16}};
  c.spec.precision = engine::Precision::kFloat32;
  c.strategy = ShardPolicy::kSequence;
  c.name = "volume";
  return c;
}

// Kept K/V bytes of the spanning sets: every set's rows, K and V, whole batch.
int64_t SpanningKeptBytes(const Case& c, const engine::ShardLayout& layout) {
  int64_t rows = 0;
  for (const engine::SpanningKeys& set : engine::SpanningKeySets(c.shape, c.spec, layout)) {
    rows += set.kept.count;
  }
  return rows * 2 * c.shape.head_dim * 4 * c.shape.batch;
}

// Rank 0: runs one case and checks output and traffic.
// The piece words rank 0 sends worker r for its shares of q, k and v: one per piece of whole
// rows (a row: a token of the share's heads) of at most piece_bytes.
int64_t PieceWordBytes(const Case& c, const engine::Share& share, int64_t piece_bytes) {
  const int64_t rows = c.shape.batch * share.tokens();
  int64_t words = 0;
  for (bool kv : {false, true, true}) {
    const engine::Shape4 whole = kv ? c.shape.KeyShape() : c.shape.QueryShape();
    const int64_t bytes = engine::ShareBytes(whole, share, DType::kFloat32, kv);
    words += ScatterPieceCount(bytes, bytes / rows, piece_bytes);
  }
  return words * kPieceWordBytes;
}

// Rank 0: runs one case and checks output and traffic. *piece_words (optional) grows by the
// piece words rank 0 sent.
int CoordinateCase(const RankFlags& flags, Communicator& comm, const Case& c, uint64_t seed,
                   const engine::ShareCompute& compute, Communicator* plane = nullptr,
                   int64_t* piece_words = nullptr) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, c.shape.QueryShape(), rng);
  const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, c.shape.KeyShape(), rng);
  const OwnedTensor v = engine::testing::RandomTensor(DType::kFloat32, c.shape.KeyShape(), rng);
  OwnedTensor single = engine::testing::PoisonedTensor(DType::kFloat32, c.shape.QueryShape());
  engine::CpuBackend backend;
  RANK_CHECK_OK(
      backend.Run(q.view(), k.view(), v.view(), c.spec, single.mutable_view(), {compute.pool}));

  OwnedTensor sharded = engine::testing::PoisonedTensor(DType::kFloat32, c.shape.QueryShape());
  ShardedProblem problem = Problem(q.view(), k.view(), v.view(), c.spec, sharded.mutable_view());
  problem.strategy = c.strategy;
  problem.compute = compute;
  ShardRunOptions options = Options(nullptr, nullptr, plane);
  // The data-plane sweeps scatter in pieces of 16 KiB: tens per share, some across a batch
  // boundary of a non-contiguous share (batch 2), instead of one piece per share.
  if (flags.scenario == "plane" || flags.scenario == "plane_staged") {
    options.scatter_piece_bytes = 16 << 10;
  }
  const absl::StatusOr<ShardRunStats> stats = CoordinateShardedRun(comm, problem, options);
  RANK_CHECK(stats.ok(), c.name, ": ", stats.status().ToString());
  double max_abs = 0, max_diff = 0;
  for (int64_t i = 0; i < single.elements(); ++i) {
    RANK_CHECK(std::isfinite(sharded.at(i)), c.name, ": element ", i, " not written");
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(single.at(i))));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(sharded.at(i)) - single.at(i)));
  }
  RANK_CHECK(max_abs > 0 && max_diff <= 1e-6 * max_abs, c.name, ": max diff ", max_diff, " of max ",
             max_abs);

  // Traffic: each worker received its frame, its piece words, its stop word, its share and
  // exactly the exchange the geometry names; nothing else.
  const absl::StatusOr<engine::ShardLayout> layout =
      engine::MakeShardLayout(c.shape, c.spec, c.strategy, comm.size());
  RANK_CHECK(layout.ok(), layout.status().ToString());
  for (int r = 0; r < comm.size(); ++r) {
    const int64_t exchange =
        engine::ExchangeBytesReceived(c.shape, c.spec, *layout, DType::kFloat32, r);
    RANK_CHECK(stats->ranks[r].exchange_bytes == exchange, c.name, ": rank ", r, " exchanged ",
               stats->ranks[r].exchange_bytes, " bytes, geometry says ", exchange);
    if (r == 0) continue;
    const engine::Share& share = layout->shares[r];
    const int64_t scatter =
        engine::ShareBytes(c.shape.QueryShape(), share, DType::kFloat32, false) +
        2 * engine::ShareBytes(c.shape.KeyShape(), share, DType::kFloat32, true);
    // What the worker holds: its shares, output and every exchanged row (placed) at least.
    const int64_t held =
        RankRunBytes(c.shape, DType::kFloat32, DType::kFloat32, c.spec, *layout, r);
    const int64_t out_share =
        engine::ShareBytes(c.shape.QueryShape(), share, DType::kFloat32, false);
    RANK_CHECK(held >= scatter + out_share + exchange, c.name, ": rank ", r, " holds ", held,
               " bytes by RankRunBytes; its shares, output and exchanged rows are ",
               scatter + out_share + exchange);
    const int64_t words = PieceWordBytes(c, share, options.scatter_piece_bytes);
    if (piece_words != nullptr) *piece_words += words;
    const int64_t output_word = plane != nullptr ? kOutputWordBytes : 0;
    RANK_CHECK(stats->ranks[r].bytes_received ==
                   kControlFrameBytes + words + kStopWordBytes + output_word + scatter + exchange,
               c.name, ": rank ", r, " received ", stats->ranks[r].bytes_received,
               "; frame + piece words + stop word + output word + share + exchange = ",
               kControlFrameBytes + words + kStopWordBytes + output_word + scatter + exchange);
  }
  if (c.name == "volume") {
    int64_t total = 0;
    for (const ShardRunStats::Rank& r : stats->ranks) total += r.exchange_bytes;
    const int64_t kept = SpanningKeptBytes(c, *layout);
    const int64_t whole_kv = 2 * c.shape.KeyShape().elements() * 4;
    std::fprintf(stderr,
                 "volume: exchanged %lld bytes; kept K/V of spanning segments %lld; "
                 "whole K/V %lld (%.4f of it)\n",
                 static_cast<long long>(total), static_cast<long long>(kept),
                 static_cast<long long>(whole_kv),
                 static_cast<double>(total) / static_cast<double>(whole_kv));
    RANK_CHECK(kept > 0 && std::fabs(static_cast<double>(total - kept)) <= 0.05 * kept, "exchange ",
               total, " not within 5% of the spanning kept K/V ", kept);
    RANK_CHECK(total * 8 < whole_kv, "exchange ", total, " is not small against ", whole_kv);
  }
  return 0;
}

// Case c's problem (SEQUENCE) over p's tensors, computed with `compute` on rank 0.
ShardedProblem SequenceProblem(const Case& c, engine::testing::OwnedProblem& p,
                               const engine::ShareCompute& compute) {
  ShardedProblem problem =
      Problem(p.q.view(), p.k.view(), p.v.view(), c.spec, p.out.mutable_view());
  problem.strategy = ShardPolicy::kSequence;
  problem.compute = compute;
  return problem;
}

// "slow_scatter" and "plane_slow_scatter": every scatter piece takes 150 ms to send (a slow link)
// and a timeout is 1 s, so that the scatter to each worker takes longer than a timeout: the last
// worker waits for the others' shares, and rank 0 for the workers' first frames, longer than one.
constexpr milliseconds kSlowScatterTimeout{1000};
constexpr milliseconds kSlowScatterPieceDelay{150};

// A communicator that passes every call to `inner`; tests override what they watch or slow.
class ForwardingCommunicator : public Communicator {
 public:
  explicit ForwardingCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string backend() const override { return inner_.backend(); }
  Capabilities capabilities() const override { return inner_.capabilities(); }
  absl::Status AllGather(const void* send, void* recv, int64_t bytes,
                         milliseconds timeout) override {
    return inner_.AllGather(send, recv, bytes, timeout);
  }
  absl::Status Broadcast(void* data, int64_t bytes, int root, milliseconds timeout) override {
    return inner_.Broadcast(data, bytes, root, timeout);
  }
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    return inner_.Send(data, bytes, peer, tag, timeout);
  }
  absl::Status Recv(void* data, int64_t bytes, int peer, int tag, milliseconds timeout) override {
    return inner_.Recv(data, bytes, peer, tag, timeout);
  }
  absl::Status Barrier(milliseconds timeout) override { return inner_.Barrier(timeout); }
  Counters counters() const override { return inner_.counters(); }
  void Abort(const std::string& why) override { inner_.Abort(why); }

 private:
  Communicator& inner_;
};

// "plane_fails_at_0" and "plane_fails_at_2": that rank's data plane fails its first exchange call
// (rank 0 sends first, rank 2 receives first) and every call after it, as a plane whose failure
// only this rank sees does (a staging copy that failed, NCCL's error on one rank): nothing of it
// reaches the other ranks, whose waits on this rank end only when it gives the run up. The
// compute timeout is 60 s and a timeout 20 s: without the abort the run held every rank for one
// or the other (the gather's first frames, the workers' stop words, a plane call's timeout).
constexpr milliseconds kPlaneFailureComputeTimeout{60000};
constexpr double kPlaneFailureLimitS = 5;

class FailsAnExchange final : public ForwardingCommunicator {
 public:
  explicit FailsAnExchange(Communicator& inner) : ForwardingCommunicator(inner) {}
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    if (Fails(tag)) return Failure("send", peer);
    return ForwardingCommunicator::Send(data, bytes, peer, tag, timeout);
  }
  absl::Status Recv(void* data, int64_t bytes, int peer, int tag, milliseconds timeout) override {
    if (Fails(tag)) return Failure("recv", peer);
    return ForwardingCommunicator::Recv(data, bytes, peer, tag, timeout);
  }

 private:
  bool Fails(int tag) {
    if (tag == kExchangeTag) failed_ = true;
    return failed_;
  }
  absl::Status Failure(const char* op, int peer) const {
    return absl::UnavailableError(
        absl::StrCat("plane ", op, " with peer ", peer, " failed on this rank only, as planned"));
  }

  std::atomic<bool> failed_{false};
};

// Rank 0's communicator (or plane) whose Sends with `tag` (every Send: -1) take `delay` longer.
class SlowSends final : public ForwardingCommunicator {
 public:
  SlowSends(Communicator& inner, int tag, milliseconds delay)
      : ForwardingCommunicator(inner), tag_(tag), delay_(delay) {}
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    if (tag_ < 0 || tag == tag_) std::this_thread::sleep_for(delay_);
    return ForwardingCommunicator::Send(data, bytes, peer, tag, timeout);
  }

 private:
  const int tag_;
  const milliseconds delay_;
};

// Rank 0's communicator, which raises a flag once it has sent its n-th piece word saying a piece
// follows: a cancel at a known point in the middle of a scatter.
class CancelAfterPieceWords final : public ForwardingCommunicator {
 public:
  CancelAfterPieceWords(Communicator& inner, std::atomic<bool>* flag, int n)
      : ForwardingCommunicator(inner), flag_(flag), n_(n) {}
  absl::Status Send(const void* data, int64_t bytes, int peer, int tag,
                    milliseconds timeout) override {
    absl::Status sent = ForwardingCommunicator::Send(data, bytes, peer, tag, timeout);
    if (tag == kPieceTag && bytes == kPieceWordBytes && *static_cast<const int64_t*>(data) == 1 &&
        ++words_ == n_) {
      *flag_ = true;
    }
    return sent;
  }

 private:
  std::atomic<bool>* flag_;
  const int n_;
  std::atomic<int> words_{0};
};

// Rank 0's communicator, which raises `flag` once a receive that `when` picks has completed: a
// cancel at a known point of a run.
class CancelOnReceive final : public ForwardingCommunicator {
 public:
  using Match = std::function<bool(int peer, int tag, const void* data, int64_t bytes)>;
  CancelOnReceive(Communicator& inner, std::atomic<bool>* flag, Match when)
      : ForwardingCommunicator(inner), flag_(flag), when_(std::move(when)) {}
  absl::Status Recv(void* data, int64_t bytes, int peer, int tag, milliseconds timeout) override {
    absl::Status received = ForwardingCommunicator::Recv(data, bytes, peer, tag, timeout);
    if (received.ok() && !fired_.load() && when_(peer, tag, data, bytes) &&
        !fired_.exchange(true)) {
      cancelled_at_ = std::chrono::steady_clock::now();
      *flag_ = true;
    }
    return received;
  }
  // When it raised the flag; read once the run has returned.
  std::chrono::steady_clock::time_point cancelled_at() const { return cancelled_at_; }

 private:
  std::atomic<bool>* flag_;
  const Match when_;
  std::atomic<bool> fired_{false};
  std::chrono::steady_clock::time_point cancelled_at_;
};

// "cancel_slow_output" (3 ranks, HEADS, one head each, no plane): worker 2 computes at once and
// sends its 1 MiB output in 16 pieces of 64 KiB, each 150 ms late (a slow link); worker 1's share
// stalls (StallsFirstShare). The request is cancelled as rank 0 takes worker 2's first piece:
// worker 1 stops and leaves the run, and rank 0 takes the rest of worker 2's output for about
// 2 s more. Worker 1 waits for each next control frame only 5 keep-alive periods (as a serving
// worker waits kIdleHeartbeats heartbeats) and must be kept by heartbeat frames.
constexpr milliseconds kSlowOutputKeepalive{200};
constexpr int64_t kSlowOutputPieceBytes = 64 << 10;
constexpr milliseconds kSlowOutputPieceDelay{150};

// After a cancelled run: `next` (its reference computed before, so that its control frame follows
// that run at once) is exact, which shows the group in step; then every worker shuts down.
int RunInStepAndShutDown(const RankFlags& flags, Communicator& comm, HeadsCase& next,
                         Communicator* plane) {
  const absl::StatusOr<ShardRunStats> after =
      CoordinateShardedRun(comm, next.problem, Options(nullptr, nullptr, plane));
  RANK_CHECK(after.ok(), "the run after the cancelled one: ", after.status().ToString());
  const double error = engine::testing::MaxRelativeError(next.p.out, next.single);
  RANK_CHECK(error <= 1e-6, "the run after the cancelled one: max relative error ", error);
  const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
  for (int r = 1; r < flags.size; ++r) {
    RANK_CHECK_OK(comm.Send(shutdown.data(), kControlFrameBytes, r, kControlTag, kTimeout));
  }
  return 0;
}

int RunRank(const RankFlags& flags) {
  auto store = ConnectCoordinatorStore(flags.coordinator, milliseconds(5000));
  RANK_CHECK(store.ok(), store.status().ToString());
  GlooOptions options;
  options.rank = flags.rank;
  options.size = flags.size;
  options.prefix = flags.prefix;
  options.timeout = milliseconds(10000);
  auto comm = MakeGlooCommunicator(**store, options);
  RANK_CHECK(comm.ok(), comm.status().ToString());
  // The "plane" scenarios carry the bulk bytes on a second group held to NCCL's terms.
  const bool with_plane = flags.scenario.rfind("plane", 0) == 0;
  std::unique_ptr<Communicator> plane;
  if (with_plane) {
    options.prefix = flags.prefix + "/plane";
    auto inner = MakeGlooCommunicator(**store, options);
    RANK_CHECK(inner.ok(), inner.status().ToString());
    // Gloo held to NCCL's terms (data_plane.h); "plane_staged" also stages every message
    // through host "device" buffers in 64 KiB chunks (the nccl data plane's path, chunking
    // every share, exchange and output).
    plane = HoldToNcclTerms(*std::move(inner));
    if (flags.scenario == "plane_staged") {
      plane = MakeStagedPlane(std::move(plane), MakeHostStaging(), 65536);
    }
    if (flags.scenario == "plane_root_lost" && flags.rank == 1) {
      plane = std::make_unique<DeafToLostPeers>(std::move(plane));
    }
  }
  engine::ThreadPool pool(1);
  // In "worker_fails" the workers compute on the portable path, which has no bf16 products.
  const bool portable = flags.scenario == "worker_fails" && flags.rank != 0;
  engine::CpuBackend rank_backend(portable ? engine::cpu::Isa::kPortableSse2
                                           : engine::cpu::SelectedIsa());
  engine::PlanCache plans(int64_t{1} << 28);
  engine::ShareCompute compute{&rank_backend, &plans, &pool};
  // In "plane_staged" the workers compute on a device with memory of its own (the staged test
  // backend: host memory tagged as a device's, the CPU kernel), as a GPU worker does: every share
  // and gathered row is copied into it and the output back (RunHostShareWithPlan).
  const bool staged_worker = flags.scenario == "plane_staged" && flags.rank != 0;
  std::unique_ptr<engine::Backend> staged_backend;
  if (staged_worker) {
    engine::testing::RegisterStagedBackend();
    auto made = engine::MakeBackend("staged", engine::testing::StagedDevice(0, 0));
    RANK_CHECK(made.ok(), made.status().ToString());
    staged_backend = *std::move(made);
    compute = {staged_backend.get(), &plans, &pool, "staged:0"};
  }
  std::optional<FailsAnExchange> failing_plane;
  if ((flags.scenario == "plane_fails_at_0" && flags.rank == 0) ||
      (flags.scenario == "plane_fails_at_2" && flags.rank == 2)) {
    failing_plane.emplace(*plane);
  }
  Communicator* const run_plane = failing_plane ? &*failing_plane : plane.get();
  const bool plane_fails =
      flags.scenario == "plane_fails_at_0" || flags.scenario == "plane_fails_at_2";
  std::optional<WrappedShares> exiting;
  if (flags.scenario == "worker_lost" && flags.rank == 2) {
    exiting.emplace(ExitInCompute(rank_backend, milliseconds(0)));
    compute = {&*exiting, &plans, &pool};
  }
  std::optional<WrappedShares> wrapped;  // A worker that stalls, fails or ends as stopped.
  std::atomic<bool> computed_then_stopped{false};  // "cancel_as_computed" (EndsAsTheStopComes).
  if (flags.scenario == "cancel_slow_output" && flags.rank == 1) {
    wrapped.emplace(StallsFirstShare(rank_backend));
    compute = {&*wrapped, &plans, &pool};
  }
  if (flags.scenario == "plane_worker_fails" && flags.rank == 2) {
    wrapped.emplace(FailsFirstShare(rank_backend));
    compute = {&*wrapped, &plans, &pool};
  }
  if (flags.scenario == "cancel_as_computed" && flags.rank == 1) {
    wrapped.emplace(EndsAsTheStopComes(rank_backend, &computed_then_stopped));
    compute = {&*wrapped, &plans, &pool};
  }
  std::optional<SlowSends> slow_outputs;
  if (flags.scenario == "cancel_slow_output" && flags.rank == 2) {
    slow_outputs.emplace(**comm, kGatherTag, kSlowOutputPieceDelay);
  }
  RankBuffers buffers;
  if (flags.rank != 0) {
    // A worker: serve runs until rank 0 says shut down. Heartbeat frames (rank 0's keep-alive
    // in a cancelled run's tail) are counted and skipped.
    milliseconds frame_wait = kTimeout;
    int heartbeats = 0;
    for (int run = 0;; ++run) {
      std::string frame(kControlFrameBytes, '\0');
      absl::StatusOr<ControlFrame> control;
      for (;;) {
        const absl::Status received =
            (*comm)->Recv(frame.data(), kControlFrameBytes, 0, kControlTag, frame_wait);
        RANK_CHECK(received.ok(), "rank ", flags.rank, " waited ", frame_wait.count(),
                   " ms for rank 0's next control frame after ", heartbeats,
                   " heartbeats: ", received.ToString());
        control = DecodeControlFrame(frame);
        RANK_CHECK(control.ok(), control.status().ToString());
        if (control->kind != ControlKind::kHeartbeat) break;
        ++heartbeats;
      }
      if (flags.scenario == "cancel_slow_output" && run == 1 && flags.rank == 1) {
        // Rank 0 took worker 2's output for about 2 s after this worker left the cancelled run.
        RANK_CHECK(heartbeats >= 3, "rank 1 was kept by ", heartbeats, " heartbeats");
        std::fprintf(stderr, "rank 1: kept by %d heartbeats\n", heartbeats);
      }
      frame_wait = kTimeout;
      if (control->kind == ControlKind::kShutdown) {
        if (staged_worker) {
          // Every share ran on the device, its bytes went in and out, and nothing is left.
          const engine::testing::StagedCounters c = engine::testing::StagedCountersOf(0);
          RANK_CHECK(c.shares_run >= run && c.bytes_in > 0 && c.bytes_out > 0 && c.live_bytes == 0,
                     "staged device: ", c.shares_run, " shares run of ", run, " runs, ", c.bytes_in,
                     " bytes in, ", c.bytes_out, " out, ", c.live_bytes, " still allocated");
        }
        return 0;
      }
      RANK_CHECK(control->kind == ControlKind::kRun, "unexpected control frame");
      // Workers keep their share buffers across the sweep's shapes (rank 0 takes fresh ones).
      const Communicator::Counters before = (*comm)->counters();
      ShardRunOptions serve_options = Options(&compute, &buffers, run_plane);
      if (plane_fails) serve_options.compute_timeout = kPlaneFailureComputeTimeout;
      if (flags.scenario == "plane_slow_root") serve_options.timeout = kSlowRootTimeout;
      if (flags.scenario == "slow_scatter" || flags.scenario == "plane_slow_scatter") {
        serve_options.timeout = kSlowScatterTimeout;
      }
      if (flags.scenario == "plane_root_lost") {
        serve_options.timeout = kRootLostTimeout;
        serve_options.compute_timeout = kRootLostComputeTimeout;
      }
      // Were rank 1's output not taken, its send would wait compute_timeout + a timeout: 25 s.
      if (flags.scenario == "plane_worker_fails")
        serve_options.compute_timeout = milliseconds(5000);
      const bool budget_scenario =
          flags.scenario == "worker_budget" || flags.scenario == "plane_worker_budget";
      if (budget_scenario && flags.rank == 2 && run == 0) {
        serve_options.memory_budget_bytes = kTinyBudget;
      }
      const auto serve_started = std::chrono::steady_clock::now();
      absl::Status served =
          ServeShardedRun(slow_outputs ? *slow_outputs : **comm, *control, serve_options).status();
      const double serve_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - serve_started).count();
      if (budget_scenario && run == 0) {
        // Rank 2 refused its part in step, holding no share; rank 1 was stopped once rank 2
        // answered, or had computed (and, over a plane, was told its output is not wanted).
        if (flags.rank == 2) {
          RANK_CHECK(served.code() == absl::StatusCode::kResourceExhausted &&
                         AnsweredInStep(served) &&
                         served.message().find("memory budget is 4096 bytes") != std::string::npos,
                     "rank 2: ", served.ToString());
          RANK_CHECK(buffers.q() == nullptr, "rank 2 took share buffers for a part it refused");
        } else {
          RANK_CHECK(served.ok() ||
                         (served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served)),
                     "rank 1: ", served.ToString());
        }
        continue;
      }
      if (flags.scenario == "plane_worker_fails" && run == 0) {
        // Rank 2 cannot compute (it says so in its stats); rank 1 can, but nobody wants its
        // output once rank 2 failed: rank 0's stop word stops its compute, or its output word 0
        // tells it not to send. Either way it answers at once instead of computing on or
        // waiting in its send.
        if (flags.rank == 1) {
          RANK_CHECK(served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served),
                     "rank 1: ", served.ToString());
          RANK_CHECK(serve_s < 10, "rank 1's run took ", serve_s, " s: its output waited");
        } else {
          RANK_CHECK(served.code() == absl::StatusCode::kInvalidArgument && AnsweredInStep(served),
                     "rank 2: ", served.ToString());
        }
        continue;
      }
      // A rank lost in the run: this worker hears it at once and leaves the group (not in step).
      //   plane_root_lost: rank 0 ended while this worker waited to send its output; heard on the
      //     control communicator, not after a plane send's compute timeout (30 s) and more.
      //   worker_lost: rank 2 ended; rank 0's communicator broke and closed its connections, and
      //     this worker's stop word's receive failed: it stopped computing.
      //   root_lost: rank 0 ended 300 ms into the run; the same, from rank 0's own connection.
      //   plane_fails_at_0, plane_fails_at_2: the plane of rank 0 (of rank 2) failed in the
      //     exchange; that rank aborted its communicators, which ended the other ranks' waits.
      const std::map<std::string, double> lost_rank_limit_s = {
          {"plane_root_lost", 10},
          {"worker_lost", kLostRankLimitS},
          {"root_lost", kLostRankLimitS},
          {"plane_fails_at_0", kPlaneFailureLimitS},
          {"plane_fails_at_2", kPlaneFailureLimitS}};
      if (auto lost = lost_rank_limit_s.find(flags.scenario); lost != lost_rank_limit_s.end()) {
        RANK_CHECK(!served.ok() && !AnsweredInStep(served), "rank ", flags.rank, ": ",
                   served.ToString());
        RANK_CHECK(serve_s < lost->second, "rank ", flags.rank, " took ", serve_s,
                   " s to hear of the failure (", served.ToString(), ")");
        std::fprintf(stderr, "rank %d: left %.2f s after the run began: %s\n", flags.rank, serve_s,
                     served.ToString().c_str());
        return 0;
      }
      if (flags.scenario == "scatter_cancel" && run < 3) {
        // Told by a piece word that the request was cancelled (runs 0 and 1: the first word; run
        // 2: worker 1 after 5 pieces), it went through the run's steps (runs 1 and 2: the
        // SEQUENCE exchange too) and answered CANCELLED.
        RANK_CHECK(served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served),
                   "the run cancelled before its scatter returned ", served.ToString());
        const int64_t received = (*comm)->counters().bytes_received - before.bytes_received;
        RANK_CHECK(run != 0 || received == kPieceWordBytes + kStopWordBytes, "run ", run,
                   ": received ", received, " bytes; a piece word and a stop word are ",
                   kPieceWordBytes + kStopWordBytes);
        continue;
      }
      if (flags.scenario == "cancel_slow_output" && run == 0) {
        // Worker 1 was stopped and left at once; worker 2 had computed and sent its output.
        RANK_CHECK(flags.rank == 2
                       ? served.ok()
                       : served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served),
                   "rank ", flags.rank, ": ", served.ToString());
        frame_wait = kSlowOutputKeepalive * kIdleHeartbeats;
        continue;
      }
      if (flags.scenario == "cancel_as_computed" && run == 0) {
        // Its compute returned OK with the stop word in: it answered CANCELLED, with no output.
        RANK_CHECK(computed_then_stopped.load(),
                   "rank 1's compute did not end as the stop came (it was stopped before)");
        RANK_CHECK(served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served),
                   "the run whose compute ended as the stop came returned ", served.ToString());
        const int64_t sent = (*comm)->counters().bytes_sent - before.bytes_sent;
        RANK_CHECK(sent < 4096, "rank 1 sent ", sent, " bytes: its output went");
        continue;
      }
      if (flags.scenario == "plane_cancel_late" && run == 0) {
        // It computed and answered; the request was cancelled before rank 0 took its output,
        // which rank 0 then did not want (output word 0).
        RANK_CHECK(served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served),
                   "the run cancelled after this worker answered returned ", served.ToString());
        continue;
      }
      if ((flags.scenario == "cancel" || flags.scenario == "plane_cancel") && run == 0) {
        // Told by rank 0's stop word, this worker's compute stopped in the middle: were it not
        // told, it would finish its share (about a second) and return OK.
        RANK_CHECK(served.code() == absl::StatusCode::kCancelled && AnsweredInStep(served),
                   "the cancelled run returned ", served.ToString());
        continue;
      }
      // A compute failure (worker_fails) is reported to rank 0; anything else fails the rank.
      RANK_CHECK(served.ok() || (flags.scenario == "worker_fails" &&
                                 served.code() == absl::StatusCode::kInvalidArgument &&
                                 AnsweredInStep(served)),
                 served.ToString());
    }
  }
  if (flags.scenario == "slow_scatter" || flags.scenario == "plane_slow_scatter") {
    // HEADS, two heads per rank: each worker's share is 12 pieces of 128 KiB, 1.8 s to send.
    // Then SEQUENCE, a third of the tokens per rank: 15 pieces, 2.25 s, and the (2048, 4) segment
    // spans every rank, so every pair exchanges: rank 0's exchange with worker 2 and worker 1's
    // with worker 2 (on a plane: every worker's first exchange call, with rank 0) wait for the
    // scatter to worker 2, longer than a timeout. Both runs are exact.
    for (const ShardPolicy strategy : {ShardPolicy::kHeads, ShardPolicy::kSequence}) {
      HeadsCase c({1, 2048, 6, 6, 32}, {{256, 1}, {2048, 4}}, static_cast<uint32_t>(flags.seed));
      c.problem.strategy = strategy;
      RANK_CHECK_OK(c.ComputeSingle(rank_backend, compute.pool));
      c.problem.compute = compute;
      // Without a plane the pieces go on the control communicator with their tag; on a plane
      // (tags dropped) every send is slowed: the pieces, and for SEQUENCE the exchange's.
      const bool on_plane = plane != nullptr;
      SlowSends slow(on_plane ? *plane : **comm, on_plane ? -1 : kScatterTag,
                     kSlowScatterPieceDelay);
      ShardRunOptions run_options = Options(nullptr, nullptr, on_plane ? &slow : nullptr);
      run_options.timeout = kSlowScatterTimeout;
      run_options.scatter_piece_bytes = 128 << 10;
      const auto started = std::chrono::steady_clock::now();
      const absl::StatusOr<ShardRunStats> result =
          CoordinateShardedRun(on_plane ? **comm : slow, c.problem, run_options);
      RANK_CHECK(result.ok(), engine::ShardPolicyName(strategy), ": ", result.status().ToString());
      const double run_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      RANK_CHECK(run_s > 3 * kSlowScatterTimeout.count() / 1000.0, "the scatter took only ", run_s,
                 " s");
      const double error = engine::testing::MaxRelativeError(c.p.out, c.single);
      RANK_CHECK(error <= 1e-6, engine::ShardPolicyName(strategy), ": max relative error ", error);
      std::fprintf(stderr, "rank 0: %s, a %.1f s scatter with a 1 s timeout, exact\n",
                   engine::ShardPolicyName(strategy).c_str(), run_s);
    }
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    for (int r = 1; r < flags.size; ++r) {
      RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, r, kControlTag, kTimeout));
    }
    return 0;
  }
  if (plane_fails) {
    // SEQUENCE with a segment across every rank, so that every pair exchanges; the run fails at
    // once on every rank (see FailsAnExchange), as one the group re-forms after.
    HeadsCase c({1, 3000, 4, 4, 32}, {{500, 1}, {3000, 4}}, static_cast<uint32_t>(flags.seed));
    c.problem.strategy = ShardPolicy::kSequence;
    c.problem.compute = compute;
    ShardRunOptions run_options = Options(nullptr, nullptr, run_plane);
    run_options.compute_timeout = kPlaneFailureComputeTimeout;
    const auto started = std::chrono::steady_clock::now();
    const absl::StatusOr<ShardRunStats> result =
        CoordinateShardedRun(**comm, c.problem, run_options);
    const double run_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    RANK_CHECK(result.status().code() == absl::StatusCode::kUnavailable &&
                   !AnsweredInStep(result.status()),
               result.status().ToString());
    RANK_CHECK(run_s < kPlaneFailureLimitS, "the run took ", run_s, " s to fail");
    std::fprintf(stderr, "rank 0: the run failed after %.2f s: %s\n", run_s,
                 result.status().ToString().c_str());
    return 0;
  }
  if (flags.scenario == "plane_slow_root") {
    // HEADS, half the heads each: the worker computes its half at once and sends its output over
    // the plane, where rank 0 takes it only after its own compute, 3 s (3 timeouts) later. The
    // worker waits for that as long as rank 0's compute may take (compute_timeout), not for one
    // timeout: the run is exact.
    HeadsCase c({1, 2048, 4, 4, 32}, {{512, 1}, {2048, 4}}, static_cast<uint32_t>(flags.seed));
    RANK_CHECK_OK(c.ComputeSingle(rank_backend, compute.pool));
    WrappedShares slow = SlowShares(rank_backend, kSlowRootDelay);
    c.problem.compute = {&slow, nullptr, &pool};
    ShardRunOptions run_options = Options(nullptr, nullptr, plane.get());
    run_options.timeout = kSlowRootTimeout;
    const absl::StatusOr<ShardRunStats> result =
        CoordinateShardedRun(**comm, c.problem, run_options);
    RANK_CHECK(result.ok(), result.status().ToString());
    // Every element written (finite) and within 1e-6 of the single-process output's largest.
    const double error = engine::testing::MaxRelativeError(c.p.out, c.single);
    RANK_CHECK(error <= 1e-6, "max relative error ", error);
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, 1, kControlTag, kTimeout));
    return 0;
  }
  if (flags.scenario == "plane_root_lost") {
    // HEADS, half the heads each: the worker computes its half at once and waits to send its
    // output; rank 0 ends its process 2 s into its own compute.
    HeadsCase c({1, 2048, 4, 4, 32}, {{512, 1}, {2048, 4}}, static_cast<uint32_t>(flags.seed));
    WrappedShares exiting = ExitInCompute(rank_backend, milliseconds(2000));
    c.problem.compute = {&exiting, nullptr, &pool};
    ShardRunOptions run_options = Options(nullptr, nullptr, plane.get());
    run_options.timeout = kRootLostTimeout;
    run_options.compute_timeout = kRootLostComputeTimeout;
    const absl::StatusOr<ShardRunStats> result =
        CoordinateShardedRun(**comm, c.problem, run_options);
    RANK_CHECK(false, "rank 0 outlived its compute: ", result.status().ToString());
  }
  if (flags.scenario == "worker_lost" || flags.scenario == "root_lost") {
    const ProblemShape shape = LostRankShape(flags.size);
    HeadsCase c(shape, {{shape.seq_len, 1}}, static_cast<uint32_t>(flags.seed));
    WrappedShares exiting_root = ExitInCompute(rank_backend, milliseconds(300));
    c.problem.compute = compute;
    if (flags.scenario == "root_lost") c.problem.compute = {&exiting_root, nullptr, &pool};
    const auto started = std::chrono::steady_clock::now();
    const absl::StatusOr<ShardRunStats> result = CoordinateShardedRun(**comm, c.problem, Options());
    const double run_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    // The run fails at once (worker_lost: without waiting for rank 1), to be re-formed.
    RANK_CHECK(result.status().code() == absl::StatusCode::kUnavailable &&
                   !AnsweredInStep(result.status()) &&
                   result.status().message().find("with peer 2") != std::string::npos,
               result.status().ToString());
    RANK_CHECK(run_s < kLostRankLimitS, "the run took ", run_s, " s to fail after rank 2 was lost");
    std::fprintf(stderr, "rank 0: the run failed after %.2f s: %s\n", run_s,
                 result.status().ToString().c_str());
    comm->reset();  // As a serving group re-forming: rank 1's connection closes.
    return 0;
  }
  if (flags.scenario == "cancel_slow_output" || flags.scenario == "plane_cancel_late" ||
      flags.scenario == "cancel_as_computed") {
    const bool slow_output = flags.scenario == "cancel_slow_output";
    const bool as_computed = flags.scenario == "cancel_as_computed";
    // The cancelled run, then a run that shows the group in step (its reference computed first,
    // so that its control frame follows the cancelled run at once). "cancel_as_computed": one
    // head per rank, a tiny share: rank 1 has computed long before the cancel, 500 ms in, and its
    // compute returns only as the stop word comes (EndsAsTheStopComes).
    HeadsCase c(slow_output   ? ProblemShape{1, 4096, 3, 3, 64}
                : as_computed ? ProblemShape{1, 1024, 2, 2, 32}
                              : ProblemShape{1, 2048, 2, 2, 32},
                {{slow_output   ? 1024
                  : as_computed ? 256
                                : 512,
                  1}},
                static_cast<uint32_t>(flags.seed));
    HeadsCase next({1, 500, 4, 4, 24}, {{64, 1}, {500, 4}}, static_cast<uint32_t>(flags.seed) + 1);
    RANK_CHECK_OK(next.ComputeSingle(rank_backend, compute.pool));
    next.problem.compute = compute;
    std::atomic<bool> cancelled{false};
    c.problem.stop = &cancelled;
    c.problem.compute = compute;
    // "plane_cancel_late": rank 0's own share stalls, and the request is cancelled once its
    // worker has computed and answered (its stats, code 0), before rank 0 takes its output.
    WrappedShares stalled = StallsFirstShare(rank_backend);
    if (flags.scenario == "plane_cancel_late") c.problem.compute = {&stalled, &plans, &pool};
    CancelOnReceive canceller(
        **comm, &cancelled, [&](int peer, int tag, const void* data, int64_t bytes) {
          if (as_computed) return false;
          if (slow_output) return peer == 2 && tag == kGatherTag && bytes == kSlowOutputPieceBytes;
          return peer == 1 && tag == kGatherTag && bytes == kStatsFrameBytes &&
                 static_cast<const int64_t*>(data)[5] == 0;
        });
    std::thread timer([&] {
      if (!as_computed) return;
      std::this_thread::sleep_for(milliseconds(500));
      cancelled = true;
    });
    ShardRunOptions run_options = Options(nullptr, nullptr, plane.get());
    if (slow_output) {
      run_options.scatter_piece_bytes = kSlowOutputPieceBytes;
      run_options.keepalive = kSlowOutputKeepalive;
    }
    const Communicator::Counters before = (*comm)->counters();
    const Communicator::Counters plane_before =
        plane != nullptr ? plane->counters() : Communicator::Counters{};
    const absl::StatusOr<ShardRunStats> result =
        CoordinateShardedRun(canceller, c.problem, run_options);
    const auto returned = std::chrono::steady_clock::now();
    timer.join();
    // "cancel_as_computed": before, the worker sent its output, rank 0 took it, and the run was
    // OK.
    RANK_CHECK(
        result.status().code() == absl::StatusCode::kCancelled && AnsweredInStep(result.status()),
        result.status().ToString());
    if (as_computed) {
      const int64_t received = (*comm)->counters().bytes_received - before.bytes_received;
      RANK_CHECK(received < 4096, "rank 0 received ", received, " bytes: the output came");
      return RunInStepAndShutDown(flags, **comm, next, nullptr);
    }
    const double tail_s =
        std::chrono::duration<double>(returned - canceller.cancelled_at()).count();
    std::fprintf(stderr, "rank 0: returned %.3f s after the cancel\n", tail_s);
    if (slow_output) {
      // The rest of worker 2's output came after the cancel (15 pieces, 150 ms late each).
      RANK_CHECK(tail_s > 1.0, "rank 0 took worker 2's output for only ", tail_s,
                 " s after the cancel: rank 1 waited for nothing");
    } else {
      // Rank 0's own compute stopped at once, and it took no output over the plane.
      RANK_CHECK(tail_s < 0.1, "rank 0 returned ", tail_s, " s after the cancel");
      const int64_t taken = plane->counters().bytes_received - plane_before.bytes_received;
      RANK_CHECK(taken == 0, "rank 0 took ", taken, " bytes of a cancelled request's output");
    }
    return RunInStepAndShutDown(flags, **comm, next, plane.get());
  }
  if (flags.scenario == "cancel" || flags.scenario == "plane_cancel") {
    // About a second of compute per rank (one thread each): one dense segment of 16384 tokens,
    // 4 heads of 64, two heads per rank. Cancelled 300 ms in, every rank stops within 100 ms.
    const ProblemShape shape{1, 16384, 4, 4, 64};
    AttentionSpec spec;
    spec.patterns = {{16384, 1}};
    spec.precision = engine::Precision::kFloat32;
    std::mt19937 rng(static_cast<uint32_t>(flags.seed));
    const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
    const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
    const OwnedTensor v = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
    OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
    std::atomic<bool> cancelled{false};
    ShardedProblem problem = Problem(q.view(), k.view(), v.view(), spec, out.mutable_view());
    problem.strategy = ShardPolicy::kHeads;
    problem.stop = &cancelled;
    problem.compute = compute;
    std::chrono::steady_clock::time_point cancelled_at;
    std::thread canceller([&] {
      std::this_thread::sleep_for(milliseconds(300));
      cancelled_at = std::chrono::steady_clock::now();
      cancelled = true;
    });
    const auto started = std::chrono::steady_clock::now();
    const absl::StatusOr<ShardRunStats> result =
        CoordinateShardedRun(**comm, problem, Options(nullptr, nullptr, plane.get()));
    const auto returned = std::chrono::steady_clock::now();
    canceller.join();
    RANK_CHECK(
        result.status().code() == absl::StatusCode::kCancelled && AnsweredInStep(result.status()),
        result.status().ToString());
    const double stop_ms =
        std::chrono::duration<double, std::milli>(returned - cancelled_at).count();
    std::fprintf(stderr, "rank 0: cancelled after %.0f ms, returned %.1f ms later\n",
                 std::chrono::duration<double, std::milli>(cancelled_at - started).count(),
                 stop_ms);
    RANK_CHECK(stop_ms < 100, "the group stopped ", stop_ms, " ms after the cancellation");
    // The group is still in step: a run after it is exact, to the byte of traffic.
    if (int bad =
            CoordinateCase(flags, **comm, SweepCases()[0], flags.seed, compute, plane.get())) {
      return bad;
    }
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, 1, kControlTag, kTimeout));
    return 0;
  }
  if (flags.scenario == "scatter_cancel") {
    // A request cancelled before its scatter (the flag is up from the start): each worker's first
    // piece word says so, and not one byte of a share is sent. HEADS first, where nothing else
    // moves; then SEQUENCE with a segment spanning every rank, where the workers still take part
    // in the exchange; then SEQUENCE cancelled in the middle of its scatter; then a run that
    // must be exact: the group stayed in step.
    const ProblemShape shape{1, 3000, 4, 4, 32};
    AttentionSpec spec;
    spec.patterns = {{500, 1}, {3000, 4}};
    spec.precision = engine::Precision::kFloat32;
    std::mt19937 rng(static_cast<uint32_t>(flags.seed));
    const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
    const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
    const OwnedTensor v = engine::testing::RandomTensor(DType::kFloat32, shape.KeyShape(), rng);
    std::atomic<bool> cancelled{true};
    const int64_t workers = flags.size - 1;
    // SEQUENCE: rank 0's kept rows of the segment that spans every rank, to each worker.
    const absl::StatusOr<engine::ShardLayout> layout =
        engine::MakeShardLayout(shape, spec, ShardPolicy::kSequence, flags.size);
    RANK_CHECK(layout.ok(), layout.status().ToString());
    int64_t exchange_rows = 0;
    for (const engine::SpanningKeys& set : engine::SpanningKeySets(shape, spec, *layout)) {
      for (int peer = 1; peer < flags.size; ++peer) {
        if (!engine::SendsRows(set, *layout, spec.causal, 0, peer)) continue;
        const auto [b, e] = engine::RowsOf(set, *layout, 0);
        exchange_rows += e - b;
      }
    }
    const int64_t exchange = exchange_rows * 2 * shape.head_dim * 4;
    for (ShardPolicy strategy : {ShardPolicy::kHeads, ShardPolicy::kSequence}) {
      OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
      ShardedProblem problem = Problem(q.view(), k.view(), v.view(), spec, out.mutable_view());
      problem.strategy = strategy;
      problem.stop = &cancelled;
      problem.compute = compute;
      const Communicator::Counters before = (*comm)->counters();
      const absl::StatusOr<ShardRunStats> result = CoordinateShardedRun(**comm, problem, Options());
      RANK_CHECK(result.status().code() == absl::StatusCode::kCancelled,
                 result.status().ToString());
      const int64_t sent = (*comm)->counters().bytes_sent - before.bytes_sent;
      const int64_t control = workers * (kControlFrameBytes + kPieceWordBytes + kStopWordBytes);
      if (strategy == ShardPolicy::kHeads) {
        RANK_CHECK(sent == control, "HEADS: rank 0 sent ", sent,
                   " bytes; frames, one piece word and one stop word per worker are ", control);
      } else {
        RANK_CHECK(exchange > 0 && sent == control + exchange, "SEQUENCE: rank 0 sent ", sent,
                   " bytes; control ", control, " and its exchange ", exchange, " are ",
                   control + exchange);
      }
    }
    {
      // Cancelled in the middle of the scatter: pieces of 64 KiB (128 rows), 8 per tensor of a
      // worker's share, and the flag raised once rank 0 has announced its 5th piece. Worker 1
      // gets 5 pieces and then a 0 word, worker 2 only a 0 word; both still exchange.
      std::atomic<bool> mid{false};
      CancelAfterPieceWords counting(**comm, &mid, 5);
      ShardRunOptions options = Options();
      options.scatter_piece_bytes = 64 << 10;
      OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
      ShardedProblem problem = Problem(q.view(), k.view(), v.view(), spec, out.mutable_view());
      problem.strategy = ShardPolicy::kSequence;
      problem.stop = &mid;
      problem.compute = compute;
      const Communicator::Counters before = (*comm)->counters();
      const absl::StatusOr<ShardRunStats> result = CoordinateShardedRun(counting, problem, options);
      RANK_CHECK(result.status().code() == absl::StatusCode::kCancelled,
                 result.status().ToString());
      const int64_t sent = (*comm)->counters().bytes_sent - before.bytes_sent;
      const int64_t expected = workers * (kControlFrameBytes + kStopWordBytes) +
                               (5 + 1 + 1) * kPieceWordBytes + 5 * (int64_t{64} << 10) + exchange;
      RANK_CHECK(sent == expected, "mid-scatter: rank 0 sent ", sent,
                 " bytes; frames, stop words, ", "7 piece words, 5 pieces and its exchange are ",
                 expected);
    }
    if (int bad = CoordinateCase(flags, **comm, SweepCases()[1], flags.seed, compute)) return bad;
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    for (int r = 1; r < flags.size; ++r) {
      RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, r, kControlTag, kTimeout));
    }
    return 0;
  }
  if (flags.scenario == "worker_budget" || flags.scenario == "plane_worker_budget") {
    // Rank 2's part of a SEQUENCE run with spanning segments is over its memory budget
    // (kTinyBudget, its first run only). Known to rank 0, the run is refused before any message;
    // not known, rank 2 refuses it in step, naming both numbers; then an exact run: the group
    // stayed in step.
    Case c = SweepCases()[0];
    c.strategy = ShardPolicy::kSequence;
    engine::testing::OwnedProblem p = engine::testing::RandomProblem(c.shape, 4);
    const ShardedProblem problem = SequenceProblem(c, p, compute);
    const absl::StatusOr<engine::ShardLayout> layout =
        engine::MakeShardLayout(c.shape, c.spec, c.strategy, flags.size);
    RANK_CHECK(layout.ok(), layout.status().ToString());
    const int64_t needs =
        RankRunBytes(c.shape, DType::kFloat32, DType::kFloat32, c.spec, *layout, 2);
    const std::string said = absl::StrCat("rank 2's part of this run needs ", needs,
                                          " bytes (its shares of q, k, v and the output, and the "
                                          "kept K/V rows it exchanges) but its memory budget is ",
                                          kTinyBudget, " bytes");
    ShardRunOptions known = Options(nullptr, nullptr, plane.get());
    known.rank_memory_budgets = {0, 0, kTinyBudget};
    const Communicator::Counters before = (*comm)->counters();
    const absl::StatusOr<ShardRunStats> refused = CoordinateShardedRun(**comm, problem, known);
    RANK_CHECK(refused.status().code() == absl::StatusCode::kResourceExhausted &&
                   refused.status().message().find(said) != std::string::npos,
               refused.status().ToString());
    RANK_CHECK((*comm)->counters().bytes_sent == before.bytes_sent &&
                   (plane == nullptr || plane->counters().bytes_sent == 0),
               "rank 0 sent ", (*comm)->counters().bytes_sent - before.bytes_sent,
               " bytes for a run it refused");
    // Pieces of 4 KiB: the refusing worker takes its share in many pieces into one scratch piece.
    ShardRunOptions unknown = Options(nullptr, nullptr, plane.get());
    unknown.scatter_piece_bytes = 4096;
    const absl::StatusOr<ShardRunStats> answered = CoordinateShardedRun(**comm, problem, unknown);
    RANK_CHECK(answered.status().code() == absl::StatusCode::kResourceExhausted &&
                   AnsweredInStep(answered.status()) &&
                   answered.status().message().find(said) != std::string::npos,
               answered.status().ToString());
    std::fprintf(stderr, "rank 0: %s\n", answered.status().ToString().c_str());
    if (int bad = CoordinateCase(flags, **comm, c, flags.seed, compute, plane.get())) return bad;
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    for (int r = 1; r < flags.size; ++r) {
      RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, r, kControlTag, kTimeout));
    }
    return 0;
  }
  if (flags.scenario == "plane_worker_fails") {
    // A run over a data plane that rank 2 cannot compute (FailsFirstShare) and rank 1 can
    // (checked on the workers' side), then an exact run: the group stayed in step.
    Case c = SweepCases()[0];
    c.strategy = ShardPolicy::kSequence;
    engine::testing::OwnedProblem p = engine::testing::RandomProblem(c.shape, 4);
    const ShardedProblem problem = SequenceProblem(c, p, compute);
    const absl::StatusOr<ShardRunStats> failed =
        CoordinateShardedRun(**comm, problem, Options(nullptr, nullptr, plane.get()));
    RANK_CHECK(failed.status().code() == absl::StatusCode::kInvalidArgument &&
                   failed.status().message().find("rank 2 failed") != std::string::npos,
               failed.status().ToString());
    if (int bad = CoordinateCase(flags, **comm, c, flags.seed, compute, plane.get())) return bad;
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    for (int r = 1; r < flags.size; ++r) {
      RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, r, kControlTag, kTimeout));
    }
    return 0;
  }
  if (flags.scenario == "worker_fails") {
    // A bf16 run the workers cannot compute: rank 0 hears which rank failed and the group stays
    // usable for the next run. On a CPU without AVX512-BF16 rank 0 cannot compute it either; its
    // error then names both ranks.
    Case c = SweepCases()[0];
    OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, c.shape.QueryShape());
    std::mt19937 rng(3);
    const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, c.shape.QueryShape(), rng);
    const OwnedTensor k = engine::testing::RandomTensor(DType::kFloat32, c.shape.KeyShape(), rng);
    ShardedProblem problem = Problem(q.view(), k.view(), k.view(), c.spec, out.mutable_view());
    problem.strategy = ShardPolicy::kSequence;
    problem.precision = engine::Precision::kBFloat16;
    problem.compute = compute;
    absl::StatusOr<ShardRunStats> failed = CoordinateShardedRun(**comm, problem, Options());
    // (A rank 0 that cannot compute it either names its own failure too, unless rank 1's came
    // first and stopped it before it began.)
    RANK_CHECK(failed.status().code() == absl::StatusCode::kInvalidArgument &&
                   AnsweredInStep(failed.status()) &&
                   failed.status().message().find("rank 1 failed") != std::string::npos,
               failed.status().ToString());
    std::fprintf(stderr, "rank 0: %s\n", failed.status().ToString().c_str());
    c.strategy = ShardPolicy::kSequence;
    if (int bad = CoordinateCase(flags, **comm, c, flags.seed, compute)) return bad;
    const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
    RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, 1, kControlTag, kTimeout));
    return 0;
  }
  std::vector<Case> cases =
      flags.scenario == "volume" ? std::vector<Case>{VolumeCase()} : SweepCases();
  const Communicator::Counters control_before = (*comm)->counters();
  int64_t runs = 0, piece_words = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (cases[i].strategy == ShardPolicy::kHeads && cases[i].shape.heads < flags.size) continue;
    if (int failed = CoordinateCase(flags, **comm, cases[i], flags.seed + i, compute, plane.get(),
                                    &piece_words)) {
      return failed;
    }
    ++runs;
  }
  if (plane != nullptr && flags.size > 1) {
    // The control communicator carried the frames, piece words, stop words, output words and
    // stats, the plane the rest.
    const Communicator::Counters control = (*comm)->counters();
    const int64_t workers = flags.size - 1;
    RANK_CHECK(piece_words > runs * workers * 3 * kPieceWordBytes,
               "the shares went in one piece each: ", piece_words, " bytes of piece words");
    RANK_CHECK(
        control.bytes_sent - control_before.bytes_sent ==
            runs * workers * (kControlFrameBytes + kStopWordBytes + kOutputWordBytes) + piece_words,
        "rank 0 sent ", control.bytes_sent - control_before.bytes_sent, " bytes of control for ",
        runs, " runs");
    RANK_CHECK(
        control.bytes_received - control_before.bytes_received == runs * workers * kStatsFrameBytes,
        "rank 0 received ", control.bytes_received - control_before.bytes_received,
        " bytes of control for ", runs, " runs");
    RANK_CHECK(plane->counters().bytes_sent > 0 && plane->counters().bytes_received > 0,
               "nothing crossed the data plane");
  }
  const std::string shutdown = EncodeControlFrame({ControlKind::kShutdown, ""});
  for (int r = 1; r < flags.size; ++r) {
    RANK_CHECK_OK((*comm)->Send(shutdown.data(), kControlFrameBytes, r, kControlTag, kTimeout));
  }
  std::fprintf(stderr, "rank 0: %zu cases on %d ranks match the single process\n", cases.size(),
               flags.size);
  return 0;
}

class ShardedRunTest : public ::testing::TestWithParam<int> {};

TEST_P(ShardedRunTest, EveryCaseEqualsTheSingleProcessOutputAndMovesOnlyWhatItMust) {
  testing::RankGroup group(GetParam(), "sweep");
  for (int rank = 0; rank < GetParam(); ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

INSTANTIATE_TEST_SUITE_P(Ranks, ShardedRunTest, ::testing::Values(1, 2, 3, 4));

class ShardedRunDataPlaneTest : public ::testing::TestWithParam<int> {};

TEST_P(ShardedRunDataPlaneTest, EveryCaseEqualsTheSingleProcessOutputWithTheBulkOnAPlane) {
  testing::RankGroup group(GetParam(), "plane");
  for (int rank = 0; rank < GetParam(); ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

INSTANTIATE_TEST_SUITE_P(Ranks, ShardedRunDataPlaneTest, ::testing::Values(2, 3, 4));

TEST(ShardedRunDataPlaneTest, EveryCaseEqualsTheSingleProcessOutputThroughAStagedPlane) {
  testing::RankGroup group(3, "plane_staged");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, ACancelledRequestStopsEveryRankWithin100MsAndTheGroupGoesOn) {
  testing::RankGroup group(2, "plane_cancel");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, AWorkerWaitsForARank0ThatComputesLongerThanATimeout) {
  testing::RankGroup group(2, "plane_slow_root");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, AWorkerWhoseRank0IsLostLeavesAtOnce) {
  testing::RankGroup group(2, "plane_root_lost");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, APlaneThatFailsOnRank0EndsTheRunOnEveryRankAtOnce) {
  testing::RankGroup group(3, "plane_fails_at_0");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, APlaneThatFailsOnAWorkerEndsTheRunOnEveryRankAtOnce) {
  testing::RankGroup group(3, "plane_fails_at_2");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, AWorkerThatComputedIsAnsweredAtOnceWhenAnotherFails) {
  testing::RankGroup group(3, "plane_worker_fails");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunCancelTest, ARequestCancelledBeforeOrDuringItsScatterSendsNoMoreAndTheGroupGoesOn) {
  testing::RankGroup group(3, "scatter_cancel");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunVolumeTest, ExchangeIsTheSpanningSegmentsKeptKeysAndValues) {
  testing::RankGroup group(2, "volume");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunFailureTest, AWorkerThatCannotComputeIsNamedAndTheGroupGoesOn) {
  testing::RankGroup group(2, "worker_fails");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunFailureTest, APartOverAWorkersMemoryBudgetIsRefusedAndTheGroupGoesOn) {
  testing::RankGroup group(3, "worker_budget");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, APartOverAWorkersMemoryBudgetIsRefusedAndTheGroupGoesOn) {
  testing::RankGroup group(3, "plane_worker_budget");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunFailureTest, ALostWorkerStopsTheOthersAtOnce) {
  testing::RankGroup group(3, "worker_lost");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunFailureTest, AWorkerWhoseRank0IsLostStopsComputing) {
  testing::RankGroup group(2, "root_lost");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunTest, AScatterLongerThanATimeoutRuns) {
  testing::RankGroup group(3, "slow_scatter");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, AScatterLongerThanATimeoutRuns) {
  testing::RankGroup group(3, "plane_slow_scatter");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunCancelTest, WorkersThatLeftACancelledRunAreKeptWhileRank0TakesOtherOutputs) {
  testing::RankGroup group(3, "cancel_slow_output");
  for (int rank = 0; rank < 3; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunCancelTest, AWorkerWhoseComputeEndsAsTheStopComesSendsNoOutput) {
  testing::RankGroup group(2, "cancel_as_computed");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunDataPlaneTest, ACancelAfterTheWorkersAnsweredStopsRank0Within100MsAndTakesNoOutput) {
  testing::RankGroup group(2, "plane_cancel_late");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ShardedRunCancelTest, ACancelledRequestStopsEveryRankWithin100MsAndTheGroupGoesOn) {
  testing::RankGroup group(2, "cancel");
  for (int rank = 0; rank < 2; ++rank) EXPECT_EQ(group.Wait(rank), 0) << "rank " << rank;
}

TEST(ControlFrameTest, RoundTripsAndRefusesDamage) {
  const std::string bytes = EncodeControlFrame({ControlKind::kRun, "payload"});
  ASSERT_EQ(static_cast<int64_t>(bytes.size()), kControlFrameBytes);
  absl::StatusOr<ControlFrame> frame = DecodeControlFrame(bytes);
  ASSERT_TRUE(frame.ok()) << frame.status();
  EXPECT_EQ(frame->kind, ControlKind::kRun);
  EXPECT_EQ(frame->payload, "payload");
  EXPECT_FALSE(DecodeControlFrame(bytes.substr(1)).ok());
  std::string damaged = bytes;
  damaged[0] ^= 1;
  EXPECT_FALSE(DecodeControlFrame(damaged).ok());
  damaged = bytes;
  damaged[4] = 9;  // Kind.
  EXPECT_FALSE(DecodeControlFrame(damaged).ok());
}

// A communicator that moves nothing, with the capabilities it is given: for the refusals that
// happen before any message.
struct NoComm : Communicator {
  Capabilities can{.concurrent_calls = true, .tagged_messages = true};
  int rank_ = 1;
  int rank() const override { return rank_; }
  int size() const override { return 2; }
  std::string backend() const override { return "none"; }
  Capabilities capabilities() const override { return can; }
  absl::Status AllGather(const void*, void*, int64_t, milliseconds) override { return {}; }
  absl::Status Broadcast(void*, int64_t, int, milliseconds) override { return {}; }
  absl::Status Send(const void*, int64_t, int, int, milliseconds) override { return {}; }
  absl::Status Recv(void*, int64_t, int, int, milliseconds) override { return {}; }
  absl::Status Barrier(milliseconds) override { return {}; }
  Counters counters() const override { return {}; }
};

TEST(ShardedRunTest, ServeRefusesAFrameThatIsNotARun) {
  NoComm comm;
  EXPECT_EQ(ServeShardedRun(comm, {ControlKind::kHeartbeat, ""}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  const absl::Status refused = ServeShardedRun(comm, {ControlKind::kRun, "short"}, {}).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  // Refused before the run began: not an answer, so a serving worker leaves the group on it.
  EXPECT_FALSE(AnsweredInStep(refused));
  EXPECT_FALSE(AnsweredInStep(absl::OkStatus()));
}

// The protocol runs threads side by side on one communicator and tells its messages apart by
// tag; a communicator that allows neither (NCCL's contract) is refused by both sides up front.
TEST(ShardedRunTest, BothSidesRefuseACommunicatorWithoutConcurrencyOrTags) {
  NoComm nccl_like;
  nccl_like.can = {.concurrent_calls = false, .tagged_messages = false};
  const absl::Status served = ServeShardedRun(nccl_like, {ControlKind::kRun, "short"}, {}).status();
  EXPECT_EQ(served.code(), absl::StatusCode::kFailedPrecondition) << served;
  EXPECT_NE(served.message().find("one thread at a time"), std::string::npos) << served;
  nccl_like.rank_ = 0;
  std::mt19937 rng(1);
  const engine::ProblemShape shape{1, 64, 2, 2, 8};
  const OwnedTensor q = engine::testing::RandomTensor(DType::kFloat32, shape.QueryShape(), rng);
  OwnedTensor out = engine::testing::PoisonedTensor(DType::kFloat32, shape.QueryShape());
  AttentionSpec spec;
  spec.patterns = {{32, 1}};
  const absl::Status coordinated =
      CoordinateShardedRun(
          nccl_like, Problem(q.view(), q.view(), q.view(), spec, out.mutable_view()), Options())
          .status();
  EXPECT_EQ(coordinated.code(), absl::StatusCode::kFailedPrecondition) << coordinated;
  EXPECT_NE(coordinated.message().find("in issue order only"), std::string::npos) << coordinated;
  // Gloo's capabilities are the ones the protocol needs (its runs are the sweep above).
  nccl_like.can = {.concurrent_calls = true, .tagged_messages = false};
  EXPECT_EQ(ServeShardedRun(nccl_like, {ControlKind::kRun, "short"}, {}).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace da::dist

int main(int argc, char** argv) {
  return da::dist::testing::RankOrTestMain(argc, argv, da::dist::RunRank);
}
