// One AttendStream RPC, pipelined: token blocks are assembled into chunks of whole segments, each
// chunk is computed on the engine as soon as its last token has arrived, and its output blocks
// are sent while later chunks are still arriving or computing (DESIGN §3, Streaming).
//
// Chunks. A chunk is chunk_tokens consecutive tokens, chunk_tokens a multiple of every segment
// length of the request (their least common multiple, rounded up to at least
// min_chunk_tokens and clipped to seq_len). No segment then spans two chunks, and the patterns'
// geometry is the same in every chunk (segments and offsets are relative to a segment's start),
// so each chunk is an independent attention problem whose output rows are exactly the rows of
// the whole problem: a streamed answer has the same bytes as the unary one. Where that multiple
// is far longer than the longest segment, chunks are windows instead (server/stream_assembler.h:
// shares of the whole problem, engine::ShareOfRequest): on a CPU the same bytes as the unary
// answer; on a GPU in fp32 where the fused path cannot take a window (the trailer reports the
// least precise chunk's precision).
//
// Memory. A stream holds `pipeline_depth` chunks of inputs (the StreamAssembler's slots; windows:
// two more, and one window's gathered rows), two
// chunks of output (one being computed into, one being sent), the chunk plan's workspace, and
// its messages (the HTTP/2 window, one incoming message of at most max_message_bytes, one
// outgoing of at most 4 MiB): all independent of seq_len. That sum is reserved against the
// engine's memory budget when the header arrives, before anything is allocated (over budget:
// RESOURCE_EXHAUSTED stating both), and released when the RPC finishes. A stream that fails
// (bad input, a cancel, an engine error) gives its window back as soon as no run uses it, even
// while its last write still waits on the client: only that message (and one incoming message,
// where a read is in flight) stays counted until gRPC returns them (ReturnWindow).
//
// Admission. The header is refused (before anything is allocated) when the engine's queue has no
// place for the stream (one place, held for all its chunks: engine::QueuePlace), when the window
// does not fit the memory budget, or when its client would hold more than
// --max-client-stream-bytes of stream windows (ClientQuota). The trailer's stream_buffer_bytes is
// the window reserved.
//
// Idle clients. The StreamWatch asks the stream every period how long its client has made no
// progress (no message read or written) while no chunk was computing; past the idle limit the
// stream ends and frees everything: DEADLINE_EXCEEDED when it waited for input, CANCELLED (the
// call is cancelled, so that the blocked write returns) when the client did not read its answer.
// A stream that failed while its write waits on a client that reads nothing is ended the same
// way, keeping its own error.
//
// Deadlines. The gRPC deadline is every chunk run's deadline; a header whose whole problem the
// engine's throughput (measured, or the start-up self-check's) cannot finish in the time left is
// refused at once with DEADLINE_EXCEEDED. The header's priority is every chunk run's priority. When
// every input slot is full the reactor stops reading, so gRPC's flow control holds the client back;
// nothing is buffered without bound.
//
// Threads. gRPC reactions (OnReadDone, OnWriteDone, OnCancel) and the engine's completion
// callback run on different threads; all state is guarded by mu_, and each reaction updates
// the state, then calls Advance(), which decides the next operations under the lock and starts
// them after releasing it. At most one read, one write and one engine run are outstanding.
// Finish is called only when no write and no engine run is outstanding, so buffers outlive any
// engine work even when the client cancels (OnCancel sets the flag the engine polls).
#pragma once

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/server_callback.h>
#include <grpcpp/support/slice.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "da/v1/attention.pb.h"
#include "engine/engine.h"
#include "server/client_quota.h"
#include "server/conversion.h"
#include "server/host_buffer.h"
#include "server/live_calls.h"
#include "server/metrics.h"
#include "server/request_record.h"
#include "server/security.h"
#include "server/stream_assembler.h"
#include "server/stream_watch.h"
#include "server/stream_wire.h"

namespace da::server {

// HTTP/2 window of each stream towards the server: what gRPC buffers for a stream that the
// server has stopped reading (flow control). Server::Start sets it on the gRPC server.
inline constexpr int64_t kStreamLookaheadBytes = int64_t{8} << 20;

// The largest header message taken: a StreamHeader is well under a kilobyte, and one padded with
// unknown fields would be held, uncounted, until admitted.
inline constexpr int64_t kMaxHeaderMessageBytes = int64_t{1} << 20;

// A client that sends kStreamAdmissionRequest in its request metadata gets the call's initial
// metadata as soon as the header is admitted (its window reserved), with kStreamWindowMetadata
// giving the window's bytes, rather than with the first answer; it may wait for it before it
// sends blocks, so that a stream refused at its header ends before the client has a message in
// flight. (grpc.aio, up to at least 1.85, reports a write that fails because the server has
// ended the call as INTERNAL "Internal error from Core" in place of the server's status:
// grpc/grpc#36066.) GetServerInfo lists kStreamAdmittedFeature among its protocol_features.
// Asked for, not sent to every client: with it, da's C++ sync client (gRPC 1.51) hung in a
// parallel-streams request whose other part was refused (its cancelled part's Read and Write
// never returned; 12 runs of 20), which it does not without it. The hang is in gRPC's retry
// filter, which is in every call unless the channel sets grpc.enable_retries to 0 (then 0 runs
// of 20 hung); da's clients keep it, because it also retries transparently a call that a GOAWAY
// (a drain, --max-connection-age-ms) refused before the server saw it.
inline constexpr std::string_view kStreamAdmissionRequest = "da-stream-admission";
inline constexpr std::string_view kStreamWindowMetadata = "da-stream-window-bytes";
inline constexpr std::string_view kStreamAdmittedFeature = "stream-admitted-metadata";

// A call the server refused before reading or computing anything, which may be sent again as it
// was (to another replica, or to this one after a reconnect), ends with this trailing metadata:
// the draining refusal (UNAVAILABLE) has kRefusedMetadata: kRefusedDraining. da's clients retry
// such calls, and only such calls: an UNAVAILABLE without it (a connection reset, a rank lost) may
// have come from a request that brought a server down, and sending it again could bring down the
// next. GetServerInfo lists kRefusedFeature among its protocol_features.
inline constexpr std::string_view kRefusedMetadata = "da-refused";
inline constexpr std::string_view kRefusedDraining = "draining";
inline constexpr std::string_view kRefusedFeature = "refused-metadata";

// When the server's drain cuts off the calls still in flight (Server::Shutdown's deadline): a call
// cancelled from then on was cancelled by the drain, not by its client, and is recorded so.
class DrainCutOff {
 public:
  void Set(std::chrono::steady_clock::time_point at) {
    at_ns_.store(at.time_since_epoch().count());
  }
  bool Passed() const {
    return std::chrono::steady_clock::now().time_since_epoch().count() >= at_ns_.load();
  }

 private:
  std::atomic<int64_t> at_ns_{INT64_MAX};  // None yet.
};

struct StreamSettings {
  int64_t max_message_bytes = 64 << 20;  // Each output message carries at most half of it.
  int pipeline_depth = 2;                // Chunks of inputs held at once (>= 1).
  int64_t min_chunk_tokens = 4096;       // Chunks are at least this long (unless seq_len is less).
  HostBufferPool* buffers = nullptr;     // Where chunk buffers come from and go back to.
  StreamWatch* watch = nullptr;          // Ends idle streams; null: none (tests).
  ClientQuota* quota = nullptr;          // Caps each client's windows; null: no cap.
  bool client_by_token = false;          // Clients are told apart by token (auth on), else peer.
  const PriorityCap* priority_cap = nullptr;  // Caps the header's priority; null: no cap.
  int64_t progress_log_ms = 0;         // A progress line this often while the stream runs; 0: none.
  const DrainCutOff* drain = nullptr;  // Tells the drain's cancels from clients'; null: none.
  LiveCalls* live_calls = nullptr;     // Counts the stream until OnDone; null: not counted.
};

// Reads and writes raw ByteBuffers (AttendStream is a raw method of the service): blocks are
// parsed where gRPC received them and output blocks are serialized straight from the output
// buffer (server/stream_wire.h), one copy each way instead of two or three.
class AttendStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
      public StreamWatch::Watched {
 public:
  AttendStreamReactor(engine::Engine* engine, Metrics* metrics, const StreamSettings& settings,
                      grpc::CallbackServerContext* context);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnSendInitialMetadataDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // StreamWatch::Watched (called under the watch's lock; EndIdle after it is released).
  bool CheckIdle(StreamWatch::Clock::time_point now,
                 std::chrono::milliseconds idle_timeout) override;
  void EndIdle() override;

 private:
  // Why the call was cancelled, as recorded: its deadline passed (DEADLINE_EXCEEDED, with the
  // stream's progress), the server's drain cut it off, or its client cancelled it (`by_client`).
  // Under mu_, or once nothing else runs (OnDone).
  absl::Status CancellationStatus(
      std::string_view by_client = "the client cancelled the stream") const;
  // Notes whether the drain's cut-off had passed when the cancellation was first seen (OnCancel,
  // or a read failed on a cancelled call), so that a client's cancel just before the cut-off is
  // not taken for the drain's when it is recorded later.
  void SeeCancellation();
  bool DrainPassed() const { return settings_.drain != nullptr && settings_.drain->Passed(); }
  // A computed chunk whose output is being sent.
  struct Outgoing {
    int64_t index = 0;
    int64_t token_start = 0;
    int64_t token_count = 0;
    int slot = 0;      // Index into out_slots_.
    int64_t sent = 0;  // Tokens of it sent so far.
  };
  // What Advance decided to do once the lock is released.
  struct Actions {
    bool send_metadata = false;
    bool read = false;
    bool write = false;
    std::optional<Chunk> compute;
    int compute_slot = 0;
    std::optional<grpc::Status> finish;

    bool Starts() const { return send_metadata || read || write || compute.has_value(); }
  };

  absl::Status AcceptHeader(const v1::StreamHeader& header);  // Under mu_.
  absl::Status Admit(const StreamLayout& layout);             // Under mu_: deadline, memory.
  absl::Status AcceptBlock(const BlockView& block);           // Under mu_.
  void Fail(absl::Status status);                             // Under mu_; the first error wins.
  void FeedPendingBlock();                                    // Under mu_.
  // Under mu_: drops the last message's bytes (its slices, gRPC's buffer unless a read fills
  // it, the protobuf fallback, the parsed view) once the stream has what it needs of them.
  void ReleaseMessage();
  Actions Decide();      // Under mu_.
  bool FillNextWrite();  // Under mu_: response_buffer_.
  // Under mu_, once the stream has failed and no run uses its buffers: frees the window and
  // keeps counted only what gRPC still holds for it (ReturnWindow's comment).
  void ReturnWindow();
  // Runs under_lock and Decide under mu_, then starts what Decide chose, until nothing is left.
  void Advance(const std::function<void()>& under_lock);
  void Compute(const Chunk& chunk, int slot);
  void OnComputed(const Outgoing& chunk, absl::StatusOr<engine::ExecutionInfo> info);

  int64_t QueryRowBytes() const;
  int64_t KeyRowBytes() const;
  int64_t OutputRowBytes() const;

  LiveCalls::Token live_;  // Held until OnDone deletes the reactor.
  engine::Engine* engine_;
  StreamSettings settings_;
  grpc::CallbackServerContext* context_;
  std::atomic<bool> cancelled_{false};
  // Set from the header: every chunk's run carries the stream's priority and deadline, and its
  // memory is the stream's reservation, made once for the whole window.
  int priority_ = 0;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  std::optional<engine::MemoryReservation> reservation_;
  engine::QueuePlace queue_place_;   // Held from the header to the end.
  ClientQuota::Share client_share_;  // The window, counted against the client's cap.
  // The last progress of the client (a message read or written) or of the engine (a chunk
  // computed); guarded by mu_. What CheckIdle measures idleness from.
  std::chrono::steady_clock::time_point last_progress_ = std::chrono::steady_clock::now();
  bool idle_ended_ = false;                // CheckIdle ended the stream; EndIdle still has to run.
  std::atomic<int> cut_off_by_drain_{-1};  // SeeCancellation's finding; -1: not seen yet.
  // When the next progress line is due (StreamSettings::progress_log_ms); guarded by mu_.
  std::chrono::steady_clock::time_point next_progress_log_;
  std::mutex mu_;
  RequestRecord record_;
  absl::Status error_;  // The first error; the RPC finishes with it.
  bool finished_ = false;
  int starting_ = 0;  // Threads starting operations Decide chose; Finish waits for them.

  // Reading. message_ refers into request_slices_ (or fallback_) while a block is pending.
  grpc::ByteBuffer request_buffer_;
  std::vector<grpc::Slice> request_slices_;
  v1::AttendStreamRequest fallback_;
  StreamMessage message_;
  bool read_in_flight_ = false;
  bool input_done_ = false;  // The client half-closed.
  // The input ended too early (no header, tokens missing) with no cancellation known yet: gRPC
  // reports a failed read and a cancellation on separate threads, in either order, so the call
  // is recorded in OnDone, where IsCancelled is final, and a client's cancel or a passed deadline
  // is not counted as invalid input.
  bool ended_early_ = false;
  bool have_header_ = false;
  bool pending_block_ = false;  // request_ holds a checked block not yet copied in full.
  int64_t pending_taken_ = 0;
  StreamProblem problem_;
  std::unique_ptr<StreamAssembler> assembler_;

  // Computing.
  bool computing_ = false;
  int64_t chunks_computed_ = 0;
  std::vector<PooledBuffer> out_slots_;
  std::vector<bool> out_slot_busy_;
  engine::ExecutionInfo info_;  // Summed over chunks.
  bool any_computed_ = false;

  // Writing.
  grpc::ByteBuffer response_buffer_;
  int64_t response_bytes_ = 0;  // response_buffer_'s length, while it is being written.
  bool write_in_flight_ = false;
  // The stream is admitted and its client asked to be told (kStreamAdmissionRequest): its
  // initial metadata (kStreamWindowMetadata) goes out at once.
  bool metadata_due_ = false;
  bool metadata_in_flight_ = false;
  bool header_sent_ = false;
  bool trailer_sent_ = false;
  std::deque<Outgoing> outgoing_;
  int64_t output_block_tokens_ = 1;
};

}  // namespace da::server
