#include "engine/cpu/cpu_plan.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu/attention_kernel.h"
#include "engine/status_macros.h"

namespace da::engine::cpu {
namespace {

AttentionSpec SpecOf(const PlanKey& key) {
  AttentionSpec spec;
  spec.patterns = key.patterns;
  spec.causal = key.causal;
  spec.mode = key.mode;
  return spec;
}

}  // namespace

int64_t Workspace::bytes() const {
  int64_t total = acc.capacity_bytes() + max_lse.capacity_bytes() + weight.capacity_bytes();
  for (const ThreadSpace& t : threads) {
    for (const AlignedBuffer* b : {&t.q, &t.kt, &t.v, &t.out, &t.lse, &t.scratch, &t.bf16}) {
      total += b->capacity_bytes();
    }
  }
  return total;
}

namespace {

// Every buffer of a workspace with the floats it needs: the one list PrepareWorkspace allocates
// from and WorkspaceBytes counts from, so the admission estimate and the allocation agree.
std::vector<std::pair<AlignedBuffer*, int64_t>> WantedBuffers(Workspace& ws,
                                                              const WorkspaceSizes& z) {
  ws.threads.resize(z.threads);
  std::vector<std::pair<AlignedBuffer*, int64_t>> wanted;
  for (ThreadSpace& t : ws.threads) {
    wanted.push_back({&t.q, z.rows_pad * z.dim_pad});
    wanted.push_back({&t.kt, z.dim_pad * z.keys_pad});
    wanted.push_back({&t.v, z.keys_pad * z.dim_pad});
    wanted.push_back({&t.out, z.rows_pad * z.dim_pad});
    wanted.push_back({&t.lse, z.rows_pad});
    wanted.push_back({&t.scratch, KernelScratchFloats(z.dim_pad)});
    if (z.bf16)
      wanted.push_back({&t.bf16, KernelBf16ScratchFloats(z.rows_pad, z.keys_pad, z.dim_pad)});
  }
  if (z.fold) {
    if (z.accumulator) wanted.push_back({&ws.acc, z.rows_total * z.head_dim});
    wanted.push_back({&ws.max_lse, z.rows_total});
    wanted.push_back({&ws.weight, z.rows_total});
  }
  return wanted;
}

}  // namespace

absl::Status PrepareWorkspace(Workspace& ws, const WorkspaceSizes& z, bool touch,
                              const std::atomic<bool>* stop) {
  // Touching a fresh page costs microseconds (a huge page far more), so a large accumulator takes
  // hundreds of milliseconds: it is written in steps, with a look at `stop` between them.
  constexpr size_t kTouchStep = size_t{2} << 20;  // One huge page.
  for (const auto& [buffer, floats] : WantedBuffers(ws, z)) {
    float* data = buffer->Reserve(floats);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: cannot allocate a ", floats * 4, "-byte workspace buffer"));
    }
    if (!touch) continue;
    char* bytes = reinterpret_cast<char*>(data);
    const size_t size = static_cast<size_t>(buffer->capacity_bytes());
    for (size_t done = 0; done < size; done += kTouchStep) {
      if (stop != nullptr && stop->load(std::memory_order_relaxed)) {
        return absl::CancelledError(absl::StrCat("stopped while touching the plan's workspace (",
                                                 ws.bytes(), " bytes reserved)"));
      }
      std::memset(bytes + done, 0, std::min(kTouchStep, size - done));
    }
  }
  return absl::OkStatus();
}

int64_t WorkspaceBytes(const WorkspaceSizes& sizes) {
  Workspace empty;  // Its buffers stay unallocated: only the list of sizes is wanted.
  int64_t total = 0;
  for (const auto& [buffer, floats] : WantedBuffers(empty, sizes)) {
    total += AlignedBuffer::CapacityFor(floats);
  }
  return total;
}

std::unique_ptr<Workspace> CpuPlan::TakeWorkspace() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::move(idle_);
}

void CpuPlan::ReturnWorkspace(std::unique_ptr<Workspace> workspace) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (idle_ == nullptr) idle_ = std::move(workspace);
}

absl::Status CpuPlan::Build(const std::atomic<bool>* stop) {
  const AttentionSpec spec = SpecOf(key_);
  work_ = AssignHeadPatterns(key_.shape.heads, spec);
  tasks_ = PlanShareTasks(key_.shape, spec, key_.ShareOrWhole(), work_, sizes_.threads);
  idle_ = std::make_unique<Workspace>();
  DA_RETURN_IF_ERROR(PrepareWorkspace(*idle_, sizes_, /*touch=*/true, stop));
  workspace_bytes_ = idle_->bytes();
  for (const auto& loop : tasks_.loops) table_bytes_ += loop.size() * sizeof(Task);
  table_bytes_ += tasks_.spanning.size() * sizeof(SpanningId);
  return absl::OkStatus();
}

int64_t PlanBytesFor(const PlanKey& key) {
  const WorkspaceSizes sizes = SizesFor(key);
  return WorkspaceBytes(sizes) +
         TaskTableBytes(key.shape, SpecOf(key), key.ShareOrWhole(), sizes.threads);
}

WorkspaceSizes SizesFor(const PlanKey& key) {
  WorkspaceSizes z;
  z.threads = std::max(1, key.threads);
  z.head_dim = key.shape.head_dim;
  z.dim_pad = RoundUp(key.shape.head_dim, kDimAlign);
  int64_t max_kept = 0;
  for (const Pattern& p : key.patterns) {
    const int64_t span = std::min(p.segment_len, key.shape.seq_len);
    max_kept = std::max(max_kept, (span + p.dilation - 1) / p.dilation);
  }
  z.rows_pad = RoundUp(max_kept, kRowAlign);
  z.keys_pad = RoundUp(max_kept, kKeyAlign);
  const Share share = key.ShareOrWhole();
  z.rows_total = key.shape.batch * share.tokens() * share.heads();
  z.longnet = key.mode == CombineMode::kLongNet;
  z.fold = z.longnet && key.patterns.size() > 1;
  z.accumulator = z.fold && key.out_dtype != DType::kFloat32;
  z.bf16 = key.precision == Precision::kBFloat16;
  return z;
}

absl::StatusOr<std::shared_ptr<CpuPlan>> BuildCpuPlan(const PlanKey& key,
                                                      const std::atomic<bool>* stop) {
  const auto start = std::chrono::steady_clock::now();
  auto plan = std::make_shared<CpuPlan>(key, SizesFor(key));
  DA_RETURN_IF_ERROR(plan->Build(stop));
  plan->build_time_us = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
  return plan;
}

}  // namespace da::engine::cpu
