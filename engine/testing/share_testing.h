// Test helpers for shares (engine/share.h): the gathered rows of a SEQUENCE share's spanning
// sets, assembled from every rank's share the way the multi-process protocol does it.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

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

}  // namespace da::engine::testing
