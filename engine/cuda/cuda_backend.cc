// The CUDA backend (issue #15), one instance per GPU: device memory from cudaMalloc, copies on a
// stream, and shares computed by the row kernel (row_kernel.cuh), which runs the arithmetic the
// CPU tests check (row_attention_test). Registered for devices of kind "cuda" (DiscoverDevices
// lists them where a driver and a GPU are present).
//
// Two paths. The row kernel: every feature of the CPU backend (both combine modes, causal,
// partial segments, w > N, r not dividing w, GQA, any batch, fp32/fp16/bf16 in and out, HEADS and
// SEQUENCE shares with gathered rows) in fp32 arithmetic, one thread per output row; it computes
// fp32 requests, shares with spanning segments, and everything before sm_80. The fused path
// (cuDNN's attention per pattern on strided views, sdpa_plan.h / cudnn_sdpa.h, then the LONGNET
// fold and GROUPED scaling of row_attention.cuh) computes bf16 and fp16 on sm_80 and later for
// shares without spanning segments. Both passed their tests on an H200 (2026-12-04); the fused
// path is on by default since then, and DA_CUDA_FUSED=0 in the environment turns it off.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/backend_registry.h"
#include "engine/cuda/block_cache.h"
#include "engine/cuda/device_scope.h"
#include "engine/cuda/row_kernel.cuh"
#include "engine/cuda/row_share.h"
#include "engine/cuda/sdpa_plan.h"
#include "engine/cuda/staged_copy.h"
#if defined(DA_HAVE_CUDNN)
#include "engine/cuda/cudnn_sdpa.h"
#endif
#include "engine/precision_policy.h"
#include "engine/status_macros.h"

namespace da::engine::cuda {
namespace {

// A failed runtime call also leaves its error in the thread's last-error slot, where the next
// kernel launch's check (cudaGetLastError in row_kernel.cu) would find it and fail an unrelated
// launch: a failure this code handles (a cudaMalloc the block cache retries, pinned memory that
// cannot be had, a run that fails with RESOURCE_EXHAUSTED) must not. Sticky errors (a broken
// context) come back from every later call anyway.
void ForgetHandledError(cudaError_t error) {
  if (error != cudaSuccess) (void)cudaGetLastError();
}

absl::Status CudaStatus(cudaError_t error, const std::string& what) {
  if (error == cudaSuccess) return absl::OkStatus();
  ForgetHandledError(error);
  const absl::StatusCode code = error == cudaErrorMemoryAllocation
                                    ? absl::StatusCode::kResourceExhausted
                                    : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorName(error), " (",
                                         cudaGetErrorString(error), ")"));
}

// Whether the run was cancelled (or its deadline passed).
bool Stopped(const RunContext& context) {
  return context.cancelled != nullptr && context.cancelled->load();
}

// The block cache of GPU `ordinal` (keeping blocks when `keep`), made when no backend holds one.
// Called with the GPU current (a DeviceScope).
std::shared_ptr<BlockCache> SharedCacheFor(int ordinal, bool keep) {
  static std::mutex mutex;
  static std::map<std::pair<int, bool>, std::weak_ptr<BlockCache>> caches;
  std::lock_guard<std::mutex> lock(mutex);
  std::weak_ptr<BlockCache>& slot = caches[{ordinal, keep}];
  if (std::shared_ptr<BlockCache> cache = slot.lock()) return cache;
  size_t free = 0, total = 0;
  if (keep) ForgetHandledError(cudaMemGetInfo(&free, &total));
  BlockCache::Allocator allocator{
      [ordinal](int64_t bytes) -> absl::StatusOr<void*> {
        DeviceScope scope(ordinal);
        void* data = nullptr;
        DA_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&data, static_cast<size_t>(bytes)), "cudaMalloc"));
        return data;
      },
      [ordinal](void* block) {
        DeviceScope scope(ordinal);
        cudaFree(block);
      },
      [ordinal] {  // What cudaFree would have waited for.
        DeviceScope scope(ordinal);
        cudaDeviceSynchronize();
      }};
  auto cache = std::make_shared<BlockCache>(std::move(allocator), static_cast<int64_t>(total / 4));
  slot = cache;
  return cache;
}

// Whether the environment sets `name` to `value`.
bool EnvIs(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::string(set) == value;
}

// An int in pinned host memory that the device reads (mapped; with unified addressing the same
// pointer on both sides): the row kernel's stop flag. Starts at 0.
class PinnedFlag {
 public:
  static absl::StatusOr<PinnedFlag> Create() {
    PinnedFlag flag;
    void* host = nullptr;
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaHostAlloc(&host, sizeof(int), cudaHostAllocMapped), "the stop flag"));
    flag.host_ = static_cast<volatile int*>(host);
    *flag.host_ = 0;
    void* device = nullptr;
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaHostGetDevicePointer(&device, host, 0), "the stop flag's device address"));
    flag.device_ = static_cast<const volatile int*>(device);
    return flag;
  }
  PinnedFlag(PinnedFlag&& other) noexcept
      : host_(std::exchange(other.host_, nullptr)), device_(other.device_) {}
  PinnedFlag& operator=(PinnedFlag&&) = delete;
  ~PinnedFlag() {
    if (host_ != nullptr) cudaFreeHost(const_cast<int*>(host_));
  }

  void Set() { *host_ = 1; }
  void Clear() { *host_ = 0; }
  const volatile int* device() const { return device_; }

 private:
  PinnedFlag() = default;
  volatile int* host_ = nullptr;
  const volatile int* device_ = nullptr;
};

// An event without timing, destroyed with its scope: what a run waits on after its own launches.
struct LaunchEvent {
  static absl::StatusOr<LaunchEvent> Create() {
    LaunchEvent made;
    DA_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&made.event, cudaEventDisableTiming),
                                  "a launch's event"));
    return made;
  }
  LaunchEvent(LaunchEvent&& other) noexcept : event(std::exchange(other.event, nullptr)) {}
  LaunchEvent& operator=(LaunchEvent&&) = delete;
  ~LaunchEvent() {
    if (event != nullptr) cudaEventDestroy(event);
  }
  cudaEvent_t event = nullptr;

 private:
  LaunchEvent() = default;
};

// Waits for what has been queued on `stream` so far, through an event recorded now: runs share
// the backend's stream, and a run (its stop above all) must not wait for work that other runs
// queue after its own. The stream's own synchronize would.
absl::Status WaitForQueued(cudaStream_t stream, const char* what) {
  DA_ASSIGN_OR_RETURN(const LaunchEvent queued, LaunchEvent::Create());
  DA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(queued.event, stream), what));
  return CudaStatus(cudaEventSynchronize(queued.event), what);
}

// With DA_CUDA_STAGE_TIMES=1 in the environment (enabled), the fused path records an event after
// each stage of a run and prints the stages' GPU times to stderr when the run ends (what a profiler
// would say, where none works): `cuda:0 fused run: alloc 1.2 ms, p0 sdpa 30.1 ms, p0 fold 3.0 ms,
// ...`.
class StageTimes {
 public:
  StageTimes(bool enabled, cudaStream_t stream, std::string device)
      : stream_(stream), device_(std::move(device)), enabled_(enabled) {
    Mark("start");
  }
  ~StageTimes() {
    if (!enabled_ || marks_.empty()) return;
    std::string line = absl::StrCat(device_, " fused run:");
    const cudaError_t synced = cudaEventSynchronize(marks_.back().second);
    ForgetHandledError(synced);
    if (synced == cudaSuccess) {
      for (size_t i = 1; i < marks_.size(); ++i) {
        float ms = 0;
        ForgetHandledError(cudaEventElapsedTime(&ms, marks_[i - 1].second, marks_[i].second));
        absl::StrAppend(&line, i > 1 ? "," : "", " ", marks_[i].first, " ", ms, " ms");
      }
    }
    for (auto& [name, event] : marks_) cudaEventDestroy(event);
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  StageTimes(const StageTimes&) = delete;
  StageTimes& operator=(const StageTimes&) = delete;

  void Mark(std::string name) {
    if (!enabled_) return;
    cudaEvent_t event = nullptr;
    if (const cudaError_t made = cudaEventCreate(&event); made != cudaSuccess) {
      ForgetHandledError(made);
      return;
    }
    if (const cudaError_t recorded = cudaEventRecord(event, stream_); recorded != cudaSuccess) {
      ForgetHandledError(recorded);
      cudaEventDestroy(event);
      return;
    }
    marks_.emplace_back(std::move(name), event);
  }

 private:
  cudaStream_t stream_;
  std::string device_;
  bool enabled_;
  std::vector<std::pair<std::string, cudaEvent_t>> marks_;
};

// A plan: the share's head tables (each head's patterns and offsets) in device memory, built once
// per key.
class CudaPlan final : public Plan {
 public:
  DeviceBuffer tables;  // RowPattern[patterns] then int[heads + 1].
  int64_t pattern_count = 0;
  // The fused path's calls (empty: the row kernel), the io dtype they compute in, their graphs
  // and workspace.
  std::vector<SdpaCall> calls;
  DType io = DType::kBFloat16;
  bool fp8 = false;  // The calls compute in fp8 E4M3 (io unused): inputs quantized per run.
  // Non-empty: the key's precision is a fused one, but this share runs on the row kernel in fp32,
  // for this reason (reported with every run, RunReport::fallback).
  std::string fp32_fallback;
#if defined(DA_HAVE_CUDNN)
  std::unique_ptr<SdpaGraphs> graphs;
#endif
  // cuDNN's workspace, shared by every run of the plan: safe because all of a backend's runs are
  // ordered on its one stream (nothing sets RunContext::stream today). Runs of one plan on
  // different streams would race on it: give each run its own first.
  DeviceBuffer workspace;
  int64_t bytes() const override { return tables.bytes() + workspace.bytes(); }
};

bool FusedPrecision(Precision precision) {
  return precision == Precision::kBFloat16 || precision == Precision::kFloat16;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int ordinal, int major, int minor, PrecisionPolicyOptions options)
      : ordinal_(ordinal),
        capabilities_(CudaCapabilities(major, minor)),
        options_(options),
        cache_enabled_(EnvIs("DA_CUDA_CACHE", "1")),
        staging_(EnvIs("DA_CUDA_STAGING", "1")) {
#if defined(DA_HAVE_CUDNN)
    fused_ = !EnvIs("DA_CUDA_FUSED", "0") && major >= 8;
    fp8_ = fused_ && major >= 9;  // cuDNN's fp8 attention: Hopper and later.
    combine_ = EnvIs("DA_CUDA_COMBINE", "onepass") ? Combine::kOnePass
               : EnvIs("DA_CUDA_COMBINE", "fold")  ? Combine::kFold
                                                   : Combine::kAuto;
    stage_times_ = EnvIs("DA_CUDA_STAGE_TIMES", "1");
#endif
  }

  ~CudaBackend() override {
    DeviceScope scope(ordinal_);
    for (cudaEvent_t event : staging_events_) {
      cudaEventSynchronize(event);  // No transfer may still read a buffer freed below.
      cudaEventDestroy(event);
    }
    for (uint8_t* buffer : staging_buffers_) cudaFreeHost(buffer);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string Name() const override { return "cuda"; }
  MemorySpace Space() const override { return MemorySpace::Device(ordinal_); }

  absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes) override {
    DeviceScope scope(ordinal_);
    const int64_t size = std::max<int64_t>(bytes, 1);
    std::shared_ptr<BlockCache> cache = Cache();
    absl::StatusOr<void*> block = cache->Take(size);
    if (!block.ok()) {
      size_t free = 0, total = 0;
      ForgetHandledError(cudaMemGetInfo(&free, &total));
      return absl::Status(block.status().code(),
                          absl::StrCat("cuda:", ordinal_, ": allocating ", bytes, " bytes with ",
                                       free, " of ", total, " free (", cache->cached_bytes(),
                                       " cached): ", block.status().message()));
    }
    const int ordinal = ordinal_;
    return DeviceBuffer(*block, bytes, Space(), [cache, ordinal, size](void* p) {
      DeviceScope release_scope(ordinal);
      cache->Give(p, size);
    });
  }

  absl::Status CopyToDevice(void* dst, const void* src, int64_t bytes,
                            const RunContext& context) override {
    DeviceScope scope(ordinal_);
    DA_ASSIGN_OR_RETURN(cudaStream_t stream, StreamOf(context));
    if (std::unique_lock<std::mutex> lock = StagingFor(bytes); lock.owns_lock() && Staged()) {
      auto* device = static_cast<uint8_t*>(dst);
      return copier_->ToDevice(static_cast<const uint8_t*>(src), bytes,
                               StagingOps(device, cudaMemcpyHostToDevice, stream, context));
    }
    return CopyInPieces(dst, src, bytes, cudaMemcpyHostToDevice, stream, context);
  }

  absl::Status CopyToHost(void* dst, const void* src, int64_t bytes,
                          const RunContext& context) override {
    DeviceScope scope(ordinal_);
    DA_ASSIGN_OR_RETURN(cudaStream_t stream, StreamOf(context));
    if (std::unique_lock<std::mutex> lock = StagingFor(bytes); lock.owns_lock() && Staged()) {
      auto* device = static_cast<uint8_t*>(const_cast<void*>(src));
      return copier_->ToHost(static_cast<uint8_t*>(dst), bytes,
                             StagingOps(device, cudaMemcpyDeviceToHost, stream, context));
    }
    return CopyInPieces(dst, src, bytes, cudaMemcpyDeviceToHost, stream, context);
  }

  absl::Status Synchronize(const RunContext& context) override {
    DeviceScope scope(ordinal_);
    DA_ASSIGN_OR_RETURN(cudaStream_t stream, StreamOf(context));
    return WaitForQueued(stream, "synchronize");
  }

  // The row kernel computes in fp32 whatever the GPU; with the fused path, bf16 and fp16 too.
  std::vector<Precision> Precisions() const override {
    if (!fused_) return {Precision::kFloat32};
    std::vector<Precision> offered;
    for (Precision p : SupportedPrecisions(capabilities_)) {
      if (p != Precision::kFloat8 || fp8_) offered.push_back(p);
    }
    return offered;
  }

  absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const override {
    if (fused_) {
      DA_ASSIGN_OR_RETURN(PrecisionChoice choice,
                          engine::ChoosePrecision(capabilities_, spec.precision, options_));
      // sm_89 has fp8 tensor cores (the policy offers fp8) but not cuDNN's fp8 attention.
      if (choice.precision == Precision::kFloat8 && !fp8_) {
        const std::string why =
            absl::StrCat("spec.precision fp8 is not supported by ", capabilities_.Describe(),
                         ": cuDNN's fp8 attention needs sm_90 or later; supported: ",
                         PrecisionListName(Precisions()));
        if (!options_.fallback) return absl::InvalidArgumentError(why);
        return PrecisionChoice{Precision::kBFloat16,
                               absl::StrCat("fallback: ", why, " (cuDNN fused)")};
      }
      if (FusedPrecision(choice.precision) || choice.precision == Precision::kFloat8) {
        absl::StrAppend(&choice.reason, " (cuDNN fused)");
      }
      return choice;
    }
    const std::string device = capabilities_.Describe();
    if (spec.precision == Precision::kAuto || spec.precision == Precision::kFloat32) {
      return PrecisionChoice{
          Precision::kFloat32,
          absl::StrCat(device, ": fp32 row kernel (the tensor-core paths are not built yet)")};
    }
    if (options_.fallback) {
      return PrecisionChoice{Precision::kFloat32,
                             absl::StrCat("fallback: ", device, " computes fp32 only today, not ",
                                          PrecisionName(spec.precision))};
    }
    return absl::InvalidArgumentError(absl::StrCat("precision ", PrecisionName(spec.precision),
                                                   " is not supported on ", device,
                                                   " yet; supported: fp32"));
  }

  absl::Status Supports(const ProblemShape& shape, DType,
                        const AttentionSpec& spec) const override {
    if (shape.head_dim != 32 && shape.head_dim != 64 && shape.head_dim != 128) {
      return absl::InvalidArgumentError(absl::StrCat(
          "head_dim ", shape.head_dim, ": the CUDA backend computes head_dim 32, 64 or 128"));
    }
    return ChoosePrecision(spec).status();
  }

  absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                  const std::atomic<bool>* stop) override {
    (void)stop;  // Polled between cuDNN graph builds, where cuDNN is built.
    const Share share = key.share.value_or(WholeShare(key.shape));
    // The head tables depend on the key alone: build them from a view-less share problem.
    ShareProblem probe;
    probe.shape = key.shape;
    probe.spec.patterns = key.patterns;
    probe.spec.mode = key.mode;
    probe.spec.causal = key.causal;
    probe.share = share;
    probe.q = {key.dtype, share.QueryShape(key.shape), nullptr, 0, Space()};
    probe.k = probe.v = {key.dtype, share.KeyShape(key.shape), nullptr, 0, Space()};
    probe.out = {key.out_dtype, share.QueryShape(key.shape), nullptr, 0, Space()};
    DA_ASSIGN_OR_RETURN(RowTables tables, MakeRowTables(probe));
    auto plan = std::make_shared<CudaPlan>();
#if defined(DA_HAVE_CUDNN)
    if (fused_ &&
        (FusedPrecision(key.precision) || (fp8_ && key.precision == Precision::kFloat8))) {
      DA_ASSIGN_OR_RETURN(SdpaPlan sdpa, PlanSdpaCalls(key.shape, probe.spec, share));
      if (!sdpa.spanning.empty()) {
        plan->fp32_fallback =
            absl::StrCat(sdpa.spanning.size(),
                         " segment pieces span devices, which the fused path does not compute yet");
      } else {
        plan->io = key.precision == Precision::kFloat16 ? DType::kFloat16 : DType::kBFloat16;
        plan->fp8 = key.precision == Precision::kFloat8;
        absl::StatusOr<std::unique_ptr<SdpaGraphs>> graphs =
            SdpaGraphs::Build(sdpa.calls, plan->io, ordinal_, plan->fp8, stop);
        if (!graphs.ok() && plan->fp8 && !options_.fallback &&
            !absl::IsCancelled(graphs.status())) {
          // cuDNN's fp8 attention covers fewer shapes than bf16 (head dims, strides, the causal
          // band), and none of ours has been checked on a GPU: say so, not INTERNAL.
          return absl::InvalidArgumentError(absl::StrCat(
              "precision fp8 is not available for this problem on cuda:", ordinal_,
              " (cuDNN refused its graph: ", graphs.status().message(), "); ask for bf16 or fp16"));
        }
        if (!graphs.ok() && !absl::IsCancelled(graphs.status())) {
          // A cuDNN that refuses a bf16 or fp16 graph (an older library: before 9.12 the frontend
          // takes only packed log-sum-exps, and ours are strided), or an fp8 one where the policy
          // falls back, still gets an exact answer, from the row kernel (whose workspace is
          // within what PlanWorkspaceBytes counted for the fused path), and says so with every
          // run.
          plan->fp32_fallback =
              absl::StrCat("cuDNN refused its graph: ", graphs.status().message());
          std::fprintf(stderr, "cuda:%d: %s; this plan computes on the fp32 row kernel\n", ordinal_,
                       plan->fp32_fallback.c_str());
          plan->fp8 = false;
        } else {
          DA_RETURN_IF_ERROR(graphs.status());
          plan->graphs = *std::move(graphs);
          DA_ASSIGN_OR_RETURN(plan->workspace,
                              Allocate(std::max<int64_t>(plan->graphs->workspace_bytes(), 16)));
          plan->calls = std::move(sdpa.calls);
        }
      }
    }
#endif
    plan->pattern_count = static_cast<int64_t>(tables.patterns.size());
    const int64_t pattern_bytes = plan->pattern_count * sizeof(RowPattern);
    const int64_t begin_bytes = static_cast<int64_t>(tables.pattern_begin.size() * sizeof(int));
    DA_ASSIGN_OR_RETURN(plan->tables, Allocate(pattern_bytes + begin_bytes));
    std::vector<uint8_t> host(pattern_bytes + begin_bytes);
    std::memcpy(host.data(), tables.patterns.data(), pattern_bytes);
    std::memcpy(host.data() + pattern_bytes, tables.pattern_begin.data(), begin_bytes);
    DeviceScope scope(ordinal_);
    DA_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy(plan->tables.data(), host.data(), host.size(), cudaMemcpyHostToDevice),
        "plan tables to the device"));
    // From pageable memory cudaMemcpy may return before its DMA has landed, and the kernels that
    // read the tables run on the backend's non-blocking stream, which does not wait for it.
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaStreamSynchronize(cudaStreamLegacy), "plan tables to the device"));
    return plan;
  }

  absl::Status RunShare(Plan& plan_base, const ShareProblem& problem,
                        const RunContext& context) override {
    auto* plan = dynamic_cast<CudaPlan*>(&plan_base);
    if (plan == nullptr) return absl::InternalError("cuda backend given a plan it did not build");
    DA_RETURN_IF_ERROR(CheckShareSpace(problem, Space()));
    DA_ASSIGN_OR_RETURN(RowTables tables, MakeRowTables(problem));
    if (static_cast<int64_t>(tables.patterns.size()) != plan->pattern_count) {
      return absl::InternalError("cuda plan built for another share");
    }
    DeviceScope scope(ordinal_);
    DA_ASSIGN_OR_RETURN(cudaStream_t stream, StreamOf(context));
    RowShare share = tables.share;
    auto* base = static_cast<uint8_t*>(plan->tables.data());
    share.head_patterns = reinterpret_cast<const RowPattern*>(base);
    share.head_pattern_begin =
        reinterpret_cast<const int*>(base + plan->pattern_count * sizeof(RowPattern));
    if (!plan->calls.empty()) return RunFused(*plan, problem, share, context, stream);
    if (context.report != nullptr && !plan->fp32_fallback.empty()) {
      context.report->fallback = Precision::kFloat32;
      context.report->fallback_why = plan->fp32_fallback;
    }
    // This run's spanning sets (their gathered rows change from run to run) and the failure flag.
    const int64_t spanning_bytes =
        static_cast<int64_t>(tables.spanning.size() * sizeof(RowSpanning));
    DA_ASSIGN_OR_RETURN(DeviceBuffer scratch, Allocate(spanning_bytes + sizeof(int)));
    auto* flag = reinterpret_cast<int*>(static_cast<uint8_t*>(scratch.data()) + spanning_bytes);
    DA_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(flag, 0, sizeof(int), stream), "clear flag"));
    if (spanning_bytes > 0) {
      DA_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(scratch.data(), tables.spanning.data(),
                                                    spanning_bytes, cudaMemcpyHostToDevice, stream),
                                    "spanning sets to the device"));
      share.spanning = static_cast<const RowSpanning*>(scratch.data());
    } else {
      share.spanning = nullptr;
    }
    // The stop flag the kernel polls (ComputeRow): pinned host memory mapped into the device's
    // address space, set here when the run is cancelled. Launches of about 2^36 key-dimension
    // products each (bounded device memory traffic per launch; the stream is waited on between
    // them), and never fewer rows than fill the GPU (32768 threads). The wait polls the run's
    // cancellation every 0.5 ms: on an H200 one launch of rows 16,384 keys long took 150 ms, so
    // the flag, not the launch boundary, is what keeps a stop within 100 ms.
    DA_ASSIGN_OR_RETURN(std::unique_ptr<PinnedFlag> flag_held, TakeFlag());
    struct FlagReturn {
      CudaBackend* backend;
      std::unique_ptr<PinnedFlag>& flag;
      ~FlagReturn() { backend->GiveFlag(std::move(flag)); }
    } flag_return{this, flag_held};
    PinnedFlag& stop = *flag_held;
    share.stop = stop.device();
    int64_t keys_per_row = 0;
    for (const Pattern& p : problem.spec.patterns) {
      keys_per_row +=
          (std::min(p.segment_len, problem.shape.seq_len) + p.dilation - 1) / p.dilation;
    }
    const int64_t rows = RowCount(share);
    const int64_t per_launch = std::clamp<int64_t>(
        (int64_t{1} << 36) / std::max<int64_t>(1, keys_per_row * problem.shape.head_dim), 32768,
        std::max<int64_t>(rows, 32768));
    // The wait is on an event after this run's launch, not on the stream: runs share the
    // backend's stream, and a stop must not wait for launches other runs queue after it.
    DA_ASSIGN_OR_RETURN(const LaunchEvent launched, LaunchEvent::Create());
    for (int64_t first = 0; first < rows; first += per_launch) {
      DA_RETURN_IF_ERROR(
          CudaStatus(LaunchRows(share, first, std::min(per_launch, rows - first), flag, stream),
                     "row kernel"));
      DA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(launched.event, stream), "row kernel"));
      cudaError_t done;
      while ((done = cudaEventQuery(launched.event)) == cudaErrorNotReady) {
        // Not an error, but the runtime may keep it as the thread's last one, where the next
        // launch's check would find it.
        ForgetHandledError(done);
        if (Stopped(context)) stop.Set();
        std::this_thread::sleep_for(std::chrono::microseconds(500));
      }
      DA_RETURN_IF_ERROR(CudaStatus(done, "row kernel"));
      if (Stopped(context)) {  // Rows of this launch may be unwritten.
        return absl::CancelledError(absl::StrCat("cuda run cancelled in rows ", first, " to ",
                                                 std::min(rows, first + per_launch), " of ", rows));
      }
    }
    int failed = 0;
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy(&failed, flag, sizeof(int), cudaMemcpyDeviceToHost), "failure flag"));
    if (failed != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "share ", problem.share.ToString(),
          " reads keys of a segment outside itself but no gathered rows were given for it"));
    }
    return absl::OkStatus();
  }

  // The fused path's scratch per run: the inputs in the io dtype when they come in another (fp8:
  // always, a byte each, and the scales), one pattern's output (io) and LSE (fp32) and the fold's
  // fp32 accumulators, or with the one-pass combine every pattern's output and LSE.
  int64_t PlanWorkspaceBytes(const PlanKey& key) const override {
    const bool fp8 = fp8_ && key.precision == Precision::kFloat8;
    if (!fused_ || !(FusedPrecision(key.precision) || fp8)) return 0;
    const Share share = key.share.value_or(WholeShare(key.shape));
    const int64_t rows = key.shape.batch * share.tokens() * share.heads();
    const int64_t d = key.shape.head_dim;
    const int64_t kv = key.shape.batch * share.tokens() * share.kv_heads() * d;
    const DType io = key.precision == Precision::kFloat16 ? DType::kFloat16 : DType::kBFloat16;
    const int64_t element = fp8 ? 1 : 2;
    const int64_t converted = fp8               ? rows * d + 2 * kv + 256  // 256: the scalars.
                              : key.dtype != io ? 2 * (rows * d + 2 * kv)
                                                : 0;
    const int patterns = static_cast<int>(key.patterns.size());
    const bool grouped = key.mode == CombineMode::kGrouped;
    if (OnePass(grouped, patterns)) {  // Every pattern's output and LSE (GROUPED: one block).
      const bool in_place = GroupedInPlace(grouped, fp8, static_cast<ElemType>(key.out_dtype),
                                           static_cast<ElemType>(io));
      const int64_t blocks = OnePassBlocks(grouped, patterns);
      return converted +
             blocks * (rows * (in_place ? 0 : d * element) + LseBlockStrideFor(rows) * 4);
    }
    return converted + rows * d * element + rows * 4 + rows * d * 4 + 2 * rows * 4;
  }

 private:
#if defined(DA_HAVE_CUDNN)
  // q, k and v (views, in `type`) quantized to fp8 E4M3 with per-tensor scales from their amax:
  // the amaxes computed on the device (into the 3 floats after the scalars in `scalars`) and read
  // back, the quantized tensors appended to `converted` and pointed to by `in`; the scales as the
  // run reports them. INVALID_ARGUMENT when a tensor holds a NaN or an infinity (no scale maps it
  // onto fp8).
  absl::StatusOr<RunReport> QuantizeToFp8(const TensorView* const views[3], ElemType type,
                                          const DeviceBuffer& scalars, const void* in[3],
                                          std::vector<DeviceBuffer>& converted,
                                          cudaStream_t stream) {
    float* amax = static_cast<float*>(scalars.data()) + kFp8ScalarCount * kFp8ScalarStride;
    DA_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(amax, 0, 3 * 4, stream), "clear the amaxes"));
    for (int i = 0; i < 3; ++i) {
      DA_RETURN_IF_ERROR(CudaStatus(
          LaunchAmax(views[i]->data, type, views[i]->shape.elements(), amax + i, stream), "amax"));
    }
    RunReport scales;
    scales.fp8 = true;
    DA_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(scales.amax, amax, sizeof(scales.amax), cudaMemcpyDeviceToHost, stream),
        "amaxes to the host"));
    DA_RETURN_IF_ERROR(WaitForQueued(stream, "amaxes"));
    static constexpr const char* kNames[3] = {"query", "key", "value"};
    for (int i = 0; i < 3; ++i) {
      if (!std::isfinite(scales.amax[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("fp8: the ", kNames[i], " holds a NaN or an infinity (largest magnitude ",
                         scales.amax[i], "); fp8 needs finite inputs"));
      }
      scales.scale[i] = Fp8ScaleFor(scales.amax[i]);
      const int64_t count = views[i]->shape.elements();
      DA_ASSIGN_OR_RETURN(DeviceBuffer buffer, Allocate(count));
      DA_RETURN_IF_ERROR(CudaStatus(LaunchQuantize(views[i]->data, type, count, scales.scale[i],
                                                   static_cast<uint8_t*>(buffer.data()), stream),
                                    "quantize to fp8"));
      in[i] = buffer.data();
      converted.push_back(std::move(buffer));
    }
    return scales;
  }
#endif

  absl::Status RunFused(CudaPlan& plan, const ShareProblem& problem, RowShare share,
                        const RunContext& context, cudaStream_t stream) {
#if defined(DA_HAVE_CUDNN)
    const int64_t rows = RowCount(share);
    const int64_t d = share.head_dim;
    const ElemType io = plan.fp8 ? ElemType::kF8E4M3 : static_cast<ElemType>(plan.io);
    const int64_t element = plan.fp8 ? 1 : 2;  // Bytes of an io element.
    StageTimes times(stage_times_, stream, absl::StrCat("cuda:", ordinal_));
    // The inputs in the io dtype.
    const void* in[3] = {problem.q.data, problem.k.data, problem.v.data};
    const TensorView* views[3] = {&problem.q, &problem.k, &problem.v};
    // fp8: the scalars' values, uploaded from here by an asynchronous copy; declared before every
    // device buffer so that it outlives all work queued in this run.
    float fp8_values[kFp8ScalarCount * kFp8ScalarStride] = {};
    std::vector<DeviceBuffer> converted;
    DeviceBuffer fp8_scalars;
    if (plan.fp8) {
      // The scalars (16 bytes apart), then the 3 amaxes of q, k and v.
      DA_ASSIGN_OR_RETURN(fp8_scalars, Allocate((kFp8ScalarCount * kFp8ScalarStride + 3) * 4));
      DA_ASSIGN_OR_RETURN(RunReport scales,
                          QuantizeToFp8(views, share.in, fp8_scalars, in, converted, stream));
      // Descales of q, k, v; the probabilities onto fp8's range and back; the output scaled as v
      // (an output row is a convex combination of v's rows, so it never exceeds v's amax); the two
      // amaxes cuDNN writes.
      const float values[kFp8ScalarCount] = {1.0f / scales.scale[0],
                                             1.0f / scales.scale[1],
                                             1.0f / scales.scale[2],
                                             1.0f / kFp8E4M3Max,
                                             kFp8E4M3Max,
                                             scales.scale[2],
                                             0.0f,
                                             0.0f};
      for (int i = 0; i < kFp8ScalarCount; ++i) fp8_values[i * kFp8ScalarStride] = values[i];
      DA_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(fp8_scalars.data(), fp8_values, sizeof(fp8_values),
                                     cudaMemcpyHostToDevice, stream),
                     "fp8 scalars to the device"));
      share.pattern_scale = 1.0f / scales.scale[2];  // The stored outputs' descale.
      if (context.report != nullptr) *context.report = scales;
      times.Mark("fp8 amax+quantize");
    } else if (problem.q.dtype != plan.io) {
      for (int i = 0; i < 3; ++i) {
        const int64_t count = views[i]->shape.elements();
        DA_ASSIGN_OR_RETURN(DeviceBuffer buffer, Allocate(count * 2));
        DA_RETURN_IF_ERROR(
            CudaStatus(LaunchConvert(views[i]->data, share.in, buffer.data(), io, count, stream),
                       "convert inputs"));
        in[i] = buffer.data();
        converted.push_back(std::move(buffer));
      }
      times.Mark("convert");
    }
    const float scale = static_cast<float>(problem.spec.ScaleFor(d));
    const int patterns = static_cast<int>(problem.spec.patterns.size());
    // Pattern pi's cuDNN calls, writing its output and LSE at out and lse. Calls are at most
    // kMaxSdpaCallFlops (sdpa_plan.h: milliseconds) and each is waited for, so the stop, polled
    // before each, is seen within one call; the run's own work is done when a stop returns. Work
    // queued after the calls (a fold) is ordered before the next pattern's calls by the stream.
    const auto attend = [&](int pi, void* out, float* lse) -> absl::Status {
      for (const SdpaCall& call : plan.calls) {
        if (call.pattern_index != pi) continue;
        if (Stopped(context)) {
          (void)WaitForQueued(stream, "a stopped run");  // Its buffers are freed next.
          return absl::CancelledError(absl::StrCat("cuda run cancelled in pattern ", pi));
        }
        DA_RETURN_IF_ERROR(plan.graphs->Run(
            call, {in[0], in[1], in[2], out, lse, scale, static_cast<float*>(fp8_scalars.data())},
            plan.workspace.data(), stream));
        DA_RETURN_IF_ERROR(WaitForQueued(stream, "sdpa call"));
      }
      times.Mark(absl::StrCat("p", pi, " sdpa"));
      return absl::OkStatus();
    };
    if (OnePass(share.grouped, patterns)) {
      // LONGNET: each pattern writes its own block; rows it does not keep are never read.
      // GROUPED: one block (OnePassBlocks), the output itself where GroupedInPlace.
      const int blocks = OnePassBlocks(share.grouped, patterns);
      const bool in_place = GroupedInPlace(share.grouped, plan.fp8, share.out_type, io);
      DeviceBuffer outs_buffer;
      if (!in_place) {
        DA_ASSIGN_OR_RETURN(outs_buffer, Allocate(blocks * rows * d * element));
      }
      const int64_t lse_stride = LseBlockStride(share);  // Each block 16-byte aligned.
      DA_ASSIGN_OR_RETURN(DeviceBuffer lses, Allocate(blocks * lse_stride * 4));
      auto* outs = static_cast<uint8_t*>(in_place ? share.out : outs_buffer.data());
      times.Mark("alloc");
      for (int pi = 0; pi < patterns; ++pi) {
        const int block = blocks == 1 ? 0 : pi;
        DA_RETURN_IF_ERROR(attend(pi, outs + block * rows * d * element,
                                  static_cast<float*>(lses.data()) + block * lse_stride));
      }
      DA_RETURN_IF_ERROR(
          CudaStatus(LaunchCombine(share, outs, io, static_cast<const float*>(lses.data()), stream),
                     "combine"));
      times.Mark("combine");
      return WaitForQueued(stream, "combine");
    }
    DA_ASSIGN_OR_RETURN(DeviceBuffer pattern_out, Allocate(rows * d * element));
    DA_ASSIGN_OR_RETURN(DeviceBuffer fold, Allocate(rows * (d + 3) * 4));
    auto* lse = static_cast<float*>(fold.data());
    float* acc = lse + rows;
    float* max_lse = acc + rows * d;
    float* weight = max_lse + rows;
    DA_RETURN_IF_ERROR(
        CudaStatus(cudaMemsetAsync(acc, 0, rows * (d + 2) * 4, stream), "clear the fold"));
    times.Mark("alloc+clear");
    for (int pi = 0; pi < patterns; ++pi) {
      DA_RETURN_IF_ERROR(attend(pi, pattern_out.data(), lse));
      DA_RETURN_IF_ERROR(CudaStatus(
          LaunchFold(share, pi, pattern_out.data(), io, lse, acc, max_lse, weight, stream),
          "fold"));
      times.Mark(absl::StrCat("p", pi, " fold"));
    }
    DA_RETURN_IF_ERROR(CudaStatus(LaunchFinish(share, acc, weight, stream), "finish"));
    times.Mark("finish");
    return WaitForQueued(stream, "finish");
#else
    (void)plan, (void)problem, (void)share, (void)context, (void)stream;
    return absl::InternalError("cuda plan with fused calls in a build without cuDNN");
#endif
  }

  // Staged copies (DA_CUDA_STAGING=1; not yet run on a GPU): copies of kStagedMin bytes or more
  // go through kStagingBuffers pinned buffers of kStagingChunk bytes, their memcpy split over a
  // pool of host threads (staged_copy.h); one such copy at a time per backend, any other copy
  // meanwhile goes straight from pageable memory. The lock, held for the copy, when this one
  // is staged.
  static constexpr int64_t kStagedMin = int64_t{16} << 20;
  static constexpr int64_t kStagingChunk = int64_t{32} << 20;
  static constexpr int kStagingBuffers = 3;
  std::unique_lock<std::mutex> StagingFor(int64_t bytes) {
    if (!staging_ || bytes < kStagedMin) return {};
    return std::unique_lock<std::mutex>(staging_mutex_, std::try_to_lock);
  }

  // The pinned buffers, their events and the copier, made on the first staged copy (under the
  // staging lock).
  absl::Status EnsureStaging() {
    if (copier_ != nullptr) return absl::OkStatus();
    // Buffer and event in pairs, kept only together: a failure part-way (pinned memory runs out)
    // leaves the two lists the same length, for the destructor to free (Staged does not try
    // again).
    for (int b = static_cast<int>(staging_buffers_.size()); b < kStagingBuffers; ++b) {
      void* buffer = nullptr;
      DA_RETURN_IF_ERROR(CudaStatus(cudaHostAlloc(&buffer, kStagingChunk, cudaHostAllocDefault),
                                    "pinned staging buffer"));
      cudaEvent_t event = nullptr;
      if (const cudaError_t made = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
          made != cudaSuccess) {
        cudaFreeHost(buffer);
        return CudaStatus(made, "staging event");
      }
      staging_buffers_.push_back(static_cast<uint8_t*>(buffer));
      staging_events_.push_back(event);
    }
    const int threads =
        std::clamp<int>(static_cast<int>(std::thread::hardware_concurrency()) / 2, 1, 8);
    copy_pool_ = std::make_unique<ThreadPool>(threads);
    copier_ = std::make_unique<StagedCopier>(staging_buffers_, kStagingChunk, copy_pool_.get());
    return absl::OkStatus();
  }

  // Whether the staging buffers are there (made now if not; the staging mutex held). Where pinned
  // memory cannot be had, the copy goes plain instead of failing, says so once, and every later
  // copy goes plain too rather than trying a failing cudaHostAlloc again each time.
  bool Staged() {
    if (staging_failed_) return false;
    const absl::Status made = EnsureStaging();
    if (!made.ok()) {
      staging_failed_ = true;
      std::fprintf(stderr, "cuda:%d: no staging buffers (%s); copies go without them\n", ordinal_,
                   std::string(made.message()).c_str());
    }
    return made.ok();
  }

  // A plain copy in pieces of kCopyPiece bytes, the run's stop polled before each: a copy from
  // or to pageable memory returns about when its bytes have moved (7 GB/s on the H200 host: 4 GiB,
  // one tensor at 1M tokens, took over half a second), so a cancelled run stops within a piece.
  static constexpr int64_t kCopyPiece = int64_t{256} << 20;
  absl::Status CopyInPieces(void* dst, const void* src, int64_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream, const RunContext& context) {
    for (int64_t done = 0; done < bytes; done += kCopyPiece) {
      if (Stopped(context)) {
        return absl::CancelledError(
            absl::StrCat("cuda copy cancelled after ", done, " of ", bytes, " bytes"));
      }
      const int64_t n = std::min(kCopyPiece, bytes - done);
      DA_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + done,
                                     static_cast<const uint8_t*>(src) + done,
                                     static_cast<size_t>(n), kind, stream),
                     kind == cudaMemcpyHostToDevice ? "copy to the device" : "copy to the host"));
    }
    return absl::OkStatus();
  }

  // The device side of a staged copy: buffer b's bytes to or from device + offset on the stream,
  // an event after each, waited for before the buffer's next use; the run's stop, polled before
  // each chunk.
  StagedCopier::Ops StagingOps(uint8_t* device, cudaMemcpyKind kind, cudaStream_t stream,
                               const RunContext& context) {
    return {[this, device, kind, stream](int b, int64_t offset, int64_t n) -> absl::Status {
              void* dst = kind == cudaMemcpyHostToDevice ? static_cast<void*>(device + offset)
                                                         : staging_buffers_[b];
              const void* src = kind == cudaMemcpyHostToDevice
                                    ? static_cast<const void*>(staging_buffers_[b])
                                    : device + offset;
              DA_RETURN_IF_ERROR(CudaStatus(
                  cudaMemcpyAsync(dst, src, static_cast<size_t>(n), kind, stream), "staged copy"));
              return CudaStatus(cudaEventRecord(staging_events_[b], stream), "staged copy event");
            },
            [this](int b) {
              return CudaStatus(cudaEventSynchronize(staging_events_[b]), "staged copy wait");
            },
            [cancelled = context.cancelled] { return cancelled != nullptr && cancelled->load(); }};
  }

  // Every buffer comes from the block cache (block_cache.h), made on first use. With
  // DA_CUDA_CACHE=1 (not yet run on a GPU) it keeps freed buffers for reuse by size, up to a
  // quarter of the device's memory; otherwise it keeps none: cudaMalloc and cudaFree as before.
  // Each buffer's deleter holds it, so it outlives the backend's last buffer. One cache per GPU
  // (SharedCacheFor): backends on one GPU (two logical devices mapped to it) share it, so that a
  // failed cudaMalloc of either releases what both keep, and together they keep at most the
  // quarter.
  std::shared_ptr<BlockCache> Cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cache_ == nullptr) cache_ = SharedCacheFor(ordinal_, cache_enabled_);
    return cache_;
  }

  // The context's stream, else the backend's own (created on first use, non-blocking).
  absl::StatusOr<cudaStream_t> StreamOf(const RunContext& context) {
    if (context.stream != nullptr) return static_cast<cudaStream_t>(context.stream);
    std::lock_guard<std::mutex> lock(mutex_);
    if (stream_ == nullptr) {
      DA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                    "creating the stream"));
    }
    return stream_;
  }

  const int ordinal_;
  const DeviceCapabilities capabilities_;
  const PrecisionPolicyOptions options_;
  const bool cache_enabled_;  // DA_CUDA_CACHE=1: device buffers kept for reuse (Cache()).
  const bool staging_;        // DA_CUDA_STAGING=1: large copies through pinned buffers.
  bool fused_ = false;  // The cuDNN path (sm_80 and later, cuDNN built; DA_CUDA_FUSED=0: off).
  // The fused path's combine. One pass: every pattern's output kept and combined once at the
  // end (right on an H200; bf16 outputs, P of them, against the fold's one output and fp32
  // accumulators: less memory for P <= 3 and less traffic always). Fold: pattern by pattern into
  // fp32 accumulators, then the finish. Auto (the default): one pass where it never holds more
  // memory: LONGNET with P <= 3, GROUPED always (its patterns share one block, OnePassBlocks);
  // else the fold. DA_CUDA_COMBINE=onepass or fold forces one.
  enum class Combine { kAuto, kOnePass, kFold };
  Combine combine_ = Combine::kAuto;
  bool OnePass(bool grouped, int patterns) const {
    return combine_ == Combine::kOnePass ||
           (combine_ == Combine::kAuto && (grouped || patterns <= 3));
  }
  bool fp8_ = false;          // fp8 on the fused path (sm_90 and later).
  bool stage_times_ = false;  // DA_CUDA_STAGE_TIMES=1: the fused path prints its stages' times.
  std::shared_ptr<BlockCache> cache_;
  std::mutex staging_mutex_;
  bool staging_failed_ = false;  // Under staging_mutex_: EnsureStaging failed once.
  std::vector<uint8_t*> staging_buffers_;
  std::vector<cudaEvent_t> staging_events_;
  std::unique_ptr<ThreadPool> copy_pool_;
  std::unique_ptr<StagedCopier> copier_;
  std::mutex mutex_;
  cudaStream_t stream_ = nullptr;
  // The row kernel's stop flags, kept between runs: cudaFreeHost waits for the whole device
  // (other runs' work and any NCCL transfer on it included), so a run's flag comes back here.
  std::mutex flags_mutex_;
  std::vector<std::unique_ptr<PinnedFlag>> idle_flags_;

  absl::StatusOr<std::unique_ptr<PinnedFlag>> TakeFlag() {
    {
      std::lock_guard<std::mutex> lock(flags_mutex_);
      if (!idle_flags_.empty()) {
        std::unique_ptr<PinnedFlag> flag = std::move(idle_flags_.back());
        idle_flags_.pop_back();
        flag->Clear();
        return flag;
      }
    }
    DA_ASSIGN_OR_RETURN(PinnedFlag made, PinnedFlag::Create());
    return std::make_unique<PinnedFlag>(std::move(made));
  }
  void GiveFlag(std::unique_ptr<PinnedFlag> flag) {
    if (flag == nullptr) return;
    std::lock_guard<std::mutex> lock(flags_mutex_);
    idle_flags_.push_back(std::move(flag));
  }
};

// "cuda:3" -> 3 (unless DeviceInfo::ordinal says otherwise); "sm_90" -> (9, 0).
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const DeviceInfo& device,
                                                         const BackendOptions& options) {
  int ordinal = device.ordinal;
  const size_t colon = device.id.find(':');
  if (ordinal < 0 && (colon == std::string::npos ||
                      !absl::SimpleAtoi(device.id.substr(colon + 1), &ordinal) || ordinal < 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda device id '", device.id, "' is not cuda:<ordinal>"));
  }
  // Past the visible GPUs, cudaSetDevice would fail in every DeviceScope (which does not check)
  // and each call would run on whatever device the thread had.
  int count = 0;
  if (const cudaError_t counted = cudaGetDeviceCount(&count); counted != cudaSuccess) {
    ForgetHandledError(counted);
    count = 0;
  }
  if (ordinal >= count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda device ", device.id, ": ordinal ", ordinal,
                                                   " is out of range: this process sees ", count,
                                                   " CUDA device(s)"));
  }
  int sm = 0;
  if (device.capability.rfind("sm_", 0) != 0 ||
      !absl::SimpleAtoi(device.capability.substr(3), &sm) || sm < 10) {
    return absl::InvalidArgumentError(absl::StrCat("cuda device ", device.id, " capability '",
                                                   device.capability,
                                                   "' is not sm_<major><minor>"));
  }
  return std::make_unique<CudaBackend>(ordinal, sm / 10, sm % 10, options.precision);
}

const bool kRegistered = RegisterBackend(
    {.name = "cuda", .device_kind = "cuda", .default_for_kind = true, .make = MakeCudaBackend});

}  // namespace
}  // namespace da::engine::cuda
