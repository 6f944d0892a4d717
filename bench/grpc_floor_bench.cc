// da-grpc-floor-bench: what one gRPC bidi stream on loopback moves with nothing of ours in it.
//
//   da-grpc-floor-bench --in-mib 1536 --out-mib 512 --message-mib 4 --repeat 3 [--streams K]
//
// The client writes in-mib of raw messages (slices of one buffer made before the clock, as
// AttendStreamShared sends blocks) on a writer thread and reads the answers on its own; the server
// (a callback generic service in this process, as da-server's AttendStream reactor) drops what it
// reads and answers out-mib in all, an answer of message-mib * out / in after every message read,
// from one buffer without copying. The time is from the first write to the last answer read.
// Next to AttendStream's figure for the same bytes (da-stream-bench) it says how much of the
// stream's time is gRPC's own and how much is ours. With --streams K the bytes are cut into K
// streams, each on a connection of its own. The channels are the client library's (MakeChannel);
// the server's flow control is da-server's (Server::Start: no BDP probing, an 8 MiB window).
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/sync_stream.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/attention_client.h"
#include "client/connection_options.h"
#include "client/grpc_poller.h"

namespace {

using Clock = std::chrono::steady_clock;

// Reads and drops every message; answers out_bytes per message read, one write at a time.
class SinkReactor final : public grpc::ServerGenericBidiReactor {
 public:
  explicit SinkReactor(const grpc::Slice* answer) : answer_(answer) { StartRead(&in_); }

  void OnReadDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      input_done_ = true;
    } else {
      in_.Clear();
      ++owed_;
      StartRead(&in_);
    }
    Next();
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) failed_ = true;
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Next() {  // Under mu_.
    if (finished_ || writing_) return;
    if (owed_ > 0 && !failed_) {
      --owed_;
      out_ = grpc::ByteBuffer(answer_, 1);
      writing_ = true;
      StartWrite(&out_);
      return;
    }
    if (input_done_ || failed_) {
      finished_ = true;
      Finish(grpc::Status::OK);
    }
  }

  const grpc::Slice* answer_;
  std::mutex mu_;
  grpc::ByteBuffer in_, out_;
  int64_t owed_ = 0;
  bool writing_ = false, input_done_ = false, finished_ = false, failed_ = false;
};

class SinkService final : public grpc::CallbackGenericService {
 public:
  explicit SinkService(const grpc::Slice* answer) : answer_(answer) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new SinkReactor(answer_);
  }

 private:
  const grpc::Slice* answer_;
};

// One stream: writes `messages` copies of block, reads the answers; true when the call ended OK
// with `answer_bytes` per message written.
bool RunStream(const std::shared_ptr<grpc::Channel>& channel, const grpc::Slice& block,
               int64_t messages, int64_t answer_bytes) {
  grpc::ClientContext context;
  const grpc::internal::RpcMethod method("/da.floor/Sink",
                                         grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &context));
  std::thread writer([&] {
    for (int64_t i = 0; i < messages; ++i) {
      grpc::ByteBuffer buffer(&block, 1);
      if (!stream->Write(buffer)) return;
    }
    stream->WritesDone();
  });
  int64_t received = 0;
  grpc::ByteBuffer buffer;
  while (stream->Read(&buffer)) received += static_cast<int64_t>(buffer.Length());
  writer.join();
  const grpc::Status status = stream->Finish();
  if (!status.ok()) {
    std::fprintf(stderr, "stream failed: %s\n", status.error_message().c_str());
    return false;
  }
  if (received != messages * answer_bytes) {
    std::fprintf(stderr, "stream answered %lld bytes, expected %lld\n",
                 static_cast<long long>(received), static_cast<long long>(messages * answer_bytes));
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"da-grpc-floor-bench: one bare gRPC bidi stream on loopback, nothing of ours in it"};
  int64_t in_mib = 1536, out_mib = 512;
  double message_mib = 4;
  int repeat = 3, streams = 1;
  app.add_option("--in-mib", in_mib, "MiB the client sends");
  app.add_option("--out-mib", out_mib, "MiB the server answers");
  app.add_option("--message-mib", message_mib, "MiB per client message");
  app.add_option("--repeat", repeat);
  app.add_option("--streams", streams, "Streams, each on a connection of its own");
  CLI11_PARSE(app, argc, argv);
  // GRPC_POLL_STRATEGY chooses gRPC's poller, as in da-server and da-client.
  const std::string poller = da::client::GrpcPollerName();

  const int64_t message = static_cast<int64_t>(message_mib * (1 << 20));
  const int64_t messages_per_stream =
      streams < 1 || message < 1 ? 0 : (in_mib << 20) / message / streams;
  const int64_t answer_bytes = message * out_mib / in_mib;
  if (streams < 1 || messages_per_stream < 1 || answer_bytes < 1) {
    std::fprintf(stderr,
                 "da-grpc-floor-bench: needs --streams >= 1 and at least one message of "
                 "input and a byte of answer per stream\n");
    return 2;
  }
  std::string block_bytes(message, 'q');
  std::string answer_bytes_data(answer_bytes, 'o');
  const grpc::Slice block(block_bytes.data(), block_bytes.size(), grpc::Slice::STATIC_SLICE);
  const grpc::Slice answer(answer_bytes_data.data(), answer_bytes_data.size(),
                           grpc::Slice::STATIC_SLICE);

  SinkService service(&answer);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&service);
  builder.SetMaxReceiveMessageSize(1 << 30);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) return 1;

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int c = 0; c < streams; ++c) {
    da::client::ConnectionOptions connection;
    connection.channel_id = c;  // A connection of its own.
    channels.push_back(da::client::MakeChannel("127.0.0.1:" + std::to_string(port), connection));
  }
  const double total_gb =
      static_cast<double>(messages_per_stream * streams * (message + answer_bytes)) / 1e9;
  for (int r = 0; r <= repeat; ++r) {
    const auto start = Clock::now();
    std::vector<std::thread> threads;
    std::atomic<bool> failed{false};
    for (int c = 0; c < streams; ++c) {
      threads.emplace_back([&, c] {
        if (!RunStream(channels[c], block, messages_per_stream, answer_bytes)) failed = true;
      });
    }
    for (std::thread& thread : threads) thread.join();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (failed) return 1;
    std::printf("%s: %d stream(s), %.2f GB in %.3f s: %.2f GB/s (gRPC poller %s)\n",
                r == 0 ? "warm-up" : "run", streams, total_gb, seconds, total_gb / seconds,
                poller.c_str());
  }
  server->Shutdown();
  return 0;
}
