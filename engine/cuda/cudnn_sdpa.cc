// The one translation unit that includes the cuDNN frontend (about 90 s to compile).
#include "engine/cuda/cudnn_sdpa.h"

#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "engine/cuda/device_scope.h"
#include "engine/cuda/nvrtc_on_demand.h"

namespace da::engine::cuda {
namespace fe = cudnn_frontend;
namespace {

constexpr int64_t kQ = 1, kK = 2, kV = 3, kO = 4, kStats = 5, kScale = 6;
// fp8 graphs' scalars (device fp32), in SdpaTensors::fp8_scalars' order.
constexpr int64_t kFp8Scalars[kFp8ScalarCount] = {7, 8, 9, 10, 11, 12, 13, 14};
constexpr const char* kFp8ScalarNames[kFp8ScalarCount] = {
    "descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o", "amax_s", "amax_o"};

std::vector<int64_t> Dims(const SdpaView& view) { return {view.dims.begin(), view.dims.end()}; }
std::vector<int64_t> Strides(const SdpaView& view) {
  return {view.strides.begin(), view.strides.end()};
}

// A cuDNN version number (major * 10000 + minor * 100 + patch since 9.0) as major.minor.patch.
std::string VersionName(size_t version) {
  return absl::StrCat(version / 10000, ".", version / 100 % 100, ".", version % 100);
}

absl::Status FrontendStatus(fe::error_t error, const std::string& what) {
  if (error.is_good()) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("cuDNN ", VersionName(cudnnGetVersion()), " ", what, ": ", error.get_message()));
}

}  // namespace

struct SdpaGraphs::Impl {
  int device = 0;
  // Runs of one plan on several threads (parallel streams of one shape, a stream's chunks) share
  // its handle and workspace: cuDNN's handle is not thread-safe, so Run holds this while it
  // queues a call. The lock does not cover the workspace, which the queued call uses later: that
  // is safe only while every run is on one CUDA stream (CudaPlan::workspace).
  std::mutex mutex;
  cudnnHandle_t handle = nullptr;
  std::map<std::string, std::shared_ptr<fe::graph::Graph>> graphs;  // By SdpaCall::Signature.
  int64_t workspace_bytes = 0;
  bool fp8 = false;

  ~Impl() {
    if (handle == nullptr) return;
    // The handle belongs to `device`; the plan may be evicted from a thread on another one.
    DeviceScope scope(device);
    cudnnDestroy(handle);
  }
};

SdpaGraphs::SdpaGraphs(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SdpaGraphs::~SdpaGraphs() = default;

absl::StatusOr<std::unique_ptr<SdpaGraphs>> SdpaGraphs::Build(const std::vector<SdpaCall>& calls,
                                                              DType io, int device, bool fp8,
                                                              const std::atomic<bool>* stop) {
  if (!fp8 && io != DType::kBFloat16 && io != DType::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuDNN fused attention takes fp16 or bf16, not ", DTypeName(io)));
  }
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->fp8 = fp8;
  DeviceScope scope(device);
  LoadNvrtc();  // For cuDNN's runtime-compiled engines (nvrtc_on_demand.h); they say if it failed.
  if (cudnnStatus_t created = cudnnCreate(&impl->handle); created != CUDNN_STATUS_SUCCESS) {
    return absl::InternalError(
        absl::StrCat("cudnnCreate on cuda:", device, ": ", cudnnGetErrorString(created)));
  }
  const fe::DataType_t type = fp8                      ? fe::DataType_t::FP8_E4M3
                              : io == DType::kBFloat16 ? fe::DataType_t::BFLOAT16
                                                       : fe::DataType_t::HALF;
  for (const SdpaCall& call : calls) {
    const std::string signature = call.Signature();
    if (impl->graphs.count(signature) != 0) continue;
    if (stop != nullptr && stop->load()) {
      return absl::CancelledError(
          absl::StrCat("cuDNN graphs cancelled after ", impl->graphs.size(), " were built"));
    }
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(type)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto q = graph->tensor(fe::graph::Tensor_attributes()
                               .set_name("q")
                               .set_uid(kQ)
                               .set_dim(Dims(call.q))
                               .set_stride(Strides(call.q)));
    auto k = graph->tensor(fe::graph::Tensor_attributes()
                               .set_name("k")
                               .set_uid(kK)
                               .set_dim(Dims(call.kv))
                               .set_stride(Strides(call.kv)));
    auto v = graph->tensor(fe::graph::Tensor_attributes()
                               .set_name("v")
                               .set_uid(kV)
                               .set_dim(Dims(call.kv))
                               .set_stride(Strides(call.kv)));
    auto scale = graph->tensor(fe::graph::Tensor_attributes()
                                   .set_name("scale")
                                   .set_uid(kScale)
                                   .set_dim({1, 1, 1, 1})
                                   .set_stride({1, 1, 1, 1})
                                   .set_is_pass_by_value(true)
                                   .set_data_type(fe::DataType_t::FLOAT));
    auto options = fe::graph::SDPA_attributes()
                       .set_name("dilated_segment")
                       .set_generate_stats(true)
                       .set_attn_scale(scale);
    if (call.causal) {
      // Queries and keys are the same kept positions: the diagonal starts top left.
      options.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
          .set_diagonal_band_right_bound(0);
    }
    std::shared_ptr<fe::graph::Tensor_attributes> o, stats;
    if (fp8) {
      // Hopper's fp8 attention: q, k, v and the output in E4M3 with per-tensor scales (device
      // scalars), the probabilities scaled into fp8 by scale_s, the amaxes of both written.
      std::shared_ptr<fe::graph::Tensor_attributes> scalars[6];  // The inputs; the amaxes below.
      for (int i = 0; i < 6; ++i) {
        scalars[i] = graph->tensor(fe::graph::Tensor_attributes()
                                       .set_name(kFp8ScalarNames[i])
                                       .set_uid(kFp8Scalars[i])
                                       .set_dim({1, 1, 1, 1})
                                       .set_stride({1, 1, 1, 1})
                                       .set_data_type(fe::DataType_t::FLOAT));
      }
      auto [fo, fstats, amax_s, amax_o] = graph->sdpa_fp8(
          q, k, v, scalars[0], scalars[1], scalars[2], scalars[3], scalars[4], scalars[5], options);
      for (auto [amax, i] : {std::pair{amax_s, 6}, std::pair{amax_o, 7}}) {
        amax->set_output(true)
            .set_uid(kFp8Scalars[i])
            .set_dim({1, 1, 1, 1})
            .set_stride({1, 1, 1, 1})
            .set_data_type(fe::DataType_t::FLOAT);
      }
      o = fo;
      stats = fstats;
    } else {
      const auto outputs = graph->sdpa(q, k, v, options);
      o = outputs[0];
      stats = outputs[1];
    }
    o->set_output(true).set_uid(kO).set_dim(Dims(call.q)).set_stride(Strides(call.q));
    stats->set_output(true)
        .set_uid(kStats)
        .set_data_type(fe::DataType_t::FLOAT)
        .set_dim(Dims(call.lse))
        .set_stride(Strides(call.lse))
        .set_alignment(call.LseAlignment());
    const std::string what = absl::StrCat("graph ", signature);
    if (auto e = graph->validate(); !e.is_good()) return FrontendStatus(e, what + " validate");
    if (auto e = graph->build_operation_graph(impl->handle); !e.is_good()) {
      return FrontendStatus(e, what + " operation graph");
    }
    if (auto e = graph->create_execution_plans({fe::HeurMode_t::A}); !e.is_good()) {
      return FrontendStatus(e, what + " execution plans");
    }
    if (auto e = graph->check_support(impl->handle); !e.is_good()) {
      return FrontendStatus(e, what + " support");
    }
    if (auto e = graph->build_plans(impl->handle); !e.is_good()) {
      return FrontendStatus(e, what + " build");
    }
    int64_t workspace = 0;
    if (auto e = graph->get_workspace_size(workspace); !e.is_good()) {
      return FrontendStatus(e, what + " workspace");
    }
    impl->workspace_bytes = std::max(impl->workspace_bytes, workspace);
    impl->graphs.emplace(signature, std::move(graph));
  }
  return std::unique_ptr<SdpaGraphs>(new SdpaGraphs(std::move(impl)));
}

std::string CudnnVersions() {
  return absl::StrCat("cuDNN ", VersionName(cudnnGetVersion()), " (built against ",
                      VersionName(CUDNN_VERSION), "), frontend ", CUDNN_FRONTEND_MAJOR_VERSION, ".",
                      CUDNN_FRONTEND_MINOR_VERSION, ".", CUDNN_FRONTEND_PATCH_VERSION);
}

int64_t SdpaGraphs::workspace_bytes() const { return impl_->workspace_bytes; }
int SdpaGraphs::graphs() const { return static_cast<int>(impl_->graphs.size()); }

absl::Status SdpaGraphs::Run(const SdpaCall& call, const SdpaTensors& tensors, void* workspace,
                             void* stream) {
  const auto found = impl_->graphs.find(call.Signature());
  if (found == impl_->graphs.end()) {
    return absl::InternalError(absl::StrCat("no cuDNN graph built for ", call.Signature()));
  }
  std::lock_guard<std::mutex> lock(impl_->mutex);
  DeviceScope scope(impl_->device);
  if (cudnnStatus_t set = cudnnSetStream(impl_->handle, static_cast<cudaStream_t>(stream));
      set != CUDNN_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrCat("cudnnSetStream: ", cudnnGetErrorString(set)));
  }
  if (impl_->fp8 && tensors.fp8_scalars == nullptr) {
    return absl::InternalError("an fp8 cuDNN graph run without its scalars");
  }
  // Element offsets of the call's views, as byte addresses in the tensors.
  const int64_t element = impl_->fp8 ? 1 : 2;  // fp8; fp16 and bf16.
  const auto at = [&](const void* base, const SdpaView& view, int64_t size) {
    return static_cast<void*>(const_cast<char*>(static_cast<const char*>(base)) +
                              view.offset * size);
  };
  std::unordered_map<int64_t, void*> pack = {
      {kQ, at(tensors.q, call.q, element)},   {kK, at(tensors.k, call.kv, element)},
      {kV, at(tensors.v, call.kv, element)},  {kO, at(tensors.out, call.q, element)},
      {kStats, at(tensors.lse, call.lse, 4)}, {kScale, const_cast<float*>(&tensors.scale)},
  };
  if (impl_->fp8) {
    for (int i = 0; i < kFp8ScalarCount; ++i) {
      pack[kFp8Scalars[i]] = tensors.fp8_scalars + i * kFp8ScalarStride;
    }
  }
  return FrontendStatus(found->second->execute(impl_->handle, pack, workspace),
                        absl::StrCat("execute ", call.Signature()));
}

}  // namespace da::engine::cuda
