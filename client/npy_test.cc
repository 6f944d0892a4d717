#include "client/npy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>

namespace da::client {
namespace {

using ::testing::HasSubstr;

// The bytes of a .npy file with the given version, header text and data, laid out by hand so that
// the tests do not trust the writer under test.
std::string RawNpy(int major, const std::string& dict, const std::string& data) {
  std::string header = dict + "\n";
  std::string bytes = "\x93NUMPY";
  bytes.push_back(static_cast<char>(major));
  bytes.push_back('\0');
  const size_t length_bytes = major == 1 ? 2 : 4;
  for (size_t i = 0; i < length_bytes; ++i) {
    bytes.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  }
  return bytes + header + data;
}

std::string FloatBytes(std::initializer_list<float> values) {
  std::string bytes(values.size() * 4, '\0');
  std::memcpy(bytes.data(), values.begin(), bytes.size());
  return bytes;
}

NpyArray SampleArray(NpyDType dtype) {
  NpyArray array;
  array.dtype = dtype;
  array.shape = {2, 3, 1, 2};
  const int64_t bytes = array.elements() * NpyDTypeSize(dtype);
  for (int64_t i = 0; i < bytes; ++i) array.data.push_back(static_cast<char>(i * 37 + 11));
  return array;
}

void ExpectSameArray(const NpyArray& actual, const NpyArray& expected) {
  EXPECT_EQ(actual.dtype, expected.dtype);
  EXPECT_EQ(actual.shape, expected.shape);
  EXPECT_EQ(actual.data, expected.data);
}

std::string ParseError(const std::string& bytes) {
  absl::StatusOr<NpyArray> array = ParseNpy(bytes, "x.npy");
  EXPECT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(array.status().message());
  EXPECT_EQ(message.rfind("x.npy: ", 0), 0u) << message;
  return message;
}

TEST(NpyTest, RoundTripsEveryDtypeInEveryVersion) {
  for (NpyDType dtype : {NpyDType::kFloat32, NpyDType::kFloat16, NpyDType::kBFloat16}) {
    for (int version : {0, 1, 2, 3}) {
      SCOPED_TRACE(testing::Message() << "dtype " << NpyDescr(dtype) << " version " << version);
      const NpyArray array = SampleArray(dtype);
      const std::string bytes = SerializeNpy(array, version);
      EXPECT_EQ(bytes[6], version == 0 ? 1 : version);
      absl::StatusOr<NpyArray> parsed = ParseNpy(bytes, "sample");
      ASSERT_TRUE(parsed.ok()) << parsed.status();
      ExpectSameArray(*parsed, array);
    }
  }
}

TEST(NpyTest, WritesNumPyHeaderWithDataAlignedTo64Bytes) {
  const std::string bytes = SerializeNpy(SampleArray(NpyDType::kFloat32));
  const size_t header_len = static_cast<unsigned char>(bytes[8]) |
                            static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8;
  EXPECT_EQ((10 + header_len) % 64, 0u);
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 1, 2), }";
  EXPECT_EQ(bytes.substr(10, dict.size()), dict);
  EXPECT_EQ(bytes[10 + header_len - 1], '\n');
}

// ml_dtypes' bfloat16 as np.save writes it ('<V2'), and a header that names it; raw bits in a
// uint16 array only when asked.
TEST(NpyTest, ReadsBFloat16InBothConventions) {
  const std::string bits("\x80\x3f\x00\x40", 4);  // bf16 1.0 and 2.0.
  for (const char* descr : {"<V2", "|V2", "bfloat16"}) {
    SCOPED_TRACE(descr);
    absl::StatusOr<NpyArray> parsed = ParseNpy(
        RawNpy(1,
               std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (2,), }",
               bits),
        "b.npy");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->dtype, NpyDType::kBFloat16);
    EXPECT_EQ(parsed->data, bits);
  }
  const std::string uint16 =
      RawNpy(1, "{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }", bits);
  EXPECT_EQ(ParseError(uint16),
            "x.npy: unsupported dtype '<u2' (expected '<f4', '<f2' or bfloat16 as '<V2'; for bf16 "
            "bits in a uint16 or int16 array, pass --bf16-as-uint16)");
  absl::StatusOr<NpyArray> parsed = ParseNpy(uint16, "b.npy", {.bf16_as_uint16 = true});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->dtype, NpyDType::kBFloat16);
  EXPECT_EQ(parsed->data, bits);
  // torch's bf16 bits come out of .view(torch.int16).numpy() as int16: the same bits.
  const std::string int16 =
      RawNpy(1, "{'descr': '<i2', 'fortran_order': False, 'shape': (2,), }", bits);
  parsed = ParseNpy(int16, "b.npy", {.bf16_as_uint16 = true});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->dtype, NpyDType::kBFloat16);
  EXPECT_EQ(parsed->data, bits);
}

TEST(NpyTest, WritesBFloat16AsVoidOrAsUint16) {
  const NpyArray array = SampleArray(NpyDType::kBFloat16);
  EXPECT_THAT(SerializeNpy(array), HasSubstr("{'descr': '<V2', "));
  const std::string uint16 = SerializeNpy(array, 0, {.bf16_as_uint16 = true});
  EXPECT_THAT(uint16, HasSubstr("{'descr': '<u2', "));
  absl::StatusOr<NpyArray> parsed = ParseNpy(uint16, "b.npy", {.bf16_as_uint16 = true});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ExpectSameArray(*parsed, array);
}

TEST(NpyTest, RoundTripsThroughFiles) {
  const std::string path =
      testing::TempDir() + "npy_test_round_trip." + std::to_string(getpid()) + ".npy";
  const NpyArray array = SampleArray(NpyDType::kFloat16);
  ASSERT_TRUE(WriteNpy(path, array).ok());
  absl::StatusOr<NpyArray> read = ReadNpy(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSameArray(*read, array);
  std::remove(path.c_str());
}

TEST(NpyTest, ReadsHandWrittenHeadersOfEveryRankAndVersion) {
  struct Case {
    int major;
    std::string dict;
    std::vector<int64_t> shape;
  } cases[] = {
      {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", {3}},
      {1, "{'shape': (1, 3), 'fortran_order': False, 'descr': '<f4'}   ", {1, 3}},
      {2, "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (3L, 1L)}", {3, 1}},
      {3, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 3, 1), }", {1, 1, 3, 1}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dict);
    const std::string data = FloatBytes({1.5f, -2.0f, 3.25f});
    absl::StatusOr<NpyArray> array = ParseNpy(RawNpy(c.major, c.dict, data), "x.npy");
    ASSERT_TRUE(array.ok()) << array.status();
    EXPECT_EQ(array->dtype, NpyDType::kFloat32);
    EXPECT_EQ(array->shape, c.shape);
    EXPECT_EQ(array->data, data);
  }
  absl::StatusOr<NpyArray> scalar =
      ParseNpy(RawNpy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': ()}", FloatBytes({7})),
               "scalar.npy");
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_TRUE(scalar->shape.empty());
  EXPECT_EQ(scalar->elements(), 1);
}

TEST(NpyTest, RejectsMissingFileNamingIt) {
  absl::StatusOr<NpyArray> array = ReadNpy("/nonexistent/dir/q.npy");
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(array.status().message()),
              HasSubstr("/nonexistent/dir/q.npy: cannot open"));
}

TEST(NpyTest, RejectsBadMagic) {
  EXPECT_THAT(ParseError("PK\x03\x04 this is a zip file"), HasSubstr("bad magic"));
  EXPECT_THAT(ParseError(""), HasSubstr("bad magic"));
}

TEST(NpyTest, RejectsUnsupportedVersion) {
  const std::string bytes =
      RawNpy(4, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", FloatBytes({1}));
  EXPECT_THAT(ParseError(bytes), HasSubstr("unsupported .npy format version 4.0"));
}

TEST(NpyTest, RejectsTruncatedHeader) {
  const std::string bytes =
      RawNpy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", "");
  EXPECT_THAT(ParseError(bytes.substr(0, 9)), HasSubstr("truncated header"));
  EXPECT_THAT(ParseError(bytes.substr(0, 30)), HasSubstr("truncated header"));
}

TEST(NpyTest, RejectsMalformedHeaders) {
  EXPECT_THAT(ParseError(RawNpy(1, "{'descr': '<f4', 'fortran_order': False}", "")),
              HasSubstr("malformed header: no 'shape' key"));
  EXPECT_THAT(
      ParseError(RawNpy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x)}", "")),
      HasSubstr("malformed header"));
  EXPECT_THAT(ParseError(RawNpy(1, "not a dict", "")), HasSubstr("malformed header"));
  EXPECT_THAT(ParseError(RawNpy(1,
                                "{'descr': [('a', '<f4')], 'fortran_order': False, "
                                "'shape': (1,)}",
                                "")),
              HasSubstr("structured dtypes are not supported"));
}

TEST(NpyTest, RejectsFortranOrder) {
  const std::string bytes =
      RawNpy(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (1,)}", FloatBytes({1}));
  EXPECT_THAT(ParseError(bytes), HasSubstr("fortran_order"));
}

TEST(NpyTest, RejectsUnsupportedDtypesNamingThem) {
  for (const char* descr : {"<f8", ">f4", "<i4", "|u1", ">f2"}) {
    const std::string bytes =
        RawNpy(1, std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (1,)}",
               std::string(8, '\0'));
    EXPECT_EQ(ParseError(bytes), std::string("x.npy: unsupported dtype '") + descr +
                                     "' (expected '<f4', '<f2' or bfloat16 as '<V2')");
  }
}

TEST(NpyTest, RejectsTruncatedAndTrailingData) {
  const std::string dict = "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2)}";
  EXPECT_THAT(ParseError(RawNpy(1, dict, std::string(7, '\0'))),
              HasSubstr("truncated data: shape (2, 2) of '<f2' needs 8 bytes, the file has 7"));
  EXPECT_THAT(ParseError(RawNpy(1, dict, std::string(10, '\0'))),
              HasSubstr("2 bytes of unexpected data"));
}

TEST(NpyTest, RejectsShapesWhoseSizeOverflows) {
  const std::string bytes =
      RawNpy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4)}", "");
  EXPECT_THAT(ParseError(bytes), HasSubstr("too large"));
}

// Lowers a resource limit of this process for a scope. The test programs are single-threaded.
class ScopedLimit {
 public:
  ScopedLimit(int resource, rlim_t soft) : resource_(resource) {
    EXPECT_EQ(getrlimit(resource_, &saved_), 0);
    rlimit lowered = saved_;
    lowered.rlim_cur = soft;
    EXPECT_EQ(setrlimit(resource_, &lowered), 0) << std::strerror(errno);
  }
  ~ScopedLimit() { EXPECT_EQ(setrlimit(resource_, &saved_), 0); }

 private:
  const int resource_;
  rlimit saved_{};
};

TEST(NpyTest, AFailedWriteSaysWhyAndRemovesThePartialFile) {
  // A device is written to, never removed.
  absl::Status status = WriteNpy("/dev/full", SampleArray(NpyDType::kFloat32));
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(status.message(), "/dev/full: write failed: No space left on device");
  EXPECT_EQ(access("/dev/full", F_OK), 0);

  // A regular file cut short by the file size limit (EFBIG once SIGXFSZ is ignored).
  const std::string path =
      testing::TempDir() + "npy_test_cut_short." + std::to_string(getpid()) + ".npy";
  NpyArray large = SampleArray(NpyDType::kFloat32);
  large.shape = {1 << 16};
  large.data.assign(4 << 16, 'x');
  void (*previous)(int) = std::signal(SIGXFSZ, SIG_IGN);
  {
    ScopedLimit limit(RLIMIT_FSIZE, 4096);
    status = WriteNpy(path, large);
  }
  std::signal(SIGXFSZ, previous);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(status.message(), path + ": write failed: File too large");
  EXPECT_NE(access(path.c_str(), F_OK), 0) << "the partial file is still there";
  std::remove(path.c_str());
}

TEST(NpyTest, AFileLargerThanMemoryIsRefusedNamingIt) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizer aborts on a failed allocation instead of throwing";
#endif
  // A sparse 8 GiB file, read with the address space limited to 1 GiB more than is in use.
  const std::string path =
      testing::TempDir() + "npy_test_too_large." + std::to_string(getpid()) + ".npy";
  std::ofstream(path, std::ios::binary | std::ios::trunc).close();
  ASSERT_EQ(truncate(path.c_str(), int64_t{8} << 30), 0) << std::strerror(errno);
  std::ifstream statm("/proc/self/statm");
  long pages = 0;
  ASSERT_TRUE(statm >> pages);
  absl::StatusOr<NpyArray> array;
  {
    ScopedLimit limit(RLIMIT_AS, static_cast<rlim_t>(pages) * sysconf(_SC_PAGESIZE) + (1 << 30));
    array = ReadNpy(path);
  }
  std::remove(path.c_str());
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(array.status().message(),
            path + ": its 8589934592 bytes do not fit in this client's memory");
}

}  // namespace
}  // namespace da::client
