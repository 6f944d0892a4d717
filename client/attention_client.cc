#include "client/attention_client.h"

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/support/sync_stream.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <exception>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/connection_options.h"
#include "client/stream_blocks.h"
#include "client/tensor_io.h"

namespace da::client {
namespace {

// Deadline and request id. wait_for_ready stays false: with nothing listening a call fails with
// UNAVAILABLE at once instead of waiting for the server to appear.
void ConfigureContext(const CallOptions& options, const std::string& request_id,
                      grpc::ClientContext* context) {
  if (options.timeout_ms > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(std::min(options.timeout_ms, kMaxTimeoutMs)));
  }
  const std::string& id = options.request_id.empty() ? request_id : options.request_id;
  if (!id.empty()) context->AddMetadata("x-request-id", id);
}

// options for one attempt of a call (WithRetries): what is left of its timeout.
CallOptions Attempt(const CallOptions& options, int64_t timeout_ms) {
  CallOptions attempt = options;
  attempt.timeout_ms = timeout_ms;
  return attempt;
}

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

grpc::Status CannotStartThread(const std::system_error& error) {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      std::string("cannot start a thread: ") + error.what());
}

// The status for the exception being handled, thrown by a caller's callback; only inside a catch.
grpc::Status CallbackThrew(const char* while_doing) {
  std::string what = "an exception that is not a std::exception";
  try {
    throw;
  } catch (const std::exception& exception) {
    what = exception.what();
  } catch (...) {
  }
  return grpc::Status(grpc::StatusCode::INTERNAL,
                      absl::StrCat("callback threw: ", what, " (while ", while_doing, ")"));
}

void ReleaseBlock(void* block) {
  delete static_cast<std::shared_ptr<const v1::TokenBlock>*>(block);
}

}  // namespace

namespace {

// AttendStreamRequest{block = 2: TokenBlock{token_start = 1, token_count = 2, query = 3, key = 4,
// value = 5}}, written as protobuf writes it (zero varints and empty bytes omitted): the tags and
// lengths in small slices of their own, each tensor's bytes the concatenation of its pieces, each
// piece as the slice tensor_slice makes of it.
template <typename TensorSlice>
grpc::ByteBuffer EncodeBlock(int64_t token_start, int64_t token_count,
                             const std::vector<std::string_view> (&tensors)[3],
                             const TensorSlice& tensor_slice) {
  std::string start;
  if (token_start != 0) {
    AppendVarint(1 << 3 | 0, &start);
    AppendVarint(static_cast<uint64_t>(token_start), &start);
  }
  if (token_count != 0) {
    AppendVarint(2 << 3 | 0, &start);
    AppendVarint(static_cast<uint64_t>(token_count), &start);
  }
  std::string tags[3];
  uint64_t sizes[3] = {0, 0, 0};
  uint64_t block_bytes = start.size();
  for (int i = 0; i < 3; ++i) {
    for (const std::string_view piece : tensors[i]) sizes[i] += piece.size();
    if (sizes[i] == 0) continue;
    AppendVarint(static_cast<uint64_t>(3 + i) << 3 | 2, &tags[i]);
    AppendVarint(sizes[i], &tags[i]);
    block_bytes += tags[i].size() + sizes[i];
  }
  std::string outer;
  AppendVarint(2 << 3 | 2, &outer);
  AppendVarint(block_bytes, &outer);
  outer += start;
  std::vector<grpc::Slice> slices;
  slices.emplace_back(outer);
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] == 0) continue;
    slices.emplace_back(tags[i]);
    for (const std::string_view piece : tensors[i]) {
      if (!piece.empty()) slices.push_back(tensor_slice(piece));
    }
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// The next block of a request held whole, as a message ready to write. A block's rows of each
// batch element are contiguous in the request's tensors ([batch, seq_len, heads, head_dim]) and
// are sent where they lie, one slice per batch element, borrowed: the call returns only once
// gRPC has released them. Returns
// the block's q, k and v bytes, 0 when there are no more blocks.
int64_t NextRequestBlock(const v1::AttendRequest& request, const StreamPlan& plan,
                         int64_t* next_block, BorrowedSlices& borrowed, grpc::ByteBuffer* buffer) {
  if (*next_block == plan.block_count) return 0;
  const int64_t token_start = (*next_block)++ * plan.block_tokens;
  const int64_t count = std::min(plan.block_tokens, plan.header.seq_len() - token_start);
  const int64_t first = plan.first_token + token_start;
  const v1::Tensor* tensors[3] = {&request.query(), &request.key(), &request.value()};
  std::vector<std::string_view> rows[3];
  int64_t payload = 0;
  for (int i = 0; i < 3; ++i) {
    const std::string_view data = tensors[i]->data();
    const int64_t batch = tensors[i]->shape(0), seq_len = tensors[i]->shape(1);
    // Bytes of one token of one batch element.
    const int64_t row_bytes = static_cast<int64_t>(data.size()) / (batch * seq_len);
    for (int64_t b = 0; b < batch; ++b) {
      rows[i].push_back(data.substr((b * seq_len + first) * row_bytes, count * row_bytes));
    }
    payload += batch * count * row_bytes;
  }
  *buffer = EncodeBlock(token_start, count, rows,
                        [&](std::string_view bytes) { return borrowed.Borrow(bytes); });
  return payload;
}

void AddProgress(std::atomic<int64_t> StreamProgress::*counter, StreamProgress* progress,
                 int64_t bytes) {
  if (progress != nullptr) (progress->*counter).fetch_add(bytes, std::memory_order_relaxed);
}

// The output bytes an answer message carries.
int64_t AnswerOutputBytes(const v1::AttendStreamResponse& message) {
  return message.has_block() ? static_cast<int64_t>(message.block().output().size()) : 0;
}

}  // namespace

grpc::Slice BorrowedSlices::Borrow(std::string_view bytes) {
  {
    std::lock_guard<std::mutex> lock(count_->mutex);
    ++count_->held;
  }
  return grpc::Slice(const_cast<char*>(bytes.data()), bytes.size(), &BorrowedSlices::Release,
                     new std::shared_ptr<Count>(count_));
}

void BorrowedSlices::Release(void* count) {
  const std::unique_ptr<std::shared_ptr<Count>> owned(static_cast<std::shared_ptr<Count>*>(count));
  Count& c = **owned;
  std::lock_guard<std::mutex> lock(c.mutex);
  if (--c.held == 0) c.released.notify_all();
}

bool BorrowedSlices::WaitUntilReleased(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(count_->mutex);
  return count_->released.wait_for(lock, timeout, [&] { return count_->held == 0; });
}

int64_t BorrowedSlices::held() const {
  std::lock_guard<std::mutex> lock(count_->mutex);
  return count_->held;
}

grpc::ByteBuffer TokenBlockBuffer(std::shared_ptr<const v1::TokenBlock> block) {
  const std::shared_ptr<const v1::TokenBlock> owned(std::move(block));
  const std::vector<std::string_view> tensors[3] = {
      {owned->query()}, {owned->key()}, {owned->value()}};
  return EncodeBlock(
      owned->token_start(), owned->token_count(), tensors, [&](std::string_view bytes) {
        return grpc::Slice(const_cast<char*>(bytes.data()), bytes.size(), &ReleaseBlock,
                           new std::shared_ptr<const v1::TokenBlock>(owned));
      });
}

grpc::ChannelArguments DefaultChannelArguments(int64_t max_message_bytes) {
  // gRPC takes an int; anything larger means "as large as possible".
  const int bytes = static_cast<int>(std::clamp<int64_t>(max_message_bytes, 0, INT_MAX));
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(bytes);
  arguments.SetMaxSendMessageSize(bytes);
  // Pings only while calls are open (no GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS), as many as it
  // takes: gRPC's default stops after two pings without data, and a long unary call sends none.
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  arguments.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  return arguments;
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, int64_t max_message_bytes) {
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(),
                                   DefaultChannelArguments(max_message_bytes));
}

grpc::Status WaitForConnection(grpc::Channel& channel, int64_t timeout_ms) {
  const auto deadline =
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(std::clamp<int64_t>(timeout_ms, 0, kMaxTimeoutMs));
  grpc_connectivity_state state = channel.GetState(/*try_to_connect=*/true);
  while (state != GRPC_CHANNEL_READY) {
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE || state == GRPC_CHANNEL_SHUTDOWN) {
      return grpc::Status::OK;
    }
    if (!channel.WaitForStateChange(state, deadline)) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "no connection within " + std::to_string(timeout_ms) + " ms");
    }
    state = channel.GetState(/*try_to_connect=*/true);
  }
  return grpc::Status::OK;
}

AttentionClient::AttentionClient(std::shared_ptr<grpc::Channel> channel)
    : AttentionClient(std::vector<std::shared_ptr<grpc::Channel>>{std::move(channel)}) {}

AttentionClient::AttentionClient(std::vector<std::shared_ptr<grpc::Channel>> channels,
                                 ChannelFactory fresh_channels, int64_t max_connection_age_ms)
    : fresh_channels_(std::move(fresh_channels)),
      max_connection_age_ms_(std::min(max_connection_age_ms, kMaxTimeoutMs)) {
  if (channels.empty()) throw std::invalid_argument("AttentionClient needs a channel");
  if (max_connection_age_ms_ > 0 && !fresh_channels_) {
    throw std::invalid_argument(
        "AttentionClient: max_connection_age_ms needs fresh_channels to make the new ones");
  }
  if (max_connection_age_ms_ > 0) rng_.seed(std::random_device()());
  const auto now = std::chrono::steady_clock::now();
  for (std::shared_ptr<grpc::Channel>& channel : channels) {
    slots_.push_back({std::move(channel), RenewAt(now)});
  }
}

std::chrono::steady_clock::time_point AttentionClient::RenewAt(
    std::chrono::steady_clock::time_point now) {
  if (max_connection_age_ms_ <= 0) return std::chrono::steady_clock::time_point::max();
  const double age_ms = max_connection_age_ms_ * std::uniform_real_distribution(0.9, 1.0)(rng_);
  return now + std::chrono::microseconds(static_cast<int64_t>(age_ms * 1000));
}

std::shared_ptr<grpc::Channel> AttentionClient::Channel(size_t index) {
  // Dropped after the lock is let go: the calls that hold it keep it, and gRPC closes its
  // connection when the last of them lets go (at once when none does).
  std::shared_ptr<grpc::Channel> replaced;
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& slot = slots_[index % slots_.size()];
  const auto now = std::chrono::steady_clock::now();
  if (now >= slot.renew_at) {
    replaced = std::exchange(slot.channel, fresh_channels_());
    slot.channel->GetState(/*try_to_connect=*/true);  // Connecting at once.
    slot.renew_at = RenewAt(now);
    ++renewed_;
  }
  return slot.channel;
}

int64_t AttentionClient::connections_renewed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return renewed_;
}

// The calls of one request streamed in parts: the first part to fail cancels the others.
class AttentionClient::CallGroup {
 public:
  // A call's context, from before the call starts until it has finished. A context added after
  // Cancel is cancelled at once (gRPC then cancels the call as it starts).
  void Add(grpc::ClientContext* context) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cancelled_) context->TryCancel();
    contexts_.push_back(context);
  }
  void Remove(grpc::ClientContext* context) {
    std::lock_guard<std::mutex> lock(mutex_);
    contexts_.erase(std::find(contexts_.begin(), contexts_.end(), context));
  }
  // Records status as the request's failure unless another part failed first, and cancels every
  // call of the group.
  void Fail(grpc::Status status) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cancelled_) return;
    cancelled_ = true;
    failure_ = std::move(status);
    for (grpc::ClientContext* context : contexts_) context->TryCancel();
  }
  grpc::Status failure() {
    std::lock_guard<std::mutex> lock(mutex_);
    return failure_;
  }
  bool failed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cancelled_;
  }

 private:
  std::mutex mutex_;
  bool cancelled_ = false;
  grpc::Status failure_;
  std::vector<grpc::ClientContext*> contexts_;
};

RetryWait AttentionClient::BackOffOn(grpc::Channel& channel, CallGroup* group) {
  // Waiting on the channel's state rather than sleeping makes gRPC read the connection: the
  // GOAWAY of a server that finished its drain meanwhile is taken in (and its ping answered) as
  // it comes. A sleeping sync client reads nothing between calls, so the next attempt would go
  // out on that connection before the GOAWAY was read, and the server, shut down, would cancel
  // it unstarted (CANCELLED; RefusedUnread allows for it) rather than the client reconnecting.
  return [&channel, group](std::chrono::milliseconds backoff) {
    const auto until = std::chrono::steady_clock::now() + backoff;
    for (;;) {
      if (group != nullptr && group->failed()) return false;
      const auto now = std::chrono::steady_clock::now();
      if (now >= until) return true;
      // In slices, so that a failed group is seen within one (gRPC's deadline is a wall-clock
      // time; the wait is measured on the steady clock, as the call's deadline is).
      const auto slice =
          std::min<std::chrono::steady_clock::duration>(until - now, std::chrono::milliseconds(20));
      channel.WaitForStateChange(channel.GetState(/*try_to_connect=*/false),
                                 std::chrono::system_clock::now() + slice);
    }
  };
}

std::shared_ptr<grpc::Channel> AttentionClient::AttemptChannel(
    int attempt, const std::shared_ptr<grpc::Channel>& first) const {
  if (attempt <= 1 || !fresh_channels_) return first;
  return fresh_channels_();
}

grpc::Status AttentionClient::RetriedUnary(
    const CallOptions& options, const std::string& request_id,
    const std::function<grpc::Status(v1::AttentionService::Stub&, grpc::ClientContext*)>& call) {
  const std::shared_ptr<grpc::Channel> first = Channel(0);
  return WithRetries(
      options.retry, options.timeout_ms,
      [&](int attempt, int64_t timeout_ms, bool* refused) {
        const std::unique_ptr<v1::AttentionService::Stub> stub =
            v1::AttentionService::NewStub(AttemptChannel(attempt, first));
        grpc::ClientContext context;
        ConfigureContext(Attempt(options, timeout_ms), request_id, &context);
        const grpc::Status status = call(*stub, &context);
        *refused = RefusedUnread(status, context);
        return status;
      },
      BackOffOn(*first, nullptr));
}

grpc::Status AttentionClient::Attend(const v1::AttendRequest& request, v1::AttendResponse* response,
                                     const CallOptions& options) {
  return RetriedUnary(options, request.request_id(),
                      [&](v1::AttentionService::Stub& stub, grpc::ClientContext* context) {
                        return stub.Attend(context, request, response);
                      });
}

void AttentionClient::SetMessageLimit(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  client_message_limit_ = std::max<int64_t>(bytes, 0);
}

grpc::Status AttentionClient::AttendAuto(const v1::AttendRequest& request,
                                         v1::AttendResponse* response, const CallOptions& options,
                                         const StreamOptions& stream) {
  const auto start = std::chrono::steady_clock::now();
  int64_t server_limit = 0;
  int64_t client_limit = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    server_limit = server_message_limit_;
    client_limit = client_message_limit_;
  }
  CallOptions call = options;
  if (server_limit < 0) {
    v1::GetServerInfoResponse info;
    CallOptions ask = options;
    ask.request_id.clear();
    if (grpc::Status status = GetServerInfo(&info, ask); !status.ok()) return status;
    server_limit = std::max<int64_t>(info.limits().max_message_bytes(), 0);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      server_message_limit_ = server_limit;
    }
    if (options.timeout_ms > 0) {
      // The call has what is left of the caller's timeout.
      const int64_t spent = std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::steady_clock::now() - start)
                                .count();
      if (spent >= options.timeout_ms) {
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                            absl::StrCat("the timeout of ", options.timeout_ms,
                                         " ms passed while asking the server for its limits"));
      }
      call.timeout_ms = options.timeout_ms - spent;
    }
  }
  const int64_t limit = MessageLimit(server_limit, client_limit);
  if (!NeedsStream(request, limit)) return Attend(request, response, call);
  StreamOptions chosen = stream;
  if (chosen.block_tokens == 0) chosen.block_tokens = BlockTokensFor(request, limit);
  return AttendStream(request, response, call, chosen);
}

grpc::Status AttentionClient::AttendStream(const v1::AttendRequest& request,
                                           v1::AttendResponse* response, const CallOptions& options,
                                           const StreamOptions& stream_options) {
  int parts = stream_options.parallel_streams;
  if (parts < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("parallel_streams must be >= 0, got ", parts));
  }
  if (parts == 0) {
    parts = DefaultParallelStreams(RequestAndAnswerBytes(request));
  }
  // Several batch elements: their rows of a block lie apart in the output, which is sized whole
  // at once and written where the rows lie, as with parts (AttendParts).
  const bool batched = request.query().shape_size() == 4 && request.query().shape(0) > 1;
  if (parts > 1 || batched) {
    return AttendParts(request, response, options, stream_options, std::max(parts, 1));
  }
  return AttendOneStream(request, response, options, stream_options);
}

grpc::Status AttentionClient::AttendOneStream(const v1::AttendRequest& request,
                                              v1::AttendResponse* response,
                                              const CallOptions& options,
                                              const StreamOptions& stream_options) {
  StreamPlan plan;
  if (grpc::Status status = MakeStreamPlan(request, stream_options.block_tokens, &plan);
      !status.ok()) {
    return status;
  }
  if (plan.header.request_id().empty()) plan.header.set_request_id(request.request_id());
  OutputAssembler assembler(plan.header);
  const grpc::Status status = StreamPlanInto(Channel(0), request, plan, assembler,
                                             stream_options.progress, options, nullptr);
  if (!status.ok()) return status;
  return assembler.Finish(response);
}

grpc::Status AttentionClient::StreamPlanInto(const std::shared_ptr<grpc::Channel>& channel,
                                             const v1::AttendRequest& request,
                                             const StreamPlan& plan, OutputAssembler& assembler,
                                             StreamProgress* progress, const CallOptions& options,
                                             CallGroup* group) {
  const auto attempt = [&](int attempt_number, int64_t timeout_ms, bool* refused) {
    int64_t next_block = 0;
    int64_t sent = 0;  // This attempt's, taken back out of progress when it is refused.
    // Declared first, destroyed last: the call and its buffers are gone when it waits
    // (BorrowedSlices::kReleaseWait at most).
    BorrowedSlices borrowed;
    grpc::Status status = AttendStreamOn(
        AttemptChannel(attempt_number, channel), plan.header,
        [&](grpc::ByteBuffer* buffer) {
          const int64_t bytes = NextRequestBlock(request, plan, &next_block, borrowed, buffer);
          AddProgress(&StreamProgress::sent_bytes, progress, bytes);
          sent += bytes;
          return bytes > 0;
        },
        {.on_block =
             [&](const OutputBlockView& block) {
               AddProgress(&StreamProgress::received_bytes, progress, block.output_bytes());
               return assembler.AddBlock(block);
             },
         .on_message =
             [&](const v1::AttendStreamResponse& message) {
               AddProgress(&StreamProgress::received_bytes, progress, AnswerOutputBytes(message));
               return assembler.Add(message);
             }},
        Attempt(options, timeout_ms), group, refused);
    if (*refused) AddProgress(&StreamProgress::sent_bytes, progress, -sent);
    return status;
  };
  return WithRetries(options.retry, options.timeout_ms, attempt, BackOffOn(*channel, group));
}

grpc::Status AttentionClient::AttendParts(const v1::AttendRequest& request,
                                          v1::AttendResponse* response, const CallOptions& options,
                                          const StreamOptions& stream_options, int part_count) {
  StreamPlan whole;
  if (grpc::Status status = MakeStreamPlan(request, stream_options.block_tokens, &whole);
      !status.ok()) {
    return status;
  }
  const int64_t seq_len = whole.header.seq_len();
  const std::vector<TokenRange> parts = CutParts(request.spec(), seq_len, part_count);
  if (parts.size() == 1 && whole.header.batch() == 1) {  // One stream, appending its output.
    return AttendOneStream(request, response, options, stream_options);
  }
  // The output, written by the parts where their tokens lie.
  response->Clear();
  v1::Tensor& output = *response->mutable_output();
  output.set_dtype(OutputDType(request));
  *output.mutable_shape() = request.query().shape();
  // Sized at once and not zeroed: each part writes its rows where they lie, and every byte is
  // written before the call succeeds (a failure clears the response). Zeroing first cost as much
  // as the transfer's slowest runs: the first touch of 512 MiB took 0.2 s on the build machine,
  // and up to 1 s when the VM's host had to back the pages, with every part's answers waiting
  // for it; now each part's reading thread pays for its own pages as their rows arrive.
  const size_t output_bytes = static_cast<size_t>(OutputBytes(request));
  try {
    ReserveOutput(output.mutable_data(), output_bytes);
    ResizeUninitialized(output.mutable_data(), output_bytes);
  } catch (const std::bad_alloc&) {
    v1::AttendResponse().Swap(response);
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("cannot allocate the output's ", output_bytes, " bytes in this client"));
  }

  const std::string base_id =
      options.request_id.empty() ? request.request_id() : options.request_id;
  CallGroup group;
  std::vector<v1::AttendResponse> answers(parts.size());
  auto run_part = [&](size_t i) {
    const TokenRange& part = parts[i];
    grpc::Status status;
    // Out of memory ends the request, not the process (the exception must not leave a thread).
    try {
      StreamPlan plan;
      status = MakePartPlan(request, stream_options.block_tokens, part, &plan);
      if (status.ok()) {
        CallOptions part_options = options;
        part_options.request_id =
            base_id.empty() || parts.size() == 1 ? base_id : absl::StrCat(base_id, "/", i + 1);
        plan.header.set_request_id(part_options.request_id);
        OutputAssembler assembler(plan.header, &output, seq_len, part.first);
        status = StreamPlanInto(Channel(i), request, plan, assembler, stream_options.progress,
                                part_options, &group);
        if (status.ok()) status = assembler.Finish(&answers[i]);
      }
    } catch (const std::bad_alloc&) {
      status = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of memory on this client");
    }
    if (!status.ok()) {
      const std::string where =
          parts.size() == 1 ? ""
                            : absl::StrCat("part ", i + 1, " of ", parts.size(), " (tokens ",
                                           part.first, "..", part.first + part.count, "): ");
      group.Fail(grpc::Status(status.error_code(), where + status.error_message(),
                              status.error_details()));
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(parts.size() - 1);
  for (size_t i = 1; i < parts.size(); ++i) {
    try {
      threads.emplace_back(run_part, i);
    } catch (const std::system_error& error) {
      group.Fail(CannotStartThread(error));  // Cancels the parts already started.
      break;
    }
  }
  if (threads.size() == parts.size() - 1) run_part(0);
  for (std::thread& thread : threads) thread.join();
  if (grpc::Status failure = group.failure(); !failure.ok()) {
    // Swapped with an empty response rather than cleared, which would keep the output's memory.
    v1::AttendResponse().Swap(response);
    return failure;
  }
  std::vector<v1::ExecutionInfo> infos;
  for (const v1::AttendResponse& answer : answers) infos.push_back(answer.info());
  *response->mutable_info() = MergePartInfos(infos);
  return grpc::Status::OK;
}

grpc::Status AttentionClient::AttendStreamBlocks(const v1::StreamHeader& header,
                                                 const BlockSource& next_block,
                                                 const AnswerSink& on_answer,
                                                 const CallOptions& options) {
  v1::AttendStreamResponse message;
  return AttendStreamShared(
      header,
      [&]() -> std::shared_ptr<const v1::TokenBlock> {
        auto block = std::make_shared<v1::TokenBlock>();
        if (!next_block(block.get())) return nullptr;
        return block;
      },
      {.on_block =
           [&](const OutputBlockView& block) {
             // This interface hands over messages: the rows are copied into one.
             message.Clear();
             v1::OutputBlock* out = message.mutable_block();
             out->set_token_start(block.token_start());
             out->set_token_count(block.token_count());
             out->mutable_output()->resize(static_cast<size_t>(block.output_bytes()));
             block.CopyTo(0, block.output_bytes(), out->mutable_output()->data());
             return on_answer(message);
           },
       .on_message = on_answer},
      options);
}

grpc::Status AttentionClient::AttendStreamShared(const v1::StreamHeader& header,
                                                 const SharedBlockSource& next_block,
                                                 const AnswerViews& answers,
                                                 const CallOptions& options) {
  return AttendStreamOn(
      Channel(0), header,
      [&](grpc::ByteBuffer* buffer) {
        std::shared_ptr<const v1::TokenBlock> block = next_block();
        if (block == nullptr) return false;
        *buffer = TokenBlockBuffer(std::move(block));
        return true;
      },
      answers, options, nullptr);
}

grpc::Status AttentionClient::AttendStreamOn(const std::shared_ptr<grpc::Channel>& channel,
                                             const v1::StreamHeader& header,
                                             const BufferSource& next_buffer,
                                             const AnswerViews& answers, const CallOptions& options,
                                             CallGroup* group, bool* refused) {
  grpc::ClientContext context;
  ConfigureContext(options, header.request_id(), &context);
  // Out of the group (which may cancel it from another thread) before the context goes.
  struct Membership {
    CallGroup* group;
    grpc::ClientContext* context;
    ~Membership() {
      if (group != nullptr) group->Remove(context);
    }
  } membership{group, &context};
  if (group != nullptr) group->Add(&context);
  // The same RPC as the generated stub's AttendStream, on ByteBuffers: a block is sent as slices
  // that point into its own q, k and v strings (TokenBlockBuffer), not serialized into a copy,
  // and an answer is parsed where it was received (client/answer_wire.h).
  const grpc::internal::RpcMethod method("/da.v1.AttentionService/AttendStream",
                                         grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &context));

  // Write on a thread of its own while this one reads: the server answers chunks while later
  // blocks are still arriving, and would otherwise fill both flow-control windows and leave both
  // sides waiting.
  // Out of memory on either thread (a block, the whole output) ends the call with
  // RESOURCE_EXHAUSTED instead of the process (an exception must not leave a thread's function).
  const auto out_of_memory = [](const char* what) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        std::string("out of memory on this client while ") + what);
  };
  grpc::Status writer_status;
  std::thread writer;
  try {
    writer = std::thread([&] {
      try {
        v1::AttendStreamRequest first;
        *first.mutable_header() = header;
        grpc::Slice serialized(first.SerializeAsString());
        grpc::ByteBuffer buffer(&serialized, 1);
        if (!stream->Write(buffer)) return;  // The call is over; Finish() says why.
        while (next_buffer(&buffer)) {
          if (!stream->Write(buffer)) return;
        }
        stream->WritesDone();
      } catch (const std::bad_alloc&) {
        writer_status = out_of_memory("making a block to send");
        context.TryCancel();
      } catch (...) {
        writer_status = CallbackThrew("making a block to send");
        context.TryCancel();
      }
    });
  } catch (const std::system_error& error) {
    context.TryCancel();
    stream->Finish();
    return CannotStartThread(error);
  }

  grpc::Status answer_status;
  grpc::ByteBuffer buffer;
  std::vector<grpc::Slice> slices;
  std::vector<std::string_view> pieces;
  v1::AttendStreamResponse message;
  OutputBlockView block;
  bool answered = false;
  while (stream->Read(&buffer)) {
    answered = true;
    slices.clear();
    pieces.clear();
    try {
      if (grpc::Status dumped = buffer.Dump(&slices); !dumped.ok()) {
        answer_status = grpc::Status(grpc::StatusCode::INTERNAL,
                                     "cannot read an answer message: " + dumped.error_message());
      } else {
        for (const grpc::Slice& slice : slices) {
          pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
        }
        if (absl::Status parsed = ParseAnswer(pieces, &message, &block); !parsed.ok()) {
          answer_status = grpc::Status(grpc::StatusCode::INTERNAL,
                                       "the server's answer is not an AttendStreamResponse: " +
                                           std::string(parsed.message()));
        } else if (message.has_block()) {
          answer_status = answers.on_block(block);
        } else {
          answer_status = answers.on_message(message);
        }
      }
    } catch (const std::bad_alloc&) {
      answer_status = out_of_memory("taking the answer");
    } catch (...) {
      answer_status = CallbackThrew("taking the answer");
    }
    if (!answer_status.ok()) {
      // The caller refused the answer: stop the call and drain so that Finish() returns promptly.
      context.TryCancel();
      while (stream->Read(&buffer)) {
      }
      break;
    }
  }
  writer.join();
  const grpc::Status call_status = stream->Finish();
  if (refused != nullptr) {  // Not when this client cancelled it (a callback, another part).
    *refused = !answered && writer_status.ok() && answer_status.ok() &&
               (group == nullptr || !group->failed()) && RefusedUnread(call_status, context);
  }
  if (!answer_status.ok()) return answer_status;
  if (!writer_status.ok()) return writer_status;
  return call_status;
}

grpc::Status AttentionClient::GetServerInfo(v1::GetServerInfoResponse* response,
                                            const CallOptions& options) {
  return RetriedUnary(options, "",
                      [&](v1::AttentionService::Stub& stub, grpc::ClientContext* context) {
                        return stub.GetServerInfo(context, v1::GetServerInfoRequest(), response);
                      });
}

grpc::Status AttentionClient::WarmUp(const v1::WarmUpRequest& request, v1::WarmUpResponse* response,
                                     const CallOptions& options) {
  return RetriedUnary(options, "",
                      [&](v1::AttentionService::Stub& stub, grpc::ClientContext* context) {
                        return stub.WarmUp(context, request, response);
                      });
}

grpc::Status AttentionClient::CheckHealth(
    const std::string& service, grpc::health::v1::HealthCheckResponse::ServingStatus* status,
    const CallOptions& options) {
  grpc::ClientContext context;
  ConfigureContext(options, "", &context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status call_status =
      grpc::health::v1::Health::NewStub(Channel(0))->Check(&context, request, &response);
  if (call_status.ok()) *status = response.status();
  return call_status;
}

}  // namespace da::client
