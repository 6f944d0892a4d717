// The CPU backend's plan: the task decomposition of a problem's share (the whole problem unless
// the key names a share) and one workspace for running it, sized from the plan key and touched
// when built.
//
//   absl::StatusOr<std::shared_ptr<cpu::CpuPlan>> plan = cpu::BuildCpuPlan(key);
//   std::unique_ptr<cpu::Workspace> ws = (*plan)->TakeWorkspace();  // null while another run has
//   it
//   ...
//   (*plan)->ReturnWorkspace(std::move(ws));
//
// Thread safety: the tables are immutable after BuildCpuPlan; Take/ReturnWorkspace lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cpu/aligned_buffer.h"
#include "engine/cpu/task_plan.h"
#include "engine/plan_cache.h"

namespace da::engine::cpu {

struct ThreadSpace {
  AlignedBuffer q, kt, v, out, lse, scratch, bf16;
};

// What a plan's workspace must hold.
struct WorkspaceSizes {
  int threads = 1;
  int64_t head_dim = 0;
  int64_t dim_pad = 0;
  int64_t rows_pad = 0;    // Query rows of the largest chunk, padded.
  int64_t keys_pad = 0;    // Keys of the largest segment, padded.
  int64_t rows_total = 0;  // batch x share tokens x share heads: LONGNET state rows.
  bool longnet = false;
  // LONGNET of several patterns folds each row's contributions in a running state (max_lse,
  // weight); one pattern's rows go straight to the output and need none.
  bool fold = false;
  bool accumulator = false;  // A fold into a non-fp32 output needs its own fp32 accumulator.
  bool bf16 = false;
};

struct Workspace {
  std::vector<ThreadSpace> threads;
  AlignedBuffer acc, max_lse, weight;  // The fold's running state (WorkspaceSizes::fold).

  int64_t bytes() const;
};

// Reserves every buffer; with touch, writes them once so that their pages are resident. A
// `stop` that turns true while it touches (a few milliseconds per check at most) ends it with
// CANCELLED.
absl::Status PrepareWorkspace(Workspace& ws, const WorkspaceSizes& sizes, bool touch,
                              const std::atomic<bool>* stop = nullptr);

// What PrepareWorkspace on a fresh workspace allocates (Workspace::bytes() afterwards), computed
// without allocating: admission control counts it before a plan exists.
int64_t WorkspaceBytes(const WorkspaceSizes& sizes);

// What BuildCpuPlan(key) keeps: WorkspaceBytes(SizesFor(key)) and at most its task table's bytes
// (TaskTableBytes), computed without building anything.
int64_t PlanBytesFor(const PlanKey& key);

class CpuPlan final : public Plan {
 public:
  CpuPlan(const PlanKey& key, const WorkspaceSizes& sizes) : key_(key), sizes_(sizes) {}

  int64_t bytes() const override { return workspace_bytes_ + table_bytes_; }
  int64_t workspace_bytes() const { return workspace_bytes_; }
  const WorkspaceSizes& sizes() const { return sizes_; }
  const PlanKey& key() const { return key_; }
  const std::vector<std::vector<Task>>& loops() const { return tasks_.loops; }
  // The spanning sets the share's tasks read gathered rows of (empty for a whole problem).
  const std::vector<SpanningId>& spanning() const { return tasks_.spanning; }

  // The plan's own workspace, or null while another run holds it.
  std::unique_ptr<Workspace> TakeWorkspace();
  void ReturnWorkspace(std::unique_ptr<Workspace> workspace);

 private:
  friend absl::StatusOr<std::shared_ptr<CpuPlan>> BuildCpuPlan(const PlanKey& key,
                                                               const std::atomic<bool>* stop);
  absl::Status Build(const std::atomic<bool>* stop);

  const PlanKey key_;
  const WorkspaceSizes sizes_;
  std::vector<std::vector<HeadWork>> work_;  // Tasks point into it.
  ShareTasks tasks_;
  std::mutex mutex_;
  std::unique_ptr<Workspace> idle_;
  int64_t workspace_bytes_ = 0;
  int64_t table_bytes_ = 0;
};

// The workspace a plan for key needs.
WorkspaceSizes SizesFor(const PlanKey& key);

// Sizes, decomposes and allocates (touching the workspace). The key's precision must be one the
// caller's kernels can run (bf16 only with AVX512-BF16). When `stop` turns true during the
// build, CANCELLED (the workspace touched so far is freed).
absl::StatusOr<std::shared_ptr<CpuPlan>> BuildCpuPlan(const PlanKey& key,
                                                      const std::atomic<bool>* stop = nullptr);

}  // namespace da::engine::cpu
