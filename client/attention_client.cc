#include "client/attention_client.h"

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/support/sync_stream.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <thread>
#include <vector>

#include "client/stream_blocks.h"

namespace da::client {
namespace {

// Deadline and request id. wait_for_ready stays false: with nothing listening a call fails with
// UNAVAILABLE at once instead of waiting for the server to appear.
void ConfigureContext(const CallOptions& options, const std::string& request_id,
                      grpc::ClientContext* context) {
  if (options.timeout_ms > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(options.timeout_ms));
  }
  const std::string& id = options.request_id.empty() ? request_id : options.request_id;
  if (!id.empty()) context->AddMetadata("x-request-id", id);
}

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

void ReleaseBlock(void* block) {
  delete static_cast<std::shared_ptr<const v1::TokenBlock>*>(block);
}

// A slice over bytes of *block, holding a reference to the block until gRPC lets go of it.
grpc::Slice BlockSlice(const std::shared_ptr<const v1::TokenBlock>& block,
                       const std::string& bytes) {
  return grpc::Slice(const_cast<char*>(bytes.data()), bytes.size(), &ReleaseBlock,
                     new std::shared_ptr<const v1::TokenBlock>(block));
}

}  // namespace

grpc::ByteBuffer TokenBlockBuffer(std::shared_ptr<const v1::TokenBlock> block) {
  const std::shared_ptr<const v1::TokenBlock> owned(std::move(block));
  // AttendStreamRequest{block = 2: TokenBlock{token_start = 1, token_count = 2, query = 3,
  // key = 4, value = 5}}, written as protobuf writes it (zero varints and empty bytes omitted):
  // the tags and lengths in small slices of their own, the tensors as slices over the block.
  std::string start;
  if (owned->token_start() != 0) {
    AppendVarint(1 << 3 | 0, &start);
    AppendVarint(static_cast<uint64_t>(owned->token_start()), &start);
  }
  if (owned->token_count() != 0) {
    AppendVarint(2 << 3 | 0, &start);
    AppendVarint(static_cast<uint64_t>(owned->token_count()), &start);
  }
  std::string tags[3];
  const std::string* tensors[3] = {&owned->query(), &owned->key(), &owned->value()};
  uint64_t block_bytes = start.size();
  for (int i = 0; i < 3; ++i) {
    if (tensors[i]->empty()) continue;
    AppendVarint(static_cast<uint64_t>(3 + i) << 3 | 2, &tags[i]);
    AppendVarint(tensors[i]->size(), &tags[i]);
    block_bytes += tags[i].size() + tensors[i]->size();
  }
  std::string outer;
  AppendVarint(2 << 3 | 2, &outer);
  AppendVarint(block_bytes, &outer);
  outer += start;
  std::vector<grpc::Slice> slices;
  slices.emplace_back(outer);
  for (int i = 0; i < 3; ++i) {
    if (tensors[i]->empty()) continue;
    slices.emplace_back(tags[i]);
    slices.push_back(BlockSlice(owned, *tensors[i]));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ChannelArguments DefaultChannelArguments(int64_t max_message_bytes) {
  // gRPC takes an int; anything larger means "as large as possible".
  const int bytes = static_cast<int>(std::clamp<int64_t>(max_message_bytes, 0, INT_MAX));
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(bytes);
  arguments.SetMaxSendMessageSize(bytes);
  return arguments;
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, int64_t max_message_bytes) {
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(),
                                   DefaultChannelArguments(max_message_bytes));
}

grpc::Status WaitForConnection(grpc::Channel& channel, int64_t timeout_ms) {
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
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
    : channel_(std::move(channel)),
      stub_(v1::AttentionService::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)) {}

grpc::Status AttentionClient::Attend(const v1::AttendRequest& request, v1::AttendResponse* response,
                                     const CallOptions& options) {
  grpc::ClientContext context;
  ConfigureContext(options, request.request_id(), &context);
  return stub_->Attend(&context, request, response);
}

grpc::Status AttentionClient::AttendStream(const v1::AttendRequest& request,
                                           v1::AttendResponse* response, const CallOptions& options,
                                           const StreamOptions& stream_options) {
  StreamPlan plan;
  if (grpc::Status status = MakeStreamPlan(request, stream_options.block_tokens, &plan);
      !status.ok()) {
    return status;
  }
  if (plan.header.request_id().empty()) plan.header.set_request_id(request.request_id());
  int64_t next_block = 0;
  OutputAssembler assembler(plan.header);
  const grpc::Status status = AttendStreamShared(
      plan.header,
      [&]() -> std::shared_ptr<const v1::TokenBlock> {
        if (next_block == plan.block_count) return nullptr;
        return std::make_shared<const v1::TokenBlock>(
            MakeTokenBlock(request, plan, next_block++ * plan.block_tokens));
      },
      {.on_block = [&](const OutputBlockView& block) { return assembler.AddBlock(block); },
       .on_message =
           [&](const v1::AttendStreamResponse& message) { return assembler.Add(message); }},
      options);
  if (!status.ok()) return status;
  return assembler.Finish(response);
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
  grpc::ClientContext context;
  ConfigureContext(options, header.request_id(), &context);
  // The same RPC as the generated stub's AttendStream, on ByteBuffers: a block is sent as slices
  // that point into its own q, k and v strings (TokenBlockBuffer), not serialized into a copy,
  // and an answer is parsed where it was received (client/answer_wire.h).
  const grpc::internal::RpcMethod method("/da.v1.AttentionService/AttendStream",
                                         grpc::internal::RpcMethod::BIDI_STREAMING, channel_);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel_.get(), method, &context));

  // Write on a thread of its own while this one reads: the server answers chunks while later
  // blocks are still arriving, and would otherwise fill both flow-control windows and leave both
  // sides waiting.
  std::thread writer([&] {
    v1::AttendStreamRequest first;
    *first.mutable_header() = header;
    grpc::Slice serialized(first.SerializeAsString());
    grpc::ByteBuffer buffer(&serialized, 1);
    if (!stream->Write(buffer)) return;  // The call is over; Finish() says why.
    while (std::shared_ptr<const v1::TokenBlock> block = next_block()) {
      buffer = TokenBlockBuffer(std::move(block));
      if (!stream->Write(buffer)) return;
    }
    stream->WritesDone();
  });

  grpc::Status answer_status;
  grpc::ByteBuffer buffer;
  std::vector<grpc::Slice> slices;
  std::vector<std::string_view> pieces;
  v1::AttendStreamResponse message;
  OutputBlockView block;
  while (stream->Read(&buffer)) {
    slices.clear();
    pieces.clear();
    if (grpc::Status dumped = buffer.Dump(&slices); !dumped.ok()) {
      answer_status = grpc::Status(grpc::StatusCode::INTERNAL,
                                   "cannot read an answer message: " + dumped.error_message());
    } else {
      for (const grpc::Slice& slice : slices) {
        pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
      }
      if (absl::Status parsed = ParseAnswer(pieces, &message, &block); !parsed.ok()) {
        answer_status = grpc::Status(
            grpc::StatusCode::INTERNAL,
            "the server's answer is not an AttendStreamResponse: " + std::string(parsed.message()));
      } else if (message.has_block()) {
        answer_status = answers.on_block(block);
      } else {
        answer_status = answers.on_message(message);
      }
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
  if (!answer_status.ok()) return answer_status;
  return call_status;
}

grpc::Status AttentionClient::GetServerInfo(v1::GetServerInfoResponse* response,
                                            const CallOptions& options) {
  grpc::ClientContext context;
  ConfigureContext(options, "", &context);
  return stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), response);
}

grpc::Status AttentionClient::WarmUp(const v1::WarmUpRequest& request, v1::WarmUpResponse* response,
                                     const CallOptions& options) {
  grpc::ClientContext context;
  ConfigureContext(options, "", &context);
  return stub_->WarmUp(&context, request, response);
}

grpc::Status AttentionClient::CheckHealth(
    const std::string& service, grpc::health::v1::HealthCheckResponse::ServingStatus* status,
    const CallOptions& options) {
  grpc::ClientContext context;
  ConfigureContext(options, "", &context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status call_status = health_stub_->Check(&context, request, &response);
  if (call_status.ok()) *status = response.status();
  return call_status;
}

}  // namespace da::client
