// Test helpers for shares (engine/share.h): the gathered rows of a SEQUENCE share's spanning
// sets, assembled from every rank's share the way the multi-process protocol does it.
#pragma once

#include <cstdint>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/shard_data.h"
#include "engine/shard_plan.h"
#include "engine/share.h"
#include "engine/test_tensors.h"

namespace da::engine::testing {

// The rows of every spanning set this rank holds rows of, gathered from all ranks' shares the
// way the protocol does it (each sender's rows with CopyKeptRows, placed with PlaceKeptRows).
struct Gathered {
  std::vector<std::vector<uint8_t>> k, v;
  std::vector<GatheredKeys> views;
};

inline Gathered GatherFor(int rank, const ProblemShape& shape, const AttentionSpec& spec,
                          const ShardLayout& layout, const std::vector<SpanningKeys>& sets,
                          const std::vector<OwnedTensor>& k_shares,
                          const std::vector<OwnedTensor>& v_shares) {
  Gathered g;
  g.k.resize(sets.size());
  g.v.resize(sets.size());
  g.views.resize(sets.size());
  const DType dtype = k_shares[0].dtype;
  const int64_t row_bytes = shape.head_dim * DTypeSize(dtype);
  for (size_t i = 0; i < sets.size(); ++i) {
    const SpanningKeys& set = sets[i];
    const auto [mine_begin, mine_end] = RowsOf(set, layout, rank);
    if (mine_begin == mine_end) continue;
    g.k[i].assign(shape.batch * set.kept.count * row_bytes, 0xff);
    g.v[i].assign(shape.batch * set.kept.count * row_bytes, 0xff);
    for (int from = set.first_rank; from <= set.last_rank; ++from) {
      if (from != rank && !SendsRows(set, layout, spec.causal, from, rank)) continue;
      const auto [b, e] = RowsOf(set, layout, from);
      std::vector<uint8_t> piece(shape.batch * (e - b) * row_bytes);
      CopyKeptRows(k_shares[from].view(), layout.shares[from], set, b, e, piece.data());
      PlaceKeptRows(piece.data(), set, b, e, dtype, shape.batch, shape.head_dim, g.k[i].data());
      CopyKeptRows(v_shares[from].view(), layout.shares[from], set, b, e, piece.data());
      PlaceKeptRows(piece.data(), set, b, e, dtype, shape.batch, shape.head_dim, g.v[i].data());
    }
    g.views[i] = {g.k[i].data(), g.v[i].data()};
  }
  return g;
}

// Every share's copy of q, k and v (index = rank), cut out of the whole tensors.
struct ShareInputs {
  std::vector<OwnedTensor> q, k, v;
};

inline ShareInputs CutShares(const ProblemShape& shape, const ShardLayout& layout,
                             const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v) {
  ShareInputs inputs;
  for (const Share& share : layout.shares) {
    for (auto [list, source, kv] :
         {std::tuple{&inputs.q, &q, false}, std::tuple{&inputs.k, &k, true},
          std::tuple{&inputs.v, &v, true}}) {
      OwnedTensor t =
          PoisonedTensor(source->dtype, kv ? share.KeyShape(shape) : share.QueryShape(shape));
      CopyShareOut(source->view(), share, kv, t.bytes.data());
      list->push_back(std::move(t));
    }
  }
  return inputs;
}

// Tokens [begin, end) of a whole problem as a request of its own (RunRequest::share_of), as a
// stream's window is: the share's q, k and v cut out of the whole tensors, the rows of the
// segments crossing its ends gathered from the shares before and after it, and a poisoned output.
struct ShareRequest {
  ProblemShape whole;
  ShardLayout layout;  // [0, begin), [begin, end), [end, seq_len): the share is rank 1.
  std::vector<SpanningKeys> sets;
  ShareInputs inputs;
  Gathered gathered;
  ShareOfRequest share_of;
  OwnedTensor out;

  RunRequest Request(const AttentionSpec& spec) {
    RunRequest r;
    r.q = inputs.q[1].view();
    r.k = inputs.k[1].view();
    r.v = inputs.v[1].view();
    r.out = out.mutable_view();
    r.spec = spec;
    r.share_of = &share_of;
    return r;
  }
  // Row t (global) of batch b of the whole output, and the share's, as floats.
  float Whole(const OwnedTensor& whole_out, int64_t b, int64_t t, int64_t i) const {
    const int64_t row = whole.heads * whole.head_dim;
    return whole_out.at((b * whole.seq_len + t) * row + i);
  }
  float Mine(int64_t b, int64_t t, int64_t i) const {
    const Share& share = layout.shares[1];
    const int64_t row = whole.heads * whole.head_dim;
    return out.at((b * share.tokens() + t - share.token_begin) * row + i);
  }
};

inline std::unique_ptr<ShareRequest> MakeShareRequest(const OwnedProblem& p,
                                                      const ProblemShape& whole, int64_t begin,
                                                      int64_t end) {
  auto r = std::make_unique<ShareRequest>();
  r->whole = whole;
  r->layout.strategy = ShardPolicy::kSequence;
  for (const auto& [b, e] : {std::pair{int64_t{0}, begin}, {begin, end}, {end, whole.seq_len}}) {
    Share share = WholeShare(whole);
    share.rank = static_cast<int>(r->layout.shares.size());
    share.token_begin = b;
    share.token_end = e;
    r->layout.shares.push_back(share);
  }
  r->sets = SpanningKeySets(whole, p.spec, r->layout);
  r->inputs = CutShares(whole, r->layout, p.q, p.k, p.v);
  r->gathered = GatherFor(1, whole, p.spec, r->layout, r->sets, r->inputs.k, r->inputs.v);
  r->share_of = {whole, r->layout.shares[1], &r->sets, &r->gathered.views};
  r->out = PoisonedTensor(p.out.dtype, r->layout.shares[1].QueryShape(whole));
  return r;
}

}  // namespace da::engine::testing
