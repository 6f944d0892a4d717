// The values of a request's q, k and v, checked before compute: every element finite, and the
// scores they make finite in fp32. Backends compute scores as dot(q * scale * log2(e), k) in fp32
// (docs/MATH.md); a NaN or an infinity anywhere, or a score past fp32's range, gives results that
// differ between backends and kernels (a NaN in one key of a causal row's panel reaches rows that
// never attend to it through 0 * inf in the value product), so such a request is refused with
// INVALID_ARGUMENT, naming the tensor, the element and what to change.
//
//   DA_RETURN_IF_ERROR(CheckInputValues(q, k, v, spec, /*first_token=*/0, stop, &pool));
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "engine/attention_spec.h"
#include "engine/tensor.h"
#include "engine/thread_pool.h"

namespace da::engine {

// What one pass over a tensor's elements [begin, end) finds: the first that is NaN or infinite
// (its flat index; -1 for none) and the largest magnitude among the elements (the finite ones
// before it, when there is one). Reads each element's bits once; vectorizes.
struct ValueScan {
  int64_t first_non_finite = -1;
  float amax = 0;
};
ValueScan ScanValues(const TensorView& tensor, int64_t begin, int64_t end);

// Scores past this magnitude are refused: fp32's largest is 3.4e38, and the online softmax
// subtracts two scores.
inline constexpr double kMaxScoreMagnitude = 1e38;

// Scans q, k and v (in pieces, on `pool`'s threads when given, looking at `stop`, optional,
// between them: CANCELLED), then
// checks max|q| * |scale| * log2(e) and max|q| * max|k| * head_dim * |scale| * log2(e) against
// kMaxScoreMagnitude, and max|v| times the most keys a row attends to (the unnormalized sum of
// weights times values) too. `first_token` is where the tensors' first token lies in the caller's
// whole sequence (a stream's chunk), so that messages name positions the caller knows.
// `compute` is the precision a device computes in: kFloat16 holds magnitudes up to
// kMaxFloat16Magnitude, so fp32 or bf16 inputs past it (which would turn into infinities, and the
// output into NaN) are refused too.
// Keys and values outside q's tokens that its rows attend to (a share's gathered rows, which the
// caller scanned for non-finite values): their largest magnitudes, and the whole sequence's
// length, which bounds the keys a row attends to.
struct OutsideKeys {
  float k_amax = 0;
  float v_amax = 0;
  int64_t seq_len = 0;
};

absl::Status CheckInputValues(const TensorView& q, const TensorView& k, const TensorView& v,
                              const AttentionSpec& spec, int64_t first_token,
                              const std::atomic<bool>* stop, ThreadPool* pool = nullptr,
                              Precision compute = Precision::kFloat32,
                              const OutsideKeys* outside = nullptr);

// fp16's largest finite value.
inline constexpr double kMaxFloat16Magnitude = 65504;

}  // namespace da::engine
