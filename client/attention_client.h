// A C++ client for da.v1.AttentionService: unary and streamed calls with deadlines, server info
// and health.
//
//   auto channel = grpc::CreateChannel("localhost:50051", grpc::InsecureChannelCredentials());
//   da::client::AttentionClient client(channel);
//   da::v1::AttendResponse response;
//   grpc::Status status = client.Attend(request, &response, {.timeout_ms = 5000});
//
// AttendAuto sends the same request in one message or streams it, as its size asks.
// AttendStream takes the same AttendRequest, sends it as a header plus token blocks, and
// reassembles the streamed output into the same AttendResponse shape, so callers can switch
// between the two with one flag. With StreamOptions::parallel_streams it cuts the request at
// chunk boundaries into parts (client/stream_blocks.h) and streams them as concurrent calls, over
// the client's channels in turn: one HTTP/2 stream, or one connection, rarely fills a fast link.
// Thread safety: one client may be used from many threads.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "client/answer_wire.h"
#include "client/retry.h"
#include "da/v1/attention.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace da::client {

class OutputAssembler;  // client/stream_blocks.h
struct StreamPlan;

struct CallOptions {
  // 0 (or less): no deadline. Values above kMaxTimeoutMs (a year, client/connection_options.h)
  // count as kMaxTimeoutMs: the deadline, a nanosecond count, would overflow into the past.
  int64_t timeout_ms = 0;
  // Sent as x-request-id metadata when set. The "= {}" keeps -Wextra quiet about designated
  // initializers such as {.timeout_ms = 5000} that leave it out.
  std::string request_id = {};
  // A call refused before the server read or computed anything (a draining server's
  // UNAVAILABLE, client/retry.h) is made again after a backoff, within timeout_ms: Attend,
  // AttendStream (each part of a parallel request on its own), GetServerInfo and WarmUp. Not
  // AttendStreamBlocks and AttendStreamShared, whose blocks the caller produces once: their
  // refusal comes back at once (UNAVAILABLE, "draining: ..."), for the caller to send again.
  RetryPolicy retry = {};
};

// What a streamed call has moved so far, for a progress display: the request's q, k and v bytes
// handed to gRPC and the output bytes received, summed over the parts of a parallel request. The
// call adds to it from its threads while it runs; read it from any thread.
struct StreamProgress {
  std::atomic<int64_t> sent_bytes{0};
  std::atomic<int64_t> received_bytes{0};
};

struct StreamOptions {
  int64_t block_tokens = 0;  // Tokens per block; 0 picks blocks of about 4 MiB.
  // Concurrent AttendStream calls, each streaming one part of the request (at most one part per
  // chunk of whole segments; a request that is one chunk goes as one stream). 0: chosen from the
  // request's size (DefaultParallelStreams).
  int parallel_streams = 1;
  StreamProgress* progress = {};  // Null: nobody watches.
};

// Channel arguments that lift gRPC's 4 MiB receive default to max_message_bytes, and keep calls
// alive: while a call is open the client pings the server after 30 s without traffic, and fails
// the call when no answer comes within 10 s, so that a call without a deadline ends when the
// server's host vanishes silently. da-server accepts pings every 10 s (server/server.cc).
grpc::ChannelArguments DefaultChannelArguments(int64_t max_message_bytes = 1LL << 30);

// An insecure channel to target with DefaultChannelArguments.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           int64_t max_message_bytes = 1LL << 30);

// Connects channel, waiting at most timeout_ms (at most kMaxTimeoutMs). Returns OK once
// connected, and also when the connection attempt has already failed (TRANSIENT_FAILURE): the next
// call then fails at once with gRPC's own reason. UNAVAILABLE when no connection is made in time
// (e.g. a black-holed address).
grpc::Status WaitForConnection(grpc::Channel& channel, int64_t timeout_ms);

// The serialized AttendStreamRequest{block} as slices: the tags and lengths copied, q, k and v
// referenced where they are (the block lives until gRPC releases the last slice). The same bytes
// as block.SerializeAsString() inside an AttendStreamRequest, without the copy.
grpc::ByteBuffer TokenBlockBuffer(std::shared_ptr<const v1::TokenBlock> block);

// Slices over memory the caller owns (a request's tensors), counted until gRPC lets go of them:
// a write cut short by a cancel or a deadline may leave the transport holding slices after the
// call has ended, to be written (or dropped) later. A call over a caller's request waits for them
// (the destructor) up to kReleaseWait, then returns all the same: a transport whose peer stopped
// reading (a stalled server) may hold them until the connection ends, and a call must not outlast
// its deadline for that. In that case only, the kernel may still copy bytes the caller has since
// freed onto a stream already reset (the peer drops them), or fail the connection's write with
// EFAULT where the memory was unmapped; gRPC's TLS encrypts before it writes, so over TLS nothing
// is read late. The count itself lives as long as any slice does.
class BorrowedSlices {
 public:
  static constexpr std::chrono::milliseconds kReleaseWait{1000};

  BorrowedSlices() = default;
  ~BorrowedSlices() { WaitUntilReleased(kReleaseWait); }
  BorrowedSlices(const BorrowedSlices&) = delete;
  BorrowedSlices& operator=(const BorrowedSlices&) = delete;

  // A slice over bytes, counted until gRPC (and every copy) releases it.
  grpc::Slice Borrow(std::string_view bytes);
  // Waits up to `timeout` until every slice Borrow made has been released; whether they were.
  bool WaitUntilReleased(std::chrono::milliseconds timeout);
  int64_t held() const;

 private:
  struct Count {
    std::mutex mutex;
    std::condition_variable released;
    int64_t held = 0;  // Guarded by mutex.
  };
  static void Release(void* count);  // A std::shared_ptr<Count>*, one per slice.
  const std::shared_ptr<Count> count_ = std::make_shared<Count>();
};

class AttentionClient {
 public:
  // Makes a channel with a connection of its own to the server the client's channels reach
  // (FreshChannels, client/connection_options.h).
  using ChannelFactory = std::function<std::shared_ptr<grpc::Channel>()>;

  explicit AttentionClient(std::shared_ptr<grpc::Channel> channel);
  // Calls go on the first channel; the parts of a parallel AttendStream on the channels in turn
  // (give channels distinct ConnectionOptions::channel_id for connections of their own).
  //
  // With fresh_channels, a call the server refused unread is sent again on a channel it makes,
  // used for that attempt only: a draining server refuses new calls on its open connections for
  // as long as any call on them runs, and a load balancer sends a new connection to a replica
  // that serves. Without it, on the call's own channel, which reaches another replica only once
  // the drained server has closed its connection.
  //
  // With max_connection_age_ms > 0 (which needs fresh_channels), a channel that has taken new
  // calls for that long (drawn per channel between 0.9 and 1 times it, so that the clients of a
  // replica do not all reconnect at once) is replaced for new calls by one fresh_channels makes;
  // the calls still running on the old one finish there, and its connection closes when the
  // last of them ends. A client that calls without pause otherwise keeps its first connection,
  // and so its first replica, for as long as it lives: behind a load balancer that spreads
  // connections (a Kubernetes ClusterIP Service), replicas added later (a scale-up) would never
  // see its calls. Doing this in the client, not with the server's --max-connection-age-ms,
  // closes a connection only once its answers have been read. std::invalid_argument when
  // max_connection_age_ms > 0 comes without fresh_channels.
  explicit AttentionClient(std::vector<std::shared_ptr<grpc::Channel>> channels,
                           ChannelFactory fresh_channels = {}, int64_t max_connection_age_ms = 0);

  // How many channels have been replaced for their age so far.
  int64_t connections_renewed() const;
  // The channel a new call goes on now (the first one, replaced for its age as above), for calls
  // made outside the client with a stub of their own; hold it for the call.
  std::shared_ptr<grpc::Channel> channel() { return Channel(0); }

  grpc::Status Attend(const v1::AttendRequest& request, v1::AttendResponse* response,
                      const CallOptions& options = {});

  // Sends request the way its size asks, as the Python client and da-client do, so that a caller
  // need not know the message limits: in one message (Attend) when q, k, v and the output fit
  // well within one (NeedsStream), else streamed (AttendStream) in blocks within half a message
  // unless stream.block_tokens sets them, and in as many parallel parts as its size calls for
  // (DefaultParallelStreams) unless stream.parallel_streams sets them. The limit is the smaller
  // of the server's, asked once (GetServerInfo, within options.timeout_ms) and kept, and
  // SetMessageLimit's. A failed GetServerInfo fails the call with its status.
  grpc::Status AttendAuto(const v1::AttendRequest& request, v1::AttendResponse* response,
                          const CallOptions& options = {},
                          const StreamOptions& stream = {.parallel_streams = 0});

  // The receive limit this client's channels were made with (ConnectionOptions::max_message_bytes,
  // MakeChannel's max_message_bytes: 1 GiB by default), for AttendAuto; 0, as until it is set:
  // the server's limit alone.
  void SetMessageLimit(int64_t bytes);

  // Streams request (header, then token blocks) and collects the answer into response. With
  // several parallel streams, the first part to fail fails the request with its status (the
  // message names the part) and cancels the others; response's execution info is the parts'
  // merged (MergePartInfos).
  grpc::Status AttendStream(const v1::AttendRequest& request, v1::AttendResponse* response,
                            const CallOptions& options = {}, const StreamOptions& stream = {});

  // Produces the next token block into *block, or returns false when there are no more.
  using BlockSource = std::function<bool(v1::TokenBlock* block)>;
  // Takes each answer message in order: the header, output blocks, the trailer. A status other
  // than OK cancels the call, and AttendStreamBlocks returns it.
  using AnswerSink = std::function<grpc::Status(const v1::AttendStreamResponse& message)>;

  // The streaming call without whole tensors on either side: blocks are produced on demand (on a
  // writer thread) and answers are handed over as they arrive (on the calling thread), so the
  // client's memory can stay as bounded as the server's. A callback that throws cancels the call,
  // which returns INTERNAL "callback threw: ..." (RESOURCE_EXHAUSTED for std::bad_alloc); a thread
  // that cannot be started fails it with RESOURCE_EXHAUSTED.
  grpc::Status AttendStreamBlocks(const v1::StreamHeader& header, const BlockSource& next_block,
                                  const AnswerSink& on_answer, const CallOptions& options = {});

  // The next token block, shared with the caller, or null when there are no more. gRPC sends
  // its q, k and v where they lie and holds a reference until the bytes are written, so a caller
  // that keeps its blocks (or made them once) neither copies nor frees anything per block. The
  // block must not change once returned.
  using SharedBlockSource = std::function<std::shared_ptr<const v1::TokenBlock>()>;
  // Answers as they arrive, without copying output rows out of gRPC's receive buffers: on_block
  // gets each output block (its pieces valid only during the call), on_message the header and
  // the trailer. A status other than OK cancels the call, as with AnswerSink.
  struct AnswerViews {
    std::function<grpc::Status(const OutputBlockView& block)> on_block;
    std::function<grpc::Status(const v1::AttendStreamResponse& message)> on_message;
  };

  // AttendStreamBlocks without copies on the client: blocks go out as slices over the shared
  // blocks, output rows are handed over where they were received. Callbacks that throw and
  // threads that cannot start fail the call as in AttendStreamBlocks.
  grpc::Status AttendStreamShared(const v1::StreamHeader& header,
                                  const SharedBlockSource& next_block, const AnswerViews& answers,
                                  const CallOptions& options = {});

  grpc::Status GetServerInfo(v1::GetServerInfoResponse* response, const CallOptions& options = {});

  // Builds the plans of request's shapes on the server, so that their first requests are plan
  // cache hits.
  grpc::Status WarmUp(const v1::WarmUpRequest& request, v1::WarmUpResponse* response,
                      const CallOptions& options = {});

  // Health of a service ("" for liveness, "da.v1.AttentionService" for readiness).
  grpc::Status CheckHealth(const std::string& service,
                           grpc::health::v1::HealthCheckResponse::ServingStatus* status,
                           const CallOptions& options = {});

 private:
  class CallGroup;
  // A retry's wait (WithRetries) for a call on channel: the backoff, reading the channel
  // meanwhile; false when group (may be null) failed first.
  static RetryWait BackOffOn(grpc::Channel& channel, CallGroup* group);
  // A unary call under options.retry: call(stub, context) makes one attempt, on a stub of
  // Channel(0) first and then on one of a retry channel (when the client makes them).
  grpc::Status RetriedUnary(
      const CallOptions& options, const std::string& request_id,
      const std::function<grpc::Status(v1::AttentionService::Stub&, grpc::ClientContext*)>& call);
  // The channel of attempt `attempt` of a call whose first went on `first`.
  std::shared_ptr<grpc::Channel> AttemptChannel(int attempt,
                                                const std::shared_ptr<grpc::Channel>& first) const;
  // Channel index (modulo their count) for a new call: replaced first when it is too old.
  std::shared_ptr<grpc::Channel> Channel(size_t index);
  grpc::Status AttendParts(const v1::AttendRequest& request, v1::AttendResponse* response,
                           const CallOptions& options, const StreamOptions& stream, int parts);
  // One stream of one batch element, its output appended block by block.
  grpc::Status AttendOneStream(const v1::AttendRequest& request, v1::AttendResponse* response,
                               const CallOptions& options, const StreamOptions& stream);
  // Writes the next block's message into *buffer, or returns false when there are no more.
  using BufferSource = std::function<bool(grpc::ByteBuffer* buffer)>;
  // *refused (may be null): set when the server refused the call unread and no answer was taken.
  grpc::Status AttendStreamOn(const std::shared_ptr<grpc::Channel>& channel,
                              const v1::StreamHeader& header, const BufferSource& next_buffer,
                              const AnswerViews& answers, const CallOptions& options,
                              CallGroup* group, bool* refused = nullptr);
  // Streams plan's blocks of request (a whole request or a part) on channel into assembler,
  // counting the bytes in progress (may be null); sent again while the server refuses it unread
  // (options.retry), the refused attempts' bytes taken back out of progress.
  grpc::Status StreamPlanInto(const std::shared_ptr<grpc::Channel>& channel,
                              const v1::AttendRequest& request, const StreamPlan& plan,
                              OutputAssembler& assembler, StreamProgress* progress,
                              const CallOptions& options, CallGroup* group);

  struct Slot {
    std::shared_ptr<grpc::Channel> channel;
    // When it is replaced (Channel); time_point::max(): never.
    std::chrono::steady_clock::time_point renew_at;
  };
  // When a channel made at `now` is replaced.
  std::chrono::steady_clock::time_point RenewAt(std::chrono::steady_clock::time_point now);

  ChannelFactory fresh_channels_;  // Empty: retries go on the call's channel, none is renewed.
  const int64_t max_connection_age_ms_;
  mutable std::mutex mutex_;
  std::vector<Slot> slots_;            // Guarded by mutex_; never empty.
  std::mt19937_64 rng_;                // Guarded by mutex_: draws the ages.
  int64_t renewed_ = 0;                // Guarded by mutex_.
  int64_t client_message_limit_ = 0;   // Guarded by mutex_: SetMessageLimit's.
  int64_t server_message_limit_ = -1;  // Guarded by mutex_: from GetServerInfo; -1: not asked yet.
};

}  // namespace da::client
