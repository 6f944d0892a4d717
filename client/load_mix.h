// The requests `da-client load` sends: named request kinds with inputs built once, their weights in
// a mix, and the status code each must get back.
//
//   std::vector<RequestKind> kinds = BuildMix(Mix::kMixed, /*malformed=*/true, /*seed=*/1);
//   KindPicker picker(kinds, /*malformed_fraction=*/0.1);
//   std::mt19937_64 rng(7);
//   const RequestKind& kind = kinds[picker.Pick(rng)];
//   grpc::Status status = SendKind(kind, client, options, -1, &response);
//
// Mixes (every input is random in [-1, 1), generated once per kind and shared by all workers, so
// the generator does not spend its CPU on random numbers):
//   small : N=2048, H=8, D=64, fp32, unary, patterns (512,1),(1024,2),(2048,4).
//   large : N=65536, H=8, D=64, fp32, streamed, patterns (2048,1),(4096,2),(8192,4).
//   mixed : tiny to moderately large, unary and streamed (weights in parentheses):
//           tiny-unary            (4) B=2 N=384 H=4 D=32 fp32, (128,1),(256,2)
//           small-unary           (3) N=2048 H=8 D=64 fp32, (512,1),(1024,2),(2048,4)
//           odd-bf16-grouped      (2) N=3001 H=6 Hkv=3 D=32 bf16 GROUPED, (256,1),(512,2),(1024,4)
//           causal-gqa-fp16-to-fp32-stream (2) N=4096 H=8 Hkv=2 D=64 fp16 in, fp32 out
//                                     (output_dtype), causal, streamed in 1000-token blocks,
//                                     (1024,1),(2048,2)
//           medium-stream         (1) N=16384 H=4 D=32 fp32 streamed, (1024,1),(2048,4)
// Malformed kinds (any mix; chosen with the malformed fraction, then in turn) all expect
// INVALID_ARGUMENT: a rank-3 query, a query one element short, a segment length of 0, a dilation
// larger than its segment, an unknown dtype, kv heads that do not divide the query heads, and
// streams with a missing block, an overlapping block, and a block of the wrong byte count.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/attention_client.h"
#include "da/v1/attention.grpc.pb.h"

namespace da::client {

enum class Mix { kSmall, kMixed, kLarge };
absl::StatusOr<Mix> ParseMix(absl::string_view name);  // "small", "mixed", "large".
std::string MixName(Mix mix);

// How a malformed stream breaks the block protocol (its header and tensors are well-formed).
enum class StreamFault {
  kNone,
  kMissingBlock,      // Block 1 is never sent.
  kOverlappingBlock,  // Block 1 is sent twice.
  kWrongBlockSize,    // Block 1's query has one element too few.
};

struct RequestKind {
  std::string name;
  double weight = 1;  // Relative, among the well-formed kinds; malformed kinds are taken in turn.
  bool stream = false;
  int64_t block_tokens = 0;  // Streams only; 0 picks blocks of about 4 MiB.
  StreamFault fault = StreamFault::kNone;
  // OK for well-formed kinds; what the server must answer otherwise.
  grpc::StatusCode expected_code = grpc::StatusCode::OK;
  // Malformed kinds: a piece of the server's message that names the fault (checked by the tests;
  // the load generator itself judges by code only, so rewording a message does not fail a run).
  std::string expected_message;
  std::shared_ptr<const v1::AttendRequest> request;  // Built once; shared by every worker.
  int64_t tokens = 0;                                // batch * seq_len.
  int64_t request_bytes = 0;  // q + k + v + output bytes, as the server's admission counts them.

  bool malformed() const { return expected_code != grpc::StatusCode::OK; }
};

// The well-formed kinds of mix, then, when with_malformed, every malformed kind. seed fixes inputs.
std::vector<RequestKind> BuildMix(Mix mix, bool with_malformed, uint64_t seed);

// Only the malformed kinds (built on small inputs, so they cost the server no compute).
std::vector<RequestKind> MalformedKinds(uint64_t seed);

// Draws kind indices: a malformed kind with probability malformed_fraction (0 when there is none),
// otherwise a well-formed one in proportion to its weight. Malformed kinds are taken in turn
// rather than at random, so that a short run with few malformed requests still sends every kind.
// Thread-safe: workers share one picker, each with its own rng.
class KindPicker {
 public:
  KindPicker(const std::vector<RequestKind>& kinds, double malformed_fraction);
  size_t Pick(std::mt19937_64& rng) const;
  // The well-formed kind worker `worker` starts with: workers start on different kinds in turn,
  // so that every kind is in flight from the first second even in a short or slow run.
  size_t First(int worker) const;

 private:
  // Kind indices of each group, and the running sums of the well-formed weights (searched with a
  // uniform draw).
  std::vector<size_t> well_formed_, malformed_;
  std::vector<double> well_formed_sums_;
  double malformed_fraction_ = 0;
  mutable std::atomic<uint64_t> malformed_turn_{0};
};

// Sends one request of kind: unary or streamed through client, or, for a stream fault, message by
// message through a stub on the client's channel (the client library only sends well-formed
// streams). stream_override: -1 keeps the kind's choice, 0 forces unary, 1 forces streaming
// (faulty streams stay streams).
grpc::Status SendKind(const RequestKind& kind, AttentionClient& client, const CallOptions& options,
                      int stream_override, v1::AttendResponse* response);

// OK when response is what kind's request must produce: the output's dtype, shape and byte count.
grpc::Status CheckResponse(const RequestKind& kind, const v1::AttendResponse& response);

}  // namespace da::client
