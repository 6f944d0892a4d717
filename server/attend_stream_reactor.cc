#include "server/attend_stream_reactor.h"

#include <grpc/slice.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/numeric/int128.h"
#include "absl/strings/str_format.h"
#include "engine/admission.h"
#include "engine/status_macros.h"
#include "server/status_conversion.h"

namespace da::server {
namespace {

constexpr int64_t kOutputMessageBytes = int64_t{4} << 20;
// A block message's bytes besides its tokens' (field tags and lengths, token_start and count).
constexpr int64_t kBlockFramingBytes = 64;

// A small message (a header or a trailer) as one slice.
grpc::ByteBuffer SerializedMessage(const v1::AttendStreamResponse& message) {
  grpc::Slice slice(message.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

AttendStreamReactor::AttendStreamReactor(engine::Engine* engine, Metrics* metrics,
                                         const StreamSettings& settings,
                                         grpc::CallbackServerContext* context)
    : live_(settings.live_calls),
      engine_(engine),
      settings_(settings),
      context_(context),
      record_(metrics, "AttendStream", *context) {
  next_progress_log_ =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(settings_.progress_log_ms);
  if (settings_.watch != nullptr) settings_.watch->Add(this);
  read_in_flight_ = true;
  StartRead(&request_buffer_);
}

void AttendStreamReactor::OnDone() {
  // Waits for a CheckIdle in progress; afterwards the watch no longer sees this stream.
  if (settings_.watch != nullptr) settings_.watch->Remove(this);
  if (ended_early_) {
    // The last callback: nothing else runs now, and IsCancelled is final. A stream the idle watch
    // ended was cancelled by this server (EndIdle), not by its client: it keeps its error.
    const bool cancelled = context_->IsCancelled() && !idle_ended_;
    record_.Finish(cancelled ? CancellationStatus() : error_, any_computed_ ? &info_ : nullptr);
  }
  delete this;
}

bool AttendStreamReactor::CheckIdle(StreamWatch::Clock::time_point now,
                                    std::chrono::milliseconds idle_timeout) {
  // A stream whose lock is held is busy (copying a block in, an answer out): not idle. Waiting
  // for it would hold the watch's lock, and with it every OnDone and every unary answer, for
  // the length of that copy.
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  // A chunk computing (or queued) is the engine's time, not the client's.
  if (finished_ || idle_ended_ || computing_) return false;
  // A failed stream finishes as soon as nothing is in flight, unless its last write waits on a
  // client that reads nothing: that one is ended like an idle stream, keeping its error.
  if (!error_.ok() && !write_in_flight_ && !metadata_in_flight_) return false;
  const auto idle = std::chrono::duration_cast<std::chrono::milliseconds>(now - last_progress_);
  if (idle <= idle_timeout) return false;
  if (!error_.ok()) {
    idle_ended_ = true;
    ++starting_;  // As below: held open until EndIdle has cancelled the write.
    return true;
  }
  const int64_t reserved = reservation_ ? reservation_->bytes() : 0;
  const std::string progress = absl::StrFormat(
      "after %d of %d tokens arrived and %d chunks were computed; its %d reserved bytes are freed "
      "(--stream-idle-timeout-ms %d)",
      assembler_ ? assembler_->tokens_received() : 0, problem_.shape.seq_len, chunks_computed_,
      reserved, idle_timeout.count());
  if (write_in_flight_ || metadata_in_flight_) {
    Fail(WithServerRejectReason(
        absl::CancelledError(absl::StrFormat(
            "stream idle: the client read no answer message for %d ms %s", idle.count(), progress)),
        "idle"));
  } else {
    Fail(WithServerRejectReason(
        absl::DeadlineExceededError(absl::StrFormat(
            "stream idle: no message from the client for %d ms %s", idle.count(), progress)),
        "idle"));
  }
  idle_ended_ = true;
  ++starting_;  // Holds the stream open (Decide does not finish it) until EndIdle.
  return true;
}

void AttendStreamReactor::EndIdle() {
  bool cancel = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancel = write_in_flight_ || metadata_in_flight_;
  }
  // A write (or the initial metadata) the client does not read never completes by itself:
  // cancelling the call returns it (ok false), and then the stream finishes. Called while starting_
  // still holds the stream open.
  if (cancel) context_->TryCancel();
  Advance([&] { --starting_; });  // May finish the stream: the last use of this object.
}

int64_t AttendStreamReactor::QueryRowBytes() const {
  return problem_.shape.heads * problem_.shape.head_dim * engine::DTypeSize(problem_.dtype);
}

int64_t AttendStreamReactor::OutputRowBytes() const {
  return problem_.shape.heads * problem_.shape.head_dim * engine::DTypeSize(problem_.out_dtype);
}

int64_t AttendStreamReactor::KeyRowBytes() const {
  return problem_.shape.kv_heads * problem_.shape.head_dim * engine::DTypeSize(problem_.dtype);
}

void AttendStreamReactor::Fail(absl::Status status) {
  if (!error_.ok()) return;
  error_ = std::move(status);
  cancelled_.store(true);  // Stops an engine run in flight at its next panel.
}

void AttendStreamReactor::OnReadDone(bool ok) {
  Advance([&] {
    read_in_flight_ = false;
    last_progress_ = std::chrono::steady_clock::now();
    if (finished_ || !error_.ok()) {
      ReleaseMessage();  // A message that arrived after the failure is not needed.
      return;
    }
    if (!ok) {  // The client half-closed, or the call is gone.
      if (context_->IsCancelled()) {
        SeeCancellation();
        Fail(CancellationStatus("the stream was cancelled before its input was complete"));
      } else if (!have_header_) {
        ended_early_ = true;
        Fail(absl::InvalidArgumentError("the stream ended before its header"));
      } else {
        input_done_ = true;
        if (absl::Status complete = assembler_->CheckComplete(); !complete.ok()) {
          ended_early_ = true;
          Fail(complete);
        }
      }
      return;
    }
    // The slices stay referenced (request_slices_) while the block's bytes are pending.
    request_slices_.clear();
    std::vector<std::string_view> pieces;
    absl::Status status;
    // The first message must be the header: one larger than a header may be is refused before
    // it is parsed (a parse would copy it whole, unaccounted, before admission).
    if (const int64_t bytes = static_cast<int64_t>(request_buffer_.Length());
        !have_header_ && bytes > kMaxHeaderMessageBytes) {
      status = absl::InvalidArgumentError(
          absl::StrFormat("header: the stream's first message is %d bytes; a header is at most %d",
                          bytes, kMaxHeaderMessageBytes));
    } else if (grpc::Status dumped = request_buffer_.Dump(&request_slices_); !dumped.ok()) {
      status = absl::InternalError("cannot read a stream message: " + dumped.error_message());
    } else {
      for (const grpc::Slice& slice : request_slices_) {
        pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
      }
      status = ParseStreamMessage(pieces, &fallback_, &message_);
      // Parsed by protobuf, the message's bytes are fallback_'s now: the wire's copy goes.
      if (message_.parsed_by_protobuf) {
        request_slices_.clear();
        if (!read_in_flight_) request_buffer_.Clear();
      }
    }
    if (!status.ok()) {
      // Reported below with the rest.
    } else if (message_.kind == StreamMessage::Kind::kHeader) {
      const int64_t bytes = static_cast<int64_t>(request_buffer_.Length());
      status = bytes > kMaxHeaderMessageBytes
                   ? absl::InvalidArgumentError(
                         absl::StrFormat("header: its message is %d bytes; a header is at most %d",
                                         bytes, kMaxHeaderMessageBytes))
                   : AcceptHeader(message_.header);
      if (status.ok()) ReleaseMessage();  // Everything the stream needs of it is copied.
    } else if (message_.kind == StreamMessage::Kind::kBlock) {
      status = AcceptBlock(message_.block);
    } else {
      status = absl::InvalidArgumentError(absl::StrFormat(
          "stream message %d carries neither a header nor a block",
          (assembler_ ? assembler_->blocks_received() : 0) + (have_header_ ? 1 : 0)));
    }
    if (!status.ok()) Fail(status);
  });
}

absl::Status AttendStreamReactor::AcceptHeader(const v1::StreamHeader& header) {
  if (have_header_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header: a second header arrived after %d blocks; a stream has exactly one header, first",
        assembler_->blocks_received()));
  }
  DA_ASSIGN_OR_RETURN(problem_, ProblemFromHeader(header));
  record_.SetRequestIdField(header.request_id());
  record_.SetProblem(problem_.shape, problem_.dtype, problem_.spec);
  // Shapes, spec and max_tokens are checked before a single byte is allocated. max_request_bytes
  // bounds what a unary request holds whole; a stream never holds itself whole, so it is bounded
  // by its window instead (see the class comment).
  engine::Limits limits = engine_->limits();
  limits.max_request_bytes = 0;
  DA_RETURN_IF_ERROR(engine::ValidateShape(problem_.shape, problem_.dtype, problem_.spec, limits,
                                           problem_.out_dtype));
  // A block holds whole tokens of every batch element: one token must fit a message.
  const int64_t token_bytes = problem_.shape.batch * (QueryRowBytes() + 2 * KeyRowBytes());
  if (token_bytes > settings_.max_message_bytes - kBlockFramingBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header: one token across batch %d needs %d bytes of query, key and value in a block "
        "message, over --max-message-bytes %d (less %d of framing)",
        problem_.shape.batch, token_bytes, settings_.max_message_bytes, kBlockFramingBytes));
  }
  // And one token of output an answer message (an output dtype wider than the inputs').
  const int64_t out_token_bytes = problem_.shape.batch * OutputRowBytes();
  if (out_token_bytes > settings_.max_message_bytes - kBlockFramingBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header: one token of output across batch %d needs %d bytes in an answer message, over "
        "--max-message-bytes %d (less %d of framing)",
        problem_.shape.batch, out_token_bytes, settings_.max_message_bytes, kBlockFramingBytes));
  }

  DA_ASSIGN_OR_RETURN(
      const StreamLayout layout,
      MakeStreamLayout(problem_.shape, problem_.dtype, problem_.out_dtype, problem_.spec,
                       settings_.min_chunk_tokens, engine_->limits().max_request_bytes,
                       engine_->ComputesShares()));
  if (settings_.priority_cap != nullptr) {
    DA_RETURN_IF_ERROR(
        settings_.priority_cap->Check(*context_, "header: priority", header.priority()));
  }
  priority_ = header.priority();
  DA_RETURN_IF_ERROR(Admit(layout));
  DA_ASSIGN_OR_RETURN(assembler_,
                      StreamAssembler::Create(layout, settings_.pipeline_depth, settings_.buffers));
  const int64_t out_slot_bytes = layout.chunk_tokens * layout.batch * layout.out_row_bytes;
  for (int i = 0; i < 2; ++i) {
    out_slots_.push_back(
        settings_.buffers != nullptr
            ? settings_.buffers->Take(out_slot_bytes)
            : PooledBuffer(AllocateHostBuffer(out_slot_bytes), out_slot_bytes, nullptr));
    out_slot_busy_.push_back(false);
    if (!out_slots_.back()) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("cannot allocate %d bytes for a chunk's output (%d tokens)",
                          out_slot_bytes, layout.chunk_tokens));
    }
  }
  // Output messages of about 4 MiB (at most half the message limit, or one token where that is
  // more: Admit reserved it): small enough that a chunk's answer starts moving while it is still
  // being copied out, and that gRPC's copies of one message stay small next to the window.
  const int64_t message_bytes =
      std::min<int64_t>(kOutputMessageBytes, settings_.max_message_bytes / 2);
  output_block_tokens_ =
      std::max<int64_t>(1, message_bytes / (layout.batch * layout.out_row_bytes));
  have_header_ = true;
  metadata_due_ = context_->client_metadata().count(grpc::string_ref(
                      kStreamAdmissionRequest.data(), kStreamAdmissionRequest.size())) > 0;
  return absl::OkStatus();
}

absl::Status AttendStreamReactor::Admit(const StreamLayout& layout) {
  const engine::ProblemShape chunk_shape{layout.batch, layout.chunk_tokens, problem_.shape.heads,
                                         problem_.shape.kv_heads, problem_.shape.head_dim};
  deadline_ = SteadyDeadline(ClientDeadline(*context_));
  if (deadline_) {
    const double left_s =
        std::chrono::duration<double>(*deadline_ - std::chrono::steady_clock::now()).count();
    // Judged by what computes a chunk: the group, or this process (always for windows).
    engine::AttentionSpec computed_by = problem_.spec;
    if (layout.windowed) computed_by.shard_policy = engine::ShardPolicy::kNone;
    const double rate = engine_->DeadlineThroughput(chunk_shape, computed_by);
    const double flops = engine::EstimateFlops(problem_.shape, problem_.spec);
    if (left_s <= 0 || (rate > 0 && flops / rate > left_s)) {
      return engine::WithRejectReason(
          absl::DeadlineExceededError(absl::StrFormat(
              "the stream needs an estimated %.0f ms of compute (%.1f GFLOP at the measured "
              "%.1f GFLOP/s) but its deadline leaves %.0f ms",
              rate > 0 ? 1e3 * flops / rate : 0.0, flops / 1e9, rate / 1e9, 1e3 * left_s)),
          engine::RejectReason::kDeadline);
    }
  }
  DA_ASSIGN_OR_RETURN(
      const engine::MemoryEstimate chunk,
      engine_->EstimateMemory(chunk_shape, problem_.dtype, problem_.out_dtype, problem_.spec));
  // The outgoing message: about 4 MiB of whole tokens, or one token where that is larger.
  const int64_t outgoing =
      std::max(std::min<int64_t>(kOutputMessageBytes, settings_.max_message_bytes / 2),
               layout.batch * layout.out_row_bytes + kBlockFramingBytes);
  const int64_t messages = kStreamLookaheadBytes + settings_.max_message_bytes + outgoing;
  // The workspace is host memory on a CPU device; on a GPU it is the device's, which the engine
  // reserves there for each chunk.
  const int64_t workspace = chunk.workspace_on_host ? chunk.workspace : 0;
  // In 128 bits: with --max-request-bytes 0 (no limit) a chunk may be near 2^63 bytes. Half the
  // int64 range at most, so that the budget's own sums cannot overflow either.
  // Windows hold two chunks more (the ones beside the chunk taken) and the rows gathered for it.
  const int slots = InputSlots(layout, settings_.pipeline_depth);
  const int64_t gathered = GatheredBytesBound(layout);
  const absl::int128 wide = absl::int128(slots) * chunk.inputs + gathered +
                            absl::int128(2) * chunk.outputs + workspace + messages;
  if (wide > absl::int128(std::numeric_limits<int64_t>::max() / 2)) {
    return engine::WithRejectReason(
        absl::ResourceExhaustedError(absl::StrFormat(
            "the stream's window (%d chunks of %d tokens, %d bytes of inputs each) is beyond any "
            "memory budget",
            slots, layout.chunk_tokens, chunk.inputs)),
        engine::RejectReason::kMemory);
  }
  const int64_t inputs = slots * chunk.inputs + gathered;
  const int64_t outputs = 2 * chunk.outputs;
  const int64_t total = static_cast<int64_t>(wide);
  // One place in the engine's queue for all the stream's chunks, so chunks never push the queue
  // past --max-queue; then the budget (a window it can never hold is refused for that); then
  // this client's share of stream memory.
  DA_ASSIGN_OR_RETURN(queue_place_, engine_->TakeQueuePlace());
  DA_ASSIGN_OR_RETURN(
      reservation_,
      engine_->ReserveMemory(
          total,
          absl::StrFormat("%d bytes for the stream's window (inputs %d: %d chunks of %d "
                          "tokens%s; outputs %d; workspace %d; messages %d)",
                          total, inputs, slots, layout.chunk_tokens,
                          gathered > 0 ? absl::StrFormat(" and %d of gathered rows", gathered) : "",
                          outputs, workspace, messages)));
  if (settings_.quota != nullptr) {
    DA_ASSIGN_OR_RETURN(
        client_share_,
        settings_.quota->Reserve(ClientKeyOf(*context_, settings_.client_by_token), total));
  }
  return absl::OkStatus();
}

absl::Status AttendStreamReactor::AcceptBlock(const BlockView& view) {
  if (!have_header_) {
    // Without signed overflow: the numbers come straight from the client.
    const int64_t end = static_cast<int64_t>(static_cast<uint64_t>(view.token_start) +
                                             static_cast<uint64_t>(view.token_count));
    return absl::InvalidArgumentError(absl::StrFormat(
        "block 0 (tokens [%d, %d)) arrived before the header; the first stream message must be "
        "a header",
        view.token_start, end));
  }
  DA_RETURN_IF_ERROR(assembler_->CheckBlock(view));
  record_.AddBytes(view.q.size() + view.k.size() + view.v.size(), 0);
  pending_block_ = true;
  pending_taken_ = 0;
  return absl::OkStatus();
}

void AttendStreamReactor::FeedPendingBlock() {
  if (!pending_block_) return;
  const BlockView& view = message_.block;
  pending_taken_ += assembler_->Fill(view, pending_taken_);
  if (pending_taken_ == view.token_count) {
    pending_block_ = false;
    // Its bytes are in the chunk: the message goes now, not when the next one arrives (no read is
    // in flight while a block is pending), so the stream holds one incoming message, not two.
    ReleaseMessage();
  }
}

void AttendStreamReactor::ReleaseMessage() {
  request_slices_.clear();
  if (!read_in_flight_) request_buffer_.Clear();  // Otherwise gRPC is filling it.
  v1::AttendStreamRequest().Swap(&fallback_);     // Clear() would keep its bytes' capacity.
  message_ = StreamMessage();
}

AttendStreamReactor::Actions AttendStreamReactor::Decide() {
  Actions actions;
  if (finished_) return actions;
  const bool quiet = !computing_ && !write_in_flight_ && !metadata_in_flight_ && starting_ == 0;
  if (!error_.ok() || trailer_sent_) {
    if (quiet) {
      finished_ = true;
      actions.finish = ended_early_ ? ToGrpcStatus(error_)  // Recorded in OnDone.
                                    : record_.Finish(error_, any_computed_ ? &info_ : nullptr);
      // Nothing uses the window any more (no run, no write in flight): return it now rather
      // than when gRPC calls OnDone.
      assembler_.reset();
      out_slots_.clear();
      reservation_.reset();
      client_share_.Reset();
      queue_place_.Reset();
    } else if (!error_.ok() && !computing_ && starting_ == 0) {
      ReturnWindow();
    }
    return actions;
  }
  if (metadata_due_) {
    metadata_due_ = false;
    metadata_in_flight_ = true;
    context_->AddInitialMetadata(std::string(kStreamWindowMetadata),
                                 std::to_string(reservation_ ? reservation_->bytes() : 0));
    actions.send_metadata = true;
  }
  FeedPendingBlock();
  if (!computing_ && assembler_ != nullptr) {
    const auto free_slot = std::find(out_slot_busy_.begin(), out_slot_busy_.end(), false);
    if (free_slot != out_slot_busy_.end()) {
      actions.compute = assembler_->TakeReadyChunk();
      if (actions.compute) {
        computing_ = true;
        *free_slot = true;
        actions.compute_slot = static_cast<int>(free_slot - out_slot_busy_.begin());
      }
    }
  }
  if (!read_in_flight_ && !input_done_ && !pending_block_) {
    read_in_flight_ = true;
    actions.read = true;
  }
  // A write is filled (its rows copied into a message) in the next round when this one starts a
  // compute: the engine then starts at once instead of after the copy and the write.
  if (!write_in_flight_ && !actions.compute && FillNextWrite()) {
    response_bytes_ = static_cast<int64_t>(response_buffer_.Length());
    write_in_flight_ = true;
    actions.write = true;
  }
  return actions;
}

void AttendStreamReactor::ReturnWindow() {
  // No run uses the inputs or the output slots any more, and no new one starts (the stream has
  // failed), but a write or a read may still be in flight: the call finishes only when gRPC
  // returns them, which a client that reads nothing delays until the idle watch ends the call.
  // Meanwhile the window goes back to the budget, the client's share and the queue; what stays
  // counted is what gRPC still holds for the stream: the message being written, and one message
  // the read in flight may still receive.
  assembler_.reset();
  out_slots_.clear();
  pending_block_ = false;
  ReleaseMessage();
  queue_place_.Reset();
  const int64_t held = (write_in_flight_ ? response_bytes_ : 0) +
                       (read_in_flight_ ? settings_.max_message_bytes : 0);
  if (reservation_) reservation_->ShrinkTo(held);
  client_share_.ShrinkTo(held);
}

bool AttendStreamReactor::FillNextWrite() {
  if (!have_header_) return false;
  v1::AttendStreamResponse response;  // Header and trailer; blocks are written directly.
  const bool trailer_ready =
      input_done_ && !computing_ && chunks_computed_ == assembler_->layout().chunk_count();
  // The header goes out with the first output, so a stream refused for its input gets no answer
  // messages at all, only the status.
  if (!header_sent_ && (!outgoing_.empty() || trailer_ready)) {
    v1::StreamResponseHeader* header = response.mutable_header();
    header->set_request_id(record_.id());
    header->set_dtype(DTypeToProto(problem_.out_dtype));
    const engine::Shape4 shape = problem_.shape.QueryShape();
    for (int64_t dim : {shape.batch, shape.seq_len, shape.heads, shape.head_dim}) {
      header->add_shape(dim);
    }
    header_sent_ = true;
    response_buffer_ = SerializedMessage(response);
    return true;
  }
  if (!outgoing_.empty()) {
    Outgoing& chunk = outgoing_.front();
    const int64_t count = std::min(output_block_tokens_, chunk.token_count - chunk.sent);
    const int64_t row_bytes = OutputRowBytes();
    const int64_t batch = problem_.shape.batch;
    // The serialized message, written straight into one slice: its prefix, then the rows copied
    // once from the output slot.
    const int64_t payload = batch * count * row_bytes;
    const std::string prefix =
        EncodeOutputBlockPrefix(chunk.token_start + chunk.sent, count, payload);
    grpc_slice raw = grpc_slice_malloc(prefix.size() + static_cast<size_t>(payload));
    char* write = reinterpret_cast<char*>(GRPC_SLICE_START_PTR(raw));
    std::memcpy(write, prefix.data(), prefix.size());
    write += prefix.size();
    const char* out = out_slots_[chunk.slot].get();
    for (int64_t b = 0; b < batch; ++b) {
      std::memcpy(write + b * count * row_bytes,
                  out + (b * chunk.token_count + chunk.sent) * row_bytes,
                  static_cast<size_t>(count * row_bytes));
    }
    grpc::Slice slice(raw, grpc::Slice::STEAL_REF);
    response_buffer_ = grpc::ByteBuffer(&slice, 1);
    record_.AddBytes(0, payload);
    chunk.sent += count;
    if (chunk.sent == chunk.token_count) {  // Copied out: the slot can take the next chunk.
      out_slot_busy_[chunk.slot] = false;
      outgoing_.pop_front();
    }
    return true;
  }
  if (trailer_ready && header_sent_) {
    v1::ExecutionInfo* info = response.mutable_trailer()->mutable_info();
    ExecutionInfoToProto(info_, record_.id(), record_.ElapsedUs(), info);
    info->set_stream_chunk_tokens(assembler_->layout().chunk_tokens);
    info->set_stream_chunks(chunks_computed_);
    // What the window reserved: the bytes this stream held against the budget.
    info->set_stream_buffer_bytes(reservation_ ? reservation_->bytes() : 0);
    trailer_sent_ = true;
    response_buffer_ = SerializedMessage(response);
    return true;
  }
  return false;
}

void AttendStreamReactor::Advance(const std::function<void()>& under_lock) {
  Actions actions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (under_lock) under_lock();
    actions = Decide();
    if (actions.Starts()) ++starting_;
  }
  for (;;) {
    if (actions.finish) {
      Finish(*actions.finish);  // The last thing: OnDone may follow at once on another thread.
      return;
    }
    if (!actions.Starts()) return;
    // Before any write: the metadata would otherwise go out with the first message.
    if (actions.send_metadata) StartSendInitialMetadata();
    if (actions.read) StartRead(&request_buffer_);
    if (actions.write) StartWrite(&response_buffer_);
    // Last: a run the engine refuses calls back before Submit returns, and that callback must
    // not finish the RPC while this thread may still start operations (starting_ prevents it).
    if (actions.compute) Compute(*actions.compute, actions.compute_slot);
    std::lock_guard<std::mutex> lock(mu_);
    --starting_;
    actions = Decide();
    if (actions.Starts()) ++starting_;
  }
}

void AttendStreamReactor::Compute(const Chunk& chunk, int slot) {
  const engine::Shape4 q_shape{problem_.shape.batch, chunk.token_count, problem_.shape.heads,
                               problem_.shape.head_dim};
  const engine::Shape4 kv_shape{problem_.shape.batch, chunk.token_count, problem_.shape.kv_heads,
                                problem_.shape.head_dim};
  const int64_t q_bytes = q_shape.elements() * engine::DTypeSize(problem_.dtype);
  const int64_t kv_bytes = kv_shape.elements() * engine::DTypeSize(problem_.dtype);
  engine::RunRequest run;
  run.q = {problem_.dtype, q_shape, chunk.q, q_bytes};
  run.k = {problem_.dtype, kv_shape, chunk.k, kv_bytes};
  run.v = {problem_.dtype, kv_shape, chunk.v, kv_bytes};
  run.spec = problem_.spec;
  run.out = {problem_.out_dtype, q_shape, out_slots_[slot].get(),
             q_shape.elements() * engine::DTypeSize(problem_.out_dtype)};
  run.request_id = record_.id();
  run.cancelled = &cancelled_;
  run.priority = priority_;
  run.deadline = deadline_;
  run.reservation = &*reservation_;
  run.queue_place = &queue_place_;
  run.first_token = chunk.token_start;
  run.share_of = chunk.share_of;
  const Outgoing outgoing{chunk.index, chunk.token_start, chunk.token_count, slot, 0};
  engine_->Submit(run, [this, outgoing](absl::StatusOr<engine::ExecutionInfo> info) {
    OnComputed(outgoing, std::move(info));
  });
}

void AttendStreamReactor::OnComputed(const Outgoing& chunk,
                                     absl::StatusOr<engine::ExecutionInfo> info) {
  Advance([&] {
    computing_ = false;
    last_progress_ = std::chrono::steady_clock::now();  // From now on the client is waited for.
    if (!info.ok()) {
      Fail(info.status());
      return;
    }
    if (!any_computed_) {
      info_ = *info;
      any_computed_ = true;
    } else {
      info_.queue_time_us += info->queue_time_us;
      info_.compute_time_us += info->compute_time_us;
      info_.plan_build_time_us += info->plan_build_time_us;
      info_.plan_cache_hit = info_.plan_cache_hit && info->plan_cache_hit;
      // The answer is as precise as its least precise chunk (a GPU computes a window its fused
      // path cannot take in fp32, and a window without crossing segments fused).
      if (engine::ErrorBound(info->precision_used) > engine::ErrorBound(info_.precision_used)) {
        info_.precision_used = info->precision_used;
        info_.precision_reason = info->precision_reason;
      }
      // fp8: each chunk was quantized with scales of its own; all of them, in chunk order.
      info_.fp8_scales.insert(info_.fp8_scales.end(), info->fp8_scales.begin(),
                              info->fp8_scales.end());
    }
    assembler_->ReleaseChunk(chunk.index);
    outgoing_.push_back(chunk);
    ++chunks_computed_;
    const auto now = std::chrono::steady_clock::now();
    if (settings_.progress_log_ms > 0 && now >= next_progress_log_) {
      next_progress_log_ = now + std::chrono::milliseconds(settings_.progress_log_ms);
      record_.LogProgress(absl::StrFormat("tokens_in=%d/%d chunks=%d/%d",
                                          assembler_->tokens_received(), problem_.shape.seq_len,
                                          chunks_computed_, assembler_->layout().chunk_count()));
    }
  });
}

void AttendStreamReactor::OnSendInitialMetadataDone(bool /*ok*/) {
  // Not ok: the call is gone, and OnCancel says so.
  Advance([&] { metadata_in_flight_ = false; });
}

void AttendStreamReactor::OnWriteDone(bool ok) {
  Advance([&] {
    write_in_flight_ = false;
    last_progress_ = std::chrono::steady_clock::now();
    if (!ok) Fail(absl::CancelledError("the client went away while the answer was being sent"));
  });
}

absl::Status AttendStreamReactor::CancellationStatus(std::string_view by_client) const {
  const std::string progress = absl::StrFormat(
      "after %d of %d tokens arrived and %d chunks were computed",
      assembler_ ? assembler_->tokens_received() : 0, problem_.shape.seq_len, chunks_computed_);
  if (!CancelledByDeadline(ClientDeadline(*context_))) {
    const int seen = cut_off_by_drain_.load();
    if (seen == 1 || (seen < 0 && DrainPassed())) {
      return absl::CancelledError(
          absl::StrCat("cut off by the server's drain (--drain-timeout-ms ran out) ", progress));
    }
    return absl::CancelledError(absl::string_view(by_client.data(), by_client.size()));
  }
  return engine::WithRejectReason(
      absl::DeadlineExceededError(absl::StrCat("the deadline passed ", progress)),
      chunks_computed_ == 0 && !computing_ ? engine::RejectReason::kDeadline
                                           : engine::RejectReason::kNone);
}

void AttendStreamReactor::SeeCancellation() {
  int unseen = -1;
  cut_off_by_drain_.compare_exchange_strong(unseen, DrainPassed() ? 1 : 0);
}

void AttendStreamReactor::OnCancel() {
  SeeCancellation();
  Advance([&] { Fail(CancellationStatus()); });
}

}  // namespace da::server
