#include "engine/backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/thread_pool.h"

namespace da::engine {

PlanKey MakePlanKey(const TensorView& q, const TensorView& k, DType out_dtype,
                    const AttentionSpec& spec, Precision precision, const std::string& devices,
                    int threads) {
  PlanKey key;
  key.shape = {q.shape.batch, q.shape.seq_len, q.shape.heads, k.shape.heads, q.shape.head_dim};
  key.dtype = q.dtype;
  key.out_dtype = out_dtype;
  key.patterns = spec.patterns;
  key.causal = spec.causal;
  key.mode = spec.mode;
  key.precision = precision;
  key.devices = devices;
  key.threads = threads;
  return key;
}

PlanKey MakeShareKey(const ShareProblem& problem, Precision precision, const std::string& devices,
                     int threads) {
  PlanKey key;
  key.shape = problem.shape;
  key.dtype = problem.q.dtype;
  key.out_dtype = problem.out.dtype;
  key.patterns = problem.spec.patterns;
  key.causal = problem.spec.causal;
  key.mode = problem.spec.mode;
  key.precision = precision;
  key.devices = devices;
  key.threads = threads;
  if (!problem.share.Covers(problem.shape)) key.share = problem.share;
  return key;
}

absl::Status RunShareWithPlan(const ShareCompute& compute, const ShareProblem& problem,
                              Precision precision, const std::atomic<bool>* stop, bool* hit,
                              RunReport* report) {
  if (compute.backend == nullptr) return absl::InternalError("share run without a backend");
  Backend& backend = *compute.backend;
  const int threads = compute.pool != nullptr ? compute.pool->size() : 1;
  const PlanKey key = MakeShareKey(problem, precision, compute.device, threads);
  std::shared_ptr<Plan> plan;
  if (compute.plans != nullptr) {
    DA_ASSIGN_OR_RETURN(plan, compute.plans->GetOrBuild(
                                  key, [&] { return backend.BuildPlan(key, stop); }, hit, stop));
  } else {
    DA_ASSIGN_OR_RETURN(plan, backend.BuildPlan(key, stop));
    if (hit != nullptr) *hit = false;
  }
  absl::Status ran = backend.RunShare(*plan, problem, {compute.pool, stop, nullptr, report});
  plan.reset();
  if (compute.plans != nullptr) compute.plans->Trim();  // Within budget now the plan is free.
  return ran;
}

absl::Status CopyGatheredRowsIn(Backend& backend, const ProblemShape& shape, DType dtype,
                                const std::vector<SpanningKeys>& sets,
                                std::vector<GatheredKeys>& gathered, const RunContext& io,
                                std::vector<DeviceBuffer>& buffers) {
  for (size_t i = 0; i < sets.size(); ++i) {
    if (gathered[i].k == nullptr) continue;
    const int64_t bytes = GatheredRowsBytes(shape, sets[i], dtype);
    for (const void** rows : {&gathered[i].k, &gathered[i].v}) {
      DA_ASSIGN_OR_RETURN(DeviceBuffer moved, backend.Allocate(bytes));
      DA_RETURN_IF_ERROR(backend.CopyToDevice(moved.data(), *rows, bytes, io));
      *rows = moved.data();
      buffers.push_back(std::move(moved));
    }
  }
  return absl::OkStatus();
}

absl::Status RunHostShareWithPlan(const ShareCompute& compute, const ShareProblem& problem,
                                  Precision precision, const std::atomic<bool>* stop, bool* hit,
                                  RunReport* report) {
  if (compute.backend == nullptr) return absl::InternalError("share run without a backend");
  // A share whose request was cancelled before its run (a worker told mid-scatter) moves nothing.
  if (stop != nullptr && stop->load())
    return absl::CancelledError("share run stopped before it began");
  Backend& backend = *compute.backend;
  if (backend.Space().host())
    return RunShareWithPlan(compute, problem, precision, stop, hit, report);
  DA_RETURN_IF_ERROR(CheckShareSpace(problem, MemorySpace::Host()));
  const RunContext io{compute.pool, stop, nullptr};
  const MemorySpace space = backend.Space();
  std::vector<DeviceBuffer> buffers;  // Every device buffer of the run, freed on return.
  const auto moved = [&](const void* host, int64_t bytes) -> absl::StatusOr<void*> {
    DA_ASSIGN_OR_RETURN(DeviceBuffer buffer, backend.Allocate(bytes));
    if (host != nullptr) DA_RETURN_IF_ERROR(backend.CopyToDevice(buffer.data(), host, bytes, io));
    buffers.push_back(std::move(buffer));
    return buffers.back().data();
  };
  ShareProblem p = problem;
  DA_ASSIGN_OR_RETURN(void* q, moved(problem.q.data, problem.q.bytes));
  DA_ASSIGN_OR_RETURN(void* k, moved(problem.k.data, problem.k.bytes));
  DA_ASSIGN_OR_RETURN(void* v, moved(problem.v.data, problem.v.bytes));
  DA_ASSIGN_OR_RETURN(void* out, moved(nullptr, problem.out.bytes));
  p.q.data = q;
  p.k.data = k;
  p.v.data = v;
  p.out.data = out;
  p.q.space = p.k.space = p.v.space = space;
  p.out.space = space;
  std::vector<GatheredKeys> gathered;
  if (problem.gathered != nullptr) {
    gathered = *problem.gathered;
    DA_RETURN_IF_ERROR(CopyGatheredRowsIn(backend, problem.shape, problem.k.dtype,
                                          *problem.spanning, gathered, io, buffers));
    p.gathered = &gathered;
  }
  DA_RETURN_IF_ERROR(backend.Synchronize(io));
  DA_RETURN_IF_ERROR(RunShareWithPlan(compute, p, precision, stop, hit, report));
  DA_RETURN_IF_ERROR(backend.CopyToHost(problem.out.data, out, problem.out.bytes, io));
  return backend.Synchronize(io);
}

DeviceBuffer::DeviceBuffer(void* data, int64_t bytes, MemorySpace space,
                           std::function<void(void*)> release)
    : data_(data), bytes_(bytes), space_(space), release_(std::move(release)) {}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr && release_) release_(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr && release_) release_(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    space_ = other.space_;
    release_ = std::move(other.release_);
  }
  return *this;
}

absl::StatusOr<DeviceBuffer> Backend::Allocate(int64_t bytes) {
  constexpr size_t kAlign = 64;
  const size_t rounded =
      (static_cast<size_t>(std::max<int64_t>(bytes, 1)) + kAlign - 1) / kAlign * kAlign;
  void* data = std::aligned_alloc(kAlign, rounded);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat(Name(), " backend: cannot allocate ", bytes, " bytes of host memory"));
  }
  return DeviceBuffer(data, bytes, MemorySpace::Host(), [](void* p) { std::free(p); });
}

absl::Status Backend::CopyToDevice(void* dst, const void* src, int64_t bytes, const RunContext&) {
  if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
  return absl::OkStatus();
}

absl::Status Backend::CopyToHost(void* dst, const void* src, int64_t bytes, const RunContext&) {
  if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
  return absl::OkStatus();
}

absl::Status Backend::RunPlan(Plan& plan, const TensorView& q, const TensorView& k,
                              const TensorView& v, const AttentionSpec& spec,
                              const MutableTensorView& out, const RunContext& context) {
  return RunShare(plan, WholeProblem(q, k, v, spec, out), context);
}

absl::Status Backend::Run(const TensorView& q, const TensorView& k, const TensorView& v,
                          const AttentionSpec& spec, const MutableTensorView& out,
                          const RunContext& context) {
  DA_ASSIGN_OR_RETURN(const PrecisionChoice precision, ChoosePrecision(spec));
  const int threads = context.pool != nullptr ? context.pool->size() : 1;
  const PlanKey key = MakePlanKey(q, k, out.dtype, spec, precision.precision, Name(), threads);
  DA_ASSIGN_OR_RETURN(const std::shared_ptr<Plan> plan, BuildPlan(key, context.cancelled));
  return RunPlan(*plan, q, k, v, spec, out, context);
}

}  // namespace da::engine
