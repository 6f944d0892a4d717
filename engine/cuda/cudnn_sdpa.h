// cuDNN's fused attention for the CUDA backend's fast path (issue #15): one graph per distinct
// SdpaCall geometry (engine/cuda/sdpa_plan.h), built once and kept by the plan, executed on a
// stream with the share's tensors, the pattern's output buffer and the fp32 log-sum-exp buffer.
// The cuDNN frontend (header-only, slow to compile) is included by cudnn_sdpa.cc alone.
//
//   DA_ASSIGN_OR_RETURN(auto graphs, SdpaGraphs::Build(plan.calls, DType::kBFloat16, 0));
//   DeviceBuffer workspace = ... graphs->workspace_bytes() ...
//   for (const SdpaCall& call : plan.calls)
//     DA_RETURN_IF_ERROR(graphs->Run(call, {q, k, v, pattern_out, lse}, workspace, stream));
//
// Built only where the frontend headers and libcudnn are found (DA_CUDNN_ENABLED). Not yet run on
// a GPU: the strided views are allowed by cuDNN's rules but not documented as tested, and
// graph->validate() needs a GPU; cudnn_sdpa_test (label gpu) compares a call with the reference.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cuda/sdpa_plan.h"
#include "engine/tensor.h"

namespace da::engine::cuda {

// Device pointers of one run: the share's q, k, v; out with q's layout (the pattern's output,
// in the io dtype); lse fp32 [B, T, H].
// fp8 graphs' device scalars (fp32), in this order: the descales of q, k and v (1 / their
// scales), the descale and scale of the probabilities, the output's scale, then the amaxes cuDNN
// writes of the probabilities and the output. Each kFp8ScalarStride floats (16 bytes) from the
// last: cuDNN takes every tensor's pointer as 16-byte aligned unless told otherwise.
inline constexpr int kFp8ScalarCount = 8;
inline constexpr int kFp8ScalarStride = 4;

struct SdpaTensors {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  float scale = 1.0f;  // The softmax scale (passed by value: one graph serves every scale).
  float* fp8_scalars = nullptr;  // fp8 graphs: kFp8ScalarCount device floats (above), 16-byte
                                 // aligned, kFp8ScalarStride apart.
};

// The cuDNN library loaded at run time, the one built against, and the frontend's version:
// "cuDNN 9.19.0 (built against 9.19.0), frontend 1.32.0". What the fused path gets depends on it.
std::string CudnnVersions();

class SdpaGraphs {
 public:
  // io: fp16 or bf16 (what q, k, v and out hold); device: ordinal; fp8: q, k, v and out in fp8
  // E4M3 instead, scaled (sm_90 and later; io is then ignored). INVALID_ARGUMENT for another
  // dtype; INTERNAL with cuDNN's message when a graph is refused; CANCELLED when `stop` (polled
  // before each graph) turns true.
  static absl::StatusOr<std::unique_ptr<SdpaGraphs>> Build(const std::vector<SdpaCall>& calls,
                                                           DType io, int device, bool fp8 = false,
                                                           const std::atomic<bool>* stop = nullptr);
  ~SdpaGraphs();
  SdpaGraphs(const SdpaGraphs&) = delete;
  SdpaGraphs& operator=(const SdpaGraphs&) = delete;

  int64_t workspace_bytes() const;  // The largest graph's.
  int graphs() const;

  // Executes `call` (one Build was given) on `stream` (a cudaStream_t).
  absl::Status Run(const SdpaCall& call, const SdpaTensors& tensors, void* workspace, void* stream);

 private:
  struct Impl;
  explicit SdpaGraphs(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace da::engine::cuda
