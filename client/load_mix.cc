#include "client/load_mix.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "client/stream_blocks.h"
#include "client/tensor_io.h"

namespace da::client {
namespace {

struct Shape {
  int64_t batch = 1, seq_len = 0, heads = 0, kv_heads = 0, head_dim = 0;
};

// Everything a kind's request is built from.
struct KindSpec {
  std::string name;
  double weight = 1;
  Shape shape;
  v1::DType dtype = v1::DTYPE_FP32;
  std::vector<std::pair<int64_t, int64_t>> patterns;  // (segment_len, dilation)
  bool causal = false;
  v1::CombineMode mode = v1::COMBINE_MODE_LONGNET;
  // FP32 where the kind stands for the fp32 benchmarks; AUTO where the server may pick.
  v1::Precision precision = v1::PRECISION_FP32;
  bool stream = false;
  int64_t block_tokens = 0;
  v1::DType output_dtype = v1::DTYPE_UNSPECIFIED;  // The request's output_dtype.
};

std::shared_ptr<v1::AttendRequest> BuildRequest(const KindSpec& spec, uint64_t seed) {
  auto request = std::make_shared<v1::AttendRequest>();
  v1::AttentionSpec* out = request->mutable_spec();
  for (const auto& [segment_len, dilation] : spec.patterns) {
    out->add_segment_lengths(segment_len);
    out->add_dilation_rates(dilation);
  }
  out->set_causal(spec.causal);
  out->set_combine_mode(spec.mode);
  out->set_precision(spec.precision);
  request->set_output_dtype(spec.output_dtype);
  const Shape& s = spec.shape;
  *request->mutable_query() =
      RandomTensor(spec.dtype, {s.batch, s.seq_len, s.heads, s.head_dim}, seed, 0);
  *request->mutable_key() =
      RandomTensor(spec.dtype, {s.batch, s.seq_len, s.kv_heads, s.head_dim}, seed, 1);
  *request->mutable_value() =
      RandomTensor(spec.dtype, {s.batch, s.seq_len, s.kv_heads, s.head_dim}, seed, 2);
  return request;
}

RequestKind MakeKind(const KindSpec& spec, uint64_t seed) {
  RequestKind kind;
  kind.name = spec.name;
  kind.weight = spec.weight;
  kind.stream = spec.stream;
  kind.block_tokens = spec.block_tokens;
  kind.request = BuildRequest(spec, seed);
  const Shape& s = spec.shape;
  kind.tokens = s.batch * s.seq_len;
  kind.request_bytes =
      kind.tokens * s.head_dim * (s.heads + 2 * s.kv_heads) * DTypeBytes(spec.dtype) +
      OutputBytes(*kind.request);
  return kind;
}

std::vector<KindSpec> WellFormedSpecs(Mix mix) {
  const std::vector<std::pair<int64_t, int64_t>> small_patterns = {{512, 1}, {1024, 2}, {2048, 4}};
  switch (mix) {
    case Mix::kSmall:
      return {{.name = "small-unary", .shape = {1, 2048, 8, 8, 64}, .patterns = small_patterns}};
    case Mix::kLarge:
      return {{.name = "large-stream",
               .shape = {1, 65536, 8, 8, 64},
               .patterns = {{2048, 1}, {4096, 2}, {8192, 4}},
               .stream = true}};
    case Mix::kMixed:
      break;
  }
  // Weights keep the cheap kinds frequent and the medium stream rare, so that at concurrency 16
  // on two cores the mix stays below about 30 ms of compute per request on average.
  return {
      {.name = "tiny-unary",
       .weight = 4,
       .shape = {2, 384, 4, 4, 32},
       .patterns = {{128, 1}, {256, 2}}},
      {.name = "small-unary",
       .weight = 3,
       .shape = {1, 2048, 8, 8, 64},
       .patterns = small_patterns},
      {.name = "odd-bf16-grouped",
       .weight = 2,
       .shape = {1, 3001, 6, 3, 32},
       .dtype = v1::DTYPE_BF16,
       .patterns = {{256, 1}, {512, 2}, {1024, 4}},
       .mode = v1::COMBINE_MODE_GROUPED,
       .precision = v1::PRECISION_AUTO},
      {.name = "causal-gqa-fp16-to-fp32-stream",
       .weight = 2,
       .shape = {1, 4096, 8, 2, 64},
       .dtype = v1::DTYPE_FP16,
       .patterns = {{1024, 1}, {2048, 2}},
       .causal = true,
       .precision = v1::PRECISION_AUTO,
       .stream = true,
       .block_tokens = 1000,
       .output_dtype = v1::DTYPE_FP32},
      {.name = "medium-stream",
       .weight = 1,
       .shape = {1, 16384, 4, 4, 32},
       .patterns = {{1024, 1}, {2048, 4}},
       .stream = true},
  };
}

// The base of every malformed kind: small, so that a rejection costs the server nothing.
KindSpec MalformedBase(const std::string& name) {
  return {.name = name,
          .shape = {1, 256, 4, 4, 16},
          .patterns = {{64, 1}, {128, 2}},
          .block_tokens = 64};
}

RequestKind Malformed(const std::string& name, const std::string& expected_message, uint64_t seed) {
  RequestKind kind = MakeKind(MalformedBase(name), seed);
  kind.expected_code = grpc::StatusCode::INVALID_ARGUMENT;
  kind.expected_message = expected_message;
  return kind;
}

// A private copy of kind's request, to break.
v1::AttendRequest* Mutable(RequestKind& kind) {
  auto copy = std::make_shared<v1::AttendRequest>(*kind.request);
  kind.request = copy;
  return copy.get();
}

void ConfigureContext(const CallOptions& options, grpc::ClientContext* context) {
  if (options.timeout_ms > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(options.timeout_ms));
  }
  if (!options.request_id.empty()) context->AddMetadata("x-request-id", options.request_id);
}

// Sends kind's request as a stream whose blocks break the protocol as kind.fault says. The
// request is small (a few blocks of a few KiB), so writing everything before reading cannot fill
// the flow-control windows.
grpc::Status SendFaultyStream(const RequestKind& kind, std::shared_ptr<grpc::Channel> channel,
                              const CallOptions& options) {
  StreamPlan plan;
  if (grpc::Status status = MakeStreamPlan(*kind.request, kind.block_tokens, &plan); !status.ok()) {
    return status;
  }
  if (plan.header.request_id().empty()) plan.header.set_request_id(options.request_id);
  std::vector<int64_t> order;
  for (int64_t i = 0; i < plan.block_count; ++i) {
    if (kind.fault == StreamFault::kMissingBlock && i == 1) continue;
    order.push_back(i);
    if (kind.fault == StreamFault::kOverlappingBlock && i == 1) order.push_back(i);
  }

  grpc::ClientContext context;
  ConfigureContext(options, &context);
  auto stream = v1::AttentionService::NewStub(channel)->AttendStream(&context);
  v1::AttendStreamRequest message;
  *message.mutable_header() = plan.header;
  bool open = stream->Write(message);
  for (size_t n = 0; open && n < order.size(); ++n) {
    const int64_t i = order[n];
    *message.mutable_block() = MakeTokenBlock(*kind.request, plan, i * plan.block_tokens);
    if (kind.fault == StreamFault::kWrongBlockSize && i == 1) {
      std::string* query = message.mutable_block()->mutable_query();
      query->resize(query->size() - DTypeBytes(plan.header.dtype()));
    }
    open = stream->Write(message);
  }
  if (open) stream->WritesDone();
  v1::AttendStreamResponse answer;
  while (stream->Read(&answer)) {
  }
  return stream->Finish();
}

}  // namespace

absl::StatusOr<Mix> ParseMix(absl::string_view name) {
  if (name == "small") return Mix::kSmall;
  if (name == "mixed") return Mix::kMixed;
  if (name == "large") return Mix::kLarge;
  return absl::InvalidArgumentError(
      absl::StrCat("--mix: '", name, "' is not small, mixed or large"));
}

std::string MixName(Mix mix) {
  switch (mix) {
    case Mix::kSmall:
      return "small";
    case Mix::kMixed:
      return "mixed";
    case Mix::kLarge:
      return "large";
  }
  return "unknown";
}

std::vector<RequestKind> MalformedKinds(uint64_t seed) {
  std::vector<RequestKind> kinds;
  // Seeds differ from the well-formed kinds' only to keep inputs distinct; any would do.
  seed += 1000;

  RequestKind rank = Malformed("bad-rank-query", "query.shape has rank 3", seed++);
  v1::Tensor* query = Mutable(rank)->mutable_query();
  query->set_shape(2, query->shape(2) * query->shape(3));
  query->mutable_shape()->RemoveLast();
  kinds.push_back(std::move(rank));

  RequestKind bytes = Malformed("short-query-data", "query.data has", seed++);
  std::string* data = Mutable(bytes)->mutable_query()->mutable_data();
  data->resize(data->size() - 4);
  kinds.push_back(std::move(bytes));

  RequestKind zero = Malformed("zero-segment", "spec.segment_lengths[0] is 0", seed++);
  Mutable(zero)->mutable_spec()->set_segment_lengths(0, 0);
  kinds.push_back(std::move(zero));

  // Unbounded, this pattern made the server divide by zero (LONGNET head offsets) and stop.
  RequestKind huge =
      Malformed("huge-segment", "spec.segment_lengths[0] is 9223372036854775807", seed++);
  v1::AttentionSpec* huge_spec = Mutable(huge)->mutable_spec();
  huge_spec->set_segment_lengths(0, std::numeric_limits<int64_t>::max());
  huge_spec->set_dilation_rates(0, std::numeric_limits<int64_t>::max());
  kinds.push_back(std::move(huge));

  RequestKind dilation =
      Malformed("dilation-over-segment", "spec.dilation_rates[1] is 129", seed++);
  Mutable(dilation)->mutable_spec()->set_dilation_rates(1, 129);
  kinds.push_back(std::move(dilation));

  // proto3 enums are open: the unknown value 9 reaches the server as sent.
  RequestKind dtype = Malformed("unknown-dtype", "query.dtype has unknown value 9", seed++);
  v1::AttendRequest* typed = Mutable(dtype);
  for (v1::Tensor* t : {typed->mutable_query(), typed->mutable_key(), typed->mutable_value()}) {
    t->set_dtype(static_cast<v1::DType>(9));
  }
  kinds.push_back(std::move(dtype));

  RequestKind gqa = Malformed("kv-heads-not-dividing", "must divide query heads 4", seed++);
  v1::AttendRequest* grouped = Mutable(gqa);
  const int64_t seq_len = grouped->query().shape(1);
  const int64_t head_dim = grouped->query().shape(3);
  *grouped->mutable_key() = RandomTensor(v1::DTYPE_FP32, {1, seq_len, 3, head_dim}, seed, 1);
  *grouped->mutable_value() = RandomTensor(v1::DTYPE_FP32, {1, seq_len, 3, head_dim}, seed++, 2);
  kinds.push_back(std::move(gqa));

  const std::tuple<const char*, StreamFault, const char*> faults[] = {
      {"stream-missing-block", StreamFault::kMissingBlock, "missing"},
      {"stream-overlapping-block", StreamFault::kOverlappingBlock, "overlap"},
      {"stream-wrong-block-size", StreamFault::kWrongBlockSize, "query has"}};
  for (const auto& [name, fault, message] : faults) {
    RequestKind kind = Malformed(name, message, seed++);
    kind.stream = true;
    kind.fault = fault;
    kinds.push_back(std::move(kind));
  }
  return kinds;
}

std::vector<RequestKind> BuildMix(Mix mix, bool with_malformed, uint64_t seed) {
  std::vector<RequestKind> kinds;
  uint64_t kind_seed = seed;
  for (const KindSpec& spec : WellFormedSpecs(mix)) kinds.push_back(MakeKind(spec, kind_seed++));
  if (with_malformed) {
    for (RequestKind& kind : MalformedKinds(seed)) kinds.push_back(std::move(kind));
  }
  return kinds;
}

KindPicker::KindPicker(const std::vector<RequestKind>& kinds, double malformed_fraction) {
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (kinds[i].malformed()) {
      malformed_.push_back(i);
      continue;
    }
    well_formed_.push_back(i);
    well_formed_sums_.push_back((well_formed_sums_.empty() ? 0 : well_formed_sums_.back()) +
                                kinds[i].weight);
  }
  malformed_fraction_ = malformed_.empty() ? 0 : well_formed_.empty() ? 1 : malformed_fraction;
}

size_t KindPicker::Pick(std::mt19937_64& rng) const {
  std::uniform_real_distribution<double> uniform(0, 1);
  if (uniform(rng) < malformed_fraction_) {
    return malformed_[malformed_turn_.fetch_add(1, std::memory_order_relaxed) % malformed_.size()];
  }
  const double draw = uniform(rng) * well_formed_sums_.back();
  const size_t at = std::upper_bound(well_formed_sums_.begin(), well_formed_sums_.end(), draw) -
                    well_formed_sums_.begin();
  return well_formed_[std::min(at, well_formed_.size() - 1)];
}

size_t KindPicker::First(int worker) const {
  if (well_formed_.empty()) return malformed_[static_cast<size_t>(worker) % malformed_.size()];
  return well_formed_[static_cast<size_t>(worker) % well_formed_.size()];
}

grpc::Status SendKind(const RequestKind& kind, AttentionClient& client, const CallOptions& options,
                      int stream_override, v1::AttendResponse* response) {
  if (kind.fault != StreamFault::kNone) return SendFaultyStream(kind, client.channel(), options);
  // A malformed unary request stays unary: streaming it would let the client library refuse it
  // before it reaches the server.
  const bool stream =
      (kind.malformed() || stream_override < 0) ? kind.stream : stream_override == 1;
  if (!stream) return client.Attend(*kind.request, response, options);
  return client.AttendStream(*kind.request, response, options, {.block_tokens = kind.block_tokens});
}

grpc::Status CheckResponse(const RequestKind& kind, const v1::AttendResponse& response) {
  const v1::Tensor& query = kind.request->query();
  const v1::Tensor& output = response.output();
  const std::string expected_shape = ShapeString(query);
  const v1::DType dtype = OutputDType(*kind.request);
  if (output.dtype() != dtype || ShapeString(output) != expected_shape) {
    return grpc::Status(
        grpc::StatusCode::INTERNAL,
        absl::StrCat("output is ", ShapeString(output), " ", DTypeName(output.dtype()),
                     "; expected ", expected_shape, " ", DTypeName(dtype)));
  }
  const size_t expected_bytes = query.data().size() / DTypeBytes(query.dtype()) * DTypeBytes(dtype);
  if (output.data().size() != expected_bytes) {
    return grpc::Status(
        grpc::StatusCode::INTERNAL,
        absl::StrCat("output has ", output.data().size(), " bytes; expected ", expected_bytes));
  }
  return grpc::Status::OK;
}

}  // namespace da::client
