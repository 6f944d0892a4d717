#include "client/stream_blocks.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/tensor_io.h"

namespace da::client {
namespace {

grpc::Status InvalidArgument(std::string message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::move(message));
}

grpc::Status Internal(std::string message) {
  return grpc::Status(grpc::StatusCode::INTERNAL, std::move(message));
}

grpc::Status CheckTensor(const v1::Tensor& tensor, const char* name) {
  if (tensor.shape_size() != 4) {
    return InvalidArgument(absl::StrCat(name,
                                        ": expected rank 4 (batch, seq_len, heads, head_dim), ",
                                        "got shape ", ShapeString(tensor)));
  }
  for (int64_t dim : tensor.shape()) {
    if (dim < 1) {
      return InvalidArgument(
          absl::StrCat(name, ": every dimension must be >= 1, got shape ", ShapeString(tensor)));
    }
  }
  if (DTypeBytes(tensor.dtype()) == 0) {
    return InvalidArgument(absl::StrCat(
        name, ": dtype must be fp32, fp16 or bf16, got ",
        v1::DType_IsValid(tensor.dtype()) ? v1::DType_Name(tensor.dtype()) : "an unknown dtype",
        " (", static_cast<int>(tensor.dtype()), ")"));
  }
  // A product that wraps (e.g. to 0, matching empty data) would pass and divide by zero later.
  int64_t expected_bytes = DTypeBytes(tensor.dtype());
  for (int64_t dim : tensor.shape()) {
    if (__builtin_mul_overflow(expected_bytes, dim, &expected_bytes)) {
      return InvalidArgument(absl::StrCat(name, ": shape ", ShapeString(tensor), " of ",
                                          DTypeName(tensor.dtype()),
                                          " is too large (its byte count overflows 64 bits)"));
    }
  }
  if (static_cast<int64_t>(tensor.data().size()) != expected_bytes) {
    return InvalidArgument(absl::StrCat(name, ": shape ", ShapeString(tensor), " of ",
                                        DTypeName(tensor.dtype()), " needs ", expected_bytes,
                                        " bytes, data has ", tensor.data().size()));
  }
  return grpc::Status::OK;
}

// Appends tokens [token_start, token_start + token_count) of every batch element of tensor.
void GatherTokens(const v1::Tensor& tensor, int64_t token_start, int64_t token_count,
                  std::string* out) {
  const int64_t batch = tensor.shape(0);
  const int64_t seq_len = tensor.shape(1);
  const int64_t token_bytes = tensor.shape(2) * tensor.shape(3) * DTypeBytes(tensor.dtype());
  out->reserve(out->size() + batch * token_count * token_bytes);
  for (int64_t b = 0; b < batch; ++b) {
    out->append(tensor.data(), (b * seq_len + token_start) * token_bytes,
                token_count * token_bytes);
  }
}

// The tensors of request can be streamed: see MakeStreamPlan.
grpc::Status CheckStreamable(const v1::AttendRequest& request) {
  const v1::Tensor& q = request.query();
  const v1::Tensor& k = request.key();
  const v1::Tensor& v = request.value();
  for (auto [tensor, name] : {std::pair{&q, "query"}, {&k, "key"}, {&v, "value"}}) {
    if (grpc::Status status = CheckTensor(*tensor, name); !status.ok()) return status;
  }
  for (auto [tensor, name] : {std::pair{&k, "key"}, {&v, "value"}}) {
    if (tensor->dtype() != q.dtype()) {
      return InvalidArgument(absl::StrCat(name, " dtype ", DTypeName(tensor->dtype()),
                                          " differs from query dtype ", DTypeName(q.dtype()),
                                          "; a stream carries one dtype"));
    }
    if (tensor->shape(0) != q.shape(0) || tensor->shape(1) != q.shape(1) ||
        tensor->shape(3) != q.shape(3)) {
      return InvalidArgument(absl::StrCat(name, " shape ", ShapeString(*tensor),
                                          " must match query shape ", ShapeString(q),
                                          " in batch, seq_len and head_dim"));
    }
  }
  if (v.shape(2) != k.shape(2)) {
    return InvalidArgument(
        absl::StrCat("value shape ", ShapeString(v), " differs from key shape ", ShapeString(k)));
  }
  if (request.output_dtype() != v1::DTYPE_UNSPECIFIED && DTypeBytes(request.output_dtype()) == 0) {
    return InvalidArgument(absl::StrCat(
        "output_dtype must be fp32, fp16 or bf16 (or unspecified: the query's), got ",
        v1::DType_IsValid(request.output_dtype()) ? v1::DType_Name(request.output_dtype())
                                                  : "an unknown dtype",
        " (", static_cast<int>(request.output_dtype()), ")"));
  }
  return grpc::Status::OK;
}

}  // namespace

int64_t ChunkTokens(const v1::AttentionSpec& spec, int64_t seq_len) {
  int64_t chunk = 1;
  for (int64_t w : spec.segment_lengths()) {
    if (w < 1 || w >= seq_len) return seq_len;  // The server refuses w < 1.
    const int64_t factor = chunk / std::gcd(chunk, w);
    if (factor >= (seq_len + w - 1) / w) return seq_len;  // factor * w >= seq_len; no overflow.
    chunk = factor * w;
  }
  return std::max<int64_t>(chunk, 1);
}

std::vector<TokenRange> CutParts(const v1::AttentionSpec& spec, int64_t seq_len, int parts) {
  if (seq_len < 1) return {{0, seq_len}};  // MakeStreamPlan refuses it.
  const int64_t chunk = ChunkTokens(spec, seq_len);
  const int64_t chunks = (seq_len + chunk - 1) / chunk;
  const int64_t count = std::clamp<int64_t>(parts, 1, std::max<int64_t>(chunks, 1));
  std::vector<TokenRange> ranges;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t first = i * chunks / count * chunk;
    const int64_t end = std::min(seq_len, (i + 1) * chunks / count * chunk);
    ranges.push_back({first, end - first});
  }
  return ranges;
}

int DefaultParallelStreams(int64_t total_bytes) {
  return static_cast<int>(
      std::clamp<int64_t>(total_bytes / kParallelStreamBytes, 1, kMaxParallelStreams));
}

v1::DType OutputDType(const v1::AttendRequest& request) {
  return request.output_dtype() != v1::DTYPE_UNSPECIFIED ? request.output_dtype()
                                                         : request.query().dtype();
}

int64_t OutputBytes(const v1::AttendRequest& request) {
  const int64_t q_size = DTypeBytes(request.query().dtype());
  if (q_size == 0) return 0;
  return static_cast<int64_t>(request.query().data().size()) / q_size *
         DTypeBytes(OutputDType(request));
}

int64_t RequestAndAnswerBytes(const v1::AttendRequest& request) {
  return static_cast<int64_t>(request.query().data().size() + request.key().data().size() +
                              request.value().data().size()) +
         OutputBytes(request);
}

bool NeedsStream(const v1::AttendRequest& request, int64_t message_limit) {
  const int64_t limit = message_limit > 0 ? message_limit : kDefaultMessageBytes;
  return static_cast<double>(RequestAndAnswerBytes(request)) > 0.9 * static_cast<double>(limit);
}

int64_t MessageLimit(int64_t server_limit, int64_t client_limit) {
  const int64_t limit = server_limit > 0 ? server_limit : kDefaultMessageBytes;
  return client_limit > 0 ? std::min(limit, client_limit) : limit;
}

int64_t BlockTokensFor(const v1::AttendRequest& request, int64_t message_limit) {
  const v1::Tensor& q = request.query();
  const v1::Tensor& k = request.key();
  if (q.shape_size() != 4 || k.shape_size() != 4) return 0;
  const int64_t limit = message_limit > 0 ? message_limit : kDefaultMessageBytes;
  const int64_t token_bytes = q.shape(0) * (q.shape(2) + 2 * k.shape(2)) * q.shape(3) *
                              std::max<int64_t>(1, DTypeBytes(q.dtype()));
  if (token_bytes <= 0) return 0;
  return std::max<int64_t>(1, std::min(kDefaultBlockBytes, limit / 2) / token_bytes);
}

v1::ExecutionInfo MergePartInfos(const std::vector<v1::ExecutionInfo>& parts) {
  v1::ExecutionInfo merged;
  if (parts.empty()) return merged;
  merged = parts.front();
  merged.clear_devices();
  std::vector<std::string> ids;
  for (const v1::ExecutionInfo& part : parts) {
    ids.push_back(part.request_id());
    for (const std::string& device : part.devices()) {
      if (std::find(merged.devices().begin(), merged.devices().end(), device) ==
          merged.devices().end()) {
        merged.add_devices(device);
      }
    }
    if (&part == &parts.front()) continue;
    merged.set_queue_time_us(std::max(merged.queue_time_us(), part.queue_time_us()));
    merged.set_total_time_us(std::max(merged.total_time_us(), part.total_time_us()));
    merged.set_compute_time_us(merged.compute_time_us() + part.compute_time_us());
    merged.set_plan_build_time_us(merged.plan_build_time_us() + part.plan_build_time_us());
    merged.set_plan_cache_hit(merged.plan_cache_hit() && part.plan_cache_hit());
    merged.set_stream_chunk_tokens(
        std::max(merged.stream_chunk_tokens(), part.stream_chunk_tokens()));
    merged.set_stream_chunks(merged.stream_chunks() + part.stream_chunks());
    merged.set_stream_buffer_bytes(merged.stream_buffer_bytes() + part.stream_buffer_bytes());
    merged.mutable_fp8_scales()->MergeFrom(part.fp8_scales());  // Every part's, in order.
  }
  merged.set_request_id(absl::StrJoin(ids, ","));
  return merged;
}

grpc::Status MakeStreamPlan(const v1::AttendRequest& request, int64_t block_tokens,
                            StreamPlan* plan) {
  if (grpc::Status status = CheckStreamable(request); !status.ok()) return status;
  return MakePartPlan(request, block_tokens, {0, request.query().shape(1)}, plan);
}

grpc::Status MakePartPlan(const v1::AttendRequest& request, int64_t block_tokens,
                          const TokenRange& part, StreamPlan* plan) {
  if (grpc::Status status = CheckStreamable(request); !status.ok()) return status;
  const v1::Tensor& q = request.query();
  const v1::Tensor& k = request.key();
  if (block_tokens < 0) {
    return InvalidArgument(absl::StrCat("block_tokens must be >= 0, got ", block_tokens));
  }
  if (part.first < 0 || part.count < 1 || part.first + part.count > q.shape(1)) {
    return InvalidArgument(absl::StrCat("part [", part.first, ", ", part.first + part.count,
                                        ") is not a non-empty range within the ", q.shape(1),
                                        " tokens"));
  }

  v1::StreamHeader& header = plan->header;
  header.Clear();
  header.set_request_id(request.request_id());
  *header.mutable_spec() = request.spec();
  header.set_dtype(q.dtype());
  header.set_output_dtype(request.output_dtype());
  header.set_batch(q.shape(0));
  header.set_seq_len(part.count);
  header.set_heads(q.shape(2));
  header.set_kv_heads(k.shape(2));
  header.set_head_dim(q.shape(3));
  header.set_priority(request.priority());

  if (block_tokens == 0) {
    const int64_t token_bytes = header.batch() * (header.heads() + 2 * header.kv_heads()) *
                                header.head_dim() * DTypeBytes(q.dtype());
    block_tokens = std::max<int64_t>(1, kDefaultBlockBytes / token_bytes);
  }
  plan->block_tokens = std::min(block_tokens, header.seq_len());
  plan->block_count = (header.seq_len() + plan->block_tokens - 1) / plan->block_tokens;
  plan->first_token = part.first;
  return grpc::Status::OK;
}

v1::TokenBlock MakeTokenBlock(const v1::AttendRequest& request, const StreamPlan& plan,
                              int64_t token_start) {
  v1::TokenBlock block;
  const int64_t token_count = std::min(plan.block_tokens, plan.header.seq_len() - token_start);
  block.set_token_start(token_start);
  block.set_token_count(token_count);
  const int64_t first = plan.first_token + token_start;
  GatherTokens(request.query(), first, token_count, block.mutable_query());
  GatherTokens(request.key(), first, token_count, block.mutable_key());
  GatherTokens(request.value(), first, token_count, block.mutable_value());
  return block;
}

OutputAssembler::OutputAssembler(const v1::StreamHeader& expected) : expected_(expected) {}

OutputAssembler::OutputAssembler(const v1::StreamHeader& expected, v1::Tensor* whole_output,
                                 int64_t whole_seq_len, int64_t first_token)
    : expected_(expected),
      target_(whole_output),
      target_seq_len_(whole_seq_len),
      target_first_token_(first_token) {}

grpc::Status OutputAssembler::Add(const v1::AttendStreamResponse& message) {
  switch (message.kind_case()) {
    case v1::AttendStreamResponse::kHeader:
      return AddHeader(message.header());
    case v1::AttendStreamResponse::kBlock:
      return AddBlock(OutputBlockView::Over(message.block()));
    case v1::AttendStreamResponse::kTrailer:
      if (!have_header_) return Internal("stream trailer arrived before the response header");
      if (have_trailer_) return Internal("second stream trailer");
      have_trailer_ = true;
      MergeTrailerInfo(message.trailer().info());
      return grpc::Status::OK;
    default:
      return Internal("empty stream response message (no header, block or trailer)");
  }
}

void OutputAssembler::MergeTrailerInfo(const v1::ExecutionInfo& info) {
  // The header's request id stands when the trailer leaves it out.
  std::string request_id = response_.info().request_id();
  *response_.mutable_info() = info;
  if (info.request_id().empty()) response_.mutable_info()->set_request_id(std::move(request_id));
}

#if defined(__GLIBCXX__)
namespace {
// libstdc++'s std::string::_M_set_length (private): sets the length and the terminating NUL and
// writes nothing else. An explicit instantiation may name a private member ([temp.spec.general]);
// this one hands its address out through a friend function.
using SetLength = void (std::string::*)(std::string::size_type);
SetLength StringSetLength();
template <SetLength kMember>
struct StringSetLengthAccess {
  friend SetLength StringSetLength() { return kMember; }
};
template struct StringSetLengthAccess<&std::string::_M_set_length>;
}  // namespace
#endif

void ResizeUninitialized(std::string* data, size_t bytes) {
  if (bytes <= data->size()) {
    data->resize(bytes);
    return;
  }
  data->reserve(bytes);
#if defined(__GLIBCXX__)
  (data->*StringSetLength())(bytes);
#else
  data->resize(bytes);
#endif
}

void ReserveOutput(std::string* data, size_t bytes) {
  data->reserve(bytes);
#if defined(__linux__)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < 2 * kHugePage) return;
  // The whole huge pages within the reserved bytes; the rest stays in small pages.
  const uintptr_t start = reinterpret_cast<uintptr_t>(data->data());
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
  // Advice only: a kernel without THP refuses it, and the output is written in small pages.
  if (end > first) madvise(reinterpret_cast<void*>(first), end - first, MADV_HUGEPAGE);
#endif
}

grpc::Status OutputAssembler::AddHeader(const v1::StreamResponseHeader& header) {
  if (have_header_) return Internal("second stream response header");
  const int64_t dtype_bytes = DTypeBytes(header.dtype());
  if (dtype_bytes == 0) {
    return Internal(absl::StrCat("stream response header has no valid dtype (",
                                 static_cast<int>(header.dtype()), ")"));
  }
  const std::array<int64_t, 4> expected_shape = {expected_.batch(), expected_.seq_len(),
                                                 expected_.heads(), expected_.head_dim()};
  v1::Tensor answered;
  answered.set_dtype(header.dtype());
  *answered.mutable_shape() = header.shape();
  if (header.shape_size() != 4 ||
      !std::equal(expected_shape.begin(), expected_shape.end(), header.shape().begin())) {
    return Internal(absl::StrCat("stream response header shape ", ShapeString(answered),
                                 " differs from the request's [", expected_shape[0], ", ",
                                 expected_shape[1], ", ", expected_shape[2], ", ",
                                 expected_shape[3], "]"));
  }
  const v1::DType wanted = expected_.output_dtype() != v1::DTYPE_UNSPECIFIED
                               ? expected_.output_dtype()
                               : expected_.dtype();
  if (header.dtype() != wanted) {
    return Internal(absl::StrCat("stream response header dtype ", DTypeName(header.dtype()),
                                 " differs from the ", DTypeName(wanted), " asked for"));
  }
  token_bytes_ = expected_.heads() * expected_.head_dim() * dtype_bytes;
  if (target_ != nullptr) {
    const int64_t whole_bytes = expected_.batch() * target_seq_len_ * token_bytes_;
    if (static_cast<int64_t>(target_->data().size()) != whole_bytes) {
      return Internal(absl::StrCat("the whole output holds ", target_->data().size(),
                                   " bytes; its shape needs ", whole_bytes));
    }
  } else {
    *response_.mutable_output() = std::move(answered);
    std::string& data = *response_.mutable_output()->mutable_data();
    const size_t bytes =
        static_cast<size_t>(expected_.batch() * expected_.seq_len() * token_bytes_);
    // Never zeroed first (zeroing 512 MiB took 0.2-1 s here, in the thread that reads answers):
    // one batch element's blocks arrive in token order and are appended (AddBlock); several
    // batch elements' rows are written where they lie into an output sized without being
    // written, every byte of which a complete stream writes (Finish checks it). Small pages:
    // huge ones (ReserveOutput) cost this thread more than they saved (measured).
    if (expected_.batch() == 1) {
      data.reserve(bytes);
    } else {
      ResizeUninitialized(&data, bytes);
    }
  }
  have_header_ = true;
  if (header.request_id().size() > 0) response_.mutable_info()->set_request_id(header.request_id());
  return grpc::Status::OK;
}

grpc::Status OutputAssembler::AddBlock(const OutputBlockView& block) {
  const int64_t index = block_index_++;
  if (!have_header_) {
    return Internal(absl::StrCat("output block ", index, " arrived before the response header"));
  }
  if (have_trailer_) {
    return Internal(absl::StrCat("output block ", index, " arrived after the stream trailer"));
  }
  const int64_t seq_len = expected_.seq_len();
  if (block.token_start() != next_token_) {
    return Internal(absl::StrCat("output block ", index, " starts at token ", block.token_start(),
                                 ", expected ", next_token_, " (blocks must be contiguous)"));
  }
  if (block.token_count() < 1 || block.token_count() > seq_len - next_token_) {
    return Internal(absl::StrCat("output block ", index, " has token_count ", block.token_count(),
                                 " at token ", next_token_, ", outside [1, ", seq_len - next_token_,
                                 "]"));
  }
  const int64_t batch = expected_.batch();
  const int64_t row_bytes = block.token_count() * token_bytes_;
  if (block.output_bytes() != batch * row_bytes) {
    return Internal(absl::StrCat("output block ", index, " has ", block.output_bytes(),
                                 " bytes, expected ", batch * row_bytes, " for ",
                                 block.token_count(), " tokens"));
  }
  if (target_ == nullptr && batch == 1) {
    block.AppendTo(response_.mutable_output()->mutable_data());
    next_token_ += block.token_count();
    return grpc::Status::OK;
  }
  // Rows of batch element b start at b * out_seq_len + out_first + next_token_.
  char* out = target_ != nullptr ? target_->mutable_data()->data()
                                 : response_.mutable_output()->mutable_data()->data();
  const int64_t out_seq_len = target_ != nullptr ? target_seq_len_ : seq_len;
  const int64_t out_first = target_ != nullptr ? target_first_token_ : 0;
  for (int64_t b = 0; b < batch; ++b) {
    block.CopyTo(b * row_bytes, row_bytes,
                 out + (b * out_seq_len + out_first + next_token_) * token_bytes_);
  }
  next_token_ += block.token_count();
  return grpc::Status::OK;
}

grpc::Status OutputAssembler::Finish(v1::AttendResponse* response) {
  if (!have_header_) return Internal("stream ended without a response header");
  if (next_token_ != expected_.seq_len()) {
    return Internal(absl::StrCat("stream ended after ", block_index_, " output blocks covering ",
                                 next_token_, " of ", expected_.seq_len(), " tokens"));
  }
  if (!have_trailer_) return Internal("stream ended without a trailer");
  *response = std::move(response_);
  response_.Clear();
  return grpc::Status::OK;
}

}  // namespace da::client
