#include "server/attention_service.h"

#include <google/protobuf/io/coded_stream.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"
#include "server/attend_stream_reactor.h"
#include "server/conversion.h"
#include "server/request_record.h"
#include "server/status_conversion.h"

namespace da::server {
namespace {

// Bytes a unary answer's ExecutionInfo may take beyond the request id: the reason string, backend,
// devices and a dozen varints come to about 150 bytes; 512 leaves room.
constexpr int64_t kInfoBytesAllowance = 512;

int64_t VarintBytes(uint64_t value) {
  return static_cast<int64_t>(google::protobuf::io::CodedOutputStream::VarintSize64(value));
}

// The size of the AttendResponse that answers request with output_bytes of output: the output
// tensor exactly (its dtype, shape, data and their framing), the execution info bounded; the
// info carries the call's id (id_bytes: the record's, from the metadata or the request).
int64_t UnaryAnswerBytes(const v1::AttendRequest& request, v1::DType output_dtype,
                         int64_t output_bytes, size_t id_bytes) {
  v1::Tensor output;
  output.set_dtype(output_dtype);
  *output.mutable_shape() = request.query().shape();
  const int64_t tensor = static_cast<int64_t>(output.ByteSizeLong()) + 1 +
                         VarintBytes(static_cast<uint64_t>(output_bytes)) + output_bytes;
  const int64_t info = kInfoBytesAllowance + static_cast<int64_t>(id_bytes) + 32;
  return 1 + VarintBytes(static_cast<uint64_t>(tensor)) + tensor + 1 + VarintBytes(info) + info;
}

// One unary Attend. The inputs are views of the parsed request's bytes and the engine writes
// straight into the response's output bytes; the response is serialized into gRPC's answer
// buffer once (the copy gRPC itself makes for a generated method). Lifetime: gRPC keeps the
// buffers alive until OnDone, which comes only after Finish, and Finish is called only once the
// engine has called back (or never started).
//
// The answer, once computed, waits on the client: gRPC sends it as the client's flow-control
// window allows, and a client that never reads (a raw HTTP/2 client granting no window) would
// hold it for as long as its connection lives. So from the moment it exists until gRPC is done
// with it (OnDone) it is counted against the memory budget (Engine::HoldMemory), and the stream
// watch ends the call when the client has not taken it within the idle limit
// (--stream-idle-timeout-ms, the limit a stream's client has for each message).
class AttendReactor final : public grpc::ServerUnaryReactor, public StreamWatch::Watched {
 public:
  AttendReactor(engine::Engine* engine, Metrics* metrics, StreamWatch* watch,
                int64_t max_message_bytes, const PriorityCap* priority_cap,
                const DrainCutOff* drain,
                const std::function<void(grpc::CallbackServerContext&)>* before_answer,
                LiveCalls* live_calls, grpc::CallbackServerContext* context,
                const grpc::ByteBuffer* body, grpc::ByteBuffer* answer)
      : live_(live_calls),
        record_(metrics, "Attend", *context),
        engine_(engine),
        watch_(watch),
        metrics_(metrics),
        max_message_bytes_(max_message_bytes),
        priority_cap_(priority_cap),
        drain_(drain),
        before_answer_(before_answer),
        context_(context),
        answer_(answer) {
    absl::Status status = ParseUnaryRequest(*body, "Attend", &request_);
    // The request's bytes are in request_ now: gRPC's copy would otherwise stay until OnDone,
    // uncounted (the engine counts q, k and v once), also while the answer waits on the client.
    const_cast<grpc::ByteBuffer*>(body)->Clear();
    if (status.ok()) {
      record_.SetRequestIdField(request_.request_id());
      status = Submit(engine);
    }
    if (!status.ok()) FinishWith(status, nullptr);
  }

  // The engine watches the deadline itself and reports DEADLINE_EXCEEDED, so only a cancellation
  // that is not the deadline's raises the flag.
  void OnCancel() override {
    if (CancelledByDeadline(ClientDeadline(*context_))) return;
    cut_off_by_drain_.store(drain_->Passed());  // Before the flag: OnComputed reads it after.
    cancelled_.store(true);
  }
  // A call finished OK and then cancelled lost its answer on the way (the client went away, the
  // transport refused the message, or the client took too long to read it): counted and logged
  // with what it was.
  void OnDone() override {
    bool idle_ended = false;
    if (watched_) {
      watch_->Remove(this);  // Waits for a CheckIdle in progress; none starts afterwards.
      std::unique_lock<std::mutex> lock(idle_mu_);
      idle_cv_.wait(lock, [&] { return !end_idle_pending_; });
      idle_ended = idle_ended_;
    }
    if (finished_ok_ && context_->IsCancelled()) {
      const std::string why = idle_ended
                                  ? absl::StrFormat(
                                        "the client had not read it %d ms after it was ready, and "
                                        "the call was cancelled (--stream-idle-timeout-ms %d)",
                                        idle_timeout_ms_, idle_timeout_ms_)
                                  : std::string("the call was cancelled while it was sent");
      spdlog::warn(
          "request id={} method=Attend code=CANCELLED error=\"the answer ({} bytes) was computed "
          "but not delivered: {}\"",
          record_.id(), answer_bytes_, why);
      metrics_->AnswerUndelivered("Attend");
    }
    delete this;  // Releases answer_held_.
  }

  // StreamWatch::Watched, from just before Finish(OK) until OnDone: the answer waits on the client.
  bool CheckIdle(StreamWatch::Clock::time_point now,
                 std::chrono::milliseconds idle_timeout) override {
    std::lock_guard<std::mutex> lock(idle_mu_);
    if (idle_ended_ || now - answered_at_ <= idle_timeout) return false;
    idle_ended_ = true;
    end_idle_pending_ = true;  // OnDone waits for EndIdle.
    idle_timeout_ms_ = idle_timeout.count();
    return true;
  }
  void EndIdle() override {
    context_->TryCancel();  // The send returns, and OnDone follows.
    std::lock_guard<std::mutex> lock(idle_mu_);
    end_idle_pending_ = false;
    idle_cv_.notify_all();
  }

 private:
  absl::Status Submit(engine::Engine* engine) {
    DA_ASSIGN_OR_RETURN(UnaryProblem problem, ProblemFromRequest(request_));
    const engine::TensorView& q = problem.q;
    record_.SetProblem(
        {q.shape.batch, q.shape.seq_len, q.shape.heads, problem.k.shape.heads, q.shape.head_dim},
        q.dtype, problem.spec);
    record_.AddBytes(q.bytes + problem.k.bytes + problem.v.bytes, 0);
    DA_RETURN_IF_ERROR(priority_cap_->Check(*context_, "priority", request_.priority()));
    // Checked here as well as in the engine so that an oversized request is refused before the
    // output is allocated.
    DA_RETURN_IF_ERROR(engine::ValidateProblem(q, problem.k, problem.v, problem.spec,
                                               engine->limits(), problem.out_dtype));
    // The answer's size is known now: one that could not be sent is refused before any compute.
    const int64_t out_bytes = q.shape.elements() * engine::DTypeSize(problem.out_dtype);
    answer_bytes_ =
        UnaryAnswerBytes(request_, DTypeToProto(problem.out_dtype), out_bytes, record_.id().size());
    if (answer_bytes_ > max_message_bytes_) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "the answer would take %d bytes (output %s of %s: %d bytes) but the message limit "
          "(--max-message-bytes) is %d; send this request with AttendStream, which returns the "
          "output in blocks and has no size limit",
          answer_bytes_, q.shape.ToString(), engine::DTypeName(problem.out_dtype), out_bytes,
          max_message_bytes_));
    }

    v1::Tensor* output = response_.mutable_output();
    output->set_dtype(DTypeToProto(problem.out_dtype));
    output->mutable_shape()->CopyFrom(request_.query().shape());
    std::string* bytes = output->mutable_data();
    bytes->resize(static_cast<size_t>(out_bytes));

    engine::RunRequest run;
    run.q = problem.q;
    run.k = problem.k;
    run.v = problem.v;
    run.spec = problem.spec;
    run.out = {problem.out_dtype, q.shape, bytes->data(), out_bytes};
    run.request_id = record_.id();
    run.cancelled = &cancelled_;
    run.priority = request_.priority();
    run.deadline = SteadyDeadline(ClientDeadline(*context_));
    engine->Submit(
        run, [this](absl::StatusOr<engine::ExecutionInfo> info) { OnComputed(std::move(info)); });
    return absl::OkStatus();
  }

  // Runs on an engine dispatcher thread.
  void OnComputed(absl::StatusOr<engine::ExecutionInfo> info) {
    if (!info.ok()) {
      // Stopped by the drain's cut-off, not by the client (whose cancel raised the same flag):
      // said so, with the engine's payloads (its reject reason) kept.
      const bool cut_off = absl::IsCancelled(info.status()) && cut_off_by_drain_.load();
      FinishWith(cut_off ? Prefixed(info.status(),
                                    "cut off by the server's drain (--drain-timeout-ms ran out): ")
                         : info.status(),
                 nullptr);
      return;
    }
    record_.AddBytes(0, static_cast<int64_t>(response_.output().data().size()));
    ExecutionInfoToProto(*info, record_.id(), record_.ElapsedUs(), response_.mutable_info());
    if (absl::Status serialized = SerializeUnaryResponse(response_, answer_); !serialized.ok()) {
      FinishWith(serialized, nullptr);
      return;
    }
    // The answer buffer holds its own copy, and the inputs are used: only the answer stays while
    // it waits on the client (HoldMemory below counts it). Swapped, not cleared: Clear() keeps
    // the strings' capacity.
    v1::AttendResponse().Swap(&response_);
    v1::AttendRequest().Swap(&request_);
    if (before_answer_ != nullptr) (*before_answer_)(*context_);
    finished_ok_ = true;
    // From here the answer waits on the client (see the class comment).
    answer_held_ = engine_->HoldMemory(static_cast<int64_t>(answer_->Length()));
    answered_at_ = StreamWatch::Clock::now();
    watched_ = true;
    watch_->Add(this);
    FinishWith(absl::OkStatus(), &*info);
  }

  // The last thing this object does: OnDone (delete this) may follow at once on another thread.
  void FinishWith(const absl::Status& status, const engine::ExecutionInfo* info) {
    Finish(record_.Finish(status, info));
  }

  LiveCalls::Token live_;  // Held until OnDone deletes the reactor.
  RequestRecord record_;
  engine::Engine* engine_;
  StreamWatch* watch_;
  Metrics* metrics_;
  const int64_t max_message_bytes_;
  const PriorityCap* const priority_cap_;
  const DrainCutOff* const drain_;
  const std::function<void(grpc::CallbackServerContext&)>* before_answer_;  // Test hook.
  grpc::CallbackServerContext* context_;
  grpc::ByteBuffer* answer_;
  v1::AttendRequest request_;
  v1::AttendResponse response_;
  int64_t answer_bytes_ = 0;
  bool finished_ok_ = false;  // Set before Finish; read in OnDone, which comes after it.
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> cut_off_by_drain_{false};  // Set by OnCancel once the drain's cut-off passed.
  // The answer, from when it exists until OnDone.
  engine::MemoryReservation answer_held_;
  bool watched_ = false;  // In the watch; set before Finish, read in OnDone.
  StreamWatch::Clock::time_point answered_at_;
  std::mutex idle_mu_;
  std::condition_variable idle_cv_;
  bool idle_ended_ = false;        // Guarded by idle_mu_.
  bool end_idle_pending_ = false;  // Guarded by idle_mu_: CheckIdle said true, EndIdle not done.
  int64_t idle_timeout_ms_ = 0;    // Guarded by idle_mu_.
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Shapes one WarmUp call may name: a deployment warms a handful; thousands would hold the warm-up
// worker (and a drain) for as many plan builds.
constexpr int kMaxWarmUpShapes = 256;

// The WarmUp call's reactor: a call that is cancelled (its client gave up, its deadline passed,
// the server is shutting down) stops the plan build in progress and the shapes after it.
class WarmUpReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit WarmUpReactor(LiveCalls* live_calls) : live_(live_calls) {}
  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override { delete this; }
  // Outlives the reactor: the worker's job reads it until it calls Finish.
  std::shared_ptr<const std::atomic<bool>> cancelled() const { return cancelled_; }

 private:
  LiveCalls::Token live_;
  const std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
};

// Every shape is converted and checked against the limits before any is built, so a malformed
// request warms nothing; a shape the engine then refuses (e.g. an unsupported precision) stops
// the call after the shapes before it.
absl::Status WarmUpShapes(engine::Engine& engine, Metrics& metrics,
                          const WarmUpTransport& transport, const v1::WarmUpRequest& request,
                          const std::atomic<bool>& stop, v1::WarmUpResponse* response) {
  if (request.shapes_size() > kMaxWarmUpShapes) {
    return absl::InvalidArgumentError(absl::StrCat("shapes holds ", request.shapes_size(),
                                                   " shapes; one WarmUp call takes at most ",
                                                   kMaxWarmUpShapes));
  }
  std::vector<WarmUpShape> shapes;
  for (int i = 0; i < request.shapes_size(); ++i) {
    const std::string field = absl::StrCat("shapes[", i, "]");
    absl::StatusOr<WarmUpShape> shape =
        ProblemFromHeader(request.shapes(i), absl::StrCat(field, ".dtype"));
    absl::Status valid = shape.status();
    if (valid.ok()) {
      valid = engine::ValidateShape(shape->shape, shape->dtype, shape->spec, engine.limits(),
                                    shape->out_dtype);
    }
    if (!valid.ok()) return Prefixed(valid, absl::StrCat(field, ": "));
    shapes.push_back(*std::move(shape));
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (stop.load()) {
      return absl::CancelledError(
          absl::StrCat("cancelled after warming ", i, " of ", shapes.size(), " shapes"));
    }
    absl::StatusOr<engine::WarmUpResult> result =
        WarmUpPlan(engine, metrics, shapes[i], transport, &stop);
    if (!result.ok()) {
      return Prefixed(result.status(), absl::StrCat("shapes[", i, "]: "));
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
      client_quota_(options_.max_client_stream_bytes),
      priority_cap_(options_.max_priority, options_.authenticator),
      stream_watch_(std::chrono::milliseconds(options_.stream_idle_timeout_ms)),
      build_features_(engine::BuildFeatures()) {}

absl::Status ParseUnaryRequest(const grpc::ByteBuffer& body, std::string_view method,
                               google::protobuf::Message* message) {
  grpc::ByteBuffer copy(body);  // Shares the slices; the reader needs a mutable buffer.
  grpc::ProtoBufferReader reader(&copy);
  if (!message->ParseFromZeroCopyStream(&reader)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the request body (%d bytes) is not a %s: truncated, malformed, or a string field "
        "that is not valid UTF-8",
        method, body.Length(), message->GetTypeName()));
  }
  return absl::OkStatus();
}

absl::Status SerializeUnaryResponse(const google::protobuf::Message& message,
                                    grpc::ByteBuffer* out) {
  bool own_buffer = false;
  const grpc::Status serialized =
      grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, out, &own_buffer);
  if (!serialized.ok()) {
    return absl::InternalError("cannot serialize the answer: " + serialized.error_message());
  }
  return absl::OkStatus();
}

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
  // Tells clients that nothing was read or computed, so the call may be sent again as it was.
  context.AddTrailingMetadata(std::string(kRefusedMetadata), std::string(kRefusedDraining));
  *status = record.Finish(absl::UnavailableError("draining: the server is shutting down and takes "
                                                 "no new calls; send this one to another replica"),
                          nullptr);
  return true;
}

grpc::ServerUnaryReactor* AttentionService::Attend(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* request,
                                                   grpc::ByteBuffer* response) {
  const LiveCalls::Token entering(&live_calls_);  // Until the reactor holds its own.
  if (grpc::Status refused; RefusedWhileDraining("Attend", *context, &refused)) {
    return FinishedWith(context, refused);
  }
  return new AttendReactor(engine_, metrics_, &stream_watch_, options_.max_message_bytes,
                           &priority_cap_, &drain_cut_off_,
                           options_.before_unary_answer ? &options_.before_unary_answer : nullptr,
                           &live_calls_, context, request, response);
}

grpc::ServerUnaryReactor* AttentionService::RefuseUnparsable(const char* method,
                                                             grpc::CallbackServerContext* context,
                                                             const absl::Status& status) {
  RequestRecord record(metrics_, method, *context);
  return FinishedWith(context, record.Finish(status, nullptr));
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttentionService::AttendStream(
    grpc::CallbackServerContext* context) {
  const LiveCalls::Token entering(&live_calls_);  // Until the reactor holds its own.
  if (grpc::Status refused; RefusedWhileDraining("AttendStream", *context, &refused)) {
    return new RefusedStreamReactor(refused);
  }
  const StreamSettings settings{.max_message_bytes = options_.max_message_bytes,
                                .pipeline_depth = options_.stream_pipeline_depth,
                                .min_chunk_tokens = options_.stream_min_chunk_tokens,
                                .buffers = &stream_buffers_,
                                .watch = &stream_watch_,
                                .quota = &client_quota_,
                                .client_by_token = options_.client_by_token,
                                .priority_cap = &priority_cap_,
                                .progress_log_ms = options_.stream_progress_log_ms,
                                .drain = &drain_cut_off_,
                                .live_calls = &live_calls_};
  return new AttendStreamReactor(engine_, metrics_, settings, context);
}

// Cheap and non-blocking, so it is answered on the gRPC thread.
grpc::ServerUnaryReactor* AttentionService::GetServerInfo(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* request,
                                                          grpc::ByteBuffer* answer) {
  if (grpc::Status refused; RefusedWhileDraining("GetServerInfo", *context, &refused)) {
    return FinishedWith(context, refused);
  }
  v1::GetServerInfoRequest parsed;
  if (absl::Status status = ParseUnaryRequest(*request, "GetServerInfo", &parsed); !status.ok()) {
    return RefuseUnparsable("GetServerInfo", context, status);
  }
  const auto start = std::chrono::steady_clock::now();
  v1::GetServerInfoResponse reply;
  v1::GetServerInfoResponse* response = &reply;
  response->set_version(options_.version);
  for (const std::string& feature : build_features_) response->add_build_features(feature);
  response->add_protocol_features(std::string(kStreamAdmittedFeature));
  response->add_protocol_features(std::string(kRefusedFeature));
  for (const engine::DeviceInfo& device : engine_->devices()) {
    DeviceInfoToProto(device, response->add_devices());
  }
  v1::Limits* limits = response->mutable_limits();
  limits->set_max_message_bytes(options_.max_message_bytes);
  limits->set_max_request_bytes(engine_->limits().max_request_bytes);
  limits->set_max_tokens(engine_->limits().max_tokens);
  limits->set_max_priority(priority_cap_.CapOf(*context));
  PlanCacheStatsToProto(engine_->plan_cache_stats(), response->mutable_plan_cache());
  const grpc::Status status = ToGrpcStatus(SerializeUnaryResponse(reply, answer));

  metrics_->RequestFinished("GetServerInfo", status.error_code(), SecondsSince(start));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// Building a plan allocates and touches its workspace (milliseconds to seconds), so it runs on
// the warm-up worker, which finishes the RPC. With --auth-token-file it needs a token like every
// AttentionService method (AuthenticatedAttentionService), since it makes the server allocate.
grpc::ServerUnaryReactor* AttentionService::WarmUp(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* body,
                                                   grpc::ByteBuffer* answer) {
  const LiveCalls::Token entering(&live_calls_);  // Until the reactor holds its own.
  if (grpc::Status refused; RefusedWhileDraining("WarmUp", *context, &refused)) {
    return FinishedWith(context, refused);
  }
  auto request = std::make_shared<v1::WarmUpRequest>();
  if (absl::Status status = ParseUnaryRequest(*body, "WarmUp", request.get()); !status.ok()) {
    return RefuseUnparsable("WarmUp", context, status);
  }
  const auto start = std::chrono::steady_clock::now();
  auto* reactor = new WarmUpReactor(&live_calls_);
  // gRPC keeps context and the answer buffer alive until Finish.
  warm_up_worker_.Post(
      [this, context, request, answer, reactor, cancelled = reactor->cancelled(), start] {
        v1::WarmUpResponse reply;
        v1::WarmUpResponse* response = &reply;
        absl::Status status =
            cancelled->load()
                ? absl::CancelledError("cancelled before the warm-up started")
                : WarmUpShapes(*engine_, *metrics_,
                               {.max_message_bytes = options_.max_message_bytes,
                                .stream_min_chunk_tokens = options_.stream_min_chunk_tokens,
                                .stream_windows = engine_->ComputesShares()},
                               *request, *cancelled, response);
        if (status.ok()) {
          PlanCacheStatsToProto(engine_->plan_cache_stats(), response->mutable_plan_cache());
          status = SerializeUnaryResponse(reply, answer);
        }
        if (!status.ok()) {
          spdlog::warn("request id={} method=WarmUp shapes={} code={} error=\"{}\"",
                       RequestIdOf(*context), request->shapes_size(),
                       absl::StatusCodeToString(status.code()), std::string(status.message()));
        }
        const grpc::Status grpc_status = ToGrpcStatus(status);
        metrics_->RequestFinished("WarmUp", grpc_status.error_code(), SecondsSince(start));
        // Refused, as other calls' refusals are counted: a malformed shape, one over the memory
        // budget (reason memory), ...
        if (const std::string reason = RejectionReason(status); !reason.empty()) {
          metrics_->RequestRejected(reason);
        }
        reactor->Finish(grpc_status);
      });
  return reactor;
}

}  // namespace da::server
