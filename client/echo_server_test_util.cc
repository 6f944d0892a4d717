#include "client/echo_server_test_util.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string_view>
#include <thread>

#include "da/v1/attention.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace da::client {
namespace {

std::string RequestId(const grpc::ServerContext& context) {
  auto it = context.client_metadata().find("x-request-id");
  if (it == context.client_metadata().end()) return "";
  return std::string(it->second.data(), it->second.size());
}

// Holds the call until the client gives up (deadline or cancellation), at most 10 s.
grpc::Status WaitForClientToGiveUp(grpc::ServerContext* context) {
  const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!context->IsCancelled() && std::chrono::steady_clock::now() < limit) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "client gave up");
}

// The real server refuses a priority above the caller's cap; the echo's cap is kEchoMaxPriority.
grpc::Status CheckPriority(int32_t priority) {
  if (priority <= kEchoMaxPriority) return grpc::Status::OK;
  return grpc::Status(
      grpc::StatusCode::PERMISSION_DENIED,
      "priority " + std::to_string(priority) + " is above " + std::to_string(kEchoMaxPriority));
}

}  // namespace

class EchoServer::AttentionService final : public v1::AttentionService::Service {
 public:
  explicit AttentionService(int64_t reported_message_bytes)
      : reported_message_bytes_(reported_message_bytes) {}

  int calls(const std::string& request_id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = calls_.find(request_id);
    return it == calls_.end() ? 0 : it->second;
  }
  int streams(const std::string& request_id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = streams_.find(request_id);
    return it == streams_.end() ? 0 : it->second;
  }
  int64_t largest_block_bytes(const std::string& request_id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = largest_block_bytes_.find(request_id);
    return it == largest_block_bytes_.end() ? 0 : it->second;
  }
  int info_calls() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return info_calls_;
  }
  std::set<std::string> peers(const std::string& request_id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = peers_.find(request_id);
    return it == peers_.end() ? std::set<std::string>{} : it->second;
  }

 private:
  // Counts the call, and refuses it as the id asks ("refuse-N...", "unavailable"): OK otherwise.
  grpc::Status Refusal(grpc::ServerContext* context, const std::string& id) {
    int made = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      made = ++calls_[id];
      peers_[id].insert(context->peer());
    }
    if (id == "unavailable") return grpc::Status(grpc::StatusCode::UNAVAILABLE, "unavailable");
    constexpr std::string_view kRefuse = "refuse-";
    if (id.rfind(kRefuse, 0) != 0) return grpc::Status::OK;
    if (made > std::atoi(id.c_str() + kRefuse.size())) return grpc::Status::OK;
    context->AddTrailingMetadata("da-refused", "draining");
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining: refusal " + std::to_string(made));
  }

  grpc::Status Attend(grpc::ServerContext* context, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override {
    if (RequestId(*context) == "wait") return WaitForClientToGiveUp(context);
    if (grpc::Status refused = Refusal(context, RequestId(*context)); !refused.ok()) {
      return refused;
    }
    if (grpc::Status refused = CheckPriority(request->priority()); !refused.ok()) return refused;
    *response->mutable_output() = request->query();
    response->mutable_info()->set_request_id(RequestId(*context));
    response->mutable_info()->set_backend("echo");
    return grpc::Status::OK;
  }

  grpc::Status AttendStream(grpc::ServerContext* context,
                            grpc::ServerReaderWriter<v1::AttendStreamResponse,
                                                     v1::AttendStreamRequest>* stream) override {
    v1::AttendStreamRequest request;
    if (!stream->Read(&request) || !request.has_header()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "expected a header first");
    }
    const v1::StreamHeader header = request.header();
    if (header.request_id() == "wait") return WaitForClientToGiveUp(context);
    if (grpc::Status refused = Refusal(context, header.request_id()); !refused.ok()) {
      return refused;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++streams_[header.request_id()];
    }
    if (grpc::Status refused = CheckPriority(header.priority()); !refused.ok()) return refused;
    v1::AttendStreamResponse response;
    response.mutable_header()->set_request_id(header.request_id());
    response.mutable_header()->set_dtype(header.dtype());
    for (int64_t dim : {header.batch(), header.seq_len(), header.heads(), header.head_dim()}) {
      response.mutable_header()->add_shape(dim);
    }
    stream->Write(response);
    while (stream->Read(&request)) {
      if (!request.has_block()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "expected token blocks");
      }
      {
        const v1::TokenBlock& in = request.block();
        const int64_t bytes =
            static_cast<int64_t>(in.query().size() + in.key().size() + in.value().size());
        std::lock_guard<std::mutex> lock(mutex_);
        int64_t& largest = largest_block_bytes_[header.request_id()];
        largest = std::max(largest, bytes);
      }
      v1::OutputBlock& block = *response.mutable_block();
      block.set_token_start(request.block().token_start() +
                            (header.request_id() == "bad-block" ? 1 : 0));
      block.set_token_count(request.block().token_count());
      *block.mutable_output() = std::move(*request.mutable_block()->mutable_query());
      stream->Write(response);
    }
    response.mutable_trailer()->mutable_info()->set_request_id(RequestId(*context));
    response.mutable_trailer()->mutable_info()->set_backend("echo");
    stream->Write(response);
    return grpc::Status::OK;
  }

  grpc::Status GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                             v1::GetServerInfoResponse* response) override {
    response->set_version("echo-1");
    v1::DeviceInfo* device = response->add_devices();
    device->set_id("cpu:0");
    device->set_kind("cpu");
    device->add_precisions(v1::PRECISION_FP32);
    response->mutable_limits()->set_max_priority(kEchoMaxPriority);
    response->mutable_limits()->set_max_message_bytes(reported_message_bytes_);
    std::lock_guard<std::mutex> lock(mutex_);
    ++info_calls_;
    return grpc::Status::OK;
  }

  const int64_t reported_message_bytes_;
  mutable std::mutex mutex_;
  std::map<std::string, int> calls_;                    // Guarded by mutex_.
  std::map<std::string, int> streams_;                  // Guarded by mutex_.
  std::map<std::string, int64_t> largest_block_bytes_;  // Guarded by mutex_.
  int info_calls_ = 0;                                  // Guarded by mutex_.
  std::map<std::string, std::set<std::string>> peers_;  // Guarded by mutex_.
};

class EchoServer::HealthService final : public grpc::health::v1::Health::Service {
  grpc::Status Check(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override {
    if (request->service().empty()) {
      response->set_status(grpc::health::v1::HealthCheckResponse::SERVING);
    } else if (request->service() == "da.v1.AttentionService") {
      response->set_status(grpc::health::v1::HealthCheckResponse::NOT_SERVING);
    } else {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service " + request->service());
    }
    return grpc::Status::OK;
  }
};

EchoServer::EchoServer(int64_t max_message_bytes)
    : attention_(std::make_unique<AttentionService>(max_message_bytes)),
      health_(std::make_unique<HealthService>()) {
  const int message_bytes = max_message_bytes > 0 ? static_cast<int>(max_message_bytes) : 1 << 30;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(message_bytes);
  builder.SetMaxSendMessageSize(message_bytes);
  builder.RegisterService(attention_.get());
  builder.RegisterService(health_.get());
  server_ = builder.BuildAndStart();
  address_ = "127.0.0.1:" + std::to_string(port);
}

EchoServer::~EchoServer() {
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

int EchoServer::calls(const std::string& request_id) const { return attention_->calls(request_id); }

int EchoServer::streams(const std::string& request_id) const {
  return attention_->streams(request_id);
}

int64_t EchoServer::largest_block_bytes(const std::string& request_id) const {
  return attention_->largest_block_bytes(request_id);
}

int EchoServer::info_calls() const { return attention_->info_calls(); }

std::set<std::string> EchoServer::peers(const std::string& request_id) const {
  return attention_->peers(request_id);
}

}  // namespace da::client
