// One request computed by a group of ranks over a dist::Communicator (DESIGN §3, Sharding).
//
// Rank 0 (the coordinator) holds the whole q, k, v and output. It sends every worker a control
// frame naming the problem, scatters each worker's share of the inputs, takes part in the
// SEQUENCE exchange, computes its own share and gathers the workers' outputs (and their
// timings). A worker that received a kRun control frame calls ServeShardedRun with it.
//
//   // rank 0, with a formed group
//   DA_ASSIGN_OR_RETURN(ShardRunStats stats, CoordinateShardedRun(*comm, problem, options));
//   // worker loop
//   std::string frame(kControlFrameBytes, '\0');
//   DA_RETURN_IF_ERROR(comm->Recv(frame.data(), frame.size(), 0, kControlTag, idle_timeout));
//   DA_ASSIGN_OR_RETURN(ControlFrame control, DecodeControlFrame(frame));
//   if (control.kind == ControlKind::kRun) ServeShardedRun(*comm, control, options);
//
// Data plane (ShardRunOptions::data_plane): the same protocol with its bulk bytes on a second
// communicator driven from one thread in a fixed order (NCCL's terms); tested with Gloo in that
// role on CPU ranks.
//
// What crosses ranks: the control frame; each worker's share of q, k and v (HEADS: its heads of
// every token; SEQUENCE: its tokens of every head); for SEQUENCE only, the kept K/V rows of the
// segments that span ranks, sent point to point among the ranks of each such segment
// (engine/shard_plan.h: SpanningKeySets, NeedsRowsFrom), never a whole sequence; each worker's
// output share and a small stats record back to rank 0. Tags below keep the kinds apart.
//
// Exactness: every rank computes its share (engine/share.h) with Backend::RunShare, the same
// kernel on the same packed rows a single process would run, so the output equals the
// single-process output up to the order in which threads fold LONGNET patterns (bit-identical in
// our tests).
//
// Errors: a failed collective (lost peer: UNAVAILABLE, timeout: DEADLINE_EXCEEDED) is returned
// as the communicator reported it; after it the communicator is unusable (communicator.h) and
// the caller re-forms the group. A rank that gives a run up out of step (any error once its
// messages began, other than one marked AnsweredInStep) aborts both its communicators before it
// returns: a data plane's failure leaves the control communicator healthy, and the other ranks'
// waits on it (rank 0's gather, a worker's stop word) would otherwise last the compute timeout
// and more. Such an error is never CANCELLED, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (those
// become UNAVAILABLE), the codes of a run refused before any message. Rank 0 receives each worker's
// answer on a thread of its own posted before it computes, so a worker lost while rank 0 computes
// stops rank 0's compute and fails the run at once; a computing worker sends a progress frame every
// third of the timeout, so a worker whose link is cut (no connection closes) fails the run within
// one timeout. A worker's compute failure comes back as its status code, naming the rank.
//
// Cancellation: the scatter goes in pieces of at most ShardRunOptions::scatter_piece_bytes, each
// announced by a piece word (kPieceTag, on the control communicator): 1, the piece follows; 0,
// the request was cancelled and nothing more of the share comes. Rank 0 looks at the request's
// flag before every piece, so a cancel during a scatter of gigabytes ends it within one piece;
// a worker told 0 still takes part in the exchange (its kept rows are then never computed with)
// and stops its compute before it starts. Each run ends with one stop word from rank 0 to every
// worker, which the worker listens for from the moment it holds its share (or has been told the
// scatter stopped). A cancelled request makes rank 0 send 1 at once
// (within a millisecond of the flag); the workers' compute polls it like rank 0's, so every rank
// stops within the kernel's stop latency, and a stopped worker sends its stats (code CANCELLED)
// without its output (also when its compute ended just as the word came). Otherwise rank 0
// sends 0 once it has gathered every worker's answer. Rank 0 watches the request's flag until
// its own compute has returned too, so a cancel after the workers answered still stops it, and
// with a data plane a cancelled request's outputs are not taken (output word 0). Either way the
// group stays in step for the next run, and rank 0 returns CANCELLED. Workers that answered a
// cancelled run leave it at once; rank 0 keeps them with heartbeat frames while it still takes
// other workers' outputs (ShardRunOptions::keepalive). A worker that answers with a failure (its
// compute failed, or it refused its part: ShardRunOptions::memory_budget_bytes) makes the run
// unwanted in the same way: the rest of the scatter is told 0, every rank is sent stop word 1,
// and rank 0 returns that worker's error.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_spec.h"
#include "engine/backend.h"
#include "engine/dist/communicator.h"
#include "engine/shard_group.h"
#include "engine/shard_plan.h"
#include "engine/tensor.h"

namespace da::dist {

// Point-to-point tags of the protocol (Communicator::Send/Recv).
inline constexpr int kControlTag = 1;   // Control frames, rank 0 -> worker.
inline constexpr int kScatterTag = 2;   // Input shares, rank 0 -> worker.
inline constexpr int kExchangeTag = 3;  // Kept K/V rows of spanning segments, rank -> rank.
inline constexpr int kGatherTag = 4;    // Output shares and stats, worker -> rank 0.
inline constexpr int kStopTag = 5;      // One stop word per run, rank 0 -> worker.
inline constexpr int kPieceTag = 6;     // A piece word before each scatter piece, rank 0 -> worker.
inline constexpr int kOutputTag = 7;    // Data plane: rank 0 -> worker, "send your output now".

// A piece word's size: 1, a scatter piece follows; 0, the scatter stopped (the run is not wanted:
// its request was cancelled, or a worker failed).
inline constexpr int64_t kPieceWordBytes = 8;

// The stop word's size: 1 stops the worker's compute (the run is not wanted), 0 ends the run.
inline constexpr int64_t kStopWordBytes = 8;

// With a data plane, rank 0 sends a worker that computed this word on the control communicator
// just before it receives the worker's output over the plane. The worker's long wait (rank 0's
// compute, then the outputs of the ranks before it) is thus a receive on the control
// communicator, where Gloo reports a rank 0 that is gone; its plane send starts only once rank 0
// is receiving, and waits one timeout. A plane send to a peer that died is not always reported:
// NCCL between processes on one node waits in shared memory until its timeout.
inline constexpr int64_t kOutputWordBytes = 8;

// A worker's answer (kGatherTag, before its output) and its progress frames have this size: its
// stats, a status code and, for a part it refused, the bytes it needed and its budget.
inline constexpr int64_t kStatsFrameBytes = 64;

// Every control frame has exactly this size.
inline constexpr int64_t kControlFrameBytes = 4096;

enum class ControlKind : uint32_t {
  kHeartbeat = 1,  // Idle keep-alive; no payload.
  kRun = 2,        // A problem follows (payload: its encoded description).
  kShutdown = 3,   // The worker leaves its loop.
};

struct ControlFrame {
  ControlKind kind = ControlKind::kHeartbeat;
  std::string payload;  // At most kControlFrameBytes - 16 bytes.
};

// Exactly kControlFrameBytes bytes: magic, kind, payload length, payload, zero padding.
std::string EncodeControlFrame(const ControlFrame& frame);
// INVALID_ARGUMENT for a frame of the wrong size, magic, kind or length.
absl::StatusOr<ControlFrame> DecodeControlFrame(const std::string& bytes);

// Memory a rank keeps between runs for its share of q, k, v and the output (a worker's always;
// rank 0's when its share is not contiguous in the whole tensors). Fresh pages cost about 13 us
// per 4 KiB here (MACHINE-NOTES): 1 GiB of share faulted in anew took 3.4 s, more than moving it.
// The buffers grow and never shrink, and ask for transparent huge pages. One run at a time.
class RankBuffers {
 public:
  RankBuffers();
  ~RankBuffers();
  RankBuffers(const RankBuffers&) = delete;
  RankBuffers& operator=(const RankBuffers&) = delete;
  // At least q_bytes, kv_bytes (k and v each) and out_bytes; RESOURCE_EXHAUSTED when memory ran
  // out.
  absl::Status Reserve(int64_t q_bytes, int64_t kv_bytes, int64_t out_bytes);
  void* q() const;
  void* k() const;
  void* v() const;
  void* out() const;

 private:
  struct Buffers;
  std::unique_ptr<Buffers> buffers_;
};

struct ShardRunOptions {
  // Limit of every point-to-point operation of the run.
  std::chrono::milliseconds timeout{30000};
  // What this rank computes its share with: its backend, plan cache (plans stay warm between
  // runs; fresh pages cost more than a small share's arithmetic) and pool. Workers set it here;
  // rank 0 computes with the problem's own (ShardedProblem::compute).
  engine::ShareCompute compute;
  // Share buffers kept between runs; null: fresh ones per run.
  RankBuffers* buffers = nullptr;
  // How long a worker's compute may take in all. While it computes, the worker sends rank 0 a
  // progress frame every timeout / 3, so rank 0 takes silence for a whole `timeout` as the
  // worker lost (a cut link closes no connection) and fails the run within it.
  std::chrono::milliseconds compute_timeout{600000};
  // The data plane: a second communicator of the same group (same ranks) that carries the bulk
  // bytes (shares of q, k, v, the exchange, the outputs) while control frames, stop words and
  // stats stay on the first. Null: the first carries everything. A data plane is driven from
  // one thread per rank in one fixed order, with no tags (messages between two ranks match in
  // issue order) and blocking sends, which is what NCCL offers: scatter in rank order, then the
  // exchange pair by pair ((a, b) with a < b in lexicographic order, a sending first), then,
  // after rank 0's compute, the outputs in rank order, each after its output word on the first
  // communicator (kOutputWordBytes). Every rank must set it, or none. Its
  // buffers are the shares' (host memory here: a device data plane needs device-resident
  // shares).
  Communicator* data_plane = nullptr;
  // The most bytes of a share that go in one scatter piece (whole token rows of the share, at
  // least one): rank 0's run header carries it, so the workers cut alike. A piece is the unit in
  // which a cancel takes effect during the scatter (32 MiB: tens of milliseconds on a 10 Gb/s
  // link) and the most rank 0 copies out of a non-contiguous share at a time. Output shares go
  // back in pieces of the same size (bytes, not rows; no piece words), each within `timeout`.
  int64_t scatter_piece_bytes = int64_t{32} << 20;
  // Rank 0: once a stopped run's stop words (1) went out, workers that have answered leave the
  // run while rank 0 may still take outputs already on their way from others; each is sent a
  // kHeartbeat control frame at most this often (as output pieces arrive) so that its wait for
  // the next control frame (a few heartbeats, serving_worker.cc) does not take rank 0 for lost.
  // 0: none (a caller whose workers wait longer, as the tests' do).
  std::chrono::milliseconds keepalive{0};
  // A worker: the most bytes of host memory its part of one run may hold (RankRunBytes); 0, no
  // limit. A run that needs more, or whose share buffers cannot be had, is refused in step: the
  // worker takes its scatter and its exchange without keeping them, computes nothing and answers
  // RESOURCE_EXHAUSTED with both numbers, which rank 0 returns naming it; the group goes on.
  int64_t memory_budget_bytes = 0;
  // Rank 0: each rank's memory_budget_bytes (index = rank; 0 or absent: not known). A run whose
  // part on some worker is over that worker's budget is refused with RESOURCE_EXHAUSTED before
  // anything is sent.
  std::vector<int64_t> rank_memory_budgets;
};

// Host bytes rank `rank`'s part of a run holds at its peak (a worker's; rank 0 also holds the
// whole tensors): its q, k, v and output shares and, for SEQUENCE, the kept K/V rows of the
// spanning sets it gathers, its outgoing exchange messages, one of its own pieces and the largest
// incoming message.
int64_t RankRunBytes(const engine::ProblemShape& shape, engine::DType dtype,
                     engine::DType out_dtype, const engine::AttentionSpec& spec,
                     const engine::ShardLayout& layout, int rank);

// The pieces (and so the piece words) in which a share of `bytes` bytes, rows of `row_bytes`
// each, is scattered with pieces of at most `piece_bytes`: every piece holds whole rows.
int64_t ScatterPieceCount(int64_t bytes, int64_t row_bytes, int64_t piece_bytes);

// What one run did, per rank (index = rank). Rank 0 fills every rank's entry (workers report
// theirs in the gather); a worker fills its own entry only.
struct ShardRunStats {
  engine::ShardPolicy strategy = engine::ShardPolicy::kSequence;
  engine::Precision precision = engine::Precision::kFloat32;
  struct Rank {
    int64_t bytes_sent = 0;      // Everything this rank sent during the run.
    int64_t bytes_received = 0;  // Everything it received.
    int64_t exchange_bytes = 0;  // Of bytes_received: kept K/V rows of spanning segments.
    double compute_seconds = 0;  // In this rank's kernel work.
    // Workers: wall time of receiving the share, the exchange and sending the output (waits
    // included). Rank 0, whose scatter and gather run on threads beside its compute: the run's
    // wall time outside its compute.
    double collective_seconds = 0;
  };
  std::vector<Rank> ranks;
};

// The problem rank 0 runs across the group. Views as in engine::RunRequest (validated by the
// caller); precision is what the caller's policy chose (fp32 or bf16 on CPU); strategy HEADS or
// SEQUENCE (ChooseShardStrategy).

// Rank 0: sends the kRun frame to every worker, then scatter, exchange, compute, gather.
absl::StatusOr<ShardRunStats> CoordinateShardedRun(Communicator& comm,
                                                   const engine::ShardedProblem& problem,
                                                   const ShardRunOptions& options);

// A worker, after receiving `run` (kind kRun) from rank 0: receives its share, exchanges,
// computes and sends its output and stats back. When its compute failed or was stopped by rank
// 0's stop word, it still answers (stats with the code) and returns that error marked
// AnsweredInStep.
absl::StatusOr<ShardRunStats> ServeShardedRun(Communicator& comm, const ControlFrame& run,
                                              const ShardRunOptions& options);

// Whether ServeShardedRun's error left the worker in step with rank 0 (its compute failed or was
// stopped, and it answered): it serves the next run as usual. Any other error means the
// communicator failed or the run never started, and the worker leaves the group.
bool AnsweredInStep(const absl::Status& served);

}  // namespace da::dist
