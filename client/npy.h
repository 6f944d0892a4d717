// Reading and writing NumPy .npy files: format versions 1.0, 2.0 and 3.0, C order, little-endian
// float32 ('<f4'), float16 ('<f2') or bfloat16; that is what the CLI exchanges with users.
//
// NumPy has no bfloat16. The ml_dtypes package (what JAX and others use) gives one, and np.save
// writes its arrays with descr '<V2' (two opaque bytes; np.load returns a void array, which
// .view(ml_dtypes.bfloat16) turns back into bfloat16). That convention is the default here:
// '<V2', '|V2' and 'bfloat16' read as bf16, and bf16 is written as '<V2'. The other convention,
// raw bits in a uint16 array ('<u2', e.g. torch's x.view(torch.int16) saved as unsigned), is used
// only when NpyOptions::bf16_as_uint16 says so, because a '<u2' file may hold plain integers.
//
//   absl::StatusOr<NpyArray> q = ReadNpy("q.npy");
//   if (!q.ok()) return q.status();  // "q.npy: unsupported dtype '<f8' (expected '<f4' or '<f2')"
//   DA_RETURN_IF_ERROR(WriteNpy("out.npy", *q));
//
// Every error message starts with the file name (or the name given to ParseNpy) and says what was
// wrong: missing file, bad magic, unsupported version, malformed header, fortran_order, dtype,
// truncated or trailing data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace da::client {

enum class NpyDType { kFloat32, kFloat16, kBFloat16 };

inline int64_t NpyDTypeSize(NpyDType dtype) { return dtype == NpyDType::kFloat32 ? 4 : 2; }

struct NpyOptions {
  // Read '<u2' arrays as bf16 bits, and write bf16 as '<u2' instead of '<V2'.
  bool bf16_as_uint16 = false;
};

// "<f4", "<f2", and for bf16 "<V2" (or "<u2" with options.bf16_as_uint16).
const char* NpyDescr(NpyDType dtype, const NpyOptions& options = {});

struct NpyArray {
  NpyDType dtype = NpyDType::kFloat32;
  std::vector<int64_t> shape;  // Rank 0 is a scalar (one element).
  std::string data;            // C-order elements, little-endian; size = elements() * dtype size.

  int64_t elements() const;
};

// Parses the bytes of a whole .npy file; name only labels error messages.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes, absl::string_view name,
                                  const NpyOptions& options = {});
// ResourceExhausted naming the path when the file does not fit in memory.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path, const NpyOptions& options = {});

// The bytes of a .npy file holding array. major_version 0 picks 1.0, or 2.0 when the header does
// not fit 1.0's 16-bit length; 1, 2 or 3 force that version.
std::string SerializeNpy(const NpyArray& array, int major_version = 0,
                         const NpyOptions& options = {});
// A write that fails (e.g. a full disk) removes the partial file and names errno's reason.
absl::Status WriteNpy(const std::string& path, const NpyArray& array,
                      const NpyOptions& options = {});

}  // namespace da::client
