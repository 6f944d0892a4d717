#include "server/warm_up_file.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace da::server {
namespace {

using nlohmann::json;

// An integer that fits int64_t (nlohmann keeps larger ones as uint64_t).
bool IsInt64(const json& value) {
  return value.is_number_integer() &&
         (!value.is_number_unsigned() ||
          value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
}

// The names the file uses, as da-client's flags do.
const std::map<std::string, engine::DType>& DTypeNames() {
  static const auto* const kNames =
      new std::map<std::string, engine::DType>{{"fp32", engine::DType::kFloat32},
                                               {"fp16", engine::DType::kFloat16},
                                               {"bf16", engine::DType::kBFloat16}};
  return *kNames;
}

const std::map<std::string, engine::CombineMode>& ModeNames() {
  static const auto* const kNames = new std::map<std::string, engine::CombineMode>{
      {"longnet", engine::CombineMode::kLongNet}, {"grouped", engine::CombineMode::kGrouped}};
  return *kNames;
}

const std::map<std::string, engine::Precision>& PrecisionNames() {
  static const auto* const kNames =
      new std::map<std::string, engine::Precision>{{"auto", engine::Precision::kAuto},
                                                   {"fp32", engine::Precision::kFloat32},
                                                   {"bf16", engine::Precision::kBFloat16},
                                                   {"fp16", engine::Precision::kFloat16},
                                                   {"fp8", engine::Precision::kFloat8}};
  return *kNames;
}

// A value for an error message: a scalar or a short flat array as written (a string cut to 64
// characters), any other array or object by its size. Never json::dump() of a container: it
// recurses, and a file of a million nested brackets would overflow the stack (the parser itself
// does not recurse), and a large value would be copied whole into the log line.
std::string Describe(const json& value) {
  if (value.is_array()) {
    bool flat = value.size() <= 16;
    for (const json& element : value) flat = flat && element.is_primitive();
    if (!flat) return absl::StrCat("an array of ", value.size(), " values");
    std::vector<std::string> elements;
    for (const json& element : value) elements.push_back(Describe(element));
    return absl::StrCat("[", absl::StrJoin(elements, ","), "]");
  }
  if (value.is_object() && !value.empty()) {
    return absl::StrCat("an object of ", value.size(), " keys");
  }
  if (value.is_string() && value.get_ref<const std::string&>().size() > 64) {
    // Cut at a byte: a character cut in two is replaced, not an exception.
    return absl::StrCat(json(value.get_ref<const std::string&>().substr(0, 64))
                            .dump(-1, ' ', false, json::error_handler_t::replace),
                        "...");
  }
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

// Reads the fields of one entry, with messages that name the entry and the field.
class EntryReader {
 public:
  EntryReader(const json& entry, size_t index)
      : entry_(entry), where_(absl::StrCat("entry ", index)) {}

  absl::Status CheckKeys() const {
    static const char* const kKeys[] = {"batch",    "seq_len", "heads",     "kv_heads",
                                        "head_dim", "dtype",   "segments",  "dilations",
                                        "causal",   "mode",    "precision", "output_dtype"};
    for (const auto& [key, value] : entry_.items()) {
      if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys)) {
        return Invalid(absl::StrCat("has unknown field \"", key,
                                    "\"; expected batch, seq_len, heads, kv_heads, head_dim, "
                                    "dtype, output_dtype, segments, dilations, causal, mode, "
                                    "precision"));
      }
    }
    return absl::OkStatus();
  }

  // A required integer, or the fallback when absent and fallback is given.
  absl::StatusOr<int64_t> Integer(const char* key, std::optional<int64_t> fallback = {}) const {
    if (!entry_.contains(key)) {
      if (fallback.has_value()) return *fallback;
      return Missing(key);
    }
    const json& value = entry_.at(key);
    if (!IsInt64(value)) return WrongType(key, value, "an integer");
    return value.get<int64_t>();
  }

  absl::StatusOr<std::vector<int64_t>> Integers(const char* key) const {
    if (!entry_.contains(key)) return Missing(key);
    const json& value = entry_.at(key);
    if (!value.is_array() || value.empty()) {
      return WrongType(key, value, "a non-empty array of integers");
    }
    std::vector<int64_t> out;
    for (const json& item : value) {
      if (!IsInt64(item)) return WrongType(key, value, "a non-empty array of integers");
      out.push_back(item.get<int64_t>());
    }
    return out;
  }

  absl::StatusOr<bool> Bool(const char* key) const {
    if (!entry_.contains(key)) return false;
    const json& value = entry_.at(key);
    if (!value.is_boolean()) return WrongType(key, value, "true or false");
    return value.get<bool>();
  }

  // One of names' keys; fallback when absent.
  template <typename T>
  absl::StatusOr<T> Choice(const char* key, const std::map<std::string, T>& names,
                           T fallback) const {
    if (!entry_.contains(key)) return fallback;
    const json& value = entry_.at(key);
    std::string expected;
    for (const auto& [name, unused] : names) {
      absl::StrAppend(&expected, expected.empty() ? "" : ", ", "\"", name, "\"");
    }
    if (value.is_string()) {
      auto found = names.find(value.get<std::string>());
      if (found != names.end()) return found->second;
    }
    return WrongType(key, value, absl::StrCat("one of ", expected));
  }

  absl::Status Invalid(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": ", what));
  }

 private:
  absl::Status Missing(const char* key) const {
    return Invalid(absl::StrCat("\"", key, "\" is missing"));
  }
  absl::Status WrongType(const char* key, const json& value, const std::string& expected) const {
    return Invalid(absl::StrCat("\"", key, "\" is ", Describe(value), "; expected ", expected));
  }

  const json& entry_;
  std::string where_;
};

absl::StatusOr<WarmUpShape> ShapeFromEntry(const json& entry, size_t index) {
  EntryReader reader(entry, index);
  if (!entry.is_object()) {
    return reader.Invalid(absl::StrCat("is ", Describe(entry), "; expected an object"));
  }
  DA_RETURN_IF_ERROR(reader.CheckKeys());
  WarmUpShape out;
  engine::ProblemShape& shape = out.shape;
  DA_ASSIGN_OR_RETURN(shape.batch, reader.Integer("batch"));
  DA_ASSIGN_OR_RETURN(shape.seq_len, reader.Integer("seq_len"));
  DA_ASSIGN_OR_RETURN(shape.heads, reader.Integer("heads"));
  DA_ASSIGN_OR_RETURN(shape.kv_heads, reader.Integer("kv_heads", shape.heads));
  DA_ASSIGN_OR_RETURN(shape.head_dim, reader.Integer("head_dim"));
  DA_ASSIGN_OR_RETURN(out.dtype, reader.Choice("dtype", DTypeNames(), engine::DType::kFloat32));
  DA_ASSIGN_OR_RETURN(out.out_dtype, reader.Choice("output_dtype", DTypeNames(), out.dtype));
  DA_ASSIGN_OR_RETURN(const std::vector<int64_t> segments, reader.Integers("segments"));
  DA_ASSIGN_OR_RETURN(const std::vector<int64_t> dilations, reader.Integers("dilations"));
  if (segments.size() != dilations.size()) {
    return reader.Invalid(absl::StrCat("\"segments\" has ", segments.size(),
                                       " values but \"dilations\" has ", dilations.size(),
                                       "; they must have equal lengths"));
  }
  for (size_t i = 0; i < segments.size(); ++i) {
    out.spec.patterns.push_back({segments[i], dilations[i]});
  }
  DA_ASSIGN_OR_RETURN(out.spec.causal, reader.Bool("causal"));
  DA_ASSIGN_OR_RETURN(out.spec.mode,
                      reader.Choice("mode", ModeNames(), engine::CombineMode::kLongNet));
  DA_ASSIGN_OR_RETURN(out.spec.precision,
                      reader.Choice("precision", PrecisionNames(), engine::Precision::kAuto));
  return out;
}

}  // namespace

absl::StatusOr<std::vector<WarmUpShape>> ParseWarmUpJson(const std::string& text) {
  // nlohmann throws on malformed text; the exception stops here (STYLE: no exceptions of ours).
  json document;
  try {
    document = json::parse(text);
  } catch (const json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!document.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the top level is ", document.type_name(), "; expected an array of shapes"));
  }
  std::vector<WarmUpShape> shapes;
  for (size_t i = 0; i < document.size(); ++i) {
    DA_ASSIGN_OR_RETURN(WarmUpShape shape, ShapeFromEntry(document[i], i));
    shapes.push_back(std::move(shape));
  }
  return shapes;
}

absl::StatusOr<std::vector<WarmUpShape>> ReadWarmUpFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read: ", std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::NotFoundError(absl::StrCat("cannot read: ", std::strerror(errno)));
  return ParseWarmUpJson(text.str());
}

}  // namespace da::server
