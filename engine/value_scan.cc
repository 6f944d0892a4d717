#include "engine/value_scan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace da::engine {
namespace {

// Elements per piece: one vectorized pass each, and a stop check between pieces.
constexpr int64_t kPieceElements = int64_t{1} << 22;

// The largest magnitude's bits over [begin, end) of `Bits` words with the sign masked off: a
// magnitude at or above `infinity` is NaN or infinite, and below it the integer order is the
// float order.
template <typename Bits>
Bits MaxMagnitudeBits(const Bits* data, int64_t begin, int64_t end, Bits mask) {
  Bits most = 0;
  for (int64_t i = begin; i < end; ++i) most = std::max<Bits>(most, data[i] & mask);
  return most;
}

template <typename Bits>
int64_t FirstAtOrAbove(const Bits* data, int64_t begin, int64_t end, Bits mask, Bits infinity) {
  for (int64_t i = begin; i < end; ++i) {
    if ((data[i] & mask) >= infinity) return i;
  }
  return -1;
}

template <typename Bits>
ValueScan Scan(const void* data, int64_t begin, int64_t end, Bits mask, Bits infinity,
               float (*to_float)(Bits)) {
  const auto* bits = static_cast<const Bits*>(data);
  // Signed words: SSE2 has the signed max for 16-bit words, and the masked values are
  // non-negative either way.
  using Signed = std::make_signed_t<Bits>;
  const Bits most = static_cast<Bits>(MaxMagnitudeBits<Signed>(
      reinterpret_cast<const Signed*>(bits), begin, end, static_cast<Signed>(mask)));
  ValueScan scan;
  if (most < infinity) {
    scan.amax = to_float(most);
    return scan;
  }
  scan.first_non_finite = FirstAtOrAbove(bits, begin, end, mask, infinity);
  const Bits before =
      MaxMagnitudeBits(bits, begin, scan.first_non_finite, mask);  // Finite, all of them.
  scan.amax = to_float(before);
  return scan;
}

float Fp32FromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
float Fp16FromBits(uint16_t bits) { return HalfToFloat(bits); }
float Bf16FromBits(uint16_t bits) { return BFloat16ToFloat(bits); }

const char* NonFiniteName(const TensorView& tensor, int64_t index) {
  const float value = LoadAsFloat(tensor.dtype, tensor.data, index);
  if (std::isnan(value)) return "NaN";
  return value > 0 ? "+inf" : "-inf";
}

}  // namespace

ValueScan ScanValues(const TensorView& tensor, int64_t begin, int64_t end) {
  switch (tensor.dtype) {
    case DType::kFloat32:
      return Scan<uint32_t>(tensor.data, begin, end, 0x7fffffffu, 0x7f800000u, &Fp32FromBits);
    case DType::kFloat16:
      return Scan<uint16_t>(tensor.data, begin, end, 0x7fff, 0x7c00, &Fp16FromBits);
    case DType::kBFloat16:
      return Scan<uint16_t>(tensor.data, begin, end, 0x7fff, 0x7f80, &Bf16FromBits);
  }
  return {};
}

absl::Status CheckInputValues(const TensorView& q, const TensorView& k, const TensorView& v,
                              const AttentionSpec& spec, int64_t first_token,
                              const std::atomic<bool>* stop, ThreadPool* pool, Precision compute,
                              const OutsideKeys* outside) {
  float amax[3] = {0, 0, 0};
  const TensorView* tensors[3] = {&q, &k, &v};
  const char* names[3] = {"q", "k", "v"};
  for (int t = 0; t < 3; ++t) {
    const TensorView& tensor = *tensors[t];
    const int64_t elements = tensor.shape.elements();
    const int64_t pieces = (elements + kPieceElements - 1) / kPieceElements;
    std::vector<ValueScan> scans(pieces);
    std::atomic<bool> stopped{false};
    const auto scan_piece = [&](int64_t piece, int /*thread*/) {
      if (stop != nullptr && stop->load(std::memory_order_relaxed)) {
        stopped.store(true, std::memory_order_relaxed);
        return;
      }
      const int64_t begin = piece * kPieceElements;
      scans[piece] = ScanValues(tensor, begin, std::min(elements, begin + kPieceElements));
    };
    if (pool != nullptr && pieces > 1) {
      pool->ParallelFor(pieces, scan_piece);
    } else {
      for (int64_t piece = 0; piece < pieces && !stopped.load(); ++piece) scan_piece(piece, 0);
    }
    if (stopped.load()) return absl::CancelledError("cancelled while checking the inputs' values");
    for (const ValueScan& scan : scans) {
      amax[t] = std::max(amax[t], scan.amax);
      if (scan.first_non_finite < 0) continue;
      const Shape4& s = tensor.shape;
      const int64_t i = scan.first_non_finite;
      const int64_t d = i % s.head_dim;
      const int64_t h = (i / s.head_dim) % s.heads;
      const int64_t n = (i / (s.head_dim * s.heads)) % s.seq_len;
      const int64_t b = i / (s.head_dim * s.heads * s.seq_len);
      return absl::InvalidArgumentError(
          absl::StrCat(names[t], " holds ", NonFiniteName(tensor, i), " at batch ", b, ", token ",
                       first_token + n, ", head ", h, ", dim ", d, "; q, k and v must be finite"));
    }
  }
  if (outside != nullptr) {
    amax[1] = std::max(amax[1], outside->k_amax);
    amax[2] = std::max(amax[2], outside->v_amax);
  }
  if (compute == Precision::kFloat16 && q.dtype != DType::kFloat16) {
    for (int t = 0; t < 3; ++t) {
      if (amax[t] <= kMaxFloat16Magnitude) continue;
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s holds a value of magnitude %g; this request computes in fp16, which holds at most "
          "%g: ask for spec.precision bf16 or fp32, or scale the inputs down",
          names[t], amax[t], kMaxFloat16Magnitude));
    }
  }
  // |score| <= max|q| * max|k| * head_dim * |scale|, in base 2 as the backends compute it.
  const double scale = std::abs(spec.ScaleFor(q.shape.head_dim)) * 1.4426950408889634;
  const double folded = static_cast<double>(amax[0]) * scale;
  const double score =
      folded * static_cast<double>(amax[1]) * static_cast<double>(q.shape.head_dim);
  if (folded > kMaxScoreMagnitude || score > kMaxScoreMagnitude) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "q and k are too large for fp32 scores: max|q| %g * max|k| %g * head_dim %d * |scale| "
        "%g * log2(e) is %g, over %g; scale q or k down (or lower spec.softmax_scale)",
        amax[0], amax[1], q.shape.head_dim, std::abs(spec.ScaleFor(q.shape.head_dim)),
        std::max(folded, score), kMaxScoreMagnitude));
  }
  // A row's unnormalized sum of weights (each at most 1) times values, over the keys one pattern
  // keeps for it: at most min(w, N) of them.
  const int64_t seq_len = outside != nullptr ? outside->seq_len : q.shape.seq_len;
  int64_t keys = 0;
  for (const Pattern& pattern : spec.patterns) {
    keys = std::max(keys, std::min(pattern.segment_len, seq_len));
  }
  const double sum = static_cast<double>(amax[2]) * static_cast<double>(keys);
  if (sum > kMaxScoreMagnitude) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "v is too large for fp32 sums: max|v| %g * %d keys a row may attend to is %g, over %g; "
        "scale v down",
        amax[2], keys, sum, kMaxScoreMagnitude));
  }
  return absl::OkStatus();
}

}  // namespace da::engine
