#include "client/npy.h"

#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <new>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace da::client {
namespace {

constexpr absl::string_view kMagic = "\x93NUMPY";
// Magic, two version bytes; the header length field follows (2 bytes in 1.0, 4 in 2.0 and 3.0).
constexpr size_t kPreludeBytes = 8;
// NumPy pads the header so that the data starts at a multiple of 64 bytes.
constexpr size_t kHeaderAlignment = 64;

// A value in a .npy header dict: a string, a bool or a tuple of integers.
struct HeaderValue {
  enum class Kind { kString, kBool, kTuple } kind = Kind::kString;
  std::string text;
  bool flag = false;
  std::vector<int64_t> dims;
};

// A parser for the Python dict literal of a .npy header, e.g.
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }. It accepts string, bool and
// tuple-of-integer values, which is all the three keys need.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  absl::Status ParseDict(std::map<std::string, HeaderValue>* dict) {
    if (!Consume('{')) return Error("expected '{'");
    while (!Consume('}')) {
      absl::StatusOr<std::string> key = ParseString();
      if (!key.ok()) return key.status();
      if (!Consume(':')) return Error(absl::StrCat("expected ':' after '", *key, "'"));
      HeaderValue& value = (*dict)[*key];
      value = HeaderValue();  // A repeated key: the last one wins, as in Python.
      if (absl::Status status = ParseValue(&value); !status.ok()) return status;
      if (!Consume(',')) {
        if (!Consume('}')) return Error("expected ',' or '}'");
        break;
      }
    }
    SkipSpace();
    if (pos_ != text_.size()) return Error("unexpected text after the dict");
    return absl::OkStatus();
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(what, " at offset ", pos_));
  }
  void SkipSpace() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool Consume(char c) {
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(absl::string_view word) {
    SkipSpace();
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  absl::StatusOr<std::string> ParseString() {
    SkipSpace();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      return Error("expected a quoted string");
    }
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == absl::string_view::npos) return Error("unterminated string");
    std::string value(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return value;
  }

  absl::StatusOr<int64_t> ParseInt() {
    SkipSpace();
    const size_t start = pos_;
    int64_t value = 0;
    while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
      const int digit = text_[pos_++] - '0';
      if (value > (std::numeric_limits<int64_t>::max() - digit) / 10) {
        return Error("dimension too large");
      }
      value = value * 10 + digit;
    }
    if (pos_ == start) return Error("expected a non-negative integer");
    if (pos_ < text_.size() && text_[pos_] == 'L') ++pos_;  // Python 2 long suffix.
    return value;
  }

  absl::Status ParseValue(HeaderValue* value) {
    SkipSpace();
    for (bool flag : {true, false}) {
      if (ConsumeWord(flag ? "True" : "False")) {
        value->kind = HeaderValue::Kind::kBool;
        value->flag = flag;
        return absl::OkStatus();
      }
    }
    if (Consume('(')) {
      value->kind = HeaderValue::Kind::kTuple;
      while (!Consume(')')) {
        absl::StatusOr<int64_t> dim = ParseInt();
        if (!dim.ok()) return dim.status();
        value->dims.push_back(*dim);
        if (!Consume(',')) {
          if (!Consume(')')) return Error("expected ',' or ')' in the shape");
          break;
        }
      }
      return absl::OkStatus();
    }
    if (pos_ < text_.size() && text_[pos_] == '[')
      return Error("structured dtypes are not supported");
    absl::StatusOr<std::string> text = ParseString();
    if (!text.ok()) return text.status();
    value->kind = HeaderValue::Kind::kString;
    value->text = *std::move(text);
    return absl::OkStatus();
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

uint32_t ReadLittleEndian(absl::string_view bytes, size_t offset, size_t width) {
  uint32_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[offset + i])) << (8 * i);
  }
  return value;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

// Checks the header and the data size; fills array's dtype and shape, and returns the offset of
// the data in bytes.
absl::StatusOr<size_t> ParseHeader(absl::string_view bytes, absl::string_view name,
                                   const NpyOptions& options, NpyArray* array) {
  auto fail = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", what));
  };
  if (bytes.size() < kMagic.size() || bytes.substr(0, kMagic.size()) != kMagic) {
    return fail("not a .npy file (bad magic)");
  }
  if (bytes.size() < kPreludeBytes) return fail("truncated header");
  const int major = static_cast<unsigned char>(bytes[6]);
  const int minor = static_cast<unsigned char>(bytes[7]);
  if (major < 1 || major > 3) {
    return fail(absl::StrCat("unsupported .npy format version ", major, ".", minor,
                             " (expected 1.0, 2.0 or 3.0)"));
  }
  const size_t length_bytes = major == 1 ? 2 : 4;
  if (bytes.size() < kPreludeBytes + length_bytes) return fail("truncated header");
  const size_t header_len = ReadLittleEndian(bytes, kPreludeBytes, length_bytes);
  const size_t data_offset = kPreludeBytes + length_bytes + header_len;
  if (bytes.size() < data_offset) return fail("truncated header");

  HeaderParser parser(bytes.substr(kPreludeBytes + length_bytes, header_len));
  std::map<std::string, HeaderValue> dict;
  if (absl::Status status = parser.ParseDict(&dict); !status.ok()) {
    return fail(absl::StrCat("malformed header: ", status.message()));
  }
  for (const char* key : {"descr", "fortran_order", "shape"}) {
    if (!dict.contains(key)) return fail(absl::StrCat("malformed header: no '", key, "' key"));
  }
  const HeaderValue& descr_value = dict["descr"];
  const HeaderValue& fortran_order = dict["fortran_order"];
  const HeaderValue& shape = dict["shape"];
  if (descr_value.kind != HeaderValue::Kind::kString) {
    return fail("malformed header: 'descr' is not a string");
  }
  if (fortran_order.kind != HeaderValue::Kind::kBool) {
    return fail("malformed header: 'fortran_order' is not a bool");
  }
  if (shape.kind != HeaderValue::Kind::kTuple)
    return fail("malformed header: 'shape' is not a tuple");
  const std::string* descr = &descr_value.text;

  if (*descr == "<f4") {
    array->dtype = NpyDType::kFloat32;
  } else if (*descr == "<f2") {
    array->dtype = NpyDType::kFloat16;
  } else if (*descr == "<V2" || *descr == "|V2" || *descr == "bfloat16") {
    array->dtype = NpyDType::kBFloat16;  // ml_dtypes' bfloat16, as np.save writes it.
  } else if ((*descr == "<u2" || *descr == "<i2") && options.bf16_as_uint16) {
    array->dtype = NpyDType::kBFloat16;  // The bits, as numpy holds them (torch: view(int16)).
  } else if (*descr == "<u2" || *descr == "<i2") {
    return fail(absl::StrCat("unsupported dtype '", *descr,
                             "' (expected '<f4', '<f2' or bfloat16 as '<V2'; for bf16 bits in a "
                             "uint16 or int16 array, pass --bf16-as-uint16)"));
  } else {
    return fail(absl::StrCat("unsupported dtype '", *descr,
                             "' (expected '<f4', '<f2' or bfloat16 as '<V2')"));
  }
  if (fortran_order.flag) {
    return fail("fortran_order arrays are not supported (save a C-order array)");
  }
  array->shape = shape.dims;

  int64_t expected_bytes = NpyDTypeSize(array->dtype);
  for (int64_t dim : array->shape) {
    if (dim != 0 && expected_bytes > std::numeric_limits<int64_t>::max() / dim) {
      return fail(absl::StrCat("shape ", ShapeText(array->shape), " is too large"));
    }
    expected_bytes *= dim;
  }
  const int64_t data_bytes = static_cast<int64_t>(bytes.size() - data_offset);
  if (data_bytes < expected_bytes) {
    return fail(absl::StrCat("truncated data: shape ", ShapeText(array->shape), " of '", *descr,
                             "' needs ", expected_bytes, " bytes, the file has ", data_bytes));
  }
  if (data_bytes > expected_bytes) {
    return fail(absl::StrCat(data_bytes - expected_bytes, " bytes of unexpected data after the ",
                             expected_bytes, " of shape ", ShapeText(array->shape)));
  }
  return data_offset;
}

// The header of a .npy file for array, in the given format version (1, 2 or 3).
std::string NpyHeader(const NpyArray& array, int major_version, const NpyOptions& options) {
  const std::string dict =
      absl::StrCat("{'descr': '", NpyDescr(array.dtype, options),
                   "', 'fortran_order': False, 'shape': ", ShapeText(array.shape), ", }");
  const size_t length_bytes = major_version == 1 ? 2 : 4;
  // Pad with spaces and end with a newline so that the data starts 64-byte aligned.
  const size_t unpadded = kPreludeBytes + length_bytes + dict.size() + 1;
  const size_t padding = (kHeaderAlignment - unpadded % kHeaderAlignment) % kHeaderAlignment;
  const size_t header_len = dict.size() + padding + 1;

  std::string bytes(kMagic);
  bytes.push_back(static_cast<char>(major_version));
  bytes.push_back('\0');
  for (size_t i = 0; i < length_bytes; ++i) {
    bytes.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  }
  bytes += dict;
  bytes.append(padding, ' ');
  bytes.push_back('\n');
  return bytes;
}

std::string NpyHeader(const NpyArray& array, const NpyOptions& options) {
  std::string header = NpyHeader(array, 1, options);
  // Version 1.0 stores the header length in 16 bits; longer headers need 2.0.
  if (header.size() - kPreludeBytes - 2 > std::numeric_limits<uint16_t>::max()) {
    header = NpyHeader(array, 2, options);
  }
  return header;
}

}  // namespace

const char* NpyDescr(NpyDType dtype, const NpyOptions& options) {
  switch (dtype) {
    case NpyDType::kFloat32:
      return "<f4";
    case NpyDType::kFloat16:
      return "<f2";
    case NpyDType::kBFloat16:
      break;
  }
  return options.bf16_as_uint16 ? "<u2" : "<V2";
}

int64_t NpyArray::elements() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes, absl::string_view name,
                                  const NpyOptions& options) {
  NpyArray array;
  absl::StatusOr<size_t> data_offset = ParseHeader(bytes, name, options, &array);
  if (!data_offset.ok()) return data_offset.status();
  array.data = std::string(bytes.substr(*data_offset));
  return array;
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path, const NpyOptions& options) {
  struct stat info {};
  if (stat(path.c_str(), &info) == 0 && !S_ISREG(info.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  const std::streamoff size = file.tellg();
  if (size < 0) return absl::DataLossError(absl::StrCat(path, ": cannot read its size"));
  std::string contents;
  try {
    contents.resize(static_cast<size_t>(size));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(path, ": its ", size, " bytes do not fit in this client's memory"));
  }
  file.seekg(0);
  file.read(contents.data(), size);
  if (!file) return absl::DataLossError(absl::StrCat(path, ": read failed"));

  NpyArray array;
  absl::StatusOr<size_t> data_offset = ParseHeader(contents, path, options, &array);
  if (!data_offset.ok()) return data_offset.status();
  // Drop the header in place rather than copy the data: inputs can be gigabytes.
  contents.erase(0, *data_offset);
  array.data = std::move(contents);
  return array;
}

std::string SerializeNpy(const NpyArray& array, int major_version, const NpyOptions& options) {
  std::string bytes =
      major_version == 0 ? NpyHeader(array, options) : NpyHeader(array, major_version, options);
  bytes += array.data;
  return bytes;
}

absl::Status WriteNpy(const std::string& path, const NpyArray& array, const NpyOptions& options) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) {
    return absl::PermissionDeniedError(
        absl::StrCat(path, ": cannot create: ", std::strerror(errno)));
  }
  const std::string header = NpyHeader(array, options);
  errno = 0;
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.write(array.data.data(), static_cast<std::streamsize>(array.data.size()));
  file.close();
  if (!file) {
    const int error = errno;
    // A truncated .npy must not be mistaken for an output; a device or a pipe is not removed.
    struct stat info {};
    if (stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode)) std::remove(path.c_str());
    return absl::DataLossError(absl::StrCat(
        path, ": write failed: ", error != 0 ? std::strerror(error) : "unknown error"));
  }
  return absl::OkStatus();
}

}  // namespace da::client
