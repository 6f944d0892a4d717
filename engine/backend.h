// The interface every compute backend implements (reference, CPU, later CUDA).
//
// A backend says what it supports and in which precision it would compute, builds a Plan for a
// problem's key (work decomposition and warm workspaces, kept by the engine's PlanCache), and runs
// shares of problems on a plan (engine/share.h): a whole problem is the share that covers it. A
// run must write every element of its share's output (positions no pattern keeps get 0) and
// nothing else.
//
//   DA_ASSIGN_OR_RETURN(PrecisionChoice precision, backend.ChoosePrecision(spec));
//   ShareProblem problem = WholeProblem(q, k, v, spec, out);  // or one device's share
//   PlanKey key = MakeShareKey(problem, precision.precision, "cpu:0", threads);
//   DA_ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, backend.BuildPlan(key, /*stop=*/nullptr));
//   DA_RETURN_IF_ERROR(backend.RunShare(*plan, problem, context));
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/plan_cache.h"
#include "engine/share.h"
#include "engine/tensor.h"

namespace da::engine {

class ThreadPool;

// What a run tells its caller beyond its output: the fp8 scales it derived from the data, and
// where it computed in another precision than its plan's key, which and why.
struct RunReport {
  bool fp8 = false;            // The run quantized its inputs to fp8 E4M3.
  float amax[3] = {0, 0, 0};   // The largest magnitudes of q, k, v.
  float scale[3] = {1, 1, 1};  // Their factors onto fp8's range (448 / amax).
  // Not kAuto: the run computed in this precision instead of the chosen one (the CUDA backend
  // where its fused path cannot take the share: fp32 on the row kernel; or cuDNN refused fp8:
  // bf16), for fallback_why; the engine reports the least precise precision its devices computed.
  Precision fallback = Precision::kAuto;
  std::string fallback_why;
};

struct RunContext {
  ThreadPool* pool = nullptr;                    // May be null: run on the calling thread.
  const std::atomic<bool>* cancelled = nullptr;  // When it turns true, stop and return CANCELLED.
  // The device's queue the run's copies and kernels are ordered on, opaque to the engine (a
  // cudaStream_t for the CUDA backend); null: the backend's default. Unused by host backends. The
  // CUDA backend's plans keep one cuDNN workspace for all their runs, so runs of one plan must be
  // on one stream until each run has its own.
  void* stream = nullptr;
  RunReport* report = nullptr;  // May be null: nobody asked.
};

// Memory a backend allocated in its space (Backend::Allocate); released when destroyed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(void* data, int64_t bytes, MemorySpace space, std::function<void(void*)> release);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  int64_t bytes() const { return bytes_; }
  MemorySpace space() const { return space_; }

 private:
  void* data_ = nullptr;
  int64_t bytes_ = 0;
  MemorySpace space_;
  std::function<void(void*)> release_;
};

// The precision a backend will compute a request in, and why.
struct PrecisionChoice {
  Precision precision = Precision::kFloat32;
  std::string reason;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string Name() const = 0;

  // The memory its runs read and write: every view given to RunShare must be in it. Host memory
  // for CPU backends; the GPU's own for a CUDA backend.
  virtual MemorySpace Space() const { return MemorySpace::Host(); }

  // A buffer of `bytes` in Space() from the backend's allocator (share inputs and outputs,
  // staging); RESOURCE_EXHAUSTED naming the bytes when the device is out of memory. The default
  // allocates 64-byte aligned host memory.
  virtual absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes);

  // Copies between host memory and Space(), ordered on context.stream (memcpy for a host
  // backend); Synchronize waits until every copy and run queued on context.stream is done.
  virtual absl::Status CopyToDevice(void* dst, const void* src, int64_t bytes,
                                    const RunContext& context);
  virtual absl::Status CopyToHost(void* dst, const void* src, int64_t bytes,
                                  const RunContext& context);
  virtual absl::Status Synchronize(const RunContext& context) {
    (void)context;
    return absl::OkStatus();
  }

  // The precisions it computes in on its device (DeviceInfo::precisions).
  virtual std::vector<Precision> Precisions() const { return {Precision::kFloat32}; }

  // Maps the request's precision wish to what this backend computes in; INVALID_ARGUMENT naming
  // the supported precisions when the wish cannot be met.
  virtual absl::StatusOr<PrecisionChoice> ChoosePrecision(const AttentionSpec& spec) const = 0;

  // OK when this backend can compute the problem; otherwise why not.
  virtual absl::Status Supports(const ProblemShape& shape, DType dtype,
                                const AttentionSpec& spec) const = 0;

  // Everything derivable from the key, workspaces allocated and touched. When `stop` (optional)
  // turns true, the build ends early with CANCELLED and keeps nothing.
  virtual absl::StatusOr<std::shared_ptr<Plan>> BuildPlan(const PlanKey& key,
                                                          const std::atomic<bool>* stop) = 0;

  // The bytes BuildPlan(key) allocates (its workspace, and tables such as the CPU's tasks),
  // computed without allocating anything: the engine's admission control counts them. A run that
  // finds its plan's workspace taken by a concurrent run allocates the workspace again, so this
  // also covers what one run needs. 0 for a backend whose plans hold no workspace.
  virtual int64_t PlanWorkspaceBytes(const PlanKey& key) const {
    (void)key;
    return 0;
  }

  // Whether RunShare computes shares smaller than the whole problem (a backend that does not
  // is never given part of a sharded problem).
  virtual bool ComputesShares() const { return true; }

  // Computes the share's output rows of DilatedAttention(q, k, v) per docs/MATH.md on a plan this
  // backend built for the problem's key (MakeShareKey). The problem is validated (views,
  // CheckShareViews). A plan may serve concurrent runs. When context.cancelled turns true the run
  // stops within a kernel panel with CANCELLED.
  virtual absl::Status RunShare(Plan& plan, const ShareProblem& problem,
                                const RunContext& context) = 0;

  // The whole problem: RunShare on WholeProblem(q, k, v, spec, out).
  absl::Status RunPlan(Plan& plan, const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionSpec& spec, const MutableTensorView& out,
                       const RunContext& context);

  // Builds a plan for this one problem and runs it (no cache): for tests and one-off use.
  absl::Status Run(const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionSpec& spec, const MutableTensorView& out,
                   const RunContext& context);
};

// The plan key of a problem: views' shapes and dtypes, the spec's patterns, mode and causality,
// the chosen precision, the devices and the thread count.
PlanKey MakePlanKey(const TensorView& q, const TensorView& k, DType out_dtype,
                    const AttentionSpec& spec, Precision precision, const std::string& devices,
                    int threads);

// The plan key of a share: the whole problem's key and, unless it covers everything, the share.
PlanKey MakeShareKey(const ShareProblem& problem, Precision precision, const std::string& devices,
                     int threads);

// What one device computes its shares with.
struct ShareCompute {
  Backend* backend = nullptr;    // Required.
  PlanCache* plans = nullptr;    // Null: a plan built for each run alone.
  ThreadPool* pool = nullptr;    // Null: the calling thread.
  std::string device = "cpu:0";  // The device, in plan keys.
  // The CPUs the computing thread is pinned to for the run (a NUMA device); empty: not pinned.
  std::vector<int> cpus = {};
};

// Runs a share in `precision` with its plan from compute.plans (built and cached on a miss).
// `stop` (optional) ends the plan build or the run with CANCELLED. *hit (optional) says whether
// the plan was cached; *report (optional) gets the run's RunReport.
absl::Status RunShareWithPlan(const ShareCompute& compute, const ShareProblem& problem,
                              Precision precision, const std::atomic<bool>* stop,
                              bool* hit = nullptr, RunReport* report = nullptr);

// Gathered rows in host memory (`gathered`, index-aligned with `sets`) copied into buffers of
// `backend` and the entries repointed at them; the buffers are appended to `buffers`, which must
// outlive the run. The copies are queued on `io`: the caller synchronises.
absl::Status CopyGatheredRowsIn(Backend& backend, const ProblemShape& shape, DType dtype,
                                const std::vector<SpanningKeys>& sets,
                                std::vector<GatheredKeys>& gathered, const RunContext& io,
                                std::vector<DeviceBuffer>& buffers);

// RunShareWithPlan for a share whose tensors and gathered rows are in host memory, on a backend
// of any memory: a host backend computes in place; another (a GPU) gets the inputs and gathered
// rows copied into buffers of its own, computes there, and the output is copied back. What a
// worker rank does with the share it received over the network. CANCELLED at once, with nothing
// copied or computed, when `stop` is up already.
absl::Status RunHostShareWithPlan(const ShareCompute& compute, const ShareProblem& problem,
                                  Precision precision, const std::atomic<bool>* stop,
                                  bool* hit = nullptr, RunReport* report = nullptr);

}  // namespace da::engine
