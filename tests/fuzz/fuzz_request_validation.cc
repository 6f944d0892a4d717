// libFuzzer target: the server's request conversion and validation, on hostile bytes.
//
// The first input byte picks the message; the rest is its protobuf encoding:
//   0: AttendRequest  -> ProblemFromRequest, then ValidateProblem (as AttendReactor::Submit)
//   1: StreamHeader   -> ProblemFromHeader, then ValidateShape (as AttendStreamReactor, which
//                        leaves max_request_bytes to its chunks)
//   2: WarmUpRequest  -> per shape ProblemFromHeader and ValidateShape (as the WarmUp RPC)
//   3: bytes of an AttendStreamRequest as the server receives them -> ParseStreamMessage (the
//      zero-copy stream parser), cut into pieces at points the next bytes choose, which must
//      read exactly as protobuf reads the same bytes
// with the limits a da-server has when started with no flags (ServerOptions' defaults).
//
// A refusal must be INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message. A problem that passes
// and is small (see kMaxRunCost) then runs on the CPU engine: on the request's own bytes (NaN,
// infinities, denormals: no crash), and on random values in [-1, 1] compared with the reference
// engine (within the precision policy's error bound), so a shape validation accepts but the
// kernel gets wrong is found too. Anything else
// aborts the run: ASan/UBSan findings, leaks, a wrong status code, a wrong output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "da/v1/attention.pb.h"
#include "engine/attention_spec.h"
#include "engine/engine.h"
#include "engine/precision_policy.h"
#include "engine/tensor.h"
#include "google/protobuf/stubs/logging.h"
#include "server/conversion.h"
#include "server/server.h"
#include "server/stream_assembler.h"
#include "server/stream_wire.h"

namespace da::server {
namespace {

// Work above this (multiply-adds, summed over patterns) is validated but not run, so that one
// input stays well under a millisecond even under the sanitizers.
constexpr double kMaxRunCost = 1 << 16;
// Patterns beyond this are validated but not run (each costs a plan and a pass).
constexpr size_t kMaxRunPatterns = 8;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_request_validation: %s\n", what.c_str());
  std::abort();
}

// The limits of a da-server started without flags.
engine::Limits DefaultServerLimits() {
  const ServerOptions defaults;
  engine::Limits limits;
  limits.max_request_bytes = defaults.max_request_bytes;
  limits.max_tokens = defaults.max_tokens;
  return limits;
}

// What the server would answer for a refused request: the code must be one a client can act on,
// and the message must say what was wrong.
void CheckRefusal(const absl::Status& status, const char* stage) {
  if (status.code() != absl::StatusCode::kInvalidArgument &&
      status.code() != absl::StatusCode::kResourceExhausted) {
    Fail(absl::StrCat(stage, " refused with an unexpected code: ", status.ToString()));
  }
  if (status.message().empty()) Fail(absl::StrCat(stage, " refused without a message"));
}

std::unique_ptr<engine::Engine> MakeEngine(const std::string& backend) {
  engine::EngineOptions options;
  options.threads = 1;
  options.backend = backend;
  options.limits = DefaultServerLimits();
  options.plan_cache_bytes = int64_t{64} << 20;  // Every shape is small; bounds the fuzzer's RSS.
  auto made = engine::Engine::Create(options);
  if (!made.ok()) Fail(absl::StrCat("Engine::Create: ", made.status().ToString()));
  return *std::move(made);
}

// One of each for the whole run: plans stay cached across inputs, as in a server.
engine::Engine& CpuEngine() {
  static const std::unique_ptr<engine::Engine> engine = MakeEngine("cpu");
  return *engine;
}

engine::Engine& ReferenceEngine() {
  static const std::unique_ptr<engine::Engine> engine = MakeEngine("reference");
  return *engine;
}

// Multiply-adds of the problem, an upper bound: every query of a segment against every key.
double RunCost(const engine::ProblemShape& shape, const engine::AttentionSpec& spec) {
  double cost = 0;
  for (const engine::Pattern& p : spec.patterns) {
    const double kept = std::ceil(static_cast<double>(std::min(p.segment_len, shape.seq_len)) /
                                  static_cast<double>(p.dilation));
    cost += static_cast<double>(shape.batch) * shape.heads * shape.head_dim * 2 * kept *
            std::ceil(static_cast<double>(shape.seq_len) / static_cast<double>(p.dilation));
  }
  return cost;
}

bool SmallEnough(const engine::ProblemShape& shape, const engine::AttentionSpec& spec) {
  return spec.patterns.size() <= kMaxRunPatterns && RunCost(shape, spec) <= kMaxRunCost;
}

// Fills a buffer with values in [-1, 1] from a fixed-seed generator (splitmix64).
std::vector<char> RandomTensor(engine::DType dtype, const engine::Shape4& shape, uint64_t seed) {
  const int64_t elements = shape.elements();
  std::vector<char> bytes(static_cast<size_t>(elements * engine::DTypeSize(dtype)));
  uint64_t state = seed;
  for (int64_t i = 0; i < elements; ++i) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float value = static_cast<float>(static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0);
    engine::StoreFromFloat(dtype, bytes.data(), i, value);
  }
  return bytes;
}

absl::StatusOr<engine::ExecutionInfo> Run(engine::Engine& engine, const engine::TensorView& q,
                                          const engine::TensorView& k, const engine::TensorView& v,
                                          const engine::AttentionSpec& spec,
                                          std::vector<char>* out) {
  out->assign(static_cast<size_t>(q.bytes), static_cast<char>(0x7F));  // Poisoned: NaN-ish.
  engine::RunRequest request;
  request.q = q;
  request.k = k;
  request.v = v;
  request.spec = spec;
  request.out = {q.dtype, q.shape, out->data(), q.bytes};
  request.request_id = "fuzz";
  return engine.Run(request);
}

// The CPU engine on q, k, v as given: any result is fine as long as nothing crashes, and a
// refusal says why.
void RunAsGiven(const engine::TensorView& q, const engine::TensorView& k,
                const engine::TensorView& v, const engine::AttentionSpec& spec) {
  std::vector<char> out;
  absl::StatusOr<engine::ExecutionInfo> info = Run(CpuEngine(), q, k, v, spec, &out);
  if (!info.ok() && info.status().message().empty()) Fail("engine refused without a message");
}

// The CPU engine against the reference on random inputs of an accepted shape. Compared only when
// the scale keeps scores small (|scale| <= 1), where the error bounds below hold.
void CompareWithReference(const engine::ProblemShape& shape, engine::DType dtype,
                          const engine::AttentionSpec& spec) {
  if (std::abs(spec.ScaleFor(shape.head_dim)) > 1.0) return;
  const std::vector<char> q_bytes = RandomTensor(dtype, shape.QueryShape(), 1);
  const std::vector<char> k_bytes = RandomTensor(dtype, shape.KeyShape(), 2);
  const std::vector<char> v_bytes = RandomTensor(dtype, shape.KeyShape(), 3);
  const auto view = [dtype](const std::vector<char>& bytes, engine::Shape4 s) {
    return engine::TensorView{dtype, s, bytes.data(), static_cast<int64_t>(bytes.size())};
  };
  const engine::TensorView q = view(q_bytes, shape.QueryShape());
  const engine::TensorView k = view(k_bytes, shape.KeyShape());
  const engine::TensorView v = view(v_bytes, shape.KeyShape());

  std::vector<char> cpu_out, reference_out;
  absl::StatusOr<engine::ExecutionInfo> cpu = Run(CpuEngine(), q, k, v, spec, &cpu_out);
  if (!cpu.ok()) {
    if (cpu.status().message().empty()) Fail("engine refused without a message");
    return;  // E.g. a precision this CPU lacks: not a validation matter.
  }
  absl::StatusOr<engine::ExecutionInfo> reference =
      Run(ReferenceEngine(), q, k, v, spec, &reference_out);
  if (!reference.ok()) {
    Fail(absl::StrCat("the CPU engine ran a problem the reference refused: ",
                      reference.status().ToString()));
  }
  // Twice the error bound the precision policy promises for the precision the CPU chose (bf16
  // under AUTO on CPUs with AVX512-BF16), with a floor for fp32 rounding of large scores, plus
  // rounding the output to a 16-bit dtype (up to 2^-8 relative for bf16).
  const double absolute = std::max(2e-3, 2 * engine::ErrorBound(cpu->precision_used));
  const double relative = dtype == engine::DType::kFloat32 ? 1e-4 : 1.0 / 128;
  const int64_t elements = shape.QueryShape().elements();
  for (int64_t i = 0; i < elements; ++i) {
    const double got = engine::LoadAsFloat(dtype, cpu_out.data(), i);
    const double want = engine::LoadAsFloat(dtype, reference_out.data(), i);
    if (!(std::abs(got - want) <= absolute + relative * std::abs(want))) {
      Fail(absl::StrCat("output element ", i, " is ", got, "; the reference gives ", want,
                        " (shape ", shape.QueryShape().ToString(), ", kv_heads ", shape.kv_heads,
                        ", ", engine::DTypeName(dtype), ", patterns ", spec.PatternsToString(),
                        spec.causal ? ", causal" : "", ", ", engine::CombineModeName(spec.mode),
                        ")"));
    }
  }
}

void FuzzAttendRequest(const v1::AttendRequest& request) {
  const engine::Limits limits = DefaultServerLimits();
  absl::StatusOr<UnaryProblem> problem = ProblemFromRequest(request);
  if (!problem.ok()) {
    CheckRefusal(problem.status(), "ProblemFromRequest");
    if (problem.status().code() != absl::StatusCode::kInvalidArgument) {
      Fail(absl::StrCat("a conversion error must be INVALID_ARGUMENT: ",
                        problem.status().ToString()));
    }
    return;
  }
  const absl::Status valid = engine::ValidateProblem(problem->q, problem->k, problem->v,
                                                     problem->spec, limits, problem->out_dtype);
  if (!valid.ok()) {
    CheckRefusal(valid, "ValidateProblem");
    return;
  }
  const engine::ProblemShape shape{problem->q.shape.batch, problem->q.shape.seq_len,
                                   problem->q.shape.heads, problem->k.shape.heads,
                                   problem->q.shape.head_dim};
  // What passed must also pass the header path's check: the two RPCs accept the same problems.
  const absl::Status shape_valid =
      engine::ValidateShape(shape, problem->q.dtype, problem->spec, limits, problem->out_dtype);
  if (!shape_valid.ok()) {
    Fail(absl::StrCat("ValidateProblem accepted what ValidateShape refuses: ",
                      shape_valid.ToString()));
  }
  if (!SmallEnough(shape, problem->spec)) return;
  RunAsGiven(problem->q, problem->k, problem->v, problem->spec);
  CompareWithReference(shape, problem->q.dtype, problem->spec);
}

// Returns the problem when the header is accepted.
// limits: a stream is checked without max_request_bytes (it never holds itself whole; its chunks
// are bounded instead, in AttendStreamReactor), a warm-up shape with every limit.
std::optional<StreamProblem> CheckHeader(const v1::StreamHeader& header,
                                         const std::string& dtype_field,
                                         const engine::Limits& limits) {
  absl::StatusOr<StreamProblem> problem = ProblemFromHeader(header, dtype_field);
  if (!problem.ok()) {
    CheckRefusal(problem.status(), "ProblemFromHeader");
    // "header.dtype" names the output's "header.output_dtype".
    const std::string output_field =
        dtype_field.substr(0, dtype_field.size() - std::string("dtype").size()) + "output_dtype";
    const std::string message(problem.status().message());
    if (message.find("spec.") == std::string::npos &&
        message.find(dtype_field) == std::string::npos &&
        message.find(output_field) == std::string::npos) {
      Fail(absl::StrCat("a header error names no field: ", problem.status().ToString()));
    }
    return std::nullopt;
  }
  const absl::Status valid = engine::ValidateShape(problem->shape, problem->dtype, problem->spec,
                                                   limits, problem->out_dtype);
  if (!valid.ok()) {
    CheckRefusal(valid, "ValidateShape");
    return std::nullopt;
  }
  return *std::move(problem);
}

void FuzzStreamHeader(const v1::StreamHeader& header) {
  engine::Limits limits = DefaultServerLimits();
  limits.max_request_bytes = 0;  // As AttendStreamReactor::AcceptHeader.
  std::optional<StreamProblem> problem = CheckHeader(header, "header.dtype", limits);
  if (!problem) return;
  // The chunking AttendStreamReactor derives from an accepted header.
  const int64_t seq_len = problem->shape.seq_len;
  for (int64_t min_chunk : {int64_t{1}, int64_t{4096}}) {
    absl::StatusOr<StreamLayout> layout =
        MakeStreamLayout(problem->shape, problem->dtype, problem->out_dtype, problem->spec,
                         min_chunk, DefaultServerLimits().max_request_bytes);
    if (!layout.ok()) {
      if (layout.status().code() != absl::StatusCode::kResourceExhausted ||
          layout.status().message().find("stream chunk of") == std::string::npos) {
        Fail(absl::StrCat("MakeStreamLayout refused oddly: ", layout.status().ToString()));
      }
      continue;
    }
    const int64_t chunk = layout->chunk_tokens;
    if (chunk < std::min(min_chunk, seq_len) || chunk > seq_len) {
      Fail(absl::StrCat("chunk_tokens ", chunk, " outside [min(", min_chunk, ", ", seq_len,
                        "), seq_len]"));
    }
    if (layout->windowed) {
      // A window holds the longest segment whole (it reads only the chunks beside it).
      for (const engine::Pattern& pattern : problem->spec.patterns) {
        if (chunk < std::min(pattern.segment_len, seq_len)) {
          Fail(absl::StrCat("window of ", chunk, " tokens is shorter than segment length ",
                            pattern.segment_len));
        }
      }
    } else if (chunk != seq_len) {
      for (const engine::Pattern& pattern : problem->spec.patterns) {
        if (chunk % pattern.segment_len != 0) {
          Fail(absl::StrCat("chunk_tokens ", chunk, " is not a multiple of segment length ",
                            pattern.segment_len));
        }
      }
    }
  }
  if (!SmallEnough(problem->shape, problem->spec)) return;
  CompareWithReference(problem->shape, problem->dtype, problem->spec);
}

void FuzzWarmUpRequest(const v1::WarmUpRequest& request) {
  // As the WarmUp RPC: every shape is checked before any is built.
  std::vector<StreamProblem> shapes;
  for (int i = 0; i < request.shapes_size(); ++i) {
    std::optional<StreamProblem> problem = CheckHeader(
        request.shapes(i), absl::StrCat("shapes[", i, "].dtype"), DefaultServerLimits());
    if (!problem) return;
    shapes.push_back(*std::move(problem));
  }
  for (const StreamProblem& shape : shapes) {
    if (!SmallEnough(shape.shape, shape.spec)) continue;
    absl::StatusOr<engine::WarmUpResult> result =
        CpuEngine().WarmUp(shape.shape, shape.dtype, shape.dtype, shape.spec);
    if (!result.ok() && result.status().message().empty()) Fail("WarmUp refused without a message");
  }
}

// cut_points: bytes that choose where the message is cut into pieces (as gRPC slices cut it).
void FuzzStreamWire(std::string_view cut_points, std::string_view bytes) {
  std::vector<std::string_view> pieces;
  size_t at = 0;
  for (char cut : cut_points) {
    if (at >= bytes.size()) break;
    const size_t n = std::min<size_t>(static_cast<uint8_t>(cut), bytes.size() - at);
    pieces.push_back(bytes.substr(at, n));  // n may be 0: empty slices must be harmless.
    at += n;
  }
  if (at < bytes.size()) pieces.push_back(bytes.substr(at));
  v1::AttendStreamRequest expected;
  const bool valid = expected.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
  v1::AttendStreamRequest fallback;
  StreamMessage message;
  const absl::Status status = ParseStreamMessage(pieces, &fallback, &message);
  if (status.ok() != valid)
    Fail(absl::StrCat("ParseStreamMessage: ", status.ToString(),
                      " but protobuf says valid=", valid));
  if (!valid) {
    if (status.code() != absl::StatusCode::kInvalidArgument) Fail(status.ToString());
    return;
  }
  auto gather = [](const ByteSpans& spans) {
    std::string out(static_cast<size_t>(spans.size()), '\0');
    if (spans.size() > 0) spans.CopyTo(0, spans.size(), out.data());
    return out;
  };
  if (expected.has_header()) {
    if (message.kind != StreamMessage::Kind::kHeader ||
        message.header.SerializeAsString() != expected.header().SerializeAsString()) {
      Fail("a header reads differently from protobuf");
    }
  } else if (expected.has_block()) {
    const v1::TokenBlock& block = expected.block();
    if (message.kind != StreamMessage::Kind::kBlock ||
        message.block.token_start != block.token_start() ||
        message.block.token_count != block.token_count() ||
        gather(message.block.q) != block.query() || gather(message.block.k) != block.key() ||
        gather(message.block.v) != block.value()) {
      Fail("a block reads differently from protobuf");
    }
  } else if (message.kind != StreamMessage::Kind::kNone) {
    Fail("an empty message reads as a header or a block");
  }
}

}  // namespace
}  // namespace da::server

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Invalid UTF-8 in string fields is logged by protobuf on every such input: noise, not news.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t kind = data[0] % 4;
  const char* bytes = reinterpret_cast<const char*>(data + 1);
  const int length = static_cast<int>(size - 1);
  switch (kind) {
    case 0: {
      da::v1::AttendRequest request;
      if (request.ParseFromArray(bytes, length)) da::server::FuzzAttendRequest(request);
      break;
    }
    case 1: {
      da::v1::StreamHeader header;
      if (header.ParseFromArray(bytes, length)) da::server::FuzzStreamHeader(header);
      break;
    }
    case 2: {
      da::v1::WarmUpRequest request;
      if (request.ParseFromArray(bytes, length)) da::server::FuzzWarmUpRequest(request);
      break;
    }
    case 3: {  // Up to 8 cut points, then the message.
      const size_t cuts = std::min<size_t>(8, static_cast<size_t>(length));
      da::server::FuzzStreamWire(std::string_view(bytes, cuts),
                                 std::string_view(bytes + cuts, length - cuts));
      break;
    }
  }
  return 0;
}
