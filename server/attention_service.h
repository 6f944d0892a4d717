// The da.v1.AttentionService implementation on gRPC's callback API.
//
//   AttentionService service(engine.get(), metrics.get(), {.max_message_bytes = 64 << 20});
//   builder.RegisterService(&service);
//
// Handlers only convert and check messages; every computation is queued on the engine
// (Engine::Submit) and the RPC is finished from the engine's dispatcher thread, so no gRPC thread
// ever computes. WarmUp builds plans on the service's own worker thread and finishes from there.
// The engine and metrics must outlive the grpc::Server the service is registered in, and the
// service must outlive it too (its destructor joins the warm-up worker).
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "da/v1/attention.grpc.pb.h"
#include "engine/engine.h"
#include "server/attend_stream_reactor.h"
#include "server/client_quota.h"
#include "server/live_calls.h"
#include "server/metrics.h"
#include "server/security.h"
#include "server/stream_watch.h"
#include "server/warm_up.h"

namespace da::server {

inline constexpr char kServiceName[] = "da.v1.AttentionService";

// The generated callback service with every method raw (ByteBuffers in and out). AttendStream's
// reactor parses and writes its messages itself so that tensors are copied once each way
// (server/stream_wire.h); the unary methods parse their requests themselves (ParseUnaryRequest)
// so that a body that is not the method's message gets INVALID_ARGUMENT with a message, a log
// line and a metric, as on the stream, instead of gRPC's bare UNIMPLEMENTED. The wire format is
// unchanged; clients use the generated stubs as they are.
using AttentionServiceBase = v1::AttentionService::WithRawCallbackMethod_Attend<
    v1::AttentionService::WithRawCallbackMethod_AttendStream<
        v1::AttentionService::WithRawCallbackMethod_GetServerInfo<
            v1::AttentionService::WithRawCallbackMethod_WarmUp<v1::AttentionService::Service>>>>;

// Parses a unary call's body into message. INVALID_ARGUMENT naming the method and the message type
// when the bytes are not one (truncated, invalid UTF-8 in a string field, wrong wire types).
absl::Status ParseUnaryRequest(const grpc::ByteBuffer& body, std::string_view method,
                               google::protobuf::Message* message);

// message serialized into out (for the raw unary methods' answers).
absl::Status SerializeUnaryResponse(const google::protobuf::Message& message,
                                    grpc::ByteBuffer* out);

// A unary call finished at once with `status` (a refusal before any work).
grpc::ServerUnaryReactor* FinishedWith(grpc::CallbackServerContext* context,
                                       const grpc::Status& status);

// A stream finished at once with `status`, before anything is read from it.
class RefusedStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit RefusedStreamReactor(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

struct ServiceOptions {
  int64_t max_message_bytes = 64 << 20;  // Bounds each streamed output block (half of it).
  std::string version;                   // Reported by GetServerInfo.
  int stream_pipeline_depth = 2;         // Chunks of input one stream holds (StreamSettings).
  int64_t stream_min_chunk_tokens = 4096;
  int64_t stream_buffer_pool_bytes = int64_t{256} << 20;  // Idle chunk buffers kept for reuse.
  // A stream's client idle this long ends it, and so does a unary answer unread this long after it
  // was ready; 0: never.
  int64_t stream_idle_timeout_ms = 20000;
  int64_t stream_progress_log_ms = 10000;  // A running stream's progress line; 0: none.
  int64_t max_client_stream_bytes = 0;     // Stream windows one client may hold; 0: no cap.
  bool client_by_token = false;            // Clients told apart by bearer token (auth on).
  // The highest priority a call may ask for, unless its token's line in the token file gives its
  // own (PriorityCap); INT32_MAX: no cap.
  int32_t max_priority = std::numeric_limits<int32_t>::max();
  const BearerTokenAuthenticator* authenticator = nullptr;  // Auth on; outlives the service.
  // Test hook: runs after a unary Attend computed OK, just before its answer is sent. Null: none.
  std::function<void(grpc::CallbackServerContext&)> before_unary_answer;
};

class AttentionService final : public AttentionServiceBase {
 public:
  AttentionService(engine::Engine* engine, Metrics* metrics, ServiceOptions options);

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

  // From now on every new call is refused with UNAVAILABLE ("draining") and trailing metadata
  // kRefusedMetadata: kRefusedDraining, counted and logged as a
  // refusal; calls already started are not affected. Server::Shutdown calls it before its grace
  // period, while gRPC still takes calls, so that a client learns of the drain from a status it
  // can retry elsewhere rather than from a call cancelled by the transport.
  void BeginDrain() { draining_.store(true); }
  // Calls still in flight at `at` are cut off by the drain (Server::Shutdown's deadline); their
  // cancellation is logged as the drain's, not their clients'.
  void SetDrainCutOff(std::chrono::steady_clock::time_point at) { drain_cut_off_.Set(at); }
  // True once every attention call (Attend, AttendStream, WarmUp) is done, its answer written to
  // the kernel (gRPC's OnDone); false when `deadline` passes first.
  bool WaitForCallsToEnd(std::chrono::steady_clock::time_point deadline) const {
    return live_calls_.WaitForNone(deadline);
  }
  int live_calls() const { return live_calls_.count(); }

 private:
  // A unary call whose body is not its message: INVALID_ARGUMENT, logged and counted.
  grpc::ServerUnaryReactor* RefuseUnparsable(const char* method,
                                             grpc::CallbackServerContext* context,
                                             const absl::Status& status);
  // Refuses `method`'s call with UNAVAILABLE while draining: true when it did (status set).
  bool RefusedWhileDraining(const char* method, grpc::CallbackServerContext& context,
                            grpc::Status* status);

  std::atomic<bool> draining_{false};
  DrainCutOff drain_cut_off_;
  // Outlives the calls' reactors: the service outlives the grpc::Server. A handler holds a token
  // from before it looks at draining_ until its reactor holds its own, so a wait that sees none
  // after BeginDrain misses no call that was let in.
  LiveCalls live_calls_;
  engine::Engine* engine_;
  Metrics* metrics_;
  ServiceOptions options_;
  HostBufferPool stream_buffers_;   // Outlives the streams: the service outlives the grpc::Server.
  ClientQuota client_quota_;        // Likewise.
  const PriorityCap priority_cap_;  // Likewise.
  StreamWatch stream_watch_;        // Likewise; its thread ends with the service.
  std::vector<std::string> build_features_;
  WarmUpWorker warm_up_worker_;
};

}  // namespace da::server
