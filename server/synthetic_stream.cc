#include "server/synthetic_stream.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "engine/tensor.h"
#include "server/conversion.h"

namespace da::server::testing {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1) from the top 24 bits.
float ToUnit(uint64_t bits) {
  return static_cast<float>(static_cast<int32_t>(bits >> 40) - (1 << 23)) * (1.0f / (1 << 23));
}

}  // namespace

SyntheticStream::SyntheticStream(const v1::StreamHeader& header, uint64_t seed,
                                 int64_t block_tokens)
    : header_(header),
      dtype_(DTypeFromProto(header.dtype(), "dtype").value_or(engine::DType::kFloat32)),
      seed_(seed),
      block_tokens_(std::max<int64_t>(1, block_tokens)) {
  if (header_.kv_heads() == 0) header_.set_kv_heads(header_.heads());
}

int64_t SyntheticStream::Heads(Tensor tensor) const {
  return tensor == kQuery ? header_.heads() : header_.kv_heads();
}

std::string SyntheticStream::Rows(Tensor tensor, int64_t token_start, int64_t count) const {
  const int64_t elements = header_.batch() * count * Heads(tensor) * header_.head_dim();
  std::string wide(static_cast<size_t>(elements * 4), '\0');
  FillValues(tensor, token_start, count, reinterpret_cast<float*>(wide.data()));
  if (dtype_ == engine::DType::kFloat32) return wide;
  // The same values rounded to the stream's dtype.
  std::string bytes(static_cast<size_t>(elements * engine::DTypeSize(dtype_)), '\0');
  const auto* values = reinterpret_cast<const float*>(wide.data());
  for (int64_t i = 0; i < elements; ++i) engine::StoreFromFloat(dtype_, bytes.data(), i, values[i]);
  return bytes;
}

void SyntheticStream::FillValues(Tensor tensor, int64_t token_start, int64_t count,
                                 float* out) const {
  const int64_t row = Heads(tensor) * header_.head_dim();
  for (int64_t b = 0; b < header_.batch(); ++b) {
    for (int64_t t = 0; t < count; ++t) {
      const uint64_t token = static_cast<uint64_t>(token_start + t);
      uint64_t state = seed_ ^ (static_cast<uint64_t>(tensor) << 60) ^
                       (static_cast<uint64_t>(b) << 44) ^ (token * 0x100000001b3ULL);
      float* dst = out + (b * count + t) * row;
      for (int64_t e = 0; e < row; e += 2) {
        const uint64_t bits = SplitMix64(state);
        dst[e] = ToUnit(bits);
        if (e + 1 < row) dst[e + 1] = ToUnit(bits << 24);
      }
    }
  }
}

v1::TokenBlock SyntheticStream::Block(int64_t token_start) const {
  const int64_t count = std::min(block_tokens_, header_.seq_len() - token_start);
  v1::TokenBlock block;
  block.set_token_start(token_start);
  block.set_token_count(count);
  block.set_query(Rows(kQuery, token_start, count));
  block.set_key(Rows(kKey, token_start, count));
  block.set_value(Rows(kValue, token_start, count));
  return block;
}

client::AttentionClient::BlockSource SyntheticStream::Source() const {
  auto next = std::make_shared<int64_t>(0);
  return [this, next](v1::TokenBlock* block) {
    if (*next >= header_.seq_len()) return false;
    *block = Block(*next);
    *next += block->token_count();
    return true;
  };
}

std::string SyntheticStream::EngineOutput(engine::Engine& engine, int64_t token_start,
                                          int64_t count) const {
  v1::StreamHeader chunk_header = header_;
  chunk_header.set_seq_len(count);
  const StreamProblem problem = *ProblemFromHeader(chunk_header);
  const std::string q = Rows(kQuery, token_start, count);
  const std::string k = Rows(kKey, token_start, count);
  const std::string v = Rows(kValue, token_start, count);
  std::string out(q.size(), '\0');
  const engine::Shape4 q_shape = problem.shape.QueryShape();
  const engine::Shape4 kv_shape = problem.shape.KeyShape();
  engine::RunRequest run;
  const engine::DType type = dtype_;
  run.q = {type, q_shape, q.data(), static_cast<int64_t>(q.size())};
  run.k = {type, kv_shape, k.data(), static_cast<int64_t>(k.size())};
  run.v = {type, kv_shape, v.data(), static_cast<int64_t>(v.size())};
  run.spec = problem.spec;
  run.out = {type, q_shape, out.data(), static_cast<int64_t>(out.size())};
  if (!engine.Run(run).ok()) return {};
  return out;
}

}  // namespace da::server::testing
