#include "server/authenticated_service.h"

#include <spdlog/spdlog.h>

#include "server/request_record.h"

namespace da::server {

grpc::Status AuthenticatedAttentionService::Authenticate(const char* method,
                                                         grpc::CallbackServerContext& context) {
  grpc::Status status = authenticator_->Check(context);
  if (!status.ok()) {
    spdlog::warn("request id={} method={} peer={} code=UNAUTHENTICATED error=\"{}\"",
                 RequestIdOf(context), method, context.peer(), status.error_message());
    if (metrics_ != nullptr) {
      metrics_->RequestRefusedBeforeRunning(method, status.error_code());
      metrics_->RequestRejected("unauthenticated");
    }
  }
  return status;
}

grpc::ServerUnaryReactor* AuthenticatedAttentionService::Attend(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
    grpc::ByteBuffer* response) {
  grpc::Status status = Authenticate("Attend", *context);
  if (!status.ok()) return FinishedWith(context, status);
  return service_->Attend(context, request, response);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>*
AuthenticatedAttentionService::AttendStream(grpc::CallbackServerContext* context) {
  grpc::Status status = Authenticate("AttendStream", *context);
  if (!status.ok()) return new RefusedStreamReactor(status);
  return service_->AttendStream(context);
}

grpc::ServerUnaryReactor* AuthenticatedAttentionService::GetServerInfo(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
    grpc::ByteBuffer* response) {
  grpc::Status status = Authenticate("GetServerInfo", *context);
  if (!status.ok()) return FinishedWith(context, status);
  return service_->GetServerInfo(context, request, response);
}

grpc::ServerUnaryReactor* AuthenticatedAttentionService::WarmUp(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
    grpc::ByteBuffer* response) {
  grpc::Status status = Authenticate("WarmUp", *context);
  if (!status.ok()) return FinishedWith(context, status);
  return service_->WarmUp(context, request, response);
}

}  // namespace da::server
