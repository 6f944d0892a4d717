// The --warmup file format: defaults, every field, and errors that name the entry and the field.
#include "server/warm_up_file.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "server/test_util.h"

namespace da::server {
namespace {

TEST(WarmUpFileTest, ParsesEveryFieldAndAppliesDefaults) {
  absl::StatusOr<std::vector<WarmUpShape>> shapes = ParseWarmUpJson(R"([
    {"batch": 1, "seq_len": 4096, "heads": 8, "head_dim": 64, "segments": [2048],
     "dilations": [1]},
    {"batch": 2, "seq_len": 8192, "heads": 8, "kv_heads": 2, "head_dim": 128, "dtype": "bf16",
     "segments": [2048, 4096], "dilations": [1, 2], "causal": true, "mode": "grouped",
     "precision": "fp32", "output_dtype": "fp32"}
  ])");
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  ASSERT_EQ(shapes->size(), 2u);

  const WarmUpShape& first = (*shapes)[0];
  EXPECT_EQ(first.shape.batch, 1);
  EXPECT_EQ(first.shape.seq_len, 4096);
  EXPECT_EQ(first.shape.heads, 8);
  EXPECT_EQ(first.shape.kv_heads, 8);  // Defaults to heads.
  EXPECT_EQ(first.shape.head_dim, 64);
  EXPECT_EQ(first.dtype, engine::DType::kFloat32);
  EXPECT_EQ(first.out_dtype, engine::DType::kFloat32);  // Defaults to dtype.
  EXPECT_EQ(first.spec.PatternsToString(), "(2048,1)");
  EXPECT_FALSE(first.spec.causal);
  EXPECT_EQ(first.spec.mode, engine::CombineMode::kLongNet);
  EXPECT_EQ(first.spec.precision, engine::Precision::kAuto);

  const WarmUpShape& second = (*shapes)[1];
  EXPECT_EQ(second.shape.batch, 2);
  EXPECT_EQ(second.shape.kv_heads, 2);
  EXPECT_EQ(second.shape.head_dim, 128);
  EXPECT_EQ(second.dtype, engine::DType::kBFloat16);
  EXPECT_EQ(second.out_dtype, engine::DType::kFloat32);
  EXPECT_EQ(second.spec.PatternsToString(), "(2048,1),(4096,2)");
  EXPECT_TRUE(second.spec.causal);
  EXPECT_EQ(second.spec.mode, engine::CombineMode::kGrouped);
  EXPECT_EQ(second.spec.precision, engine::Precision::kFloat32);
}

TEST(WarmUpFileTest, AnEmptyArrayIsNoShapes) {
  absl::StatusOr<std::vector<WarmUpShape>> shapes = ParseWarmUpJson("[]");
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_TRUE(shapes->empty());
}

struct BadCase {
  std::string name;
  std::string text;
  std::vector<std::string> message_parts;  // Each must appear in the error message.
};

void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name; }

class WarmUpFileErrorTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(WarmUpFileErrorTest, NamesTheEntryAndTheField) {
  absl::StatusOr<std::vector<WarmUpShape>> shapes = ParseWarmUpJson(GetParam().text);
  ASSERT_FALSE(shapes.ok());
  EXPECT_EQ(shapes.status().code(), absl::StatusCode::kInvalidArgument);
  for (const std::string& part : GetParam().message_parts) {
    EXPECT_NE(shapes.status().message().find(part), std::string::npos)
        << "'" << part << "' not in: " << shapes.status().message();
  }
}

// A valid entry, then the entry under test at index 1.
std::string SecondEntry(const std::string& entry) {
  return R"([{"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16, "segments": [64],
              "dilations": [1]}, )" +
         entry + "]";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, WarmUpFileErrorTest,
    ::testing::Values(
        BadCase{"NotJson", "[{\"batch\": 1,", {"not valid JSON"}},
        BadCase{"NotAnArray", R"({"batch": 1})", {"top level is object", "expected an array"}},
        BadCase{"NotAnObject", SecondEntry("7"), {"entry 1", "expected an object"}},
        BadCase{"MissingField",
                SecondEntry(R"({"batch": 1, "heads": 2, "head_dim": 16, "segments": [64],
                                "dilations": [1]})"),
                {"entry 1", "\"seq_len\" is missing"}},
        BadCase{"WrongType",
                SecondEntry(R"({"batch": 1, "seq_len": "4k", "heads": 2, "head_dim": 16,
                                "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"seq_len\" is \"4k\"", "expected an integer"}},
        BadCase{"Fraction",
                SecondEntry(R"({"batch": 1, "seq_len": 64.5, "heads": 2, "head_dim": 16,
                                "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"seq_len\" is 64.5"}},
        BadCase{"TooLarge",
                SecondEntry(R"({"batch": 1, "seq_len": 18446744073709551615, "heads": 2,
                                "head_dim": 16, "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"seq_len\" is 18446744073709551615"}},
        BadCase{"BadDType",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "dtype": "fp64", "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"dtype\" is \"fp64\"", "\"bf16\""}},
        BadCase{"BadMode",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "mode": "sparse", "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"mode\" is \"sparse\"", "\"grouped\""}},
        BadCase{"BadPrecision",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "precision": "fp4", "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"precision\" is \"fp4\"", "\"fp8\""}},
        BadCase{"BadCausal",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "causal": 1, "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"causal\" is 1", "true or false"}},
        BadCase{"EmptySegments",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "segments": [], "dilations": []})"),
                {"entry 1", "\"segments\" is []"}},
        BadCase{"UnequalPatternLists",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "segments": [32, 64], "dilations": [1]})"),
                {"entry 1", "\"segments\" has 2 values but \"dilations\" has 1"}},
        // Containers are named by their size, never written out: json's dump() recurses, so a
        // million nested brackets crashed the server instead of exiting with this message.
        BadCase{"DeeplyNestedEntry",
                SecondEntry(std::string(1000000, '[') + std::string(1000000, ']')),
                {"entry 1", "is an array of 1 values; expected an object"}},
        BadCase{"NestedField",
                SecondEntry(R"({"batch": [[1]], "seq_len": 64, "heads": 2, "head_dim": 16,
                                "segments": [64], "dilations": [1]})"),
                {"entry 1", "\"batch\" is an array of 1 values", "expected an integer"}},
        BadCase{"LongString",
                SecondEntry(R"({"batch": 1, "seq_len": ")" + std::string(100000, 'x') +
                            R"(", "heads": 2, "head_dim": 16, "segments": [64],
                                "dilations": [1]})"),
                {"entry 1", "\"seq_len\" is \"" + std::string(64, 'x') + "\"...",
                 "expected an integer"}},
        BadCase{"LongStringInAnArray",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "segments": [")" +
                            std::string(100000, 'y') + R"("], "dilations": [1]})"),
                {"entry 1", "\"segments\" is [\"" + std::string(64, 'y') + "\"...]"}},
        BadCase{"UnknownField",
                SecondEntry(R"({"batch": 1, "seq_len": 64, "heads": 2, "head_dim": 16,
                                "segments": [64], "dilations": [1], "causl": true})"),
                {"entry 1", "unknown field \"causl\""}}));

TEST(WarmUpFileTest, ReadsAFileAndReportsAMissingOne) {
  const std::string dir = testing::MakeTempDir();
  const std::string path = dir + "/warmup.json";
  std::ofstream(path) << SecondEntry(R"({"batch": 1, "seq_len": 128, "heads": 2, "head_dim": 16,
                                         "segments": [64], "dilations": [1]})");
  absl::StatusOr<std::vector<WarmUpShape>> shapes = ReadWarmUpFile(path);
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  ASSERT_EQ(shapes->size(), 2u);
  EXPECT_EQ((*shapes)[1].shape.seq_len, 128);

  absl::StatusOr<std::vector<WarmUpShape>> missing = ReadWarmUpFile(dir + "/absent.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("cannot read"), std::string::npos) << missing.status();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace da::server
