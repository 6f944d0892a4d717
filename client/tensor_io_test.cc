#include "client/tensor_io.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include "engine/tensor.h"

namespace da::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

NpyArray Array(std::vector<int64_t> shape, NpyDType dtype) {
  NpyArray array;
  array.dtype = dtype;
  array.shape = std::move(shape);
  array.data.assign(array.elements() * NpyDTypeSize(dtype), '\x3c');
  return array;
}

TEST(TensorIoTest, TensorFromNpyKeepsDtypeShapeAndBytes) {
  absl::StatusOr<v1::Tensor> tensor = TensorFromNpy(Array({1, 5, 2, 4}, NpyDType::kFloat16), "q");
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->dtype(), v1::DTYPE_FP16);
  EXPECT_THAT(tensor->shape(), ElementsAre(1, 5, 2, 4));
  EXPECT_EQ(tensor->data(), std::string(80, '\x3c'));
}

TEST(TensorIoTest, TensorFromNpyRejectsWrongRankNamingTheFile) {
  absl::StatusOr<v1::Tensor> tensor = TensorFromNpy(Array({5, 2, 4}, NpyDType::kFloat32), "q.npy");
  ASSERT_FALSE(tensor.ok());
  EXPECT_EQ(tensor.status().message(),
            "q.npy: expected rank 4 (batch, seq_len, heads, head_dim), got shape (5, 2, 4)");
}

TEST(TensorIoTest, WritesAndReadsBackEveryDtype) {
  for (v1::DType dtype : {v1::DTYPE_FP32, v1::DTYPE_FP16, v1::DTYPE_BF16}) {
    const v1::Tensor tensor = RandomTensor(dtype, {2, 3, 4, 5}, 9, 0);
    const std::string path = testing::TempDir() + "/tensor_io_test_" + DTypeName(dtype) + "." +
                             std::to_string(getpid()) + ".npy";
    ASSERT_TRUE(WriteTensorNpy(path, tensor).ok());
    absl::StatusOr<v1::Tensor> read = ReadTensorNpy(path);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->dtype(), dtype);
    EXPECT_THAT(read->shape(), ElementsAre(2, 3, 4, 5));
    EXPECT_EQ(read->data(), tensor.data());
    std::remove(path.c_str());
  }
}

TEST(TensorIoTest, BFloat16AsUint16RoundTripsOnlyWithTheOption) {
  const v1::Tensor tensor = RandomTensor(v1::DTYPE_BF16, {1, 3, 2, 4}, 9, 0);
  const std::string path =
      testing::TempDir() + "/tensor_io_test_u2." + std::to_string(getpid()) + ".npy";
  ASSERT_TRUE(WriteTensorNpy(path, tensor, {.bf16_as_uint16 = true}).ok());
  EXPECT_THAT(std::string(ReadTensorNpy(path).status().message()),
              HasSubstr("unsupported dtype '<u2'"));
  absl::StatusOr<v1::Tensor> read = ReadTensorNpy(path, {.bf16_as_uint16 = true});
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(read->data(), tensor.data());
  std::remove(path.c_str());
}

TEST(TensorIoTest, RefusesUnspecifiedOrInconsistentTensors) {
  const std::string path =
      testing::TempDir() + "/tensor_io_test_bad." + std::to_string(getpid()) + ".npy";
  v1::Tensor unspecified = RandomTensor(v1::DTYPE_FP32, {1, 1, 1, 2}, 0, 0);
  unspecified.set_dtype(v1::DTYPE_UNSPECIFIED);
  absl::Status status = WriteTensorNpy(path, unspecified);
  EXPECT_THAT(std::string(status.message()), HasSubstr("cannot write a unspecified tensor"));
  v1::Tensor tensor = RandomTensor(v1::DTYPE_FP32, {1, 1, 1, 2}, 0, 0);
  tensor.mutable_data()->pop_back();
  status = WriteTensorNpy(path, tensor);
  EXPECT_THAT(std::string(status.message()), HasSubstr("has 7 bytes, expected 8"));
  // Shapes a server might send that multiply to the byte count only by wrapping or by signs
  // cancelling: [-1, -1, 1, 2] against 8 bytes, [2^62, 4, 1, 1] (product 2^66 wraps to 0) against
  // none.
  v1::Tensor negative = RandomTensor(v1::DTYPE_FP32, {1, 1, 1, 2}, 0, 0);
  negative.set_shape(0, -1);
  negative.set_shape(1, -1);
  status = WriteTensorNpy(path, negative);
  EXPECT_THAT(std::string(status.message()), HasSubstr("negative or too large dimension"));
  v1::Tensor huge;
  huge.set_dtype(v1::DTYPE_FP32);
  for (const int64_t dim : {int64_t{1} << 62, int64_t{4}, int64_t{1}, int64_t{1}}) {
    huge.add_shape(dim);
  }
  status = WriteTensorNpy(path, huge);
  EXPECT_THAT(std::string(status.message()), HasSubstr("negative or too large dimension"));
}

TEST(TensorIoTest, RandomTensorsAreSeededUniformAndDistinctPerStream) {
  const v1::Tensor a = RandomTensor(v1::DTYPE_FP32, {1, 64, 2, 8}, 42, 0);
  EXPECT_EQ(a.data(), RandomTensor(v1::DTYPE_FP32, {1, 64, 2, 8}, 42, 0).data());
  EXPECT_NE(a.data(), RandomTensor(v1::DTYPE_FP32, {1, 64, 2, 8}, 42, 1).data());
  EXPECT_NE(a.data(), RandomTensor(v1::DTYPE_FP32, {1, 64, 2, 8}, 43, 0).data());
  ASSERT_EQ(a.data().size(), 1024u * 4);
  double sum = 0;
  float low = 1, high = -1;
  for (size_t i = 0; i < 1024; ++i) {
    float value;
    std::memcpy(&value, a.data().data() + 4 * i, 4);
    ASSERT_GE(value, -1.0f);
    ASSERT_LT(value, 1.0f);
    sum += value;
    low = std::min(low, value);
    high = std::max(high, value);
  }
  EXPECT_LT(std::abs(sum / 1024), 0.1);  // Mean of 1024 uniforms: standard deviation 0.018.
  EXPECT_LT(low, -0.9f);
  EXPECT_GT(high, 0.9f);
}

TEST(TensorIoTest, HalfPrecisionRandomTensorsRoundTheSameValues) {
  const v1::Tensor wide = RandomTensor(v1::DTYPE_FP32, {1, 16, 1, 4}, 5, 2);
  const v1::Tensor half = RandomTensor(v1::DTYPE_FP16, {1, 16, 1, 4}, 5, 2);
  const v1::Tensor brain = RandomTensor(v1::DTYPE_BF16, {1, 16, 1, 4}, 5, 2);
  ASSERT_EQ(half.data().size(), 128u);
  ASSERT_EQ(brain.data().size(), 128u);
  for (int i = 0; i < 64; ++i) {
    float value;
    uint16_t half_bits, brain_bits;
    std::memcpy(&value, wide.data().data() + 4 * i, 4);
    std::memcpy(&half_bits, half.data().data() + 2 * i, 2);
    std::memcpy(&brain_bits, brain.data().data() + 2 * i, 2);
    EXPECT_EQ(half_bits, engine::FloatToHalf(value));
    EXPECT_EQ(brain_bits, engine::FloatToBFloat16(value));
  }
}

}  // namespace
}  // namespace da::client
