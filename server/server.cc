#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <climits>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "server/authenticated_service.h"

#ifndef DA_VERSION
#define DA_VERSION "unknown"
#endif

namespace da::server {

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (options.max_message_bytes < 1 || options.max_message_bytes > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes is ", options.max_message_bytes, "; must be in [1, ", INT_MAX, "]"));
  }
  if (options.max_concurrent_streams < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_concurrent_streams is ", options.max_concurrent_streams, "; must be at least 1"));
  }
  // Files first: a bad certificate or token file fails before the engine is built.
  DA_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                      MakeServerCredentials(options.security));
  std::unique_ptr<Server> server(new Server());
  if (!options.security.auth_token_file.empty()) {
    DA_ASSIGN_OR_RETURN(server->authenticator_,
                        BearerTokenAuthenticator::FromFile(options.security.auth_token_file));
  }

  engine::EngineOptions engine_options;
  engine_options.threads = options.threads;
  engine_options.backend = options.backend;
  engine_options.limits.max_request_bytes = options.max_request_bytes;
  engine_options.limits.max_tokens = options.max_tokens;
  engine_options.plan_cache_bytes = options.plan_cache_bytes;
  engine_options.precision.fallback = options.precision_fallback;
  DA_ASSIGN_OR_RETURN(server->engine_, engine::Engine::Create(engine_options));
  DA_ASSIGN_OR_RETURN(server->metrics_, Metrics::Create(options.metrics_address));
  server->metrics_->SetPlanCacheSource(
      [engine = server->engine_.get()] { return engine->plan_cache_stats(); });
  server->warmup_ = options.warmup;
  server->service_ = std::make_unique<AttentionService>(
      server->engine_.get(), server->metrics_.get(),
      ServiceOptions{.max_message_bytes = options.max_message_bytes, .version = DA_VERSION});

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  if (server->authenticator_ != nullptr) {
    server->guarded_ = std::make_unique<AuthenticatedAttentionService>(
        server->service_.get(), server->authenticator_.get(), server->metrics_.get());
    builder.RegisterService(server->guarded_.get());
  } else {
    builder.RegisterService(server->service_.get());
  }
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen_address));
  }
  grpc::HealthCheckServiceInterface* health = server->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kServiceName, server->warmup_.empty());
  return server;
}

absl::Status Server::WarmUp() {
  for (size_t i = 0; i < warmup_.size(); ++i) {
    absl::StatusOr<engine::WarmUpResult> result = WarmUpPlan(*engine_, *metrics_, warmup_[i]);
    if (!result.ok()) {
      return absl::Status(result.status().code(),
                          absl::StrCat("entry ", i, " (", DescribeWarmUpShape(warmup_[i]),
                                       "): ", result.status().message()));
    }
  }
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  if (!shut_down_ && server_ != nullptr) {
    server_->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  }
  return absl::OkStatus();
}

Server::~Server() { Shutdown(std::chrono::milliseconds(0)); }

void Server::Shutdown(std::chrono::milliseconds drain_timeout) {
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  if (shut_down_ || server_ == nullptr) return;
  shut_down_ = true;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  health->SetServingStatus(kServiceName, false);
  health->SetServingStatus("", false);
  // New calls are refused at once; calls in flight run to completion until the deadline, then
  // are cancelled (their reactors see OnCancel, the engine stops them). Returns when every
  // reactor is done, so no engine callback can touch the service afterwards.
  server_->Shutdown(std::chrono::system_clock::now() + drain_timeout);
  // Scrapes keep the plan cache's last statistics; the engine's destructor finishes anything
  // still queued.
  metrics_->SetPlanCacheSource(nullptr);
  engine_.reset();
}

}  // namespace da::server
