// One AttendStream RPC: reads a StreamHeader and the token blocks, computes on the engine, and
// writes a StreamResponseHeader, OutputBlocks and a StreamTrailer.
//
// This version collects the whole input before computing (pipelining comes later). The input
// total is checked against the engine's limits (max_request_bytes, max_tokens) from the header,
// before any buffer is allocated. Output blocks carry at most max_message_bytes / 2 bytes each
// (at least one token).
//
// Lifetime: created by the service per RPC and deleted in OnDone. Reads, the engine run and
// writes happen strictly one after another, so at most one operation is outstanding; Finish is
// called only after the engine has called back, so buffers outlive any engine work even when the
// client cancels (OnCancel sets the flag the engine polls).
#pragma once

#include <grpcpp/support/server_callback.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "da/v1/attention.pb.h"
#include "engine/engine.h"
#include "server/conversion.h"
#include "server/metrics.h"
#include "server/request_record.h"

namespace da::server {

class AttendStreamReactor final
    : public grpc::ServerBidiReactor<v1::AttendStreamRequest, v1::AttendStreamResponse> {
 public:
  // Whole-tensor host memory, released with free().
  struct FreeDeleter {
    void operator()(char* p) const { std::free(p); }
  };
  using HostBuffer = std::unique_ptr<char, FreeDeleter>;

  AttendStreamReactor(engine::Engine* engine, Metrics* metrics, int64_t max_message_bytes,
                      grpc::CallbackServerContext* context);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override { delete this; }

 private:
  enum class WriteStage { kHeader, kBlocks, kTrailer, kFinished };

  absl::Status AcceptHeader(const v1::StreamHeader& header);
  absl::Status AcceptBlock(const v1::TokenBlock& block);
  absl::Status CheckComplete() const;
  void StartCompute();
  void OnComputed(absl::StatusOr<engine::ExecutionInfo> info);  // On an engine thread.
  void WriteNext();
  void FillOutputBlock(v1::OutputBlock* block);
  // The last thing the reactor does: OnDone may follow at once on another thread.
  void FinishWith(const absl::Status& status);

  // Bytes of one token row of q (heads) and of k or v (kv_heads).
  int64_t QueryRowBytes() const;
  int64_t KeyRowBytes() const;

  engine::Engine* engine_;
  int64_t max_message_bytes_;
  grpc::CallbackServerContext* context_;
  RequestRecord record_;
  std::atomic<bool> cancelled_{false};

  v1::AttendStreamRequest request_;
  v1::AttendStreamResponse response_;

  bool have_header_ = false;
  StreamProblem problem_;
  int64_t blocks_received_ = 0;
  int64_t next_token_ = 0;  // Tokens [0, next_token_) have arrived.
  HostBuffer q_;
  HostBuffer k_;
  HostBuffer v_;
  HostBuffer out_;

  bool computed_ = false;
  engine::ExecutionInfo info_;
  WriteStage write_stage_ = WriteStage::kHeader;
  int64_t next_output_token_ = 0;
  int64_t output_block_tokens_ = 1;
};

}  // namespace da::server
