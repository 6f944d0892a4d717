// Tensors as the engine sees them: a dtype, a rank-4 shape and a pointer it does not own.
//
// Layout (stated once for the whole project): row-major [batch, seq, heads, head_dim], that is
// element (b, n, h, d) lives at ((b * seq + n) * heads + h) * head_dim + d. Element bytes are
// little-endian, as on every host the engine runs on.
//
//   TensorView q{DType::kFloat32, {1, 4096, 8, 64}, q_bytes};
//   float x = LoadAsFloat(q.dtype, q.data, 17);
//
// Views never copy and never own; the caller keeps the memory alive for the duration of a call.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <string>

namespace da::engine {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Bytes per element.
inline int64_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }
std::string DTypeName(DType dtype);  // "fp32", "fp16", "bf16".

// [batch, seq_len, heads, head_dim].
struct Shape4 {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;

  int64_t elements() const { return batch * seq_len * heads * head_dim; }
  std::string ToString() const;  // "[1, 4096, 8, 64]".
};

// Where a view's memory lives: host memory (what every CPU device computes on, and where requests
// arrive), or the memory of one accelerator ("cuda:<device>").
struct MemorySpace {
  enum class Kind { kHost, kDevice };
  Kind kind = Kind::kHost;
  int device = -1;  // The accelerator's index for kDevice.

  static MemorySpace Host() { return {}; }
  static MemorySpace Device(int index) { return {Kind::kDevice, index}; }
  bool host() const { return kind == Kind::kHost; }
  bool operator==(const MemorySpace&) const = default;
  std::string ToString() const;  // "host", "device 1".
};

// Read-only view of caller-owned memory.
struct TensorView {
  DType dtype = DType::kFloat32;
  Shape4 shape;
  const void* data = nullptr;
  int64_t bytes = 0;  // Size of the memory behind data; must equal shape.elements() * DTypeSize.
  MemorySpace space = {};
};

// Writable view of caller-owned memory.
struct MutableTensorView {
  DType dtype = DType::kFloat32;
  Shape4 shape;
  void* data = nullptr;
  int64_t bytes = 0;
  MemorySpace space = {};
};

// IEEE half and bfloat16 conversions, round to nearest even; NaN stays NaN.
float HalfToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);
inline float BFloat16ToFloat(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
uint16_t FloatToBFloat16(float value);

// Element i of a buffer of the given dtype, widened to float.
inline float LoadAsFloat(DType dtype, const void* data, int64_t i) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(data)[i];
    case DType::kFloat16:
      return HalfToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kBFloat16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}

// Stores value, rounded to the dtype, as element i.
inline void StoreFromFloat(DType dtype, void* data, int64_t i, float value) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(data)[i] = value;
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(data)[i] = FloatToHalf(value);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(data)[i] = FloatToBFloat16(value);
      return;
  }
}

}  // namespace da::engine
