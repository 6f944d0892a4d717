#include "engine/tensor.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace da::engine {

std::string MemorySpace::ToString() const {
  return host() ? "host" : "device " + std::to_string(device);
}

std::string DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "fp32";
    case DType::kFloat16:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
  }
  return "unknown";
}

std::string Shape4::ToString() const {
  return absl::StrCat("[", batch, ", ", seq_len, ", ", heads, ", ", head_dim, "]");
}

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  uint32_t wide;
  if (exponent == 0x1f) {
    wide = sign | 0x7f800000u | (mantissa << 13);  // Inf or NaN (payload kept).
  } else {
    wide = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

uint16_t FloatToHalf(float value) {
  uint32_t wide;
  std::memcpy(&wide, &value, sizeof(wide));
  const uint16_t sign = static_cast<uint16_t>((wide >> 16) & 0x8000u);
  const uint32_t abs_bits = wide & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // Inf or NaN.
    return sign | (abs_bits > 0x7f800000u ? 0x7e00u : 0x7c00u);
  }
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // Rounds to >= 65520: overflow to Inf.
  if (abs_bits < 0x38800000u) {
    // Result is subnormal (or zero) in half: round |value| / 2^-24 to an integer, ties to even.
    float magnitude;
    std::memcpy(&magnitude, &abs_bits, sizeof(magnitude));
    const float scaled = std::nearbyint(std::ldexp(magnitude, 24));
    return sign | static_cast<uint16_t>(scaled);
  }
  // Normal: drop 13 mantissa bits with round to nearest even; a carry may bump the exponent.
  const uint32_t rebased = abs_bits - (112u << 23);
  const uint32_t rounded = rebased + 0x0fffu + ((rebased >> 13) & 1u);
  return sign | static_cast<uint16_t>(rounded >> 13);
}

uint16_t FloatToBFloat16(float value) {
  uint32_t wide;
  std::memcpy(&wide, &value, sizeof(wide));
  if ((wide & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((wide >> 16) | 0x40u);
  const uint32_t rounded = wide + 0x7fffu + ((wide >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

}  // namespace da::engine
