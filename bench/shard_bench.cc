// da-shard-bench: one problem computed by W ranks (real processes, Gloo on loopback) against one
// process with the same total thread count, in one run, after checking that the sharded output
// equals the single-process output. Also prints the SEQUENCE exchange per token, measured.
//
//   da-shard-bench --world-size 2 --seq-len 65536 --heads 8 --head-dim 64
//                  --segments 2048,4096,8192 --dilations 1,2,4 --strategy sequence --repeat 5
//   da-shard-bench --geometry-only --seq-len 1048576 ...   # exchange bytes/token, no compute
//
// Units: times are wall seconds of one whole request (rank 0: control, scatter, exchange,
// compute, gather); the single process runs the CPU backend on a warm plan with
// world_size * threads_per_rank threads. Exchange bytes are the kept K/V rows received in the
// SEQUENCE exchange by all ranks together (nothing else is counted there); per token = / N.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/median.h"
#include "bench/problem_flags.h"
#include "engine/backend.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/dist/gloo_communicator.h"
#include "engine/dist/multi_process_test_util.h"
#include "engine/dist/sharded_run.h"
#include "engine/shard_plan.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::bench {
namespace {

using Clock = std::chrono::steady_clock;
using engine::DType;
using std::chrono::milliseconds;

constexpr milliseconds kTimeout{600000};

struct Options : ProblemFlags {
  Options() {
    seq_len = 65536;
    segments = {2048, 4096, 8192};
    dilations = {1, 2, 4};
  }
  int world_size = 2, threads_per_rank = 1, repeat = 5;
  std::string strategy = "sequence";
  bool geometry_only = false;
};

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The worker side: join, then serve runs until shut down.
int RunWorker(const dist::testing::RankFlags& flags) {
  auto store = dist::ConnectCoordinatorStore(flags.coordinator, milliseconds(10000));
  if (!store.ok()) return 2;
  dist::GlooOptions gloo{flags.rank, flags.size, "127.0.0.1", flags.prefix, milliseconds(60000)};
  auto comm = dist::MakeGlooCommunicator(**store, gloo);
  if (!comm.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", flags.rank, comm.status().ToString().c_str());
    return 2;
  }
  engine::ThreadPool pool(static_cast<int>(flags.seed));  // --seed carries the thread count.
  engine::CpuBackend backend;
  engine::PlanCache plans(int64_t{1} << 30);
  dist::RankBuffers buffers;
  dist::ShardRunOptions run_options;
  run_options.timeout = kTimeout;
  run_options.compute = {&backend, &plans, &pool};
  run_options.buffers = &buffers;
  while (true) {
    std::string frame(dist::kControlFrameBytes, '\0');
    absl::Status got =
        (*comm)->Recv(frame.data(), dist::kControlFrameBytes, 0, dist::kControlTag, kTimeout);
    absl::StatusOr<dist::ControlFrame> control =
        got.ok() ? dist::DecodeControlFrame(frame) : absl::StatusOr<dist::ControlFrame>(got);
    if (!control.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", flags.rank, control.status().ToString().c_str());
      return 2;
    }
    if (control->kind == dist::ControlKind::kShutdown) return 0;
    auto served = dist::ServeShardedRun(**comm, *control, run_options);
    if (!served.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", flags.rank, served.status().ToString().c_str());
      return 2;
    }
  }
}

// The flags' spec, fp32, with the chosen strategy.
absl::StatusOr<engine::AttentionSpec> SpecOf(Options& o) {
  DA_ASSIGN_OR_RETURN(engine::AttentionSpec spec, o.ResolveSpec());
  spec.precision = engine::Precision::kFloat32;
  spec.shard_policy =
      o.strategy == "heads"
          ? engine::ShardPolicy::kHeads
          : (o.strategy == "auto" ? engine::ShardPolicy::kAuto : engine::ShardPolicy::kSequence);
  return spec;
}

void PrintGeometry(const Options& o, const engine::ProblemShape& shape,
                   const engine::AttentionSpec& spec) {
  for (int world : {2, 4, 8, 16}) {
    auto layout = engine::MakeShardLayout(shape, spec, engine::ShardPolicy::kSequence, world);
    if (!layout.ok()) continue;
    int64_t bytes = 0;
    for (int r = 0; r < world; ++r) {
      bytes += engine::ExchangeBytesReceived(shape, spec, *layout, DType::kFloat32, r);
    }
    const double kv_bytes = 2.0 * static_cast<double>(shape.KeyShape().elements()) * 4;
    std::printf(
        "geometry  W=%-2d N=%lld: exchange %.3f MiB in all, %.2f bytes/token (%.4f of "
        "the K/V)\n",
        world, static_cast<long long>(o.seq_len), static_cast<double>(bytes) / (1 << 20),
        static_cast<double>(bytes) / static_cast<double>(o.seq_len * o.batch),
        static_cast<double>(bytes) / kv_bytes);
  }
}

std::vector<float> Random(int64_t elements, std::mt19937& rng) {
  std::vector<float> v(elements);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (float& x : v) x = uniform(rng);
  return v;
}

int Main(int argc, char** argv) {
  if (auto flags = dist::testing::ParseRankFlags(argc, argv)) return RunWorker(*flags);
  Options o;
  CLI::App app{"da-shard-bench: W ranks over Gloo against one process, checked, then timed"};
  app.add_option("--world-size", o.world_size)->check(CLI::Range(1, 64));
  app.add_option("--threads-per-rank", o.threads_per_rank)->check(CLI::Range(1, 256));
  app.add_option("--repeat", o.repeat)->check(CLI::PositiveNumber);
  o.AddTo(app);
  app.add_option("--strategy", o.strategy)->check(CLI::IsMember({"auto", "heads", "sequence"}));
  app.add_flag("--geometry-only", o.geometry_only,
               "Print the SEQUENCE exchange for W = 2, 4, 8, 16 from the geometry; no compute");
  CLI11_PARSE(app, argc, argv);
  const absl::StatusOr<engine::AttentionSpec> resolved = SpecOf(o);
  if (!resolved.ok()) {
    std::fprintf(stderr, "da-shard-bench: %s\n", std::string(resolved.status().message()).c_str());
    return 2;
  }
  const engine::AttentionSpec& spec = *resolved;
  const engine::ProblemShape shape{o.batch, o.seq_len, o.heads, o.kv_heads, o.head_dim};
  if (absl::Status valid = spec.Validate(); !valid.ok()) {
    std::fprintf(stderr, "%s\n", valid.ToString().c_str());
    return 1;
  }
  PrintGeometry(o, shape, spec);
  if (o.geometry_only) return 0;

  // The group: a store here, W - 1 worker processes, and this process as rank 0.
  auto server = dist::CoordinatorStoreServer::Start("127.0.0.1:0");
  if (!server.ok()) return 1;
  dist::testing::RankFlags flags;
  flags.size = o.world_size;
  flags.coordinator = absl::StrCat("127.0.0.1:", (*server)->port());
  flags.prefix = dist::testing::UniquePrefix("shard-bench");
  flags.seed = static_cast<uint64_t>(o.threads_per_rank);
  std::vector<pid_t> workers;
  for (int r = 1; r < o.world_size; ++r) {
    flags.rank = r;
    workers.push_back(dist::testing::SpawnRank(flags));
  }
  auto store = dist::ConnectCoordinatorStore(flags.coordinator, milliseconds(10000));
  if (!store.ok()) return 1;
  auto comm = dist::MakeGlooCommunicator(
      **store, {0, o.world_size, "127.0.0.1", flags.prefix, milliseconds(60000)});
  if (!comm.ok()) {
    std::fprintf(stderr, "%s\n", comm.status().ToString().c_str());
    return 1;
  }

  std::mt19937 rng(1);
  std::vector<float> q = Random(shape.QueryShape().elements(), rng);
  std::vector<float> k = Random(shape.KeyShape().elements(), rng);
  std::vector<float> v = Random(shape.KeyShape().elements(), rng);
  std::vector<float> single(q.size()), sharded(q.size());
  const engine::TensorView qv{DType::kFloat32, shape.QueryShape(), q.data(),
                              static_cast<int64_t>(q.size() * 4)};
  const engine::TensorView kv{DType::kFloat32, shape.KeyShape(), k.data(),
                              static_cast<int64_t>(k.size() * 4)};
  const engine::TensorView vv{DType::kFloat32, shape.KeyShape(), v.data(),
                              static_cast<int64_t>(v.size() * 4)};
  const auto out_view = [&](std::vector<float>& out) {
    return engine::MutableTensorView{DType::kFloat32, shape.QueryShape(), out.data(),
                                     static_cast<int64_t>(out.size() * 4)};
  };

  // One process with every thread, on a warm plan (built before timing).
  const int total_threads = o.world_size * o.threads_per_rank;
  engine::ThreadPool single_pool(total_threads);
  engine::CpuBackend backend;
  const engine::PlanKey key = engine::MakePlanKey(
      qv, kv, DType::kFloat32, spec, engine::Precision::kFloat32, "cpu:0", total_threads);
  auto plan = backend.BuildPlan(key, /*stop=*/nullptr);
  if (!plan.ok()) return 1;
  // Rank 0 of the group.
  engine::ThreadPool rank_pool(o.threads_per_rank);
  engine::CpuBackend rank_backend;
  engine::PlanCache rank_plans(int64_t{1} << 30);
  dist::RankBuffers buffers;
  auto strategy =
      engine::ChooseShardStrategy(shape, DType::kFloat32, DType::kFloat32, spec, o.world_size, 0);
  if (!strategy.ok()) {
    std::fprintf(stderr, "%s\n", strategy.status().ToString().c_str());
    return 1;
  }
  engine::ShardedProblem problem;
  problem.q = qv;
  problem.k = kv;
  problem.v = vv;
  problem.spec = spec;
  problem.out = out_view(sharded);
  problem.strategy = *strategy;
  problem.compute = {&rank_backend, &rank_plans, &rank_pool};

  dist::ShardRunOptions coordinate_options;
  coordinate_options.timeout = kTimeout;
  coordinate_options.buffers = &buffers;

  std::vector<double> single_s, sharded_s;
  dist::ShardRunStats last;
  for (int i = 0; i <= o.repeat; ++i) {  // Run 0 warms both up and is checked, not timed.
    Clock::time_point start = Clock::now();
    absl::Status ran =
        backend.RunPlan(**plan, qv, kv, vv, spec, out_view(single), {&single_pool, nullptr});
    const double single_time = Seconds(start);
    start = Clock::now();
    auto stats = dist::CoordinateShardedRun(**comm, problem, coordinate_options);
    const double sharded_time = Seconds(start);
    if (!ran.ok() || !stats.ok()) {
      std::fprintf(stderr, "run failed: %s / %s\n", ran.ToString().c_str(),
                   stats.status().ToString().c_str());
      return 1;
    }
    if (i == 0) {
      // std::max drops a NaN, so non-finite values are counted apart and fail the check.
      double max_abs = 0, max_diff = 0;
      int64_t non_finite = 0;
      for (size_t j = 0; j < single.size(); ++j) {
        if (!std::isfinite(single[j]) || !std::isfinite(sharded[j])) {
          ++non_finite;
          continue;
        }
        max_abs = std::max(max_abs, static_cast<double>(std::fabs(single[j])));
        max_diff = std::max(max_diff, static_cast<double>(std::fabs(sharded[j] - single[j])));
      }
      const bool same = non_finite == 0 && max_diff <= 1e-6 * max_abs;
      std::printf(
          "check     sharded vs single process: max |diff| %.3g (max |out| %.3g), non-finite "
          "values %lld: %s\n",
          max_diff, max_abs, static_cast<long long>(non_finite), same ? "OK" : "FAILED");
      if (!same) return 1;
      continue;
    }
    single_s.push_back(single_time);
    sharded_s.push_back(sharded_time);
    last = *stats;
  }
  const std::string shutdown = dist::EncodeControlFrame({dist::ControlKind::kShutdown, ""});
  for (int r = 1; r < o.world_size; ++r) {
    (void)(*comm)->Send(shutdown.data(), dist::kControlFrameBytes, r, dist::kControlTag, kTimeout);
  }
  for (pid_t pid : workers) dist::testing::WaitForExit(pid, milliseconds(10000));

  std::printf("problem   B=%lld N=%lld H=%lld Hkv=%lld D=%lld patterns %s %s%s, strategy %s\n",
              static_cast<long long>(o.batch), static_cast<long long>(o.seq_len),
              static_cast<long long>(o.heads), static_cast<long long>(o.kv_heads),
              static_cast<long long>(o.head_dim), spec.PatternsToString().c_str(), o.mode.c_str(),
              o.causal ? " causal" : "", engine::ShardPolicyName(*strategy).c_str());
  std::printf("single    1 process x %d threads: best %.4f s, median %.4f s\n", total_threads,
              *std::min_element(single_s.begin(), single_s.end()), Median(single_s));
  std::printf("sharded   %d ranks x %d threads:  best %.4f s, median %.4f s\n", o.world_size,
              o.threads_per_rank, *std::min_element(sharded_s.begin(), sharded_s.end()),
              Median(sharded_s));
  std::printf("ratio     sharded / single: best %.3f, median %.3f\n",
              *std::min_element(sharded_s.begin(), sharded_s.end()) /
                  *std::min_element(single_s.begin(), single_s.end()),
              Median(sharded_s) / Median(single_s));
  int64_t exchange = 0;
  for (size_t r = 0; r < last.ranks.size(); ++r) {
    const dist::ShardRunStats::Rank& s = last.ranks[r];
    exchange += s.exchange_bytes;
    std::printf(
        "rank %zu    compute %.4f s, communication %.4f s, sent %lld B, received %lld B "
        "(exchange %lld B)\n",
        r, s.compute_seconds, s.collective_seconds, static_cast<long long>(s.bytes_sent),
        static_cast<long long>(s.bytes_received), static_cast<long long>(s.exchange_bytes));
  }
  std::printf("exchange  %lld bytes in all, %.2f bytes/token (measured)\n",
              static_cast<long long>(exchange),
              static_cast<double>(exchange) / static_cast<double>(o.seq_len * o.batch));
  return 0;
}

}  // namespace
}  // namespace da::bench

int main(int argc, char** argv) { return da::bench::Main(argc, argv); }
