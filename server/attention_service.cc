#include "server/attention_service.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "server/attend_stream_reactor.h"
#include "server/conversion.h"
#include "server/request_record.h"
#include "server/status_conversion.h"

namespace da::server {
namespace {

// One unary Attend: the inputs are views of the request's bytes and the engine writes straight
// into the response's output bytes, so the server itself copies no tensor. Lifetime: gRPC keeps
// request and response alive until OnDone, which comes only after Finish, and Finish is called only
// once the engine has called back (or never started).
class AttendReactor final : public grpc::ServerUnaryReactor {
 public:
  AttendReactor(engine::Engine* engine, Metrics* metrics, grpc::CallbackServerContext* context,
                const v1::AttendRequest* request, v1::AttendResponse* response)
      : record_(metrics, "Attend", *context),
        context_(context),
        request_(request),
        response_(response) {
    record_.SetRequestIdField(request->request_id());
    absl::Status status = Submit(engine);
    if (!status.ok()) FinishWith(status, nullptr);
  }

  // The engine watches the deadline itself and reports DEADLINE_EXCEEDED, so only a cancellation
  // that is not the deadline's raises the flag.
  void OnCancel() override {
    if (!CancelledByDeadline(context_->deadline())) cancelled_.store(true);
  }
  void OnDone() override { delete this; }

 private:
  absl::Status Submit(engine::Engine* engine) {
    DA_ASSIGN_OR_RETURN(UnaryProblem problem, ProblemFromRequest(*request_));
    const engine::TensorView& q = problem.q;
    record_.SetProblem(
        {q.shape.batch, q.shape.seq_len, q.shape.heads, problem.k.shape.heads, q.shape.head_dim},
        q.dtype, problem.spec);
    record_.AddBytes(q.bytes + problem.k.bytes + problem.v.bytes, 0);
    // Checked here as well as in the engine so that an oversized request is refused before the
    // output is allocated.
    DA_RETURN_IF_ERROR(
        engine::ValidateProblem(q, problem.k, problem.v, problem.spec, engine->limits()));

    v1::Tensor* output = response_->mutable_output();
    output->set_dtype(request_->query().dtype());
    output->mutable_shape()->CopyFrom(request_->query().shape());
    std::string* bytes = output->mutable_data();
    bytes->resize(static_cast<size_t>(q.bytes));

    engine::RunRequest run;
    run.q = problem.q;
    run.k = problem.k;
    run.v = problem.v;
    run.spec = problem.spec;
    run.out = {q.dtype, q.shape, bytes->data(), q.bytes};
    run.request_id = record_.id();
    run.cancelled = &cancelled_;
    run.priority = request_->priority();
    run.deadline = SteadyDeadline(context_->deadline());
    engine->Submit(
        run, [this](absl::StatusOr<engine::ExecutionInfo> info) { OnComputed(std::move(info)); });
    return absl::OkStatus();
  }

  // Runs on an engine dispatcher thread.
  void OnComputed(absl::StatusOr<engine::ExecutionInfo> info) {
    if (!info.ok()) {
      response_->Clear();
      FinishWith(info.status(), nullptr);
      return;
    }
    record_.AddBytes(0, static_cast<int64_t>(response_->output().data().size()));
    ExecutionInfoToProto(*info, record_.id(), record_.ElapsedUs(), response_->mutable_info());
    FinishWith(absl::OkStatus(), &*info);
  }

  // The last thing this object does: OnDone (delete this) may follow at once on another thread.
  void FinishWith(const absl::Status& status, const engine::ExecutionInfo* info) {
    Finish(record_.Finish(status, info));
  }

  RequestRecord record_;
  grpc::CallbackServerContext* context_;
  const v1::AttendRequest* request_;
  v1::AttendResponse* response_;
  std::atomic<bool> cancelled_{false};
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Every shape is converted and checked against the limits before any is built, so a malformed
// request warms nothing; a shape the engine then refuses (e.g. an unsupported precision) stops
// the call after the shapes before it.
absl::Status WarmUpShapes(engine::Engine& engine, Metrics& metrics,
                          const v1::WarmUpRequest& request, v1::WarmUpResponse* response) {
  std::vector<WarmUpShape> shapes;
  for (int i = 0; i < request.shapes_size(); ++i) {
    const std::string field = absl::StrCat("shapes[", i, "]");
    absl::StatusOr<WarmUpShape> shape =
        ProblemFromHeader(request.shapes(i), absl::StrCat(field, ".dtype"));
    absl::Status valid = shape.status();
    if (valid.ok()) {
      valid = engine::ValidateShape(shape->shape, shape->dtype, shape->spec, engine.limits());
    }
    if (!valid.ok()) return absl::Status(valid.code(), absl::StrCat(field, ": ", valid.message()));
    shapes.push_back(*std::move(shape));
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    absl::StatusOr<engine::WarmUpResult> result = WarmUpPlan(engine, metrics, shapes[i]);
    if (!result.ok()) {
      return absl::Status(result.status().code(),
                          absl::StrCat("shapes[", i, "]: ", result.status().message()));
    }
    WarmUpResultToProto(*result, response->add_results());
  }
  return absl::OkStatus();
}

}  // namespace

AttentionService::AttentionService(engine::Engine* engine, Metrics* metrics, ServiceOptions options)
    : engine_(engine),
      metrics_(metrics),
      options_(std::move(options)),
      stream_buffers_(options_.stream_buffer_pool_bytes),
      build_features_(engine::BuildFeatures()) {}

grpc::ServerUnaryReactor* FinishedWith(grpc::CallbackServerContext* context,
                                       const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

bool AttentionService::RefusedWhileDraining(const char* method,
                                            grpc::CallbackServerContext& context,
                                            grpc::Status* status) {
  if (!draining_.load()) return false;
  RequestRecord record(metrics_, method, context);
  *status = record.Finish(absl::UnavailableError("draining: the server is shutting down and takes "
                                                 "no new calls; send this one to another replica"),
                          nullptr);
  return true;
}

grpc::ServerUnaryReactor* AttentionService::Attend(grpc::CallbackServerContext* context,
                                                   const v1::AttendRequest* request,
                                                   v1::AttendResponse* response) {
  if (grpc::Status refused; RefusedWhileDraining("Attend", *context, &refused)) {
    return FinishedWith(context, refused);
  }
  return new AttendReactor(engine_, metrics_, context, request, response);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttentionService::AttendStream(
    grpc::CallbackServerContext* context) {
  if (grpc::Status refused; RefusedWhileDraining("AttendStream", *context, &refused)) {
    return new RefusedStreamReactor(refused);
  }
  const StreamSettings settings{.max_message_bytes = options_.max_message_bytes,
                                .pipeline_depth = options_.stream_pipeline_depth,
                                .min_chunk_tokens = options_.stream_min_chunk_tokens,
                                .buffers = &stream_buffers_};
  return new AttendStreamReactor(engine_, metrics_, settings, context);
}

// Cheap and non-blocking, so it is answered on the gRPC thread.
grpc::ServerUnaryReactor* AttentionService::GetServerInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetServerInfoRequest*,
                                                          v1::GetServerInfoResponse* response) {
  if (grpc::Status refused; RefusedWhileDraining("GetServerInfo", *context, &refused)) {
    return FinishedWith(context, refused);
  }
  const auto start = std::chrono::steady_clock::now();
  response->set_version(options_.version);
  for (const std::string& feature : build_features_) response->add_build_features(feature);
  for (const engine::DeviceInfo& device : engine_->devices()) {
    DeviceInfoToProto(device, response->add_devices());
  }
  v1::Limits* limits = response->mutable_limits();
  limits->set_max_message_bytes(options_.max_message_bytes);
  limits->set_max_request_bytes(engine_->limits().max_request_bytes);
  limits->set_max_tokens(engine_->limits().max_tokens);
  PlanCacheStatsToProto(engine_->plan_cache_stats(), response->mutable_plan_cache());

  metrics_->RequestFinished("GetServerInfo", grpc::StatusCode::OK, SecondsSince(start));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

// Building a plan allocates and touches its workspace (milliseconds to seconds), so it runs on
// the warm-up worker, which finishes the RPC. With --auth-token-file it needs a token like every
// AttentionService method (AuthenticatedAttentionService), since it makes the server allocate.
grpc::ServerUnaryReactor* AttentionService::WarmUp(grpc::CallbackServerContext* context,
                                                   const v1::WarmUpRequest* request,
                                                   v1::WarmUpResponse* response) {
  if (grpc::Status refused; RefusedWhileDraining("WarmUp", *context, &refused)) {
    return FinishedWith(context, refused);
  }
  const auto start = std::chrono::steady_clock::now();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // gRPC keeps context, request and response alive until Finish.
  warm_up_worker_.Post([this, context, request, response, reactor, start] {
    absl::Status status = context->IsCancelled()
                              ? absl::CancelledError("cancelled before the warm-up started")
                              : WarmUpShapes(*engine_, *metrics_, *request, response);
    if (status.ok()) {
      PlanCacheStatsToProto(engine_->plan_cache_stats(), response->mutable_plan_cache());
    } else {
      response->Clear();
      spdlog::warn("request id={} method=WarmUp shapes={} code={} error=\"{}\"",
                   RequestIdOf(*context), request->shapes_size(),
                   absl::StatusCodeToString(status.code()), std::string(status.message()));
    }
    const grpc::Status grpc_status = ToGrpcStatus(status);
    metrics_->RequestFinished("WarmUp", grpc_status.error_code(), SecondsSince(start));
    reactor->Finish(grpc_status);
  });
  return reactor;
}

}  // namespace da::server
