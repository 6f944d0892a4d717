// SyntheticStream in every wire dtype (da-stream-bench --dtype): fp16 and bf16 streams hold the
// fp32 stream's values rounded to the dtype, half the bytes, and their engine output is in the
// stream's dtype.
#include "server/synthetic_stream.h"

#include <gtest/gtest.h>

#include <cmath>
#include <utility>

#include "engine/tensor.h"

namespace da::server::testing {
namespace {

v1::StreamHeader Header(v1::DType dtype) {
  v1::StreamHeader header;
  header.set_dtype(dtype);
  header.set_batch(2);
  header.set_seq_len(512);
  header.set_heads(4);
  header.set_kv_heads(2);
  header.set_head_dim(32);
  header.mutable_spec()->add_segment_lengths(256);
  header.mutable_spec()->add_dilation_rates(2);
  return header;
}

TEST(SyntheticStreamTest, HalfDtypesHoldTheFp32ValuesRounded) {
  const SyntheticStream wide(Header(v1::DTYPE_FP32), 7, 100);
  for (auto [wire, type] : {std::pair{v1::DTYPE_BF16, engine::DType::kBFloat16},
                            std::pair{v1::DTYPE_FP16, engine::DType::kFloat16}}) {
    const SyntheticStream narrow(Header(wire), 7, 100);
    EXPECT_EQ(narrow.dtype(), type);
    for (auto tensor : {SyntheticStream::kQuery, SyntheticStream::kKey}) {
      const std::string f32 = wide.Rows(tensor, 100, 37);
      const std::string half = narrow.Rows(tensor, 100, 37);
      ASSERT_EQ(half.size() * 2, f32.size());
      std::string rounded(half.size(), '\0');
      const auto* values = reinterpret_cast<const float*>(f32.data());
      int64_t nonzero = 0;
      for (size_t i = 0; i < f32.size() / 4; ++i) {
        engine::StoreFromFloat(type, rounded.data(), static_cast<int64_t>(i), values[i]);
        nonzero += values[i] != 0.0f;
      }
      EXPECT_EQ(half, rounded);
      EXPECT_GT(nonzero, static_cast<int64_t>(f32.size() / 4 * 9 / 10));
    }
  }
}

TEST(SyntheticStreamTest, EngineOutputIsInTheStreamsDtype) {
  engine::EngineOptions options;
  options.threads = 1;
  auto engine = engine::Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const SyntheticStream wide(Header(v1::DTYPE_FP32), 3, 64);
  const SyntheticStream narrow(Header(v1::DTYPE_BF16), 3, 64);
  const std::string f32 = wide.EngineOutput(**engine, 0, 256);
  const std::string bf16 = narrow.EngineOutput(**engine, 0, 256);
  ASSERT_EQ(f32.size(), 2u * 256 * 4 * 32 * 4);
  ASSERT_EQ(bf16.size() * 2, f32.size());
  // The bf16 problem's output is close to the fp32 one's (inputs and output rounded to bf16).
  double err2 = 0, ref2 = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(f32.size() / 4); ++i) {
    const double want = engine::LoadAsFloat(engine::DType::kFloat32, f32.data(), i);
    const double got = engine::LoadAsFloat(engine::DType::kBFloat16, bf16.data(), i);
    err2 += (got - want) * (got - want);
    ref2 += want * want;
  }
  EXPECT_GT(ref2, 0);
  EXPECT_LT(std::sqrt(err2 / ref2), 2e-2);
}

}  // namespace
}  // namespace da::server::testing
