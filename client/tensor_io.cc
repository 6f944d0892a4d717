#include "client/tensor_io.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/tensor.h"

namespace da::client {
namespace {

// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and identical on every standard library,
// unlike std::uniform_real_distribution.
uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1) from the top 24 bits, exactly representable in float.
float UniformMinusOneToOne(uint64_t* state) {
  const uint64_t bits = SplitMix64(state) >> 40;
  return static_cast<float>(bits) * (2.0f / 16777216.0f) - 1.0f;
}

}  // namespace

std::string DTypeName(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return "fp32";
    case v1::DTYPE_FP16:
      return "fp16";
    case v1::DTYPE_BF16:
      return "bf16";
    default:
      return "unspecified";
  }
}

int64_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return 4;
    case v1::DTYPE_FP16:
    case v1::DTYPE_BF16:
      return 2;
    default:
      return 0;
  }
}

std::string ShapeString(const v1::Tensor& tensor) {
  return absl::StrCat("[", absl::StrJoin(tensor.shape(), ", "), "]");
}

absl::StatusOr<v1::Tensor> TensorFromNpy(NpyArray array, absl::string_view name) {
  if (array.shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": expected rank 4 (batch, seq_len, heads, head_dim), got shape (",
                     absl::StrJoin(array.shape, ", "), ")"));
  }
  v1::Tensor tensor;
  switch (array.dtype) {
    case NpyDType::kFloat32:
      tensor.set_dtype(v1::DTYPE_FP32);
      break;
    case NpyDType::kFloat16:
      tensor.set_dtype(v1::DTYPE_FP16);
      break;
    case NpyDType::kBFloat16:
      tensor.set_dtype(v1::DTYPE_BF16);
      break;
  }
  for (int64_t dim : array.shape) tensor.add_shape(dim);
  tensor.set_data(std::move(array.data));
  return tensor;
}

absl::StatusOr<v1::Tensor> ReadTensorNpy(const std::string& path, const NpyOptions& options) {
  absl::StatusOr<NpyArray> array = ReadNpy(path, options);
  if (!array.ok()) return array.status();
  return TensorFromNpy(*std::move(array), path);
}

absl::Status WriteTensorNpy(const std::string& path, v1::Tensor tensor, const NpyOptions& options) {
  NpyArray array;
  switch (tensor.dtype()) {
    case v1::DTYPE_FP32:
      array.dtype = NpyDType::kFloat32;
      break;
    case v1::DTYPE_FP16:
      array.dtype = NpyDType::kFloat16;
      break;
    case v1::DTYPE_BF16:
      array.dtype = NpyDType::kBFloat16;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(path, ": cannot write a ",
                                                     DTypeName(tensor.dtype()),
                                                     " tensor to .npy (fp32, fp16 or bf16)"));
  }
  array.shape.assign(tensor.shape().begin(), tensor.shape().end());
  // The shape comes from the server: every dimension non-negative and their product in range
  // before it is compared with the bytes (a wrapped or sign-cancelled product would write a .npy
  // whose header numpy refuses).
  int64_t expected_bytes = NpyDTypeSize(array.dtype);
  for (const int64_t dim : array.shape) {
    if (dim < 0 || (dim != 0 && expected_bytes > std::numeric_limits<int64_t>::max() / dim)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor of shape ",
                                                     ShapeString(tensor),
                                                     " has a negative or too large dimension"));
    }
    expected_bytes *= dim;
  }
  if (static_cast<int64_t>(tensor.data().size()) != expected_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor of shape ", ShapeString(tensor),
                                                   " has ", tensor.data().size(),
                                                   " bytes, expected ", expected_bytes));
  }
  array.data = std::move(*tensor.mutable_data());
  return WriteNpy(path, array, options);
}

v1::Tensor RandomTensor(v1::DType dtype, const std::array<int64_t, 4>& shape, uint64_t seed,
                        uint64_t stream) {
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  int64_t elements = 1;
  for (int64_t dim : shape) {
    tensor.add_shape(dim);
    elements *= dim;
  }
  // Decorrelate streams by running the seed and the stream id through the mixer once.
  uint64_t state = seed ^ (0x2545f4914f6cdd1dull * (stream + 1));
  state = SplitMix64(&state);

  std::string* data = tensor.mutable_data();
  data->resize(static_cast<size_t>(elements * DTypeBytes(dtype)));
  for (int64_t i = 0; i < elements; ++i) {
    const float value = UniformMinusOneToOne(&state);
    if (dtype == v1::DTYPE_FP32) {
      std::memcpy(data->data() + 4 * i, &value, 4);
    } else {
      const uint16_t bits =
          dtype == v1::DTYPE_FP16 ? engine::FloatToHalf(value) : engine::FloatToBFloat16(value);
      std::memcpy(data->data() + 2 * i, &bits, 2);
    }
  }
  return tensor;
}

}  // namespace da::client
