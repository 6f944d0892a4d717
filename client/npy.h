// Reading and writing NumPy .npy files: format versions 1.0, 2.0 and 3.0, C order, little-endian
// float32 ('<f4') or float16 ('<f2') only; that is what the CLI exchanges with users.
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

enum class NpyDType { kFloat32, kFloat16 };

inline int64_t NpyDTypeSize(NpyDType dtype) { return dtype == NpyDType::kFloat32 ? 4 : 2; }
const char* NpyDescr(NpyDType dtype);  // "<f4" or "<f2".

struct NpyArray {
  NpyDType dtype = NpyDType::kFloat32;
  std::vector<int64_t> shape;  // Rank 0 is a scalar (one element).
  std::string data;            // C-order elements, little-endian; size = elements() * dtype size.

  int64_t elements() const;
};

// Parses the bytes of a whole .npy file; name only labels error messages.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes, absl::string_view name);
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// The bytes of a .npy file holding array. major_version 0 picks 1.0, or 2.0 when the header does
// not fit 1.0's 16-bit length; 1, 2 or 3 force that version.
std::string SerializeNpy(const NpyArray& array, int major_version = 0);
absl::Status WriteNpy(const std::string& path, const NpyArray& array);

}  // namespace da::client
