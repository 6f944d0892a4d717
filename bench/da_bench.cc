// da-bench: times the engine on one problem, after checking its output against the fp64
// reference, and prints the figures next to peaks measured in the same run.
//
//   da-bench --seq-len 65536 --heads 8 --head-dim 64 --segments 2048,4096,8192
//            --dilations 1,2,4 --mode grouped --threads 2 --repeat 5
//
// FLOPs are counted as the attention needs them: 4 * m^2 * D per segment and head for m kept
// positions (2 * m * (m + 1) * D when causal: only the computed, unmasked part). Check: the whole
// output when the reference costs little, otherwise the last row and a random sample of rows
// (--check-rows).
// Peaks: short samples of a throughput loop before, between and after the timed runs, the best
// kept (bench/peak.h), on the vector unit of the path that ran: ymm FMAs when DA_CPU_ISA=avx2
// forces the AVX2 kernel on an AVX-512 machine; for bf16 precision, bf16 dot products or AMX tile
// products, whichever kernel ran (DA_CPU_BF16=avx512_bf16 forces the dot products on an AMX CPU).
// On a GPU: the cuBLAS GEMM rate in the precision the engine computed in; fp8 runs are held
// against the bf16 GEMM rate (no fp8 GEMM is sampled), so their ratio is not to an fp8 peak.
// Medians of an even count are the mean of the two middle values (bench/median.h).
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/gpu_peak.h"
#include "bench/median.h"
#include "bench/peak.h"
#include "bench/problem_flags.h"
#include "engine/cpu/attention_kernel.h"
#include "engine/dilation.h"
#include "engine/engine.h"
#include "engine/reference/reference_backend.h"

namespace da::bench {
namespace {

using engine::DType;
using engine::Shape4;

struct Options : ProblemFlags {
  std::string dtype = "fp32", precision = "auto", device;
  bool json = false;
  int threads = 0, repeat = 5, check_rows = 64;
  uint32_t seed = 1;
};

double AttentionFlops(const Options& o, const engine::AttentionSpec& spec) {
  double flops = 0.0;
  const auto work = engine::AssignHeadPatterns(o.heads, spec);
  for (int64_t h = 0; h < o.heads; ++h) {
    for (const engine::HeadWork& hw : work[h]) {
      for (int64_t t = 0; t < engine::NumSegments(o.seq_len, hw.pattern.segment_len); ++t) {
        const double m = engine::KeptPositions(hw.pattern, hw.offset, o.seq_len, t).count;
        flops += spec.causal ? 2.0 * m * (m + 1) * o.head_dim : 4.0 * m * m * o.head_dim;
      }
    }
  }
  return flops * o.batch;
}

// Uniform in [-1, 1), filled by up to 16 threads, each its own stream seeded from rng (a GPU
// problem's inputs run to gigabytes).
std::vector<uint8_t> RandomBytes(DType dtype, int64_t elements, std::mt19937& rng) {
  std::vector<uint8_t> bytes(elements * engine::DTypeSize(dtype));
  const int64_t parts = std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, 16) * 4;
  const int64_t per_part = (elements + parts - 1) / parts;
  std::vector<uint32_t> seeds(parts);
  for (uint32_t& seed : seeds) seed = rng();
  std::atomic<int64_t> next{0};
  const auto fill = [&] {
    for (int64_t part; (part = next.fetch_add(1)) < parts;) {
      std::mt19937 local(seeds[part]);
      std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
      const int64_t end = std::min(elements, (part + 1) * per_part);
      for (int64_t i = part * per_part; i < end; ++i)
        engine::StoreFromFloat(dtype, bytes.data(), i, uniform(local));
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < std::min<int64_t>(parts / 4, elements / 65536 + 1); ++t)
    threads.emplace_back(fill);
  fill();
  for (std::thread& t : threads) t.join();
  return bytes;
}

struct CheckResult {
  int64_t rows = 0;
  double max_abs_error = 0.0;
  double relative_l2 = 0.0;
};

// Compares out with the fp64 reference: every row when the reference is cheap, else a sample.
CheckResult Check(const engine::RunRequest& r, const Options& o, double flops) {
  CheckResult result;
  double err2 = 0.0, ref2 = 0.0;
  const Shape4& s = r.q.shape;
  const auto compare_row = [&](int64_t b, int64_t n, int64_t h, const std::vector<double>& ref) {
    for (int64_t d = 0; d < s.head_dim; ++d) {
      const double got = engine::LoadAsFloat(r.out.dtype, r.out.data,
                                             ((b * s.seq_len + n) * s.heads + h) * s.head_dim + d);
      const double e = std::fabs(got - ref[d]);
      result.max_abs_error = std::max(result.max_abs_error, std::isfinite(got) ? e : INFINITY);
      err2 += e * e;
      ref2 += ref[d] * ref[d];
    }
    ++result.rows;
  };
  std::mt19937 rng(o.seed + 1);
  const int64_t all_rows = s.batch * s.seq_len * s.heads;
  const bool whole = flops <= 2e9;
  const int64_t rows = whole ? all_rows : std::min<int64_t>(o.check_rows, all_rows);
  std::uniform_int_distribution<int64_t> pick(0, all_rows - 1);
  for (int64_t i = 0; i < rows; ++i) {
    // A sample starts with the last row: the farthest offsets are where an index held in 32 bits
    // would wrap (a bf16 tensor of 2^31 elements is 2^32 bytes).
    const int64_t row = whole ? i : i == 0 ? all_rows - 1 : pick(rng);
    const int64_t h = row % s.heads, n = (row / s.heads) % s.seq_len, b = row / s.heads / s.seq_len;
    compare_row(b, n, h, engine::ReferenceRow(r.q, r.k, r.v, r.spec, b, n, h));
  }
  result.relative_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  return result;
}

int Main(int argc, char** argv) {
  Options o;
  CLI::App app{"da-bench: check the engine against the reference, then time it"};
  o.AddTo(app);
  app.add_option("--dtype", o.dtype)->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  app.add_option("--precision", o.precision,
                 "on a GPU, fp8's ratio is to the bf16 GEMM rate (no fp8 GEMM is sampled)")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16", "fp8"}));
  app.add_option("--device", o.device,
                 "the device to compute on, e.g. cuda:0 (default: the engine's placement)");
  app.add_option("--threads", o.threads, "0: every core");
  app.add_option("--repeat", o.repeat)->check(CLI::PositiveNumber);
  app.add_option("--check-rows", o.check_rows,
                 "rows sampled when the whole check is too costly (at least 1)");
  app.add_option("--seed", o.seed);
  app.add_flag("--json", o.json);
  CLI11_PARSE(app, argc, argv);
  if (o.check_rows < 1) {
    std::cerr << "da-bench: --check-rows " << o.check_rows
              << ": at least 1 row must be checked before timing\n";
    return 2;
  }
  absl::StatusOr<engine::AttentionSpec> resolved = o.ResolveSpec();
  if (!resolved.ok()) {
    std::cerr << "da-bench: " << resolved.status().message() << "\n";
    return 2;
  }
  engine::AttentionSpec spec = *std::move(resolved);
  spec.precision = o.precision == "bf16"   ? engine::Precision::kBFloat16
                   : o.precision == "fp16" ? engine::Precision::kFloat16
                   : o.precision == "fp32" ? engine::Precision::kFloat32
                   : o.precision == "fp8"  ? engine::Precision::kFloat8
                                           : engine::Precision::kAuto;
  const DType dtype = o.dtype == "fp16"   ? DType::kFloat16
                      : o.dtype == "bf16" ? DType::kBFloat16
                                          : DType::kFloat32;

  engine::EngineOptions engine_options;
  engine_options.threads = o.threads;
  if (!o.device.empty()) engine_options.devices = {o.device};
  auto engine_or = engine::Engine::Create(engine_options);
  if (!engine_or.ok()) {
    std::cerr << "da-bench: " << engine_or.status() << "\n";
    return 2;
  }
  engine::Engine& engine = **engine_or;

  std::mt19937 rng(o.seed);
  const Shape4 q_shape{o.batch, o.seq_len, o.heads, o.head_dim};
  const Shape4 kv_shape{o.batch, o.seq_len, o.kv_heads, o.head_dim};
  const std::vector<uint8_t> q = RandomBytes(dtype, q_shape.elements(), rng);
  const std::vector<uint8_t> k = RandomBytes(dtype, kv_shape.elements(), rng);
  const std::vector<uint8_t> v = RandomBytes(dtype, kv_shape.elements(), rng);
  std::vector<uint8_t> out(q.size(), 0xff);
  engine::RunRequest request;
  request.q = {dtype, q_shape, q.data(), static_cast<int64_t>(q.size())};
  request.k = {dtype, kv_shape, k.data(), static_cast<int64_t>(k.size())};
  request.v = {dtype, kv_shape, v.data(), static_cast<int64_t>(v.size())};
  request.out = {dtype, q_shape, out.data(), static_cast<int64_t>(out.size())};
  request.spec = spec;

  // First run: also the check. Its time includes first-touch costs and is reported apart.
  const double flops = AttentionFlops(o, spec);
  const auto first_start = std::chrono::steady_clock::now();
  absl::StatusOr<engine::ExecutionInfo> info = engine.Run(request);
  const double first_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - first_start).count();
  if (!info.ok()) {
    std::cerr << "da-bench: " << info.status() << "\n";
    return 2;
  }
  const CheckResult check = Check(request, o, flops);
  const double tolerance = info->precision_used == engine::Precision::kFloat8     ? 8e-2
                           : info->precision_used == engine::Precision::kBFloat16 ? 2e-2
                           : dtype == DType::kFloat32                             ? 1e-5
                                                                                  : 1e-2;
  const bool check_ok = check.relative_l2 <= tolerance && std::isfinite(check.max_abs_error);

  const int threads = engine.threads();
  const engine::cpu::Isa isa = engine::cpu::SelectedIsa();
  PeakSampler fp32_peak(Fp32PeakLoopFor(isa), threads);
  const engine::cpu::Bf16Kernel bf16_kernel = engine::cpu::SelectedBf16Kernel(isa);
  PeakSampler bf16_peak(Bf16PeakLoop(bf16_kernel), threads);
  // A run the engine placed on a GPU is held against that GPU's cuBLAS GEMM rate in the precision
  // it computed in (before and after the timed runs, the best kept), not the CPU's loops. fp8 has
  // no GEMM sampled here: it is held against the bf16 rate, so its ratio is not to an fp8 peak.
  // Copies: `info` is reassigned by the timed runs below.
  const std::string first_device = info->devices.empty() ? o.device : info->devices[0];
  const bool on_gpu = first_device.rfind("cuda:", 0) == 0;
  const engine::Precision first_precision = info->precision_used;
  const bool fp8_against_bf16 = on_gpu && first_precision == engine::Precision::kFloat8;
  const bool bf16_gemm = first_precision == engine::Precision::kBFloat16 || fp8_against_bf16;
  const GemmType gemm_type = bf16_gemm                                        ? GemmType::kBFloat16
                             : first_precision == engine::Precision::kFloat16 ? GemmType::kFloat16
                                                                              : GemmType::kFloat32;
  GemmRate gpu_peak;
  const auto sample_peaks = [&](int count) {
    if (!on_gpu) {
      fp32_peak.Sample(count);
      bf16_peak.Sample(count);
      return;
    }
    absl::StatusOr<GemmRate> rate =
        GpuGemmRate(std::stoi(first_device.substr(5)), gemm_type, 8192, 5 * count);
    if (!rate.ok()) {
      std::cerr << "da-bench: the GPU's GEMM rate: " << rate.status() << "\n";
    } else if (rate->flops_per_second > gpu_peak.flops_per_second) {
      gpu_peak = *rate;
    }
  };
  sample_peaks(3);
  std::vector<double> times, device_us, copy_us;
  for (int i = 0; i < o.repeat && check_ok; ++i) {
    const auto start = std::chrono::steady_clock::now();
    info = engine.Run(request);
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (!info.ok()) {
      std::cerr << "da-bench: " << info.status() << "\n";
      return 2;
    }
    device_us.push_back(static_cast<double>(info->device_compute_us));
    copy_us.push_back(static_cast<double>(info->device_copy_us));
    if (!on_gpu) sample_peaks(1);  // A GPU's rate is taken only before and after.
  }
  sample_peaks(2);

  std::sort(times.begin(), times.end());
  const double median = Median(times);
  const double gflops = median > 0 ? flops / median / 1e9 : 0;
  const bool bf16_used = info->precision_used == engine::Precision::kBFloat16;
  const PeakSampler& used_peak = bf16_used ? bf16_peak : fp32_peak;
  const double peak = on_gpu ? gpu_peak.flops_per_second / 1e9 : used_peak.Best();
  const std::string peak_name =
      on_gpu ? absl::StrCat("cuBLAS ", GemmTypeName(gemm_type), " GEMM on ", gpu_peak.device_name,
                            fp8_against_bf16 ? " (fp8 compute, no fp8 GEMM sampled)" : "")
             : PeakLoopName(used_peak.loop());
  // The kernel that ran: the GPU's, the bf16 kernel (dot products or AMX tiles), or the fp32
  // kernel of the selected ISA.
  const std::string kernel = on_gpu      ? first_device
                             : bf16_used ? engine::cpu::Bf16KernelName(bf16_kernel)
                                         : engine::cpu::IsaName(isa);
  const auto peak_json = [](const PeakSampler& p) {
    return nlohmann::json{{"loop", PeakLoopName(p.loop())},
                          {"best", p.Best()},
                          {"median", p.Median()},
                          {"min", p.Min()},
                          {"samples", p.Count()}};
  };
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);

  nlohmann::json j;
  j["shape"] = {{"batch", o.batch},
                {"seq_len", o.seq_len},
                {"heads", o.heads},
                {"kv_heads", o.kv_heads},
                {"head_dim", o.head_dim}};
  j["patterns"] = spec.PatternsToString();
  j["mode"] = o.mode;
  j["causal"] = o.causal;
  j["dtype"] = o.dtype;
  j["precision_used"] = engine::PrecisionName(info->precision_used);
  j["isa"] = engine::cpu::IsaName(isa);
  j["kernel"] = kernel;
  j["threads"] = threads;
  j["check"] = {{"rows", check.rows},
                {"max_abs_error", check.max_abs_error},
                {"relative_l2", check.relative_l2},
                {"tolerance", tolerance},
                {"ok", check_ok}};
  j["gflop"] = flops / 1e9;
  j["first_run_s"] = first_seconds;
  j["time_s"] = {{"median", median},
                 {"min", times.empty() ? 0 : times.front()},
                 {"max", times.empty() ? 0 : times.back()},
                 {"repeat", times.size()}};
  j["gflops"] = gflops;
  j["peak_fp32_gflops"] = fp32_peak.Best();
  j["peak_bf16_gflops"] = bf16_peak.Best();
  j["peak_fp32"] = peak_json(fp32_peak);
  j["peak_bf16"] = peak_json(bf16_peak);
  j["ratio_peak_loop"] = peak_name;
  if (on_gpu) {
    j["peak_gpu_gemm_gflops"] = peak;
    j["peak_gpu_gemm_type"] = GemmTypeName(gemm_type);
  }
  j["ratio_to_peak"] = peak > 0 ? gflops / peak : 0;
  if (on_gpu) {
    // The GPU's own time: the median of the runs' RunShare, without the host<->device copies.
    const double device_s = Median(device_us) / 1e6;
    j["device_compute_s"] = device_s;
    j["device_copy_s"] = Median(copy_us) / 1e6;
    j["device_gflops"] = device_s > 0 ? flops / device_s / 1e9 : 0;
    j["device_ratio_to_peak"] = device_s > 0 && peak > 0 ? flops / device_s / 1e9 / peak : 0;
  }
  j["ns_per_token"] = median / (o.batch * o.seq_len) * 1e9;
  j["peak_rss_mib"] = usage.ru_maxrss / 1024.0;
  if (o.json) {
    std::cout << j.dump() << "\n";
  } else {
    std::printf(
        "problem   B=%lld N=%lld H=%lld Hkv=%lld D=%lld patterns %s %s%s %s, %d threads, %s\n",
        (long long)o.batch, (long long)o.seq_len, (long long)o.heads, (long long)o.kv_heads,
        (long long)o.head_dim, spec.PatternsToString().c_str(), o.mode.c_str(),
        o.causal ? " causal" : "", o.dtype.c_str(), threads, kernel.c_str());
    std::printf("check     %s: %lld rows, max abs error %.3g, relative L2 %.3g (tolerance %.1g)\n",
                check_ok ? "ok" : "FAILED", (long long)check.rows, check.max_abs_error,
                check.relative_l2, tolerance);
    std::printf(
        "time      median %.4f s, min %.4f s, max %.4f s over %zu runs (first run %.4f s)\n",
        median, times.empty() ? 0 : times.front(), times.empty() ? 0 : times.back(), times.size(),
        first_seconds);
    std::printf("compute   %.1f GFLOP, %.1f GFLOP/s in %s; %.1f%% of the %s peak (%s kernel)\n",
                flops / 1e9, gflops, engine::PrecisionName(info->precision_used).c_str(),
                peak > 0 ? 100 * gflops / peak : 0, peak_name.c_str(), kernel.c_str());
    if (on_gpu) {
      std::printf("peak      %s %.1f GFLOP/s: best before and after the timed runs\n",
                  peak_name.c_str(), peak);
      const double device_s = j["device_compute_s"];
      std::printf(
          "on GPU    %.4f s in the backend (%.1f GFLOP/s, %.1f%% of the GEMM rate), "
          "%.4f s of copies\n",
          device_s, device_s > 0 ? flops / device_s / 1e9 : 0,
          device_s > 0 && peak > 0 ? 100 * flops / device_s / 1e9 / peak : 0,
          static_cast<double>(j["device_copy_s"]));
    }
    for (const PeakSampler* p : {&fp32_peak, &bf16_peak}) {
      if (p->Count() == 0) continue;
      std::printf(
          "peak      %s %.1f GFLOP/s: best of %d samples around the timed runs "
          "(median %.1f, min %.1f)\n",
          PeakLoopName(p->loop()).c_str(), p->Best(), p->Count(), p->Median(), p->Min());
    }
    std::printf("per token %.1f ns; peak RSS %.0f MiB\n", median / (o.batch * o.seq_len) * 1e9,
                usage.ru_maxrss / 1024.0);
  }
  return check_ok ? 0 : 1;
}

}  // namespace
}  // namespace da::bench

int main(int argc, char** argv) { return da::bench::Main(argc, argv); }
