#include "engine/dist/sharded_run.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "engine/cpu/aligned_buffer.h"
#include "engine/shard_data.h"
#include "engine/shard_plan.h"
#include "engine/status_macros.h"

namespace da::dist {
namespace {

using engine::DType;
using engine::ProblemShape;
using engine::ShardLayout;
using engine::Share;
using engine::SpanningKeys;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kFrameMagic = 0x44414331;  // "DAC1"
constexpr int64_t kFrameHeaderBytes = 16;     // magic, kind, payload length, reserved.
// ShardRunStats::Rank, a status code and, for a refused part, its bytes and budget.
constexpr int64_t kStatsWords = kStatsFrameBytes / 8;
// In a stats frame's code word: not the stats but a worker saying it is still computing.
constexpr int64_t kProgressWord = -1;
// Marks a worker's error after which it answered rank 0 (AnsweredInStep).
constexpr char kAnsweredPayload[] = "da.dist/answered-in-step";

// Joins a thread when the scope ends (early returns included), unless it was joined already.
struct JoinOnExit {
  std::thread& thread;
  ~JoinOnExit() {
    if (thread.joinable()) thread.join();
  }
};

// Fails a run's communicators (the control communicator and the data plane) when the rank gives
// the run up out of step with the others: its destructor runs before the joins of the threads
// that still wait on them (declared after their JoinOnExit), unless InStep() was called. Without
// it a failure on the data plane, which leaves the control communicator healthy, would keep rank
// 0's gather waiting for each worker's first frame, and a worker's stop-word listener, for the
// compute timeout and more; aborted, their calls end at once, and Gloo closes this rank's
// connections, so that the other ranks' waits on it end too. A rank that gives a run up out of
// step leaves the group anyway (the serving group re-forms it; a worker leaves its generation).
class AbortUnlessInStep {
 public:
  AbortUnlessInStep(Communicator& comm, Communicator& plane) : comm_(comm), plane_(plane) {}
  ~AbortUnlessInStep() {
    if (in_step_) return;
    comm_.Abort(why_);
    if (&plane_ != &comm_) plane_.Abort(why_);
  }
  AbortUnlessInStep(const AbortUnlessInStep&) = delete;
  AbortUnlessInStep& operator=(const AbortUnlessInStep&) = delete;

  // Every rank answered (or the run succeeded): the communicators stay usable.
  void InStep() { in_step_ = true; }

  // The run's error, as returned: the communicators' calls in flight quote it. A code that
  // callers read as a refusal that left the group usable (CANCELLED, INVALID_ARGUMENT and
  // RESOURCE_EXHAUSTED, from a communicator's argument check or a staging buffer, say) becomes
  // UNAVAILABLE, since the group is not usable now.
  absl::Status Fail(absl::Status status) {
    why_ = absl::StrCat("rank ", comm_.rank(), " gave the run up: ", status.message());
    switch (status.code()) {
      case absl::StatusCode::kCancelled:
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kResourceExhausted:
        return absl::UnavailableError(absl::StrCat(absl::StatusCodeToString(status.code()), ": ",
                                                   status.message(),
                                                   " (in the middle of a run: the ranks are out "
                                                   "of step)"));
      default:
        return status;
    }
  }

 private:
  Communicator& comm_;
  Communicator& plane_;
  bool in_step_ = false;
  std::string why_ = "the run was given up out of step";
};

// A worker's part of a run that does not fit its memory budget (budget 0: whose share buffers
// could not be had), marked engine::kPartRefusedPayload.
absl::Status PartRefused(int rank, int64_t needs, int64_t budget) {
  absl::Status refused = absl::ResourceExhaustedError(
      budget > 0
          ? absl::StrCat("rank ", rank, "'s part of this run needs ", needs,
                         " bytes (its shares of q, k, v and the output, and the kept K/V rows it "
                         "exchanges) but its memory budget is ",
                         budget,
                         " bytes (--memory-budget-bytes on that rank); fewer tokens, heads or "
                         "batch fit")
          : absl::StrCat("rank ", rank,
                         " could not allocate its share buffers (its part of this run needs ",
                         needs, " bytes)"));
  refused.SetPayload(engine::kPartRefusedPayload, absl::Cord("1"));
  return refused;
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Whole rows of `row_bytes` in one scatter piece of at most `piece_bytes` (at least one row).
int64_t PieceRows(int64_t row_bytes, int64_t piece_bytes) {
  return std::max<int64_t>(1, piece_bytes / std::max<int64_t>(1, row_bytes));
}

// An output share goes from a worker to rank 0 in pieces of at most `piece_bytes` (the run
// header's scatter_piece_bytes, so both sides cut alike): each piece within the timeout however
// large the share, and each one completed shows in the communicators' counters, by which a
// stopped run's watch (stop_watch.h) tells outputs still arriving from a rank that stalled.
// InPieces calls move(offset, piece) for each piece of `bytes` in order (once, with 0, for none).
template <typename Move>
absl::Status InPieces(int64_t bytes, int64_t piece_bytes, Move move) {
  int64_t offset = 0;
  do {
    const int64_t piece = std::min(piece_bytes, bytes - offset);
    DA_RETURN_IF_ERROR(move(offset, piece));
    offset += piece;
  } while (offset < bytes);
  return absl::OkStatus();
}

absl::Status SendInPieces(Communicator& comm, const void* data, int64_t bytes, int peer, int tag,
                          int64_t piece_bytes, std::chrono::milliseconds timeout) {
  return InPieces(bytes, piece_bytes, [&](int64_t offset, int64_t piece) {
    return comm.Send(static_cast<const uint8_t*>(data) + offset, piece, peer, tag, timeout);
  });
}

// `after_piece` (may be empty) runs after each piece received.
absl::Status RecvInPieces(Communicator& comm, void* data, int64_t bytes, int peer, int tag,
                          int64_t piece_bytes, std::chrono::milliseconds timeout,
                          const std::function<absl::Status()>& after_piece = nullptr) {
  return InPieces(bytes, piece_bytes, [&](int64_t offset, int64_t piece) {
    DA_RETURN_IF_ERROR(comm.Recv(static_cast<uint8_t*>(data) + offset, piece, peer, tag, timeout));
    return after_piece ? after_piece() : absl::OkStatus();
  });
}

// The problem description of a kRun frame: little-endian int64 words.
struct RunHeader {
  ProblemShape shape;
  DType dtype = DType::kFloat32;
  DType out_dtype = DType::kFloat32;
  engine::AttentionSpec spec;       // precision = the chosen one; shard_policy = the strategy.
  int64_t scatter_piece_bytes = 0;  // ShardRunOptions::scatter_piece_bytes of rank 0.
};

std::string EncodeRunHeader(const RunHeader& h) {
  std::vector<int64_t> words = {h.shape.batch,
                                h.shape.seq_len,
                                h.shape.heads,
                                h.shape.kv_heads,
                                h.shape.head_dim,
                                static_cast<int64_t>(h.dtype),
                                static_cast<int64_t>(h.out_dtype),
                                h.spec.causal ? 1 : 0,
                                static_cast<int64_t>(h.spec.mode),
                                static_cast<int64_t>(h.spec.precision),
                                static_cast<int64_t>(h.spec.shard_policy),
                                h.spec.softmax_scale.has_value() ? 1 : 0,
                                0,
                                static_cast<int64_t>(h.spec.patterns.size()),
                                h.scatter_piece_bytes};
  if (h.spec.softmax_scale.has_value()) std::memcpy(&words[12], &*h.spec.softmax_scale, 8);
  for (const engine::Pattern& p : h.spec.patterns) {
    words.push_back(p.segment_len);
    words.push_back(p.dilation);
  }
  return std::string(reinterpret_cast<const char*>(words.data()), words.size() * 8);
}

absl::StatusOr<RunHeader> DecodeRunHeader(const std::string& bytes) {
  constexpr size_t kFixedWords = 15;
  if (bytes.size() % 8 != 0 || bytes.size() < kFixedWords * 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "run header of ", bytes.size(), " bytes; expected 8-byte words, >= ", kFixedWords * 8));
  }
  std::vector<int64_t> w(bytes.size() / 8);
  std::memcpy(w.data(), bytes.data(), bytes.size());
  RunHeader h;
  h.shape = {w[0], w[1], w[2], w[3], w[4]};
  h.dtype = static_cast<DType>(w[5]);
  h.out_dtype = static_cast<DType>(w[6]);
  h.spec.causal = w[7] != 0;
  h.spec.mode = static_cast<engine::CombineMode>(w[8]);
  h.spec.precision = static_cast<engine::Precision>(w[9]);
  h.spec.shard_policy = static_cast<engine::ShardPolicy>(w[10]);
  if (w[11] != 0) {
    double scale;
    std::memcpy(&scale, &w[12], 8);
    h.spec.softmax_scale = scale;
  }
  h.scatter_piece_bytes = w[14];
  if (w[13] < 0 || w.size() != kFixedWords + 2 * static_cast<size_t>(w[13])) {
    return absl::InvalidArgumentError(
        absl::StrCat("run header names ", w[13], " patterns but holds ", w.size(), " words"));
  }
  for (int64_t i = 0; i < w[13]; ++i) {
    h.spec.patterns.push_back({w[kFixedWords + 2 * i], w[kFixedWords + 2 * i + 1]});
  }
  if (h.shape.batch < 1 || h.shape.seq_len < 1 || h.shape.heads < 1 || h.shape.kv_heads < 1 ||
      h.shape.head_dim < 1 || h.shape.heads % h.shape.kv_heads != 0) {
    return absl::InvalidArgumentError("run header has an invalid shape");
  }
  if (h.scatter_piece_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("run header has scatter pieces of ", h.scatter_piece_bytes, " bytes"));
  }
  DA_RETURN_IF_ERROR(h.spec.Validate());
  return h;
}

// One rank's view of a run: its share of the layout, its local tensors and its stats.
class RankRun {
 public:
  RankRun(Communicator& comm, const RunHeader& header, ShardLayout layout,
          const ShardRunOptions& options, const engine::ShareCompute& compute)
      : comm_(comm),
        plane_(options.data_plane != nullptr ? *options.data_plane : comm),
        h_(header),
        layout_(std::move(layout)),
        options_(options),
        compute_(compute),
        share_(layout_.shares[comm.rank()]) {
    if (layout_.strategy == engine::ShardPolicy::kSequence) {
      sets_ = engine::SpanningKeySets(h_.shape, h_.spec, layout_);
    }
  }

  // The share's tensors: views into caller memory (rank 0 when contiguous) or owned buffers.
  engine::TensorView q, k, v;
  engine::MutableTensorView out;

  // Bytes of this rank's share of q, of k (and of v) and of the output.
  int64_t q_bytes() const { return ShareBytes(h_.shape.QueryShape(), share_, h_.dtype, false); }
  int64_t kv_bytes() const { return ShareBytes(h_.shape.KeyShape(), share_, h_.dtype, true); }
  int64_t out_bytes() const {
    return ShareBytes(h_.shape.QueryShape(), share_, h_.out_dtype, false);
  }

  // The share's inputs and output in the rank's kept buffers (or fresh ones).
  absl::Status AllocateShare() {
    const int64_t q_bytes = this->q_bytes();
    const int64_t kv_bytes = this->kv_bytes();
    const int64_t out_bytes = this->out_bytes();
    RankBuffers& b = options_.buffers != nullptr ? *options_.buffers : own_buffers_;
    DA_RETURN_IF_ERROR(b.Reserve(q_bytes, kv_bytes, out_bytes));
    q = {h_.dtype, share_.QueryShape(h_.shape), b.q(), q_bytes};
    k = {h_.dtype, share_.KeyShape(h_.shape), b.k(), kv_bytes};
    v = {h_.dtype, share_.KeyShape(h_.shape), b.v(), kv_bytes};
    out = {h_.out_dtype, share_.QueryShape(h_.shape), b.out(), out_bytes};
    return absl::OkStatus();
  }

  // A worker that refused the run (its part is over its memory budget): it holds no share, and
  // its exchange sends zero rows in place of its kept rows and keeps nothing it receives.
  void HoldNoShare() { no_share_ = true; }
  bool holds_share() const { return !no_share_; }

  // SEQUENCE: sends this rank's kept rows of every spanning set to the ranks that read them and
  // gathers the rows it reads; a no-op for HEADS. Each operation waits up to `limit`. Rank 0
  // without a data plane scatters on another thread meanwhile: share_sent(peer), when set, waits
  // until peer's share has gone out before any operation with it, which otherwise would wait on
  // the scatter to peer and the ranks before it.
  absl::Status Exchange(std::chrono::milliseconds limit,
                        const std::function<void(int)>& share_sent = nullptr) {
    if (sets_.empty()) return absl::OkStatus();
    const Clock::time_point start = Clock::now();
    const int me = comm_.rank();
    const int world = comm_.size();
    const int64_t row_bytes = h_.shape.head_dim * engine::DTypeSize(h_.dtype);
    gathered_k_.resize(sets_.size());
    gathered_v_.resize(sets_.size());
    views_.assign(sets_.size(), {});
    // Outgoing messages, one per peer: for every set both hold rows of (in set order) and the
    // peer reads, this rank's K rows then V rows.
    std::vector<std::vector<uint8_t>> outgoing(world);
    std::vector<int64_t> incoming_bytes(world, 0);
    {
      // Each message at its size at once (RankRunBytes counts them so, not grown by doubling).
      std::vector<int64_t> outgoing_bytes(world, 0);
      for (const SpanningKeys& set : sets_) {
        const auto [mine_begin, mine_end] = engine::RowsOf(set, layout_, me);
        for (int peer = set.first_rank; peer <= set.last_rank && mine_begin < mine_end; ++peer) {
          if (!engine::SendsRows(set, layout_, h_.spec.causal, me, peer)) continue;
          outgoing_bytes[peer] += 2 * h_.shape.batch * (mine_end - mine_begin) * row_bytes;
        }
      }
      for (int peer = 0; peer < world; ++peer) outgoing[peer].reserve(outgoing_bytes[peer]);
    }
    for (size_t i = 0; i < sets_.size(); ++i) {
      const SpanningKeys& set = sets_[i];
      const auto [mine_begin, mine_end] = engine::RowsOf(set, layout_, me);
      if (mine_begin == mine_end) continue;
      const int64_t piece_bytes = h_.shape.batch * (mine_end - mine_begin) * row_bytes;
      if (!no_share_) {
        gathered_k_[i].resize(h_.shape.batch * set.kept.count * row_bytes);
        gathered_v_[i].resize(gathered_k_[i].size());
        views_[i] = {gathered_k_[i].data(), gathered_v_[i].data()};
      }
      std::vector<uint8_t> piece(piece_bytes);  // Zeros from a rank that holds no share.
      for (auto [source, gathered] :
           {std::pair{&k, &gathered_k_[i]}, std::pair{&v, &gathered_v_[i]}}) {
        if (!no_share_) {
          engine::CopyKeptRows(*source, share_, set, mine_begin, mine_end, piece.data());
          engine::PlaceKeptRows(piece.data(), set, mine_begin, mine_end, h_.dtype, h_.shape.batch,
                                h_.shape.head_dim, gathered->data());
        }
        for (int peer = set.first_rank; peer <= set.last_rank; ++peer) {
          if (!engine::SendsRows(set, layout_, h_.spec.causal, me, peer)) continue;
          outgoing[peer].insert(outgoing[peer].end(), piece.begin(), piece.end());
        }
      }
      for (int peer = set.first_rank; peer <= set.last_rank; ++peer) {
        if (!engine::SendsRows(set, layout_, h_.spec.causal, peer, me)) continue;
        const auto [b, e] = engine::RowsOf(set, layout_, peer);
        incoming_bytes[peer] += 2 * h_.shape.batch * (e - b) * row_bytes;
      }
    }
    const auto send_to = [&](int peer) -> absl::Status {
      if (outgoing[peer].empty()) return absl::OkStatus();
      if (share_sent) share_sent(peer);
      return plane_.Send(outgoing[peer].data(), static_cast<int64_t>(outgoing[peer].size()), peer,
                         kExchangeTag, limit);
    };
    const auto receive_from = [&](int peer) -> absl::Status {
      if (incoming_bytes[peer] == 0) return absl::OkStatus();
      if (share_sent) share_sent(peer);
      std::vector<uint8_t> message(incoming_bytes[peer]);
      DA_RETURN_IF_ERROR(
          plane_.Recv(message.data(), incoming_bytes[peer], peer, kExchangeTag, limit));
      stats_.exchange_bytes += incoming_bytes[peer];
      if (no_share_) return absl::OkStatus();
      // Unpack in the sender's order: per set, K rows then V rows.
      const uint8_t* cursor = message.data();
      for (size_t i = 0; i < sets_.size(); ++i) {
        const SpanningKeys& set = sets_[i];
        if (!engine::SendsRows(set, layout_, h_.spec.causal, peer, me)) continue;
        const auto [b, e] = engine::RowsOf(set, layout_, peer);
        for (std::vector<uint8_t>* gathered : {&gathered_k_[i], &gathered_v_[i]}) {
          engine::PlaceKeptRows(cursor, set, b, e, h_.dtype, h_.shape.batch, h_.shape.head_dim,
                                gathered->data());
          cursor += h_.shape.batch * (e - b) * row_bytes;
        }
      }
      return absl::OkStatus();
    };
    absl::Status exchanged;
    if (separate_plane()) {
      // A data plane: one thread, blocking sends, no tags. Pair by pair in one global order
      // ((a, b), a < b, lexicographic), the lower rank sending first: the first pair not yet done
      // always has both its ranks at it, so the exchange cannot deadlock.
      for (int a = 0; a < world && exchanged.ok(); ++a) {
        for (int b = a + 1; b < world && exchanged.ok(); ++b) {
          if (me != a && me != b) continue;
          const int peer = me == a ? b : a;
          exchanged = me == a ? send_to(peer) : receive_from(peer);
          if (exchanged.ok()) exchanged = me == a ? receive_from(peer) : send_to(peer);
        }
      }
    } else {
      // Sends are synchronous: each peer's on its own thread, receives here in rank order, so no
      // two ranks ever wait on each other in a cycle.
      std::vector<absl::Status> sent(world);
      std::vector<std::thread> senders;
      for (int peer = 0; peer < world; ++peer) {
        if (outgoing[peer].empty()) continue;
        senders.emplace_back([&, peer] { sent[peer] = send_to(peer); });
      }
      for (int peer = 0; peer < world && exchanged.ok(); ++peer) exchanged = receive_from(peer);
      for (std::thread& t : senders) t.join();
      for (const absl::Status& s : sent) {
        if (exchanged.ok()) exchanged = s;
      }
    }
    stats_.collective_seconds += SecondsSince(start);
    return exchanged;
  }

  absl::Status Compute(const std::atomic<bool>* cancelled) {
    const Clock::time_point start = Clock::now();
    engine::ShareProblem p;
    p.shape = h_.shape;
    p.spec = h_.spec;
    p.share = share_;
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    if (!sets_.empty()) {
      p.spanning = &sets_;
      p.gathered = &views_;
    }
    // The share is in host memory (received, or rank 0's own); a GPU computes it in its memory.
    absl::Status status = engine::RunHostShareWithPlan(compute_, p, h_.spec.precision, cancelled);
    stats_.compute_seconds += SecondsSince(start);
    return status;
  }

  // Times a scatter or gather step into collective_seconds.
  template <typename F>
  absl::Status Timed(F&& step) {
    const Clock::time_point start = Clock::now();
    absl::Status status = step();
    stats_.collective_seconds += SecondsSince(start);
    return status;
  }

  ShardRunStats::Rank& stats() { return stats_; }
  const Share& share() const { return share_; }
  const ShardLayout& layout() const { return layout_; }
  // Where the bulk bytes go: the data plane, or the control communicator itself.
  Communicator& plane() const { return plane_; }
  bool separate_plane() const { return &plane_ != &comm_; }

 private:
  Communicator& comm_;
  Communicator& plane_;
  const RunHeader& h_;
  const ShardLayout layout_;
  const ShardRunOptions& options_;
  const engine::ShareCompute& compute_;
  const Share share_;
  std::vector<SpanningKeys> sets_;
  std::vector<std::vector<uint8_t>> gathered_k_, gathered_v_;
  std::vector<engine::GatheredKeys> views_;
  bool no_share_ = false;
  RankBuffers own_buffers_;
  ShardRunStats::Rank stats_;
};

// Bytes a rank moved during a run, over the control communicator and the data plane (when it has
// one of its own).
class Traffic {
 public:
  Traffic(const Communicator& comm, const Communicator* plane)
      : comm_(comm), plane_(plane == &comm ? nullptr : plane), before_(Sum()) {}
  void Count(ShardRunStats::Rank& stats) const {
    const Communicator::Counters after = Sum();
    stats.bytes_sent = after.bytes_sent - before_.bytes_sent;
    stats.bytes_received = after.bytes_received - before_.bytes_received;
  }

 private:
  Communicator::Counters Sum() const {
    Communicator::Counters sum = comm_.counters();
    if (plane_ != nullptr) {
      const Communicator::Counters plane = plane_->counters();
      sum.bytes_sent += plane.bytes_sent;
      sum.bytes_received += plane.bytes_received;
    }
    return sum;
  }
  const Communicator& comm_;
  const Communicator* plane_;
  const Communicator::Counters before_;
};

// A refused part (ShardRunOptions::memory_budget_bytes) also sends the bytes it needed and the
// budget it was over (0: its share buffers could not be had).
std::vector<int64_t> StatsWords(const ShardRunStats::Rank& r, absl::StatusCode code,
                                int64_t refused_needs = 0, int64_t refused_budget = 0) {
  int64_t compute_ns = static_cast<int64_t>(r.compute_seconds * 1e9);
  int64_t collective_ns = static_cast<int64_t>(r.collective_seconds * 1e9);
  return {r.bytes_sent,  r.bytes_received,           r.exchange_bytes, compute_ns,
          collective_ns, static_cast<int64_t>(code), refused_needs,    refused_budget};
}

ShardRunStats::Rank StatsFromWords(const std::vector<int64_t>& w) {
  ShardRunStats::Rank r;
  r.bytes_sent = w[0];
  r.bytes_received = w[1];
  r.exchange_bytes = w[2];
  r.compute_seconds = static_cast<double>(w[3]) / 1e9;
  r.collective_seconds = static_cast<double>(w[4]) / 1e9;
  return r;
}

// Views of a rank-0 share straight into the whole tensors, when the share is contiguous there
// (SEQUENCE with batch 1): no copy in or out.
}  // namespace

int64_t RankRunBytes(const ProblemShape& shape, DType dtype, DType out_dtype,
                     const engine::AttentionSpec& spec, const ShardLayout& layout, int rank) {
  const Share& share = layout.shares[rank];
  int64_t bytes = ShareBytes(shape.QueryShape(), share, dtype, false) +
                  2 * ShareBytes(shape.KeyShape(), share, dtype, true) +
                  ShareBytes(shape.QueryShape(), share, out_dtype, false);
  if (layout.strategy != engine::ShardPolicy::kSequence) return bytes;
  // As RankRun::Exchange holds them: per set it has rows of, the whole set's K and V rows and a
  // copy of its own rows for each peer that reads them (one piece of them at a time besides),
  // and one incoming message at a time.
  const int64_t row_bytes = shape.head_dim * engine::DTypeSize(dtype);
  const int world = static_cast<int>(layout.shares.size());
  std::vector<int64_t> incoming(world, 0);
  int64_t largest_piece = 0;
  for (const SpanningKeys& set : engine::SpanningKeySets(shape, spec, layout)) {
    const auto [mine_begin, mine_end] = engine::RowsOf(set, layout, rank);
    if (mine_begin == mine_end) continue;
    const int64_t piece = shape.batch * (mine_end - mine_begin) * row_bytes;
    largest_piece = std::max(largest_piece, piece);
    bytes += 2 * shape.batch * set.kept.count * row_bytes;
    for (int peer = set.first_rank; peer <= set.last_rank; ++peer) {
      if (engine::SendsRows(set, layout, spec.causal, rank, peer)) bytes += 2 * piece;
      if (engine::SendsRows(set, layout, spec.causal, peer, rank)) {
        const auto [b, e] = engine::RowsOf(set, layout, peer);
        incoming[peer] += 2 * shape.batch * (e - b) * row_bytes;
      }
    }
  }
  return bytes + largest_piece + *std::max_element(incoming.begin(), incoming.end());
}

int64_t ScatterPieceCount(int64_t bytes, int64_t row_bytes, int64_t piece_bytes) {
  if (bytes <= 0) return 0;
  const int64_t rows = bytes / std::max<int64_t>(1, row_bytes);
  const int64_t piece_rows = PieceRows(row_bytes, piece_bytes);
  return (rows + piece_rows - 1) / piece_rows;
}

struct RankBuffers::Buffers {
  engine::cpu::AlignedBuffer q, k, v, out;
};

RankBuffers::RankBuffers() : buffers_(std::make_unique<Buffers>()) {}
RankBuffers::~RankBuffers() = default;

absl::Status RankBuffers::Reserve(int64_t q_bytes, int64_t kv_bytes, int64_t out_bytes) {
  for (auto [buffer, bytes] :
       {std::pair{&buffers_->q, q_bytes}, std::pair{&buffers_->k, kv_bytes},
        std::pair{&buffers_->v, kv_bytes}, std::pair{&buffers_->out, out_bytes}}) {
    if (buffer->Reserve((bytes + 3) / 4) == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("sharded run: cannot allocate a ", bytes, "-byte share buffer"));
    }
  }
  return absl::OkStatus();
}

void* RankBuffers::q() const { return buffers_->q.data(); }
void* RankBuffers::k() const { return buffers_->k.data(); }
void* RankBuffers::v() const { return buffers_->v.data(); }
void* RankBuffers::out() const { return buffers_->out.data(); }

std::string EncodeControlFrame(const ControlFrame& frame) {
  std::string bytes(kControlFrameBytes, '\0');
  const uint32_t words[4] = {kFrameMagic, static_cast<uint32_t>(frame.kind),
                             static_cast<uint32_t>(frame.payload.size()), 0};
  std::memcpy(bytes.data(), words, sizeof(words));
  const size_t room = kControlFrameBytes - kFrameHeaderBytes;
  std::memcpy(bytes.data() + kFrameHeaderBytes, frame.payload.data(),
              std::min(frame.payload.size(), room));
  return bytes;
}

absl::StatusOr<ControlFrame> DecodeControlFrame(const std::string& bytes) {
  if (static_cast<int64_t>(bytes.size()) != kControlFrameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("control frame of ", bytes.size(), " bytes; expected ", kControlFrameBytes));
  }
  uint32_t words[4];
  std::memcpy(words, bytes.data(), sizeof(words));
  if (words[0] != kFrameMagic) {
    return absl::InvalidArgumentError(absl::StrCat("control frame magic ", words[0]));
  }
  if (words[1] < 1 || words[1] > 3) {
    return absl::InvalidArgumentError(absl::StrCat("control frame kind ", words[1]));
  }
  if (words[2] > kControlFrameBytes - kFrameHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("control frame payload of ", words[2],
                                                   " bytes; at most ",
                                                   kControlFrameBytes - kFrameHeaderBytes));
  }
  ControlFrame frame;
  frame.kind = static_cast<ControlKind>(words[1]);
  frame.payload = bytes.substr(kFrameHeaderBytes, words[2]);
  return frame;
}

namespace {

// The protocol overlaps scatter, exchange, compute and gather on threads, and keeps its kinds of
// messages apart by tag: it runs only over a communicator that allows both.
absl::Status CheckCapabilities(const Communicator& comm, const Communicator* plane) {
  if (plane != nullptr && (plane->rank() != comm.rank() || plane->size() != comm.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("the data plane is rank ", plane->rank(), " of ", plane->size(),
                     ", the control communicator rank ", comm.rank(), " of ", comm.size(),
                     "; they must be one group"));
  }
  const Communicator::Capabilities can = comm.capabilities();
  if (can.concurrent_calls && can.tagged_messages) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the sharded protocol needs a communicator that takes concurrent calls and tagged "
      "messages; ",
      comm.backend(), " takes ", can.concurrent_calls ? "concurrent calls" : "one thread at a time",
      " and matches messages ", can.tagged_messages ? "by tag" : "in issue order only",
      " (it can carry a data plane driven from one thread, not this protocol)"));
}

}  // namespace

absl::StatusOr<ShardRunStats> CoordinateShardedRun(Communicator& comm,
                                                   const engine::ShardedProblem& problem,
                                                   const ShardRunOptions& options) {
  DA_RETURN_IF_ERROR(CheckCapabilities(comm, options.data_plane));
  if (comm.rank() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("CoordinateShardedRun on rank ", comm.rank(), "; only rank 0 coordinates"));
  }
  RunHeader header;
  header.shape = {problem.q.shape.batch, problem.q.shape.seq_len, problem.q.shape.heads,
                  problem.k.shape.heads, problem.q.shape.head_dim};
  header.dtype = problem.q.dtype;
  header.out_dtype = problem.out.dtype;
  header.spec = problem.spec;
  header.spec.precision = problem.precision;
  header.spec.shard_policy = problem.strategy;
  if (options.scatter_piece_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sharded run: scatter pieces of ", options.scatter_piece_bytes, " bytes; at least 1"));
  }
  header.scatter_piece_bytes = options.scatter_piece_bytes;
  const std::string payload = EncodeRunHeader(header);
  if (static_cast<int64_t>(payload.size()) > kControlFrameBytes - kFrameHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("sharded run: ", problem.spec.patterns.size(),
                                                   " patterns do not fit a control frame"));
  }
  DA_ASSIGN_OR_RETURN(ShardLayout layout, engine::MakeShardLayout(header.shape, header.spec,
                                                                  problem.strategy, comm.size()));
  // A worker's part over its memory budget is refused here, before any message: the group stays
  // in step. (A worker whose budget rank 0 does not know refuses in step itself.)
  for (int r = 1; r < comm.size(); ++r) {
    const int64_t budget = static_cast<size_t>(r) < options.rank_memory_budgets.size()
                               ? options.rank_memory_budgets[r]
                               : 0;
    if (budget <= 0) continue;
    const int64_t needs =
        RankRunBytes(header.shape, header.dtype, header.out_dtype, header.spec, layout, r);
    if (needs > budget) return PartRefused(r, needs, budget);
  }
  const Clock::time_point run_start = Clock::now();
  const Traffic traffic(comm, options.data_plane);
  RankRun run(comm, header, std::move(layout), options, problem.compute);
  Communicator& plane = run.plane();
  const ProblemShape& shape = header.shape;
  const int world = comm.size();

  // Rank 0's own share buffers, when its share is not contiguous in the whole tensors, are had
  // before anything is sent: running out of memory then leaves the group in step.
  if (!engine::ShareIsContiguous(shape, run.share())) DA_RETURN_IF_ERROR(run.AllocateShare());

  // Control frames, then the scatter of each worker's q, k and v share on a thread of its own,
  // so that rank 0's exchange and compute overlap it (on a data plane: here, before the
  // exchange, as the plane takes one thread).
  const std::string frame = EncodeControlFrame({ControlKind::kRun, payload});
  for (int r = 1; r < world; ++r) {
    if (absl::Status sent =
            comm.Send(frame.data(), kControlFrameBytes, r, kControlTag, options.timeout);
        !sent.ok()) {
      AbortUnlessInStep give_up(comm, plane);  // The workers before r wait for their scatter.
      return give_up.Fail(std::move(sent));
    }
  }
  // The gather runs on a thread posted before the scatter: a worker that computes before rank 0
  // has scattered to the others (HEADS) is not left waiting in its (synchronous) Send, a worker
  // lost at any time is noticed at once and stops rank 0's compute. Each worker's first frame
  // comes only once it holds its share, has exchanged and computed a while, after the shares of
  // the ranks before it (and for SEQUENCE its peers'), which may take longer than a timeout: the
  // first receive waits up to the compute timeout, the later ones (progress frames, every third
  // of a timeout) a timeout. Workers write disjoint parts of the output. With a data plane the
  // thread takes the stats only; the outputs come over the plane after rank 0's compute.
  ShardRunStats stats;
  stats.strategy = problem.strategy;
  stats.precision = problem.precision;
  stats.ranks.resize(world);
  std::atomic<bool> stop{false};
  std::atomic<bool> gather_done{false};
  absl::Status gathered, worker_failed;
  std::vector<char> sends_output(world, 0);  // The worker computed its share (one writer each).
  // Every worker gets one stop word per run (kStopTag): 1 from the relay below when the request
  // is cancelled, else 0 at the end. Whoever claims `stop_words_sent` first sends them.
  std::atomic<bool> stop_words_sent{false};
  // Once the relay's words (1) went out, each worker leaves the run as soon as it has answered
  // (stats, and output unless it comes later over a data plane: `left`), while rank 0 may still
  // take outputs already on their way from others (worker 2's output of gigabytes over a slow
  // link, say). A worker that left waits for rank 0's next control frame for only
  // kIdleHeartbeats heartbeats, so it is kept with heartbeat frames (keep_left_workers).
  std::atomic<bool> stopped_early{false};
  std::unique_ptr<std::atomic<bool>[]> left(new std::atomic<bool>[world] {});
  const auto send_stop_words = [&](int64_t word) -> absl::Status {
    if (stop_words_sent.exchange(true)) return absl::OkStatus();
    for (int r = 1; r < world; ++r) {
      DA_RETURN_IF_ERROR(comm.Send(&word, kStopWordBytes, r, kStopTag, options.timeout));
    }
    if (word != 0) stopped_early = true;
    return absl::OkStatus();
  };
  // Called after each output piece rank 0 takes: a heartbeat frame to every worker that left,
  // at most every options.keepalive. Only as the run moves, so that a run that stalls after its
  // stop still looks stalled (no bytes move) to the serving group's stop watch.
  std::mutex keepalive_mutex;
  Clock::time_point last_keepalive = Clock::now();
  std::atomic<int64_t> keepalive_bytes{0};  // Not the run's bytes: taken off its stats.
  const std::string keepalive_frame = EncodeControlFrame({ControlKind::kHeartbeat, ""});
  const auto keep_left_workers = [&]() -> absl::Status {
    if (options.keepalive.count() <= 0 || !stopped_early.load()) return absl::OkStatus();
    std::unique_lock<std::mutex> lock(keepalive_mutex, std::try_to_lock);
    if (!lock.owns_lock() || Clock::now() - last_keepalive < options.keepalive) {
      return absl::OkStatus();  // Another output's thread is at it, or it is not time yet.
    }
    last_keepalive = Clock::now();
    for (int r = 1; r < world; ++r) {
      if (!left[r].load()) continue;
      DA_RETURN_IF_ERROR(
          comm.Send(keepalive_frame.data(), kControlFrameBytes, r, kControlTag, options.timeout));
      keepalive_bytes += kControlFrameBytes;
    }
    return absl::OkStatus();
  };
  // Worker r's output share, into its place in the whole output.
  const auto receive_output = [&](int r, std::chrono::milliseconds limit,
                                  std::vector<uint8_t>& buffer) -> absl::Status {
    const Share& share = run.layout().shares[r];
    const int64_t bytes = engine::ShareBytes(problem.out.shape, share, problem.out.dtype, false);
    if (engine::ShareIsContiguous(shape, share)) {
      return RecvInPieces(plane,
                          const_cast<uint8_t*>(engine::ShareStart(problem.out.data, shape, share,
                                                                  shape.heads, problem.out.dtype)),
                          bytes, r, kGatherTag, header.scatter_piece_bytes, limit,
                          keep_left_workers);
    }
    buffer.resize(bytes);
    DA_RETURN_IF_ERROR(RecvInPieces(plane, buffer.data(), bytes, r, kGatherTag,
                                    header.scatter_piece_bytes, limit, keep_left_workers));
    engine::CopyShareIn(buffer.data(), share, problem.out);
    return absl::OkStatus();
  };
  // One thread per worker, so that a worker lost while another computes is noticed within the
  // collective timeout: a computing worker sends a progress frame at least every third of it
  // (kProgressWord), so silence for a whole timeout means the worker (or its link) is gone, even
  // when no connection closes. Its compute may take up to compute_timeout in all.
  std::mutex gather_mutex;                       // worker_failed and gathered.
  std::atomic<bool> worker_failed_early{false};  // A worker answered with a failure.
  std::atomic<bool> abandon{false};
  const auto gather_worker = [&](int r) -> absl::Status {
    std::vector<uint8_t> buffer;
    std::optional<Clock::time_point> begin;  // The first frame: the worker computes.
    std::vector<int64_t> words(kStatsWords);
    for (;;) {
      DA_RETURN_IF_ERROR(
          comm.Recv(words.data(), kStatsWords * 8, r, kGatherTag,
                    begin ? options.timeout : options.compute_timeout + options.timeout));
      if (!begin) begin = Clock::now();
      if (words[5] != kProgressWord) break;
      // Another worker is lost: the run fails and the group re-forms; stop waiting for this one.
      if (abandon.load()) return absl::AbortedError("run abandoned");
      if (Clock::now() - *begin > options.timeout + options.compute_timeout) {
        return absl::DeadlineExceededError(
            absl::StrCat("rank ", r, " computed its share for longer than ",
                         (options.timeout + options.compute_timeout).count(), " ms"));
      }
    }
    // The stats first: a worker that failed or was stopped sends no output.
    stats.ranks[r] = StatsFromWords(words);
    if (words[5] != 0) {
      std::lock_guard<std::mutex> lock(gather_mutex);
      const absl::StatusCode code = static_cast<absl::StatusCode>(words[5]);
      if (worker_failed.ok() && code == absl::StatusCode::kResourceExhausted && words[6] > 0) {
        // A part the worker refused: its numbers reach the caller.
        worker_failed = PartRefused(r, words[6], words[7]);
      } else if (worker_failed.ok()) {
        // The worker's own log has its message; the code and the rank reach the caller.
        worker_failed = absl::Status(
            static_cast<absl::StatusCode>(words[5]),
            absl::StrCat("rank ", r, " failed to compute its share (",
                         absl::StatusCodeToString(static_cast<absl::StatusCode>(words[5])),
                         "; see that rank's log)"));
      }
      // The run has failed: the relay stops every other rank's compute (the group stays in
      // step, as for a cancelled request).
      if (!absl::IsCancelled(worker_failed)) worker_failed_early = true;
      return absl::OkStatus();
    }
    sends_output[r] = 1;
    if (!run.separate_plane()) return receive_output(r, options.timeout, buffer);
    return absl::OkStatus();
  };
  // Rank 0's compute has returned: the relay below watches the request's flag until then, and
  // until every worker answered.
  std::atomic<bool> compute_done{false};
  std::thread gather([&] {
    std::vector<std::thread> workers;
    for (int r = 1; r < world; ++r) {
      workers.emplace_back([&, r] {
        absl::Status status = gather_worker(r);
        // (With a data plane no output piece arrives after the stop words, so nobody is kept.)
        if (status.ok() && (!run.separate_plane() || sends_output[r] == 0)) left[r] = true;
        if (!status.ok()) {
          stop = true;     // A lost worker stops rank 0's compute at once, and the other
          abandon = true;  // workers' waits at their next progress frame (the communicator,
                           // broken, has ended the waits in flight and closed every connection,
                           // which stops the other workers' compute: ServeShardedRun).
          // A timeout is the cause, where one comes: the calls it ended name it in their
          // messages, but as UNAVAILABLE.
          std::lock_guard<std::mutex> lock(gather_mutex);
          if (gathered.ok() ||
              (absl::IsDeadlineExceeded(status) && !absl::IsDeadlineExceeded(gathered))) {
            gathered = std::move(status);
          }
        }
      });
    }
    for (std::thread& t : workers) t.join();
    gather_done = true;
  });
  JoinOnExit gather_joiner{gather};

  absl::Status scattered;
  // Each worker's q, k and v share in pieces of whole rows, each announced by a piece word.
  // Before every piece rank 0 looks whether the run is still wanted (its request not cancelled,
  // no worker failed): once not, the worker being sent to and every later one are told 0
  // (nothing more comes) instead.
  const auto request_cancelled = [&] { return problem.stop != nullptr && problem.stop->load(); };
  // A run is not wanted once its request is cancelled or a worker answered with a failure.
  const auto run_unwanted = [&] { return request_cancelled() || worker_failed_early.load(); };
  const auto send_word = [&](int r, int64_t word) {
    return comm.Send(&word, kPieceWordBytes, r, kPieceTag, options.timeout);
  };
  // Without a data plane the scatter runs beside rank 0's exchange, which takes a worker up only
  // once that worker's share has gone out (it exchanges only once it holds it): each exchange
  // call then waits on its peer's exchange, within a timeout, not on the scatter to the ranks
  // before it, which may take longer. Workers below shares_out have their share, or the scatter
  // ended.
  std::mutex shares_mutex;
  std::condition_variable shares_cv;
  int shares_out = 1;  // Guarded by shares_mutex.
  const auto shares_out_below = [&](int r) {
    {
      std::lock_guard<std::mutex> lock(shares_mutex);
      shares_out = r;
    }
    shares_cv.notify_all();
  };
  const auto share_sent = [&](int peer) {
    std::unique_lock<std::mutex> lock(shares_mutex);
    shares_cv.wait(lock, [&] { return shares_out > peer; });
  };
  const auto scatter_shares = [&] {
    std::vector<uint8_t> buffer;  // A piece of a share that is not contiguous in the whole.
    bool stopped = false;
    for (int r = 1; r < world && scattered.ok(); ++r) {
      const Share& share = run.layout().shares[r];
      const int64_t rows = shape.batch * share.tokens();
      const bool contiguous = engine::ShareIsContiguous(shape, share);
      for (auto [view, kv] : {std::pair{&problem.q, false}, std::pair{&problem.k, true},
                              std::pair{&problem.v, true}}) {
        if (stopped || !scattered.ok() || rows == 0) break;
        const int64_t row_bytes = engine::ShareBytes(view->shape, share, view->dtype, kv) / rows;
        const int64_t piece_rows = PieceRows(row_bytes, header.scatter_piece_bytes);
        // Contiguous: the pieces are read in place from the whole tensor.
        const uint8_t* start = contiguous ? engine::ShareStart(view->data, shape, share,
                                                               view->shape.heads, view->dtype)
                                          : nullptr;
        for (int64_t r0 = 0; r0 < rows; r0 += piece_rows) {
          if (run_unwanted()) {
            stopped = true;
            break;
          }
          const int64_t r1 = std::min(rows, r0 + piece_rows);
          const void* data;
          if (contiguous) {
            data = start + r0 * row_bytes;
          } else {
            buffer.resize((r1 - r0) * row_bytes);
            engine::CopyShareOutRows(*view, share, kv, r0, r1, buffer.data());
            data = buffer.data();
          }
          scattered = send_word(r, 1);
          if (scattered.ok()) {
            scattered = plane.Send(data, (r1 - r0) * row_bytes, r, kScatterTag, options.timeout);
          }
          if (!scattered.ok()) break;
        }
      }
      if (stopped && scattered.ok()) scattered = send_word(r, 0);
      shares_out_below(r + 1);
    }
    shares_out_below(world);  // Ended, however: nobody waits for a share that will not come.
  };
  std::thread scatter;
  JoinOnExit joiner{scatter};
  // Runs before the joiners above: an error out of step from here on aborts the communicators
  // first, which ends the gather's (and the scatter's) waits at once.
  AbortUnlessInStep abort_unless_in_step(comm, plane);
  if (run.separate_plane()) {
    scatter_shares();
    if (!scattered.ok()) return abort_unless_in_step.Fail(scattered);
  } else {
    scatter = std::thread(scatter_shares);
  }

  // Rank 0's own share.
  const Share& mine = run.share();
  if (engine::ShareIsContiguous(shape, mine)) {
    run.q = {problem.q.dtype, mine.QueryShape(shape),
             engine::ShareStart(problem.q.data, shape, mine, shape.heads, problem.q.dtype),
             engine::ShareBytes(problem.q.shape, mine, problem.q.dtype, false)};
    for (auto [dst, src] : {std::pair{&run.k, &problem.k}, std::pair{&run.v, &problem.v}}) {
      *dst = {src->dtype, mine.KeyShape(shape),
              engine::ShareStart(src->data, shape, mine, shape.kv_heads, src->dtype),
              engine::ShareBytes(src->shape, mine, src->dtype, true)};
    }
    run.out = {problem.out.dtype, mine.QueryShape(shape),
               const_cast<uint8_t*>(engine::ShareStart(problem.out.data, shape, mine, shape.heads,
                                                       problem.out.dtype)),
               engine::ShareBytes(problem.out.shape, mine, problem.out.dtype, false)};
  } else {
    // Into the buffers allocated above. A copy that stops part-way leaves rows nobody reads: the
    // exchange below still runs (the ranks stay in step) and the compute stops at once.
    for (auto [whole, kv, dst] :
         {std::tuple{&problem.q, false, &run.q}, std::tuple{&problem.k, true, &run.k},
          std::tuple{&problem.v, true, &run.v}}) {
      if (!engine::CopyShareOutUnlessStopped(*whole, mine, kv, const_cast<void*>(dst->data),
                                             problem.stop)) {
        break;
      }
    }
  }
  // With a data plane the scatter is over and each worker waits in its first exchange call.
  if (absl::Status exchanged = run.separate_plane() ? run.Exchange(options.timeout)
                                                    : run.Exchange(options.timeout, share_sent);
      !exchanged.ok()) {
    return abort_unless_in_step.Fail(std::move(exchanged));
  }

  // Rank 0's compute polls one flag: set by the gather on a lost worker, or by a watcher that
  // polls the caller's cancellation (and whether a worker answered with a failure, after which
  // nobody's output is wanted) every millisecond until every worker has answered and rank 0's
  // compute has returned, and on it also stops the workers. (A cancel after the workers
  // answered still stops rank 0's own compute: with a data plane they answer before their
  // outputs go, and a rank 0 busy with local requests computes longest.)
  absl::Status relayed;
  std::thread relay([&] {
    while (!gather_done.load() || !compute_done.load()) {
      if (run_unwanted()) {
        stop = true;
        relayed = send_stop_words(1);
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  JoinOnExit relay_joiner{relay};
  if (run_unwanted()) stop = true;  // Not one kernel step for a run that is not wanted.
  const absl::Status computed = run.Compute(&stop);
  compute_done = true;
  if (computed.ok() && !engine::ShareIsContiguous(shape, mine)) {
    engine::CopyShareIn(run.out.data, mine, problem.out);
  }

  // Whatever happened here, every worker's answer is collected, so the group stays in step.
  if (scatter.joinable()) scatter.join();
  gather.join();
  relay.join();
  bool outputs_skipped = false;
  if (run.separate_plane()) {
    // Every worker that computed waits for its output word, then sends its output over the
    // plane, in rank order; each is told, so that no worker is left waiting. After a lost worker
    // (the gather failed) none is: the caller drops the communicators and the workers' waits for
    // their words end at once. The outputs of a run that is not wanted (its request cancelled,
    // or another worker failed) are not taken: word 0, and the worker sends none (the run is then
    // CANCELLED or that worker's failure, however the computes ended).
    std::vector<uint8_t> buffer;
    for (int r = 1; r < world && gathered.ok(); ++r) {
      if (sends_output[r] == 0) continue;
      const int64_t word = run_unwanted() ? 0 : 1;
      outputs_skipped = outputs_skipped || word == 0;
      gathered = comm.Send(&word, kOutputWordBytes, r, kOutputTag, options.timeout);
      if (gathered.ok() && word != 0) gathered = receive_output(r, options.timeout, buffer);
    }
  }
  // Workers that answered wait for their stop word (0 unless the relay sent 1).
  // Any failure here is out of step: a communicator's, or a worker that computed for too long.
  if (scattered.ok() && gathered.ok()) {
    if (absl::Status sent = send_stop_words(0); !sent.ok()) {
      return abort_unless_in_step.Fail(std::move(sent));
    }
  }
  for (const absl::Status* failed : {&relayed, &scattered, &gathered}) {
    if (!failed->ok()) return abort_unless_in_step.Fail(*failed);
  }
  abort_unless_in_step.InStep();
  // Rank 0's scatter and gather overlap its compute: its communication time is the run's wall
  // time outside its compute (sends, waits and copies).
  run.stats().collective_seconds = SecondsSince(run_start) - run.stats().compute_seconds;
  traffic.Count(run.stats());
  run.stats().bytes_sent -= keepalive_bytes.load();  // Heartbeats to workers that left.
  stats.ranks[0] = run.stats();
  // A cancelled request stops rank 0 (CANCELLED from its compute) or, when rank 0 had finished,
  // only the workers (CANCELLED in their stats).
  // Every rank answered and has its stop word: the group is in step, whatever failed.
  const auto in_step = [](absl::Status status) {
    status.SetPayload(kAnsweredPayload, absl::Cord("1"));
    return status;
  };
  const bool cancelled = request_cancelled();
  for (const absl::Status* failed : {&computed, static_cast<const absl::Status*>(&worker_failed)}) {
    if (failed->ok()) continue;
    if (cancelled && failed->code() == absl::StatusCode::kCancelled) {
      return in_step(absl::CancelledError("sharded run cancelled"));
    }
    // Rank 0 stopped because a worker failed: that worker's failure is the run's.
    if (failed == &computed && absl::IsCancelled(computed) && !worker_failed.ok()) continue;
    if (failed == &computed && !worker_failed.ok()) {
      // Both sides failed (the same unsupported request, say): name every rank that did.
      return in_step(absl::Status(
          computed.code(),
          absl::StrCat("rank 0 failed: ", computed.message(), "; ", worker_failed.message())));
    }
    return in_step(*failed);
  }
  // Every rank computed, but the outputs were not taken: cancelled (a failure above says more).
  if (outputs_skipped) return in_step(absl::CancelledError("sharded run cancelled"));
  return stats;
}

bool AnsweredInStep(const absl::Status& served) {
  return !served.ok() && served.GetPayload(kAnsweredPayload).has_value();
}

absl::StatusOr<ShardRunStats> ServeShardedRun(Communicator& comm, const ControlFrame& frame,
                                              const ShardRunOptions& options) {
  if (frame.kind != ControlKind::kRun) {
    return absl::InvalidArgumentError("ServeShardedRun needs a kRun control frame");
  }
  DA_RETURN_IF_ERROR(CheckCapabilities(comm, options.data_plane));
  DA_ASSIGN_OR_RETURN(const RunHeader header, DecodeRunHeader(frame.payload));
  DA_ASSIGN_OR_RETURN(
      ShardLayout layout,
      engine::MakeShardLayout(header.shape, header.spec, header.spec.shard_policy, comm.size()));
  const Traffic traffic(comm, options.data_plane);
  RankRun run(comm, header, std::move(layout), options, options.compute);
  // A part over this rank's memory budget, or whose share buffers cannot be had, is refused in
  // step: the worker goes through the run's steps holding no share and answers with the refusal.
  // Its part's bytes are worked out only where they matter: a budget to hold them to, or a
  // refusal to report them in.
  const auto part_bytes = [&] {
    return RankRunBytes(header.shape, header.dtype, header.out_dtype, header.spec, run.layout(),
                        comm.rank());
  };
  int64_t needs = options.memory_budget_bytes > 0 ? part_bytes() : 0;
  absl::Status refused;
  int64_t refused_budget = 0;  // The budget it was over; 0 when its buffers could not be had.
  if (options.memory_budget_bytes > 0 && needs > options.memory_budget_bytes) {
    refused_budget = options.memory_budget_bytes;
    refused = PartRefused(comm.rank(), needs, refused_budget);
  } else {
    refused = run.AllocateShare();
    if (!refused.ok() && needs == 0) needs = part_bytes();
  }
  if (!refused.ok()) run.HoldNoShare();
  std::vector<uint8_t> scratch;  // A refused run's scatter pieces, one at a time, not kept.
  // The share in pieces, each after its piece word; a 0 word (the request was cancelled) ends
  // the scatter early, and the worker then goes through the run's steps without computing.
  bool scatter_stopped = false;
  absl::Status received = run.Timed([&]() -> absl::Status {
    const int64_t rows = header.shape.batch * run.share().tokens();
    if (rows == 0) return absl::OkStatus();
    const int64_t kv_bytes = run.kv_bytes();
    for (auto [view, bytes] : {std::pair{&run.q, run.q_bytes()}, std::pair{&run.k, kv_bytes},
                               std::pair{&run.v, kv_bytes}}) {
      auto* share_data = static_cast<uint8_t*>(const_cast<void*>(view->data));
      const int64_t row_bytes = bytes / rows;
      const int64_t piece_rows = PieceRows(row_bytes, header.scatter_piece_bytes);
      for (int64_t r0 = 0; r0 < rows; r0 += piece_rows) {
        // Rank 0 scatters to the workers in rank order: the first word waits for the shares of
        // every rank before this one, of any size (a lost rank 0 is heard at once; a cut link
        // no later than the compute timeout), each later word one piece.
        int64_t word = 0;
        const bool first = view == &run.q && r0 == 0;
        DA_RETURN_IF_ERROR(
            comm.Recv(&word, kPieceWordBytes, 0, kPieceTag,
                      first ? options.compute_timeout + options.timeout : options.timeout));
        if (word == 0) {
          scatter_stopped = true;
          return absl::OkStatus();
        }
        const int64_t r1 = std::min(rows, r0 + piece_rows);
        uint8_t* into = nullptr;
        if (run.holds_share()) {
          into = share_data + r0 * row_bytes;
        } else {
          if (scratch.size() < static_cast<size_t>((r1 - r0) * row_bytes)) {
            scratch.resize((r1 - r0) * row_bytes);
          }
          into = scratch.data();
        }
        DA_RETURN_IF_ERROR(
            run.plane().Recv(into, (r1 - r0) * row_bytes, 0, kScatterTag, options.timeout));
      }
    }
    return absl::OkStatus();
  });
  if (!received.ok()) {
    AbortUnlessInStep give_up(comm, run.plane());  // Rank 0 is scattering, or will exchange.
    return give_up.Fail(std::move(received));
  }
  // From here on this worker answers rank 0 whatever happens (or its communicator has failed, and
  // with it this receive), so it listens for the run's stop word: rank 0 sends 1 as soon as the
  // request is cancelled, 0 after its own compute and every worker's answer (and output). The
  // compute polls the flag, which a failed receive raises too: rank 0 is gone, or gave the run up
  // and dropped its communicator, and nobody will take this worker's answer.
  std::atomic<bool> stop{scatter_stopped};
  std::atomic<bool> listened{false};
  int64_t stop_word = 0;
  absl::Status heard;
  std::thread listener([&] {
    heard = comm.Recv(&stop_word, kStopWordBytes, 0, kStopTag,
                      options.compute_timeout + options.timeout * (comm.size() + 1));
    if (!heard.ok() || stop_word != 0) stop = true;
    listened = true;
  });
  JoinOnExit joiner{listener};
  // Runs before the listener's join: an error from here on (every one is out of step) aborts the
  // communicators first, which ends the listener's wait for the stop word at once.
  AbortUnlessInStep abort_unless_in_step(comm, run.plane());
  // Each exchange call may wait for the shares of the ranks after this one (the peer's share,
  // or, on a data plane, rank 0's scatter to them), of any size, as the first piece word waits
  // for those before it: up to the compute timeout and a timeout. A peer lost meanwhile is heard
  // at once; one that stalls, by rank 0 within a timeout (its own exchange calls with it) or
  // when its first gather frame does not come, and rank 0 then aborts the run everywhere.
  if (absl::Status exchanged = run.Exchange(options.compute_timeout + options.timeout);
      !exchanged.ok()) {
    return abort_unless_in_step.Fail(std::move(exchanged));
  }
  // While it computes, a progress frame to rank 0 every third of the timeout: rank 0 takes a
  // whole timeout of silence for a lost worker (a cut link closes no connection).
  std::mutex progress_mutex;
  std::condition_variable progress_wake;
  bool computing = true;
  std::thread progress([&] {
    std::vector<int64_t> words(kStatsWords, 0);
    words[5] = kProgressWord;
    std::unique_lock<std::mutex> lock(progress_mutex);
    while (!progress_wake.wait_for(lock, options.timeout / 3, [&] { return !computing; })) {
      lock.unlock();
      const absl::Status sent =
          comm.Send(words.data(), kStatsWords * 8, 0, kGatherTag, options.timeout);
      lock.lock();
      if (!sent.ok()) {
        stop = true;  // Rank 0 is not listening: nobody will take the answer.
        return;       // The stats send below fails the same way.
      }
    }
  });
  // A failed or stopped compute sends only its stats, whose code says why; the error is returned
  // to the worker's loop.
  // A refused part answers its refusal, unless the run was stopped meanwhile (a cancel says
  // more: nobody wanted the part).
  absl::Status computed = refused;
  if (refused.ok()) {
    computed = run.Compute(&stop);
  } else if (stop.load()) {
    computed = absl::CancelledError("stopped by rank 0 before its refused part mattered");
  }
  const bool answers_refusal = !refused.ok() && computed.code() == refused.code();
  // Stopped as the compute ended: the output is not wanted (rank 0 may be taking other
  // outputs, and would take this one before the run ends), so it answers as a stopped compute.
  if (computed.ok() && stop.load()) {
    computed = absl::CancelledError("stopped by rank 0 as its compute ended");
  }
  {
    std::lock_guard<std::mutex> lock(progress_mutex);
    computing = false;
  }
  progress_wake.notify_all();
  progress.join();              // Its frames go before the stats, in order.
  bool output_dropped = false;  // Rank 0 said (output word 0) it does not want the output.
  absl::Status answered = run.Timed([&]() -> absl::Status {
    traffic.Count(run.stats());
    // The kRun frame (received before this call), the stop word (unless it came already: a
    // cancelled run), the output word and what is sent below belong to the run.
    // (The stats it reports count the output as sent: with a data plane, rank 0 does not take
    // the output of a request cancelled meanwhile, but the run is then CANCELLED, with no stats.)
    const bool output_word = computed.ok() && run.separate_plane();
    run.stats().bytes_received += kControlFrameBytes + (listened.load() ? 0 : kStopWordBytes) +
                                  (output_word ? kOutputWordBytes : 0);
    run.stats().bytes_sent += kStatsWords * 8 + (computed.ok() ? run.out.bytes : 0);
    const std::vector<int64_t> words =
        answers_refusal ? StatsWords(run.stats(), computed.code(), needs, refused_budget)
                        : StatsWords(run.stats(), computed.code());
    DA_RETURN_IF_ERROR(comm.Send(words.data(), kStatsWords * 8, 0, kGatherTag, options.timeout));
    if (!computed.ok()) return absl::OkStatus();
    if (output_word) {
      // Rank 0 takes the outputs only after its own compute (up to compute_timeout), then in rank
      // order (up to a timeout each); the wait is here, on the control communicator. 0: the
      // request was cancelled, and the output is not wanted.
      int64_t word = 0;
      DA_RETURN_IF_ERROR(comm.Recv(&word, kOutputWordBytes, 0, kOutputTag,
                                   options.compute_timeout + options.timeout * comm.rank()));
      if (word == 0) {
        output_dropped = true;
        return absl::OkStatus();
      }
    }
    return SendInPieces(run.plane(), run.out.data, run.out.bytes, 0, kGatherTag,
                        header.scatter_piece_bytes, options.timeout);
  });
  if (!answered.ok()) return abort_unless_in_step.Fail(std::move(answered));
  listener.join();
  if (!heard.ok()) return abort_unless_in_step.Fail(heard);
  abort_unless_in_step.InStep();
  if (output_dropped) computed = absl::CancelledError("rank 0 did not take the output: cancelled");
  if (!computed.ok()) {
    absl::Status failed = computed;
    failed.SetPayload(kAnsweredPayload, absl::Cord("1"));
    return failed;
  }
  ShardRunStats stats;
  stats.strategy = header.spec.shard_policy;
  stats.precision = header.spec.precision;
  stats.ranks.resize(comm.size());
  stats.ranks[comm.rank()] = run.stats();
  return stats;
}

}  // namespace da::dist
