#include "server/attend_stream_reactor.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace da::server {
namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;

// Uninitialised on purpose: every byte is overwritten by the blocks (inputs) or the engine.
// Large buffers are 2 MiB aligned and advised onto transparent huge pages: first touch of 4 KiB
// pages costs about 13 us each here (MACHINE-NOTES), seconds per GiB. Returns null when the
// memory is not there, which becomes RESOURCE_EXHAUSTED.
AttendStreamReactor::HostBuffer Allocate(int64_t bytes) {
  const size_t size = static_cast<size_t>(bytes);
  if (size < kHugePageBytes)
    return AttendStreamReactor::HostBuffer(static_cast<char*>(std::malloc(size)));
  const size_t rounded = (size + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  AttendStreamReactor::HostBuffer buffer(
      static_cast<char*>(std::aligned_alloc(kHugePageBytes, rounded)));
  if (buffer) madvise(buffer.get(), rounded, MADV_HUGEPAGE);  // Advice only: failure is harmless.
  return buffer;
}

// Copies count token rows of each batch element between a block ([batch, count, ...]) and a
// whole tensor ([batch, seq_len, ...]).
void CopyBlockIntoTensor(const std::string& block, int64_t batch, int64_t seq_len,
                         int64_t token_start, int64_t token_count, int64_t row_bytes,
                         char* tensor) {
  const int64_t block_batch_bytes = token_count * row_bytes;
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(tensor + (b * seq_len + token_start) * row_bytes,
                block.data() + b * block_batch_bytes, static_cast<size_t>(block_batch_bytes));
  }
}

}  // namespace

AttendStreamReactor::AttendStreamReactor(engine::Engine* engine, Metrics* metrics,
                                         int64_t max_message_bytes,
                                         grpc::CallbackServerContext* context)
    : engine_(engine),
      max_message_bytes_(max_message_bytes),
      context_(context),
      record_(metrics, "AttendStream", *context) {
  StartRead(&request_);
}

int64_t AttendStreamReactor::QueryRowBytes() const {
  return problem_.shape.heads * problem_.shape.head_dim * engine::DTypeSize(problem_.dtype);
}

int64_t AttendStreamReactor::KeyRowBytes() const {
  return problem_.shape.kv_heads * problem_.shape.head_dim * engine::DTypeSize(problem_.dtype);
}

void AttendStreamReactor::OnReadDone(bool ok) {
  if (!ok) {  // The client half-closed, or the call is gone.
    if (context_->IsCancelled()) {
      FinishWith(absl::CancelledError("the stream was cancelled before its input was complete"));
      return;
    }
    absl::Status complete = CheckComplete();
    if (!complete.ok()) {
      FinishWith(complete);
      return;
    }
    StartCompute();
    return;
  }
  absl::Status status;
  if (request_.has_header()) {
    status = AcceptHeader(request_.header());
  } else if (request_.has_block()) {
    status = AcceptBlock(request_.block());
  } else {
    status = absl::InvalidArgumentError(absl::StrFormat(
        "stream message %d carries neither a header nor a block", blocks_received_ + 1));
  }
  if (!status.ok()) {
    FinishWith(status);
    return;
  }
  StartRead(&request_);
}

absl::Status AttendStreamReactor::AcceptHeader(const v1::StreamHeader& header) {
  if (have_header_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header: a second header arrived after %d blocks; a stream has exactly one header, first",
        blocks_received_));
  }
  DA_ASSIGN_OR_RETURN(problem_, ProblemFromHeader(header));
  record_.SetRequestIdField(header.request_id());
  record_.SetProblem(problem_.shape, problem_.dtype, problem_.spec);
  // Shapes, spec and the configured limits (max_request_bytes counts q, k, v and the output)
  // are all checked before a single byte is allocated.
  DA_RETURN_IF_ERROR(
      engine::ValidateShape(problem_.shape, problem_.dtype, problem_.spec, engine_->limits()));

  const int64_t q_bytes = problem_.shape.batch * problem_.shape.seq_len * QueryRowBytes();
  const int64_t kv_bytes = problem_.shape.batch * problem_.shape.seq_len * KeyRowBytes();
  q_ = Allocate(q_bytes);
  k_ = Allocate(kv_bytes);
  v_ = Allocate(kv_bytes);
  out_ = Allocate(q_bytes);
  if (!q_ || !k_ || !v_ || !out_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %d bytes for the request (q, k, v and output)", 2 * (q_bytes + kv_bytes)));
  }
  have_header_ = true;
  return absl::OkStatus();
}

absl::Status AttendStreamReactor::AcceptBlock(const v1::TokenBlock& block) {
  const int64_t index = blocks_received_;
  const int64_t start = block.token_start();
  const int64_t count = block.token_count();
  // Computed without signed overflow: the numbers come straight from the client.
  const int64_t end =
      static_cast<int64_t>(static_cast<uint64_t>(start) + static_cast<uint64_t>(count));
  const std::string where = absl::StrFormat("block %d (tokens [%d, %d))", index, start, end);
  if (!have_header_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s arrived before the header; the first stream message must be a header", where));
  }
  const int64_t seq_len = problem_.shape.seq_len;
  if (count < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: token_count is %d; must be >= 1", where, count));
  }
  if (start < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: token_start is %d; must be >= 0", where, start));
  }
  if (start < next_token_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s overlaps tokens already received: expected token_start %d (blocks must be contiguous "
        "and in order)",
        where, next_token_));
  }
  if (start > next_token_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is out of order: tokens [%d, %d) are missing before it (blocks must be contiguous and "
        "in order)",
        where, next_token_, start));
  }
  if (count > seq_len - start) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s extends past seq_len %d", where, seq_len));
  }
  const int64_t batch = problem_.shape.batch;
  const int64_t q_bytes = batch * count * QueryRowBytes();
  const int64_t kv_bytes = batch * count * KeyRowBytes();
  const std::pair<const char*, std::pair<int64_t, int64_t>> sizes[] = {
      {"query", {static_cast<int64_t>(block.query().size()), q_bytes}},
      {"key", {static_cast<int64_t>(block.key().size()), kv_bytes}},
      {"value", {static_cast<int64_t>(block.value().size()), kv_bytes}}};
  for (const auto& [field, size] : sizes) {
    if (size.first != size.second) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: %s has %d bytes; expected %d (batch x token_count x heads x head_dim x dtype size)",
          where, field, size.first, size.second));
    }
  }
  CopyBlockIntoTensor(block.query(), batch, seq_len, start, count, QueryRowBytes(), q_.get());
  CopyBlockIntoTensor(block.key(), batch, seq_len, start, count, KeyRowBytes(), k_.get());
  CopyBlockIntoTensor(block.value(), batch, seq_len, start, count, KeyRowBytes(), v_.get());
  record_.AddBytes(q_bytes + 2 * kv_bytes, 0);
  next_token_ += count;
  ++blocks_received_;
  return absl::OkStatus();
}

absl::Status AttendStreamReactor::CheckComplete() const {
  if (!have_header_) {
    return absl::InvalidArgumentError("the stream ended before its header");
  }
  if (next_token_ != problem_.shape.seq_len) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the stream ended after %d blocks with tokens [%d, %d) missing (seq_len %d)",
        blocks_received_, next_token_, problem_.shape.seq_len, problem_.shape.seq_len));
  }
  return absl::OkStatus();
}

void AttendStreamReactor::StartCompute() {
  const engine::Shape4 q_shape = problem_.shape.QueryShape();
  const engine::Shape4 kv_shape = problem_.shape.KeyShape();
  const int64_t q_bytes = q_shape.elements() * engine::DTypeSize(problem_.dtype);
  const int64_t kv_bytes = kv_shape.elements() * engine::DTypeSize(problem_.dtype);
  engine::RunRequest run;
  run.q = {problem_.dtype, q_shape, q_.get(), q_bytes};
  run.k = {problem_.dtype, kv_shape, k_.get(), kv_bytes};
  run.v = {problem_.dtype, kv_shape, v_.get(), kv_bytes};
  run.spec = problem_.spec;
  run.out = {problem_.dtype, q_shape, out_.get(), q_bytes};
  run.request_id = record_.id();
  run.cancelled = &cancelled_;
  engine_->Submit(
      run, [this](absl::StatusOr<engine::ExecutionInfo> info) { OnComputed(std::move(info)); });
}

void AttendStreamReactor::OnComputed(absl::StatusOr<engine::ExecutionInfo> info) {
  q_.reset();
  k_.reset();
  v_.reset();
  if (!info.ok()) {
    FinishWith(info.status());
    return;
  }
  computed_ = true;
  info_ = *std::move(info);
  const int64_t batch_row_bytes = problem_.shape.batch * QueryRowBytes();
  output_block_tokens_ = std::max<int64_t>(1, (max_message_bytes_ / 2) / batch_row_bytes);
  write_stage_ = WriteStage::kHeader;
  WriteNext();
}

void AttendStreamReactor::WriteNext() {
  response_.Clear();
  switch (write_stage_) {
    case WriteStage::kHeader: {
      v1::StreamResponseHeader* header = response_.mutable_header();
      header->set_request_id(record_.id());
      header->set_dtype(DTypeToProto(problem_.dtype));
      const engine::Shape4 shape = problem_.shape.QueryShape();
      for (int64_t dim : {shape.batch, shape.seq_len, shape.heads, shape.head_dim}) {
        header->add_shape(dim);
      }
      write_stage_ = WriteStage::kBlocks;
      break;
    }
    case WriteStage::kBlocks:
      FillOutputBlock(response_.mutable_block());
      if (next_output_token_ == problem_.shape.seq_len) write_stage_ = WriteStage::kTrailer;
      break;
    case WriteStage::kTrailer:
      ExecutionInfoToProto(info_, record_.id(), record_.ElapsedUs(),
                           response_.mutable_trailer()->mutable_info());
      write_stage_ = WriteStage::kFinished;
      break;
    case WriteStage::kFinished:
      return;
  }
  StartWrite(&response_);
}

void AttendStreamReactor::FillOutputBlock(v1::OutputBlock* block) {
  const int64_t start = next_output_token_;
  const int64_t count = std::min(output_block_tokens_, problem_.shape.seq_len - start);
  const int64_t row_bytes = QueryRowBytes();
  const int64_t batch = problem_.shape.batch;
  block->set_token_start(start);
  block->set_token_count(count);
  std::string* bytes = block->mutable_output();
  bytes->resize(static_cast<size_t>(batch * count * row_bytes));
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(bytes->data() + b * count * row_bytes,
                out_.get() + (b * problem_.shape.seq_len + start) * row_bytes,
                static_cast<size_t>(count * row_bytes));
  }
  record_.AddBytes(0, static_cast<int64_t>(bytes->size()));
  next_output_token_ += count;
}

void AttendStreamReactor::OnWriteDone(bool ok) {
  if (!ok) {
    FinishWith(absl::CancelledError("the client went away while the answer was being sent"));
    return;
  }
  if (write_stage_ == WriteStage::kFinished) {
    FinishWith(absl::OkStatus());
    return;
  }
  WriteNext();
}

void AttendStreamReactor::FinishWith(const absl::Status& status) {
  Finish(record_.Finish(status, computed_ ? &info_ : nullptr));
}

}  // namespace da::server
