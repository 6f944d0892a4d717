// A long fp32 stream whose inputs are generated on demand, for the bounded-memory test and the
// streaming benchmark: neither side ever holds the whole q, k and v.
//
// Every token row of q, k and v is a deterministic function of (seed, tensor, batch, token), so
// any token range can be regenerated later, e.g. to check one chunk of the answer against the
// in-process engine. Values are uniform in [-1, 1) (never zeros). Test and benchmark code only.
//
//   SyntheticStream stream(header, /*seed=*/7, /*block_tokens=*/4096);
//   client.AttendStreamBlocks(header, stream.Source(), sink);
//   std::string q = stream.Rows(SyntheticStream::kQuery, start, count);  // [batch, count, H, D]
#pragma once

#include <cstdint>
#include <string>

#include "client/attention_client.h"
#include "da/v1/attention.pb.h"
#include "engine/engine.h"

namespace da::server::testing {

class SyntheticStream {
 public:
  enum Tensor { kQuery = 0, kKey = 1, kValue = 2 };

  // header: a StreamHeader (kv_heads 0 means heads) of dtype fp32, fp16 or bf16; the values are
  // the same for every dtype, rounded to it.
  SyntheticStream(const v1::StreamHeader& header, uint64_t seed, int64_t block_tokens);

  const v1::StreamHeader& header() const { return header_; }
  engine::DType dtype() const { return dtype_; }  // The header's.
  int64_t block_tokens() const { return block_tokens_; }

  // Tokens [token_start, token_start + count) of every batch element, [batch, count, heads, D].
  std::string Rows(Tensor tensor, int64_t token_start, int64_t count) const;

  // The block that starts at token_start (block_tokens long, clipped to seq_len).
  v1::TokenBlock Block(int64_t token_start) const;

  // Blocks in order, for AttendStreamBlocks; each call of Source() starts from token 0.
  client::AttentionClient::BlockSource Source() const;

  // What the in-process engine (CPU, `threads` threads, output in the stream's dtype) answers for
  // tokens [token_start, token_start + count) computed as a problem of their own: for a chunk of
  // the server's stream this equals the server's output for those tokens.
  std::string EngineOutput(engine::Engine& engine, int64_t token_start, int64_t count) const;

 private:
  int64_t Heads(Tensor tensor) const;
  // The values of Rows (fp32, whatever the stream's dtype) into out.
  void FillValues(Tensor tensor, int64_t token_start, int64_t count, float* out) const;

  v1::StreamHeader header_;
  engine::DType dtype_;
  uint64_t seed_;
  int64_t block_tokens_;
};

}  // namespace da::server::testing
