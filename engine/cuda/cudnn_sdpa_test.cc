// cuDNN's fused attention over the strided views of PlanSdpaCalls, on a real GPU (label gpu;
// skips, saying so, without one): a one-pattern problem in bf16 (r = 1, 2 and 3 with offsets
// per head run, causal and not, GQA, a partial last segment) computed by the plan's calls equals
// the reference at every kept position (relative L2 at most 2e-2, the bf16 bound), and every
// kept row's log-sum-exp equals the natural-log LSE of its scaled scores computed here in fp64
// (within 1e-2). This is the check that cuDNN takes the dilated strided views the geometry
// describes, Stats included: r = 3 over 8 heads starts head groups at heads 3 and 6, so calls
// whose LSE starts off 16 bytes (SdpaCall::LseAlignment) run too.
#include "engine/cuda/cudnn_sdpa.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <tuple>
#include <vector>

#include "engine/backend_registry.h"
#include "engine/cuda/sdpa_plan.h"
#include "engine/dilation.h"
#include "engine/test_tensors.h"
#include "engine/testing/reference_output.h"

namespace da::engine::cuda {
namespace {

using engine::testing::OwnedTensor;

bool HaveGpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

struct DeviceMemory {
  void* data = nullptr;
  explicit DeviceMemory(size_t bytes) { cudaMalloc(&data, bytes); }
  ~DeviceMemory() { cudaFree(data); }
};

using Param = std::tuple<int64_t /*dilation*/, bool /*causal*/>;
class CudnnSdpaTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine: the GPU tests skip";
    static const bool printed = [] {
      std::printf("%s\n", CudnnVersions().c_str());  // For scripts/gpu-check's log.
      return true;
    }();
    (void)printed;
  }
};

TEST_P(CudnnSdpaTest, ThePlansCallsMatchTheReferenceAtKeptPositions) {
  const auto& [dilation, causal] = GetParam();
  const ProblemShape shape{2, 2000, 8, 4, 64};  // Segments of 512: the last one has 464.
  AttentionSpec spec;
  spec.patterns = {{512, dilation}};
  spec.causal = causal;
  std::mt19937 rng(static_cast<uint32_t>(dilation * 2 + causal));
  const OwnedTensor q = engine::testing::RandomTensor(DType::kBFloat16, shape.QueryShape(), rng);
  const OwnedTensor k = engine::testing::RandomTensor(DType::kBFloat16, shape.KeyShape(), rng);
  const OwnedTensor v = engine::testing::RandomTensor(DType::kBFloat16, shape.KeyShape(), rng);
  const OwnedTensor expected = engine::testing::ReferenceOutput(q, k, v, spec, DType::kFloat32);

  absl::StatusOr<SdpaPlan> plan = PlanSdpaCalls(shape, spec, WholeShare(shape));
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::StatusOr<std::unique_ptr<SdpaGraphs>> graphs =
      SdpaGraphs::Build(plan->calls, DType::kBFloat16, 0);
  ASSERT_TRUE(graphs.ok()) << graphs.status();
  const size_t out_bytes = q.bytes.size();
  const size_t lse_bytes = shape.batch * shape.seq_len * shape.heads * sizeof(float);
  DeviceMemory dq(q.bytes.size()), dk(k.bytes.size()), dv(v.bytes.size()), dout(out_bytes),
      dlse(lse_bytes), workspace(std::max<int64_t>((*graphs)->workspace_bytes(), 16));
  cudaMemcpy(dq.data, q.bytes.data(), q.bytes.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(dk.data, k.bytes.data(), k.bytes.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(dv.data, v.bytes.data(), v.bytes.size(), cudaMemcpyHostToDevice);
  cudaMemset(dout.data, 0xff, out_bytes);
  cudaMemset(dlse.data, 0xff, lse_bytes);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  for (const SdpaCall& call : plan->calls) {
    const SdpaTensors tensors{dq.data,
                              dk.data,
                              dv.data,
                              dout.data,
                              static_cast<float*>(dlse.data),
                              static_cast<float>(spec.ScaleFor(shape.head_dim))};
    absl::Status ran = (*graphs)->Run(call, tensors, workspace.data, stream);
    ASSERT_TRUE(ran.ok()) << ran;
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
  OwnedTensor actual = engine::testing::PoisonedTensor(DType::kBFloat16, shape.QueryShape());
  std::vector<float> lse(lse_bytes / sizeof(float));
  cudaMemcpy(actual.bytes.data(), dout.data, out_bytes, cudaMemcpyDeviceToHost);
  cudaMemcpy(lse.data(), dlse.data, lse_bytes, cudaMemcpyDeviceToHost);

  // Kept positions only (one pattern: its output is the result there; others stay untouched).
  const std::vector<std::vector<HeadWork>> work = AssignHeadPatterns(shape.heads, spec);
  double err2 = 0, ref2 = 0, worst_lse = 0;
  int64_t kept = 0;
  const double scale = spec.ScaleFor(shape.head_dim);
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t n = 0; n < shape.seq_len; ++n) {
      for (int64_t h = 0; h < shape.heads; ++h) {
        if ((n % 512) % dilation != work[h][0].offset) continue;
        ++kept;
        const int64_t row = (b * shape.seq_len + n) * shape.heads + h;
        ASSERT_TRUE(std::isfinite(lse[row])) << "lse of row " << row;
        // The LSE over the row's keys: its segment's kept positions (up to itself when causal).
        const int64_t kvh = h / (shape.heads / shape.kv_heads);
        const KeptRange keys =
            KeptPositions(work[h][0].pattern, work[h][0].offset, shape.seq_len, n / 512);
        std::vector<double> scores;
        for (int64_t i = 0; i < keys.count; ++i) {
          const int64_t x = keys.first + i * keys.stride;
          if (causal && x > n) break;
          double dot = 0;
          for (int64_t d = 0; d < shape.head_dim; ++d) {
            dot += static_cast<double>(q.at(row * shape.head_dim + d)) *
                   k.at(((b * shape.seq_len + x) * shape.kv_heads + kvh) * shape.head_dim + d);
          }
          scores.push_back(dot * scale);
        }
        const double top = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (double score : scores) sum += std::exp(score - top);
        const double want_lse = top + std::log(sum);
        worst_lse = std::max(worst_lse, std::fabs(lse[row] - want_lse));
        ASSERT_NEAR(lse[row], want_lse, 1e-2) << "lse of row " << row;
        for (int64_t d = 0; d < shape.head_dim; ++d) {
          const double want = expected.at(row * shape.head_dim + d);
          const double got = actual.at(row * shape.head_dim + d);
          err2 += (got - want) * (got - want);
          ref2 += want * want;
        }
      }
    }
  }
  int64_t want_kept = 0;  // From the dilation's own arithmetic.
  for (int64_t h = 0; h < shape.heads; ++h) {
    for (int64_t t = 0; t < NumSegments(shape.seq_len, 512); ++t) {
      want_kept += shape.batch *
                   KeptPositions(work[h][0].pattern, work[h][0].offset, shape.seq_len, t).count;
    }
  }
  EXPECT_EQ(kept, want_kept);
  EXPECT_LE(std::sqrt(err2 / ref2), 2e-2);
  std::printf("r=%lld causal=%d: relative L2 %.2e, largest LSE error %.2e, %zu calls\n",
              static_cast<long long>(dilation), causal ? 1 : 0, std::sqrt(err2 / ref2), worst_lse,
              plan->calls.size());
}

INSTANTIATE_TEST_SUITE_P(Patterns, CudnnSdpaTest,
                         ::testing::Combine(::testing::Values(int64_t{1}, int64_t{2}, int64_t{3}),
                                            ::testing::Bool()));

}  // namespace
}  // namespace da::engine::cuda
