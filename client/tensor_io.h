// Tensors for requests: from and to .npy files, and seeded random inputs.
//
//   absl::StatusOr<v1::Tensor> q = ReadTensorNpy("q.npy");  // rank 4, fp32, fp16 or bf16
//   v1::Tensor k = RandomTensor(v1::DTYPE_BF16, {1, 4096, 2, 64}, /*seed=*/7, /*stream=*/1);
//   DA_RETURN_IF_ERROR(WriteTensorNpy("out.npy", std::move(*response.mutable_output())));
//
// Error messages start with the file name.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/npy.h"
#include "da/v1/attention.pb.h"

namespace da::client {

std::string DTypeName(v1::DType dtype);  // "fp32", "fp16", "bf16", "unspecified".
int64_t DTypeBytes(v1::DType dtype);     // 4, 2, 2; 0 for DTYPE_UNSPECIFIED.

// "[1, 4096, 8, 64]".
std::string ShapeString(const v1::Tensor& tensor);

// A rank-4 (batch, seq_len, heads, head_dim) tensor from an array; name labels errors.
absl::StatusOr<v1::Tensor> TensorFromNpy(NpyArray array, absl::string_view name);
absl::StatusOr<v1::Tensor> ReadTensorNpy(const std::string& path, const NpyOptions& options = {});

// Writes an fp32, fp16 or bf16 tensor (bf16 as '<V2', ml_dtypes' convention, or '<u2' with
// options.bf16_as_uint16; client/npy.h). Takes the tensor to move its bytes instead of copying
// them.
absl::Status WriteTensorNpy(const std::string& path, v1::Tensor tensor,
                            const NpyOptions& options = {});

// A tensor of the given shape with elements uniform in [-1, 1), rounded to dtype. The values depend
// only on (seed, stream, shape): the generator is splitmix64, the same on every platform. Use a
// different stream for each of q, k and v.
v1::Tensor RandomTensor(v1::DType dtype, const std::array<int64_t, 4>& shape, uint64_t seed,
                        uint64_t stream);

}  // namespace da::client
