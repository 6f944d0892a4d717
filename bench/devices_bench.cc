// da-devices-bench: the same threads as one CPU device against N CPU devices (--devices N),
// in one run: one large request (sharded across the N devices by AUTO placement) and a burst of
// small concurrent requests (each placed on one device). After the timed runs, the large
// request's last output on N devices is checked against one device's (a failed check prints no
// times); the burst's outputs are not checked.
//
//   da-devices-bench --threads 2 --devices 2 --large-seq 16384 --small-count 48 --repeat 5
//                    [--large-policy auto|heads|sequence] [--small-seq 2048]
//
// Prints, per engine, the median wall time of the large request and of the whole burst, and the
// ratios one-device / N-devices (above 1: the N devices are faster).
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "bench/median.h"
#include "engine/engine.h"
#include "engine/test_tensors.h"

namespace da::bench {
namespace {

using engine::DType;
using engine::Engine;
using engine::ExecutionInfo;
using engine::testing::OwnedTensor;
using Clock = std::chrono::steady_clock;

struct Options {
  int threads = 2;
  int devices = 2;
  int64_t large_seq = 16384;
  int small_count = 48;
  int64_t small_seq = 2048;
  int repeat = 5;
  std::string large_policy = "auto";
};

using Problem = engine::testing::OwnedProblem;

Problem MakeProblem(int64_t seq, int64_t heads, uint32_t seed) {
  Problem p = engine::testing::RandomProblem({1, seq, heads, heads, 64}, seed);
  p.spec.patterns = {{2048, 1}, {4096, 2}, {8192, 4}};
  p.spec.shard_policy = engine::ShardPolicy::kAuto;
  return p;
}

struct Figures {
  double large_s = 0, burst_s = 0;
  std::string large_devices, large_strategy;
};

int Run(const Options& o) {
  std::vector<Figures> figures;
  std::vector<OwnedTensor> large_outputs;
  for (const int devices : {1, o.devices}) {
    engine::EngineOptions options;
    options.threads = o.threads;
    options.cpu_devices = devices;
    auto created = Engine::Create(options);
    if (!created.ok()) {
      std::fprintf(stderr, "%s\n", created.status().ToString().c_str());
      return 1;
    }
    Engine& e = **created;
    Figures f;
    // The large request: warm once (plans), then timed.
    Problem large = MakeProblem(o.large_seq, 8, 7);
    large.spec.shard_policy = o.large_policy == "heads"      ? engine::ShardPolicy::kHeads
                              : o.large_policy == "sequence" ? engine::ShardPolicy::kSequence
                                                             : engine::ShardPolicy::kAuto;
    std::vector<double> times;
    for (int i = 0; i <= o.repeat; ++i) {
      const Clock::time_point start = Clock::now();
      absl::StatusOr<ExecutionInfo> info = e.Run(large.Request());
      const double s = std::chrono::duration<double>(Clock::now() - start).count();
      if (!info.ok()) {
        std::fprintf(stderr, "large: %s\n", info.status().ToString().c_str());
        return 1;
      }
      if (i > 0) times.push_back(s);
      f.large_devices = std::to_string(info->devices.size());
      f.large_strategy = engine::ShardPolicyName(info->shard_strategy);
    }
    f.large_s = Median(times);
    large_outputs.push_back(std::move(large.out));

    // The burst: small_count requests submitted at once, timed until the last one is done.
    std::vector<Problem> small;
    for (int i = 0; i < o.small_count; ++i) {
      small.push_back(MakeProblem(o.small_seq, 4, 100 + i));
      small.back().spec.patterns = {{512, 1}, {1024, 2}, {2048, 4}};
    }
    times.clear();
    for (int round = 0; round <= o.repeat; ++round) {
      std::mutex mu;
      std::condition_variable cv;
      int left = o.small_count;
      bool failed = false;
      const Clock::time_point start = Clock::now();
      for (Problem& p : small) {
        e.Submit(p.Request(), [&](absl::StatusOr<ExecutionInfo> info) {
          std::lock_guard<std::mutex> lock(mu);
          failed = failed || !info.ok();
          if (--left == 0) cv.notify_all();
        });
      }
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return left == 0; });
      const double s = std::chrono::duration<double>(Clock::now() - start).count();
      if (failed) {
        std::fprintf(stderr, "a small request failed (queue too short for the burst?)\n");
        return 1;
      }
      if (round > 0) times.push_back(s);
    }
    f.burst_s = Median(times);
    figures.push_back(f);
  }
  const double diff = engine::testing::MaxRelativeError(large_outputs[1], large_outputs[0]);
  std::printf(
      "check (after timing; the burst is not checked): the large request on %d devices against "
      "one device: max diff %.3g of the largest value\n",
      o.devices, diff);
  if (!(diff <= 1e-6)) return 1;
  std::printf("%-10s %28s %28s\n", "engine", "large request (median s)", "small burst (median s)");
  for (size_t i = 0; i < figures.size(); ++i) {
    const Figures& f = figures[i];
    std::printf("%d device%s %14.4f (%s on %s)%*s %14.4f (%d x seq %lld)\n", i == 0 ? 1 : o.devices,
                i == 0 ? " " : "s", f.large_s, f.large_strategy.c_str(), f.large_devices.c_str(), 4,
                "", f.burst_s, o.small_count, static_cast<long long>(o.small_seq));
  }
  std::printf("one device / %d devices: large %.3fx, burst %.3fx\n", o.devices,
              figures[0].large_s / figures[1].large_s, figures[0].burst_s / figures[1].burst_s);
  return 0;
}

}  // namespace
}  // namespace da::bench

int main(int argc, char** argv) {
  da::bench::Options o;
  CLI::App app{"da-devices-bench: one CPU device against N, same threads"};
  app.add_option("--threads", o.threads, "Compute threads of both engines")->capture_default_str();
  app.add_option("--devices", o.devices, "CPU devices of the second engine")
      ->capture_default_str()
      ->check(CLI::Range(2, 64));
  app.add_option("--large-seq", o.large_seq, "Tokens of the large request (8 heads of 64)")
      ->capture_default_str();
  app.add_option("--small-count", o.small_count, "Requests in the burst")->capture_default_str();
  app.add_option("--small-seq", o.small_seq, "Tokens of each small request (4 heads of 64)")
      ->capture_default_str();
  app.add_option("--repeat", o.repeat, "Timed runs (after one warm-up)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--large-policy", o.large_policy, "Shard policy of the large request")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "heads", "sequence"}));
  CLI11_PARSE(app, argc, argv);
  return da::bench::Run(o);
}
