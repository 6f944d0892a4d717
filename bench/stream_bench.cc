// da-stream-bench: one fp32 problem through AttendStream on loopback, next to the in-process
// engine's time for the same problem, measured in the same run.
//
//   da-stream-bench --seq-len 65536 --heads 8 --head-dim 64 --segments 2048,4096,8192
//                   --dilations 1,2,4 --mode grouped --threads 2 --repeat 3
//   da-stream-bench --server 127.0.0.1:50051 --server-pid 1234 --seq-len 4194304 --heads 2
//                   --skip-in-process --repeat 1
//   da-stream-bench --parallel-streams 2 ...   # the client library's AttendStream, 2 parts
//
// Without --server it starts an in-process server (127.0.0.1, port 0, --threads compute
// threads). Inputs are generated block by block (server/synthetic_stream.h), so the client holds
// no whole tensors; with the in-process baseline on, the whole streamed output is compared byte
// for byte with the engine's (with one stream of shared blocks at --batch 1 only; the ratio line
// says when it was not compared). With --parallel-streams K the client holds the whole request
// (made before the clock) and sends it as a user of the client library does, AttendStream cut
// into K parts on K connections of their own (K = 1: the same library path in one stream).
// --server-pid reads that process's peak RSS (VmHWM) after the run.
//
// The plain-TCP floor (unless --skip-plain-tcp) moves the inputs, then the output, in sequence:
// not full duplex, while the stream overlaps its output with its inputs. A floor that overlapped
// them could be faster by up to the output's transfer time, so ratios against this floor may
// flatter the stream by up to that much.
//
// A client that does not share the server's cores (as a remote client does not), on a machine
// with four or more:
//   taskset -c 0,1 da-server --threads 2 ... &
//   taskset -c 2,3 da-stream-bench --server 127.0.0.1:50051 --server-pid $! --engine-cpus 0,1
// --engine-cpus runs the in-process baseline on the server's cores, so both sides of the ratio
// compute on the same two cores.
#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_join.h"
#include "bench/median.h"
#include "client/attention_client.h"
#include "client/connection_options.h"
#include "client/grpc_poller.h"
#include "engine/dist/socket_io.h"
#include "engine/status_macros.h"
#include "server/conversion.h"
#include "server/malloc_tuning.h"
#include "server/proc_stats.h"
#include "server/server.h"
#include "server/synthetic_stream.h"

namespace {

using Clock = std::chrono::steady_clock;
using da::bench::Median;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// This process's CPU time (all threads: with an in-process server, client and server alike) and
// minor page faults so far.
struct Usage {
  double cpu_s = 0;
  double minor_faults = 0;
};

Usage ProcessUsage() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; };
  return {seconds(usage.ru_utime) + seconds(usage.ru_stime), static_cast<double>(usage.ru_minflt)};
}

Usage Since(const Usage& start) {
  const Usage now = ProcessUsage();
  return {now.cpu_s - start.cpu_s, now.minor_faults - start.minor_faults};
}

// The whole machine over a run (/proc/stat, 10 ms ticks): the share of its CPU time that was not
// idle, and the softirq time (loopback TCP's receive path runs there, charged to no process).
struct MachineShare {
  double busy = 0;
  double softirq_s = 0;
};

MachineShare MachineSince(const da::server::MachineCpu& start) {
  const da::server::MachineCpu now = da::server::ReadMachineCpu();
  const double total = now.total_s - start.total_s;
  if (!start.ok || !now.ok || total <= 0) return {};
  return {1.0 - (now.idle_s - start.idle_s) / total, now.softirq_s - start.softirq_s};
}

// What one timed run took: wall time, this process's usage and the machine's share.
struct Measurement {
  double seconds = 0;
  Usage used;
  MachineShare machine;
};

// Starts measuring when made; Stop() says what happened since.
class Meter {
 public:
  Measurement Stop() const { return {Seconds(start_), Since(usage_), MachineSince(machine_)}; }

 private:
  Usage usage_ = ProcessUsage();
  da::server::MachineCpu machine_ = da::server::ReadMachineCpu();
  Clock::time_point start_ = Clock::now();
};

// The timed runs of one kind (the stream's, the in-process engine's, plain TCP's), in order.
struct Runs {
  std::vector<double> seconds, cpu_s, faults, busy, softirq_s;
  void Add(const Measurement& m) {
    seconds.push_back(m.seconds);
    cpu_s.push_back(m.used.cpu_s);
    faults.push_back(m.used.minor_faults);
    busy.push_back(m.machine.busy);
    softirq_s.push_back(m.machine.softirq_s);
  }
};

// Runs `body` with the calling thread (and the threads it starts) on `cpus`, then restores the
// calling thread's affinity. Empty `cpus`: runs it as is.
template <typename Body>
bool WithAffinity(const std::vector<int>& cpus, Body&& body) {
  cpu_set_t before;
  if (cpus.empty()) {
    body();
    return true;
  }
  if (sched_getaffinity(0, sizeof(before), &before) != 0) return false;
  cpu_set_t wanted;
  CPU_ZERO(&wanted);
  for (const int cpu : cpus) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
    CPU_SET(cpu, &wanted);
  }
  if (sched_setaffinity(0, sizeof(wanted), &wanted) != 0) return false;
  body();
  return sched_setaffinity(0, sizeof(before), &before) == 0;
}

// The whole problem in memory and an engine to run it on: the stream's baseline.
class Baseline {
 public:
  static absl::StatusOr<std::unique_ptr<Baseline>> Create(
      const da::server::testing::SyntheticStream& stream, const da::v1::StreamHeader& header,
      int threads) {
    da::engine::EngineOptions engine_options;
    engine_options.threads = threads;
    auto engine = da::engine::Engine::Create(engine_options);
    if (!engine.ok()) return engine.status();
    const auto problem = da::server::ProblemFromHeader(header);
    if (!problem.ok()) return problem.status();
    auto made = std::unique_ptr<Baseline>(new Baseline);
    made->engine_ = *std::move(engine);
    using da::server::testing::SyntheticStream;
    const int64_t n = header.seq_len();
    made->q_ = stream.Rows(SyntheticStream::kQuery, 0, n);
    made->k_ = stream.Rows(SyntheticStream::kKey, 0, n);
    made->v_ = stream.Rows(SyntheticStream::kValue, 0, n);
    made->out_.assign(made->q_.size(), '\0');
    const da::engine::Shape4 q_shape = problem->shape.QueryShape();
    const da::engine::Shape4 kv_shape = problem->shape.KeyShape();
    const da::engine::DType type = stream.dtype();
    const auto view = [type](da::engine::Shape4 shape, const std::string& bytes) {
      return da::engine::TensorView{type, shape, bytes.data(), static_cast<int64_t>(bytes.size())};
    };
    made->run_.q = view(q_shape, made->q_);
    made->run_.k = view(kv_shape, made->k_);
    made->run_.v = view(kv_shape, made->v_);
    made->run_.out = {type, q_shape, made->out_.data(), static_cast<int64_t>(made->out_.size())};
    made->run_.spec = problem->spec;
    return made;
  }

  absl::Status Run() { return engine_->Run(run_).status(); }
  // The last run's output.
  const std::string& output() const { return out_; }

 private:
  Baseline() = default;
  std::unique_ptr<da::engine::Engine> engine_;
  std::string q_, k_, v_, out_;
  da::engine::RunRequest run_;
};

// The same bytes over a plain loopback TCP connection between two threads of this process:
// in_bytes one way, then, once they have all arrived, out_bytes back (in sequence, not full
// duplex: the stream overlaps the two), in 4 MiB blocking writes and reads, no framing and no
// copies of our own. Its CPU time is what the kernel alone charges for moving a stream's bytes,
// the part of the stream's cost beyond the engine that no server code can remove.
absl::StatusOr<Measurement> MovePlainTcp(int64_t in_bytes, int64_t out_bytes) {
  namespace io = da::dist::internal;
  constexpr int64_t kChunk = int64_t{4} << 20;
  const auto deadline = io::Clock::now() + std::chrono::seconds(60);
  struct Fd {
    int fd = -1;
    ~Fd() {
      if (fd >= 0) close(fd);
    }
  } listener, client, server;
  const io::HostPort loopback{"127.0.0.1", 0};
  DA_ASSIGN_OR_RETURN(listener.fd, io::ListenTcp(loopback));
  DA_ASSIGN_OR_RETURN(const int port, io::LocalPort(listener.fd));
  DA_ASSIGN_OR_RETURN(client.fd, io::ConnectTcp({loopback.host, port}, deadline));
  server.fd = accept(listener.fd, nullptr, nullptr);  // The connection is already queued.
  if (server.fd < 0) return absl::UnavailableError("accept on the loopback listener failed");
  // The helpers make non-blocking sockets; blocking ones sleep in recv and send, as a plain
  // transfer does, instead of polling.
  for (const int fd : {client.fd, server.fd}) fcntl(fd, F_SETFL, 0);
  // Not zeros: the bytes are what they are to TCP, but nothing should look compressible.
  std::string send_buffer(static_cast<size_t>(kChunk), '\0');
  for (size_t i = 0; i < send_buffer.size(); ++i) {
    send_buffer[i] = static_cast<char>(i * 2654435761u >> 13);
  }
  std::string receive_buffer(static_cast<size_t>(kChunk), '\0');
  const auto transfer = [&](int from, int to, int64_t total) {
    absl::Status sent;
    std::thread sender([&] {
      for (int64_t done = 0; done < total && sent.ok(); done += kChunk) {
        sent = io::WriteAll(from, send_buffer.data(), std::min(kChunk, total - done), deadline);
      }
    });
    absl::Status received;
    for (int64_t done = 0; done < total && received.ok(); done += kChunk) {
      received = io::ReadAll(to, receive_buffer.data(), std::min(kChunk, total - done), deadline);
    }
    if (!received.ok()) shutdown(from, SHUT_RDWR);  // A sender blocked on a full socket returns.
    sender.join();
    return received.ok() ? sent : received;
  };
  const Meter meter;
  DA_RETURN_IF_ERROR(transfer(client.fd, server.fd, in_bytes));   // Inputs in,
  DA_RETURN_IF_ERROR(transfer(server.fd, client.fd, out_bytes));  // the output back.
  return meter.Stop();
}

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 1, seq_len = 65536, heads = 8, kv_heads = 0, head_dim = 64;
  int64_t block_tokens = 0, min_chunk_tokens = 4096;
  std::vector<int64_t> segments{2048, 4096, 8192}, dilations{1, 2, 4};
  std::string mode = "grouped", precision = "fp32", dtype = "fp32", server_address;
  std::string listen = "127.0.0.1:0";
  int threads = 2, repeat = 3, depth = 2, parallel_streams = 0, parts_used = 1;
  long server_pid = 0;
  bool skip_in_process = false;
  bool generate_while_sending = false;
  bool skip_plain_tcp = false;
  std::vector<int> engine_cpus;

  CLI::App app{"da-stream-bench: AttendStream on loopback against the in-process engine"};
  app.add_option("--server", server_address,
                 "host:port of a running da-server; default: start one");
  app.add_option("--server-pid", server_pid, "pid of that server, to report its peak RSS");
  app.add_option("--listen", listen,
                 "Address of the in-process server: host:0 (TCP loopback) or unix:PATH")
      ->capture_default_str();
  app.add_option("--batch", batch);
  app.add_option("--seq-len", seq_len);
  app.add_option("--heads", heads);
  app.add_option("--kv-heads", kv_heads);
  app.add_option("--head-dim", head_dim);
  app.add_option("--segments", segments)->delimiter(',');
  app.add_option("--dilations", dilations)->delimiter(',');
  app.add_option("--mode", mode)->check(CLI::IsMember({"longnet", "grouped"}));
  app.add_option("--precision", precision)->check(CLI::IsMember({"auto", "fp32", "bf16"}));
  app.add_option("--dtype", dtype,
                 "The tensors' dtype on the wire and out (bf16 and fp16: half "
                 "the bytes of fp32)")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  app.add_option("--block-tokens", block_tokens, "Tokens per input block; 0: about 4 MiB");
  app.add_option("--threads", threads, "Compute threads of the in-process engine and server");
  app.add_option("--pipeline-depth", depth, "In-process server's --stream-pipeline-depth");
  app.add_option("--min-chunk-tokens", min_chunk_tokens, "In-process server's chunk minimum");
  app.add_option("--repeat", repeat, "Timed runs of each (after one warm-up run)");
  app.add_option("--parallel-streams", parallel_streams,
                 "Send through AttendStream cut into K parts on K connections (0: shared blocks, "
                 "one stream)");
  app.add_flag("--skip-in-process", skip_in_process, "Only the stream (e.g. for 4M tokens)");
  app.add_flag("--generate-while-sending", generate_while_sending,
               "Make each block as it is sent (bounded client memory, e.g. for 4M tokens) instead "
               "of before the clock starts");
  app.add_flag("--skip-plain-tcp", skip_plain_tcp,
               "Do not measure the same bytes over a plain loopback TCP connection (inputs, "
               "then output, in sequence: not full duplex)");
  app.add_option("--engine-cpus", engine_cpus,
                 "CPUs of the in-process baseline (e.g. those a --server is pinned to)")
      ->delimiter(',');
  CLI11_PARSE(app, argc, argv);
  const std::string poller = da::client::GrpcPollerName();
  // As da-server does (this process is the server too, unless --server).
  if (server_address.empty()) da::server::KeepFreedMessageMemory();
  if (segments.size() != dilations.size() || repeat < 1) {
    std::cerr << "da-stream-bench: --segments and --dilations need equal lengths; --repeat >= 1\n";
    return 2;
  }

  da::v1::StreamHeader header;
  header.set_request_id("da-stream-bench");
  const da::v1::DType wire_dtype = dtype == "bf16"   ? da::v1::DTYPE_BF16
                                   : dtype == "fp16" ? da::v1::DTYPE_FP16
                                                     : da::v1::DTYPE_FP32;
  const int64_t element_bytes =
      da::engine::DTypeSize(*da::server::DTypeFromProto(wire_dtype, "dtype"));
  header.set_dtype(wire_dtype);
  header.set_batch(batch);
  header.set_seq_len(seq_len);
  header.set_heads(heads);
  header.set_kv_heads(kv_heads);
  header.set_head_dim(head_dim);
  for (size_t i = 0; i < segments.size(); ++i) {
    header.mutable_spec()->add_segment_lengths(segments[i]);
    header.mutable_spec()->add_dilation_rates(dilations[i]);
  }
  header.mutable_spec()->set_combine_mode(mode == "grouped" ? da::v1::COMBINE_MODE_GROUPED
                                                            : da::v1::COMBINE_MODE_LONGNET);
  header.mutable_spec()->set_precision(precision == "fp32"   ? da::v1::PRECISION_FP32
                                       : precision == "bf16" ? da::v1::PRECISION_BF16
                                                             : da::v1::PRECISION_AUTO);
  const int64_t row_bytes = (kv_heads == 0 ? heads : kv_heads) * head_dim * element_bytes;
  if (block_tokens == 0) {
    block_tokens = std::max<int64_t>(
        1, (4 << 20) / (batch * (heads * head_dim * element_bytes + 2 * row_bytes)));
  }
  const da::server::testing::SyntheticStream stream(header, /*seed=*/20261125, block_tokens);
  const int64_t out_bytes = batch * seq_len * heads * head_dim * element_bytes;
  const double wire_bytes = static_cast<double>(batch * seq_len) *
                            (2.0 * heads * head_dim * element_bytes + 2.0 * row_bytes);

  // The in-process baseline: the whole problem in one Engine::Run on inputs already in memory
  // (the same values the stream sends). Its runs alternate with the stream's, so that both see
  // the same state of the machine; the first of each warms up.
  std::unique_ptr<Baseline> baseline;
  if (!skip_in_process) {
    // The engine's pool threads start inside Engine::Create and inherit the affinity.
    absl::StatusOr<std::unique_ptr<Baseline>> made;
    if (!WithAffinity(engine_cpus, [&] { made = Baseline::Create(stream, header, threads); })) {
      std::cerr << "da-stream-bench: cannot run on --engine-cpus\n";
      return 1;
    }
    if (!made.ok()) {
      std::cerr << "da-stream-bench: " << made.status() << "\n";
      return 1;
    }
    baseline = *std::move(made);
  }
  const std::string no_output;
  const std::string& expected = baseline ? baseline->output() : no_output;  // Not a copy.
  Runs engine_runs;

  std::unique_ptr<da::server::Server> server;
  if (server_address.empty()) {
    da::server::ServerOptions options;
    options.listen_address = listen;
    options.metrics_address = "";
    options.threads = threads;
    options.stream_pipeline_depth = depth;
    options.stream_min_chunk_tokens = min_chunk_tokens;
    auto started = da::server::Server::Start(options);
    if (!started.ok()) {
      std::cerr << started.status() << "\n";
      return 1;
    }
    server = *std::move(started);
    server_address = listen.rfind("unix:", 0) == 0 ? listen
                                                   : listen.substr(0, listen.rfind(':')) + ":" +
                                                         std::to_string(server->port());
  }
  da::client::AttentionClient client(da::client::MakeChannel(server_address));
  // --parallel-streams: the whole request, and a client with a connection per part.
  da::v1::AttendRequest request;
  std::unique_ptr<da::client::AttentionClient> parts_client;
  if (parallel_streams > 0) {
    using da::server::testing::SyntheticStream;
    request.set_request_id(header.request_id());
    *request.mutable_spec() = header.spec();
    for (auto [tensor, kind, h] :
         {std::tuple{request.mutable_query(), SyntheticStream::kQuery, heads},
          {request.mutable_key(), SyntheticStream::kKey, kv_heads == 0 ? heads : kv_heads},
          {request.mutable_value(), SyntheticStream::kValue, kv_heads == 0 ? heads : kv_heads}}) {
      tensor->set_dtype(wire_dtype);
      for (int64_t dim : {batch, seq_len, h, head_dim}) tensor->add_shape(dim);
      tensor->set_data(stream.Rows(kind, 0, seq_len));
    }
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (int c = 0; c < parallel_streams; ++c) {
      da::client::ConnectionOptions connection;
      connection.channel_id = c;
      channels.push_back(da::client::MakeChannel(server_address, connection));
    }
    parts_client = std::make_unique<da::client::AttentionClient>(std::move(channels));
  }

  // Whether the stream's output is compared with the engine's: always with --parallel-streams (the
  // whole output), with shared blocks at batch 1 only (blocks are compared at their offsets in
  // the [B, N, H, D] output, which holds for one batch).
  const bool compared = !expected.empty() && (parallel_streams > 0 || batch == 1);
  Runs stream_runs;
  std::vector<double> server_cpu;
  da::v1::ExecutionInfo info;
  for (int i = 0; i <= repeat; ++i) {  // Run 0 warms the plan and the server's buffers.
    if (baseline) {
      const Meter meter;
      absl::Status ran;
      WithAffinity(engine_cpus, [&] { ran = baseline->Run(); });
      const Measurement measured = meter.Stop();
      if (!ran.ok()) {
        std::cerr << "da-stream-bench: the in-process engine refused: " << ran << "\n";
        return 1;
      }
      if (i > 0) engine_runs.Add(measured);
    }
    int64_t received = 0;
    bool same = true;  // Stays true when nothing is compared (see `compared`).
    // Blocks are made before the clock starts (unless --generate-while-sending): on a shared
    // loopback machine the client's random number generation would otherwise compete with the
    // server's compute, which a client on its own machine does not. They are shared with the
    // client, which sends them where they lie, and freed after the clock stops, as the
    // in-process run's inputs are.
    std::vector<std::shared_ptr<const da::v1::TokenBlock>> blocks;
    if (!generate_while_sending) {
      for (int64_t start = 0; start < seq_len; start += block_tokens) {
        blocks.push_back(std::make_shared<const da::v1::TokenBlock>(stream.Block(start)));
      }
    }
    size_t next_block = 0;
    int64_t next_start = 0;
    const auto source = [&]() -> std::shared_ptr<const da::v1::TokenBlock> {
      if (!generate_while_sending) {
        return next_block == blocks.size() ? nullptr : blocks[next_block++];
      }
      if (next_start >= seq_len) return nullptr;
      next_start += block_tokens;
      return std::make_shared<const da::v1::TokenBlock>(stream.Block(next_start - block_tokens));
    };
    da::client::AttentionClient::AnswerViews answers;
    answers.on_block = [&](const da::client::OutputBlockView& block) {
      // Checked on the warm-up run, outside the timed runs.
      if (i == 0 && compared &&
          (received + block.output_bytes() > static_cast<int64_t>(expected.size()) ||
           !block.Equals(std::string_view(expected).substr(received, block.output_bytes())))) {
        same = false;
      }
      received += block.output_bytes();
      return grpc::Status::OK;
    };
    answers.on_message = [&](const da::v1::AttendStreamResponse& message) {
      if (message.has_trailer()) info = message.trailer().info();
      return grpc::Status::OK;
    };
    const double server_cpu_start =
        server_pid > 0 ? da::server::ProcessCpuSeconds(static_cast<pid_t>(server_pid)) : -1;
    const Meter meter;
    grpc::Status status;
    da::v1::AttendResponse response;
    if (parts_client == nullptr) {
      status = client.AttendStreamShared(header, source, answers);
    } else {
      status = parts_client->AttendStream(
          request, &response, {},
          {.block_tokens = block_tokens, .parallel_streams = parallel_streams});
    }
    const Measurement measured = meter.Stop();
    if (parts_client != nullptr && status.ok()) {
      received = static_cast<int64_t>(response.output().data().size());
      same = i > 0 || expected.empty() || response.output().data() == expected;
      info = response.info();
      parts_used = std::count(info.request_id().begin(), info.request_id().end(), ',') + 1;
    }
    if (!status.ok()) {
      std::cerr << "da-stream-bench: stream failed: " << status.error_message() << "\n";
      return 1;
    }
    if (received != out_bytes || !same) {
      std::cerr << "da-stream-bench: streamed output differs from the in-process engine's\n";
      return 1;
    }
    if (i > 0) {
      stream_runs.Add(measured);
      if (server_cpu_start >= 0)
        server_cpu.push_back(da::server::ProcessCpuSeconds(static_cast<pid_t>(server_pid)) -
                             server_cpu_start);
    }
  }

  std::printf(
      "problem: B=%lld N=%lld H=%lld Hkv=%lld D=%lld %s, %s, precision %s, %zu patterns\n",
      static_cast<long long>(batch), static_cast<long long>(seq_len), static_cast<long long>(heads),
      static_cast<long long>(kv_heads == 0 ? heads : kv_heads), static_cast<long long>(head_dim),
      dtype.c_str(), mode.c_str(), precision.c_str(), segments.size());
  std::printf(
      "stream: %lld-token blocks, chunks of %lld tokens (%lld chunks), %.2f GiB through the wire\n",
      static_cast<long long>(block_tokens), static_cast<long long>(info.stream_chunk_tokens()),
      static_cast<long long>(info.stream_chunks()), wire_bytes / (1 << 30));
  if (parts_client != nullptr) {
    std::printf(
        "client: the library's AttendStream, %d parallel streams asked, %d used, each on "
        "a connection of its own\n",
        parallel_streams, parts_used);
  } else {
    std::printf("client: one stream of shared blocks (AttendStreamShared)\n");
  }
  std::printf("gRPC poller of this process: %s\n", poller.c_str());
  const double stream_best =
      *std::min_element(stream_runs.seconds.begin(), stream_runs.seconds.end());
  std::printf(
      "AttendStream end to end: best %.3f s, median %.3f s (%.2f GB/s of q, k, v and output)\n",
      stream_best, Median(stream_runs.seconds), wire_bytes / stream_best / 1e9);
  // Each run's time and CPU, in order: a spread between runs shows whether the slow ones work
  // more (more CPU) or wait more.
  std::printf("  each run (s / CPU s):");
  for (size_t r = 0; r < stream_runs.seconds.size(); ++r) {
    std::printf(" %.3f/%.2f", stream_runs.seconds[r], stream_runs.cpu_s[r]);
  }
  std::printf("\n");
  std::printf("  server compute (trailer, last run): %.3f s, queue %.3f s, on %s (%s: %s)\n",
              info.compute_time_us() / 1e6, info.queue_time_us() / 1e6,
              absl::StrJoin(info.devices(), ",").c_str(),
              da::v1::Precision_Name(info.precision_used()).c_str(),
              info.precision_reason().c_str());
  std::printf("  this process (median): %.3f CPU s, %.0f minor page faults%s\n",
              Median(stream_runs.cpu_s), Median(stream_runs.faults),
              server ? " (client and server)" : " (client only)");
  const auto print_machine = [](const Runs& runs) {
    std::printf(
        "  the machine, all processes (/proc/stat, median): %.1f%% of its CPU time busy, "
        "softirq %.3f CPU s\n",
        100 * Median(runs.busy), Median(runs.softirq_s));
  };
  print_machine(stream_runs);
  if (!server_cpu.empty()) {
    std::printf("  server process %ld (median): %.3f CPU s\n", server_pid, Median(server_cpu));
  }
  if (!engine_runs.seconds.empty()) {
    const double engine_best =
        *std::min_element(engine_runs.seconds.begin(), engine_runs.seconds.end());
    std::printf("in-process Engine::Run: best %.3f s, median %.3f s\n", engine_best,
                Median(engine_runs.seconds));
    std::printf("  this process (median): %.3f CPU s, %.0f minor page faults\n",
                Median(engine_runs.cpu_s), Median(engine_runs.faults));
    print_machine(engine_runs);
    std::vector<double> paired;  // Each stream run over the engine run just before it.
    for (size_t i = 0; i < stream_runs.seconds.size(); ++i) {
      paired.push_back(stream_runs.seconds[i] / engine_runs.seconds[i]);
    }
    std::printf(
        "ratio stream / in-process: best %.3f, median %.3f, median of pairs %.3f (pairs %.3f to "
        "%.3f); output identical: %s\n",
        stream_best / engine_best, Median(stream_runs.seconds) / Median(engine_runs.seconds),
        Median(paired), *std::min_element(paired.begin(), paired.end()),
        *std::max_element(paired.begin(), paired.end()),
        compared ? "yes" : "not compared (batch > 1 without --parallel-streams)");
  }
  if (!skip_plain_tcp) {
    // After the stream runs, so that it does not disturb them; the in-process server is idle.
    const int64_t in_bytes = static_cast<int64_t>(wire_bytes) - out_bytes;
    Runs tcp_runs;
    for (int i = 0; i < repeat; ++i) {
      const absl::StatusOr<Measurement> moved = MovePlainTcp(in_bytes, out_bytes);
      if (!moved.ok()) {
        std::cerr << "da-stream-bench: plain loopback TCP: " << moved.status() << "\n";
        return 1;
      }
      tcp_runs.Add(*moved);
    }
    std::printf(
        "plain loopback TCP, the same %.0f MiB in, then %.0f MiB out, between two threads, no "
        "gRPC (median): %.3f CPU s, %.3f s\n",
        in_bytes / 1048576.0, out_bytes / 1048576.0, Median(tcp_runs.cpu_s),
        Median(tcp_runs.seconds));
    std::printf(
        "  in sequence, not full duplex (the stream overlaps its output with its inputs): a ratio "
        "to this floor may flatter the stream by up to the output's transfer time\n");
    if (server != nullptr && !engine_runs.cpu_s.empty()) {
      std::printf(
          "  the stream's CPU beyond the in-process engine's (median - median): %.3f CPU s, "
          "%.2fx the plain TCP's\n",
          Median(stream_runs.cpu_s) - Median(engine_runs.cpu_s),
          (Median(stream_runs.cpu_s) - Median(engine_runs.cpu_s)) / Median(tcp_runs.cpu_s));
    }
  }
  if (server_pid > 0) {
    std::printf("server peak RSS (VmHWM of pid %ld): %.1f MiB\n", server_pid,
                da::server::ProcStatusBytes(static_cast<pid_t>(server_pid), "VmHWM") / 1048576.0);
  }
  return 0;
}
