// AttentionService behind bearer-token authentication: every method checks the call's
// `authorization` metadata before the wrapped service sees the call, and answers UNAUTHENTICATED
// (counted in da_requests_total and da_requests_rejected_total{reason="unauthenticated"}, not in
// da_request_duration_seconds, and logged without the token) when it is missing or wrong.
//
//   AttentionService service(engine, metrics, options);
//   AuthenticatedAttentionService guarded(&service, authenticator.get(), metrics);
//   builder.RegisterService(&guarded);  // Not `service`: it would be reachable without a token.
//
// Health and reflection are separate services and stay open. A method of the proto that this
// class does not forward answers UNIMPLEMENTED, so a new RPC is closed until it is added here.
// The wrapped service, the authenticator and the metrics must outlive the grpc::Server.
#pragma once

#include "da/v1/attention.grpc.pb.h"
#include "server/attention_service.h"
#include "server/metrics.h"
#include "server/security.h"

namespace da::server {

class AuthenticatedAttentionService final : public AttentionServiceBase {
 public:
  AuthenticatedAttentionService(AttentionServiceBase* service,
                                const BearerTokenAuthenticator* authenticator, Metrics* metrics)
      : service_(service), authenticator_(authenticator), metrics_(metrics) {}

  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttendStream(
      grpc::CallbackServerContext* context) override;

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response) override;

  grpc::ServerUnaryReactor* WarmUp(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;

 private:
  // OK, or the UNAUTHENTICATED status after counting and logging the refusal.
  grpc::Status Authenticate(const char* method, grpc::CallbackServerContext& context);

  AttentionServiceBase* service_;
  const BearerTokenAuthenticator* authenticator_;
  Metrics* metrics_;
};

}  // namespace da::server
