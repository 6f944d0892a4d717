// Every registered backend (engine/backend_registry.h) against the reference backend, on a device
// of its kind found on this machine, over one sweep: pattern sets (dense, geometric, r not
// dividing w, w > N), causal or not, both combine modes, GQA, partial last segments, every input
// dtype, and every precision the backend offers on that device. Adding a backend adds no test
// code: it registers, and this suite instantiates for it. ctest runs the suite once per CPU
// instruction set (DA_CPU_ISA), as it does the CPU kernel's own tests.
//
// Inputs live in host memory and reach the backend's memory through its own Allocate and
// CopyToDevice (a no-op hop for host backends), as the engine's local shard groups move them.
//
// Tolerances per precision, against the fp64 reference rendered in fp32:
// - fp32: testing::ToleranceFor(output dtype), elementwise (fp32 output 1e-5 + 1e-4 |ref|).
// - bf16, fp16 products: relative L2 error at most testing::kBf16RelativeL2 (1e-2), half the
//   documented bound of docs/PRECISION.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/backend_registry.h"
#include "engine/device.h"
#include "engine/test_tensors.h"
#include "engine/thread_pool.h"

namespace da::engine {
namespace {

using testing::OwnedTensor;

const std::vector<std::vector<Pattern>>& PatternSets() {
  static const auto* sets = new std::vector<std::vector<Pattern>>{
      {{8, 1}},                     // Dense segments, partial last segment.
      {{16, 1}, {32, 2}, {64, 4}},  // Geometric set.
      {{10, 3}, {100, 7}},          // r does not divide w.
      {{64, 1}, {5000, 40}},        // w > N.
  };
  return *sets;
}

// One backend on one device in one precision.
struct Target {
  std::string backend;
  DeviceInfo device;
  Precision precision;
};

// Readable parameters in test listings and failures (not gtest's byte dumps).
void PrintTo(const Target& target, std::ostream* os) {
  *os << target.backend << " on " << target.device.id << " in " << PrecisionName(target.precision);
}

std::vector<Target> Targets() {
  std::vector<Target> targets;
  const std::vector<DeviceInfo> devices = DiscoverDevices(2);
  for (const BackendRegistration& registration : RegisteredBackends()) {
    if (registration.name == "reference") continue;  // The yardstick itself.
    for (const DeviceInfo& device : devices) {
      if (device.kind != registration.device_kind) continue;
      // Every computed precision, whatever this process offers: the test names must not depend
      // on DA_CPU_ISA (ctest lists them once); a precision the backend does not offer on this
      // path is skipped at run time, saying so.
      for (const Precision precision :
           {Precision::kFloat32, Precision::kBFloat16, Precision::kFloat16}) {
        targets.push_back({registration.name, device, precision});
      }
      break;  // One device of each kind is enough: they run the same code.
    }
  }
  return targets;
}

struct Heads {
  int64_t heads, kv_heads;
};

void PrintTo(const Heads& heads, std::ostream* os) {
  *os << heads.heads << " heads, " << heads.kv_heads << " kv heads";
}

using Param = std::tuple<Target, int64_t /*seq_len*/, int /*set*/, Heads, bool /*causal*/,
                         CombineMode, DType>;

class BackendConformanceTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    const std::string missing = testing::MissingRequestedIsa();
    if (!missing.empty()) GTEST_SKIP() << missing;
  }
};

TEST_P(BackendConformanceTest, MatchesTheReference) {
  const auto& [target, seq_len, set, heads, causal, mode, dtype] = GetParam();
  AttentionSpec spec;
  spec.patterns = PatternSets()[set];
  spec.causal = causal;
  spec.mode = mode;
  spec.precision = target.precision;
  const Shape4 q_shape{2, seq_len, heads.heads, 16};
  const Shape4 kv_shape{2, seq_len, heads.kv_heads, 16};
  std::mt19937 rng(static_cast<uint32_t>(seq_len * 7919 + set * 31 + heads.heads * 3 + causal));
  const OwnedTensor q = testing::RandomTensor(dtype, q_shape, rng);
  const OwnedTensor k = testing::RandomTensor(dtype, kv_shape, rng);
  const OwnedTensor v = testing::RandomTensor(dtype, kv_shape, rng);
  ThreadPool pool(2);

  OwnedTensor expected = testing::PoisonedTensor(DType::kFloat32, q_shape);
  absl::StatusOr<std::unique_ptr<Backend>> reference =
      MakeBackend("reference", DiscoverDevices(1)[0]);
  ASSERT_TRUE(reference.ok()) << reference.status();
  ASSERT_TRUE(
      (*reference)->Run(q.view(), k.view(), v.view(), spec, expected.mutable_view(), {&pool}).ok());

  absl::StatusOr<std::unique_ptr<Backend>> made = MakeBackend(target.backend, target.device);
  ASSERT_TRUE(made.ok()) << made.status();
  Backend& backend = **made;
  const std::vector<Precision> offered = backend.Precisions();
  if (std::find(offered.begin(), offered.end(), target.precision) == offered.end()) {
    GTEST_SKIP() << target.backend << " on " << target.device.id << " does not offer "
                 << PrecisionName(target.precision) << " on this path";
  }
  absl::StatusOr<PrecisionChoice> chosen = backend.ChoosePrecision(spec);
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  ASSERT_EQ(chosen->precision, target.precision) << chosen->reason;

  // The inputs into the backend's memory, the output back, through its own allocator and copies.
  const RunContext context{&pool, nullptr, nullptr};
  std::vector<DeviceBuffer> buffers;
  for (const OwnedTensor* t : {&q, &k, &v}) {
    absl::StatusOr<DeviceBuffer> buffer = backend.Allocate(t->bytes.size());
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    ASSERT_TRUE(
        backend.CopyToDevice(buffer->data(), t->bytes.data(), t->bytes.size(), context).ok());
    buffers.push_back(*std::move(buffer));
  }
  OwnedTensor actual = testing::PoisonedTensor(dtype, q_shape);
  absl::StatusOr<DeviceBuffer> out = backend.Allocate(actual.bytes.size());
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_TRUE(
      backend.CopyToDevice(out->data(), actual.bytes.data(), actual.bytes.size(), context).ok());
  const auto view = [&](const OwnedTensor& t, const DeviceBuffer& b) {
    return TensorView{t.dtype, t.shape, b.data(), static_cast<int64_t>(t.bytes.size()), b.space()};
  };
  const MutableTensorView out_view{dtype, q_shape, out->data(),
                                   static_cast<int64_t>(actual.bytes.size()), out->space()};
  absl::Status ran = backend.Run(view(q, buffers[0]), view(k, buffers[1]), view(v, buffers[2]),
                                 spec, out_view, context);
  ASSERT_TRUE(ran.ok()) << ran;
  ASSERT_TRUE(
      backend.CopyToHost(actual.bytes.data(), out->data(), actual.bytes.size(), context).ok());
  ASSERT_TRUE(backend.Synchronize(context).ok());

  if (target.precision == Precision::kFloat32) {
    EXPECT_EQ(testing::Compare(actual, expected, testing::ToleranceFor(dtype)), "");
  } else {
    EXPECT_EQ(testing::Compare(actual, expected, {1.0, 0.0}), "");  // Finite and sane.
    EXPECT_LE(testing::RelativeL2(actual, expected), testing::kBf16RelativeL2);
  }
}

std::string Name(const ::testing::TestParamInfo<Param>& info) {
  const auto& [target, n, set, heads, causal, mode, dtype] = info.param;
  std::string device = target.device.id;
  for (char& c : device) {
    if (c == ':') c = '_';
  }
  return absl::StrCat(target.backend, "_", device, "_", PrecisionName(target.precision), "_N", n,
                      "_set", set, "_H", heads.heads, "kv", heads.kv_heads,
                      causal ? "_causal_" : "_full_", CombineModeName(mode), "_", DTypeName(dtype));
}

INSTANTIATE_TEST_SUITE_P(
    Registered, BackendConformanceTest,
    ::testing::Combine(::testing::ValuesIn(Targets()), ::testing::Values(int64_t{333}),
                       ::testing::Values(0, 1, 2, 3), ::testing::Values(Heads{2, 2}, Heads{6, 3}),
                       ::testing::Bool(),
                       ::testing::Values(CombineMode::kLongNet, CombineMode::kGrouped),
                       ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16)),
    Name);

// The suite is not empty: the CPU's default backend is always registered and found.
TEST(BackendRegistryTest, TheCpuBackendIsRegisteredAndFindsItsDevice) {
  bool cpu = false;
  for (const Target& target : Targets()) cpu = cpu || target.backend == "cpu";
  // fp32 is offered everywhere: at least those cases run on every path.
  EXPECT_TRUE(cpu);
  absl::StatusOr<std::unique_ptr<Backend>> none = MakeBackend("tpu", DiscoverDevices(1)[0]);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  // Every registered backend is named, with the kind of device it computes on (cuda too in a
  // build with CUDA).
  EXPECT_NE(none.status().message().find("registered: cpu (cpu), "), std::string::npos)
      << none.status();
  for (const BackendRegistration& registered : RegisteredBackends()) {
    EXPECT_NE(none.status().message().find(
                  absl::StrCat(registered.name, " (", registered.device_kind, ")")),
              std::string::npos)
        << none.status();
  }
  DeviceInfo gpu;
  gpu.id = "cuda:0";
  gpu.kind = "cuda";
  absl::StatusOr<std::unique_ptr<Backend>> wrong_kind = MakeBackend("cpu", gpu);
  EXPECT_EQ(wrong_kind.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_kind.status().message().find("computes on cpu devices, not on cuda:0"),
            std::string::npos)
      << wrong_kind.status();
}

}  // namespace
}  // namespace da::engine
