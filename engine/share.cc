#include "engine/share.h"

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace da::engine {
namespace {

absl::Status CheckShape(const char* what, const Shape4& got, const Shape4& want,
                        const Share& share) {
  if (got.batch == want.batch && got.seq_len == want.seq_len && got.heads == want.heads &&
      got.head_dim == want.head_dim) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("share ", what, " has shape ", got.ToString(),
                                                 "; ", share.ToString(), " needs ",
                                                 want.ToString()));
}

}  // namespace

Shape4 Share::QueryShape(const ProblemShape& shape) const {
  return {shape.batch, tokens(), heads(), shape.head_dim};
}

Shape4 Share::KeyShape(const ProblemShape& shape) const {
  return {shape.batch, tokens(), kv_heads(), shape.head_dim};
}

bool Share::Covers(const ProblemShape& shape) const {
  return token_begin == 0 && token_end == shape.seq_len && head_begin == 0 &&
         head_end == shape.heads && kv_head_begin == 0 && kv_head_end == shape.kv_heads;
}

std::string Share::ToString() const {
  return absl::StrCat("tokens [", token_begin, ", ", token_end, ") heads [", head_begin, ", ",
                      head_end, ") kv heads [", kv_head_begin, ", ", kv_head_end, ")");
}

Share WholeShare(const ProblemShape& shape) {
  return {0, 0, shape.seq_len, 0, shape.heads, 0, shape.kv_heads};
}

ShareProblem WholeProblem(const TensorView& q, const TensorView& k, const TensorView& v,
                          const AttentionSpec& spec, const MutableTensorView& out) {
  ShareProblem p;
  p.shape = {q.shape.batch, q.shape.seq_len, q.shape.heads, k.shape.heads, q.shape.head_dim};
  p.spec = spec;
  p.share = WholeShare(p.shape);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  return p;
}

absl::Status CheckShareViews(const ShareProblem& p) {
  const Shape4 q_shape = p.share.QueryShape(p.shape);
  const Shape4 kv_shape = p.share.KeyShape(p.shape);
  if (p.share.tokens() <= 0 || p.share.heads() <= 0 || p.share.kv_heads() <= 0 ||
      p.share.token_begin < 0 || p.share.token_end > p.shape.seq_len || p.share.head_begin < 0 ||
      p.share.head_end > p.shape.heads || p.share.kv_head_begin < 0 ||
      p.share.kv_head_end > p.shape.kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(p.share.ToString(), " is not a share of ", p.shape.QueryShape().ToString()));
  }
  DA_RETURN_IF_ERROR(CheckShape("q", p.q.shape, q_shape, p.share));
  DA_RETURN_IF_ERROR(CheckShape("k", p.k.shape, kv_shape, p.share));
  DA_RETURN_IF_ERROR(CheckShape("v", p.v.shape, kv_shape, p.share));
  DA_RETURN_IF_ERROR(CheckShape("out", p.out.shape, q_shape, p.share));
  if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype) {
    return absl::InvalidArgumentError("share q, k and v must share one dtype");
  }
  if ((p.spanning == nullptr) != (p.gathered == nullptr) ||
      (p.spanning != nullptr && p.spanning->size() != p.gathered->size())) {
    return absl::InvalidArgumentError("share spanning sets and gathered rows must pair up");
  }
  return absl::OkStatus();
}

absl::Status CheckShareSpace(const ShareProblem& p, MemorySpace space) {
  const std::pair<const char*, MemorySpace> views[] = {
      {"q", p.q.space}, {"k", p.k.space}, {"v", p.v.space}, {"out", p.out.space}};
  for (const auto& [name, in] : views) {
    if (!(in == space)) {
      return absl::InvalidArgumentError(absl::StrCat("share ", name, " is in ", in.ToString(),
                                                     " memory; the backend computes in ",
                                                     space.ToString(), " memory"));
    }
  }
  return absl::OkStatus();
}

}  // namespace da::engine
