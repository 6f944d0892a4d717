// SIGTERM on the real da-server binary: the call in flight completes, new calls are refused, the
// process exits 0; under load (unary and streamed calls, one still sending its input) every call
// in flight completes with the right output while readiness turns NOT_SERVING; and a drain
// deadline cancels what is still running.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "client/connection_options.h"
#include "client/retry.h"
#include "client/stream_blocks.h"
#include "server/test_util.h"

namespace da::server {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// drain_goaway_test is this file built with DA_NO_BACKUP_POLLER: no client backup poller in the
// process (gRPC reads the variable as it starts, after static initialization), so that a sync
// client reads its connections only while it has a call, as
// ACallThatCrossesTheGoawayIsSentAgainAndServedByTheNextReplica's control needs (with it, gRPC
// polls idle channels every 5 s, which could let the control fail by chance). It runs only there:
// SigtermUnderLoad... needs the poller, to see its idle channel leave READY.
#ifdef DA_NO_BACKUP_POLLER
const bool kNoBackupPoller = setenv("GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS", "0", 1) == 0;
#else
const bool kNoBackupPoller = false;
#endif

// A da-server process that drains for up to drain_timeout_ms, after drain_grace_ms of grace.
std::unique_ptr<testing::SpawnedServer> SpawnServer(int64_t drain_timeout_ms,
                                                    int64_t drain_grace_ms = 0,
                                                    const std::string& log_level = "warn") {
  auto server = std::make_unique<testing::SpawnedServer>(
      DA_SERVER_BINARY,
      std::vector<std::string>{"--drain-timeout-ms", std::to_string(drain_timeout_ms),
                               "--drain-grace-ms", std::to_string(drain_grace_ms),
                               "--max-message-bytes", "1073741824", "--log-level", log_level});
  return server->WaitForPorts(seconds(30)) ? std::move(server) : nullptr;
}

// True once /metrics reports n attention calls in flight.
bool InFlight(const testing::SpawnedServer& server, int n) {
  std::optional<std::string> text = testing::HttpGet(server.metrics_port(), "/metrics");
  return text.has_value() &&
         testing::MetricValue(*text, "da_in_flight_requests") == static_cast<double>(n);
}

// A deadline, and no retry: the call's refusal comes back as the server gave it.
client::CallOptions Once(int64_t timeout_ms) {
  client::CallOptions options = testing::WithTimeout(timeout_ms);
  options.retry.max_attempts = 1;
  return options;
}

// True once client's readiness check (kServiceName) answers NOT_SERVING, within timeout.
bool ReadinessTurnsNotServing(client::AttentionClient& client, std::chrono::seconds timeout) {
  return testing::WaitFor(
      [&] {
        auto serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
        return client.CheckHealth(kServiceName, &serving, testing::WithTimeout(1000)).ok() &&
               serving == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
      },
      timeout);
}

bool ExitedWithZero(const std::optional<int>& wait_status) {
  return wait_status.has_value() && WIFEXITED(*wait_status) && WEXITSTATUS(*wait_status) == 0;
}

// A long unary call (seconds of compute on two cores) on its own thread, seen in flight.
struct LongCallInFlight {
  explicit LongCallInFlight(client::AttentionClient& client)
      : request(testing::LongRequest(40960)), thread([this, &client] {
          status = client.Attend(request, &response, testing::WithTimeout(300000));
          done.store(true);
        }) {}
  ~LongCallInFlight() {
    if (thread.joinable()) thread.join();
  }
  bool thread_done() const { return done.load(); }
  const v1::AttendRequest request;
  grpc::Status status;
  v1::AttendResponse response;
  std::atomic<bool> done{false};
  std::thread thread;  // Last: it starts once the members above exist.
};

TEST(DrainTest, SigtermFinishesTheCallInFlightRefusesNewCallsAndExitsZero) {
  std::unique_ptr<testing::SpawnedServer> server = SpawnServer(/*drain_timeout_ms=*/120000);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  LongCallInFlight call(client);
  ASSERT_TRUE(testing::WaitFor([&] { return InFlight(*server, 1); }, seconds(60)));
  ASSERT_EQ(kill(server->process().pid(), SIGTERM), 0);

  // While the call is in flight the server still takes connections (gRPC's shutdown waits until
  // its answer has reached the client, Server::DeliverAnswersInFlight): readiness says
  // NOT_SERVING, and the service refuses new calls with UNAVAILABLE, naming the drain.
  client::AttentionClient late_client(testing::ChannelTo(server->port()));
  EXPECT_TRUE(ReadinessTurnsNotServing(late_client, seconds(10)));
  v1::AttendResponse late_response;
  std::mt19937 rng(std::random_device{}());
  const grpc::Status late =
      late_client.Attend(testing::RandomRequest({}, rng), &late_response, Once(5000));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE) << late.error_message();
  EXPECT_NE(late.error_message().find("draining"), std::string::npos) << late.error_message();
  EXPECT_FALSE(call.thread_done()) << "the call ended before the checks: they prove nothing";

  call.thread.join();
  EXPECT_TRUE(call.status.ok()) << call.status.error_message();
  EXPECT_EQ(call.response.output().data().size(), call.request.query().data().size());
  // Then the server stops accepting: a fresh channel's calls fail, health included.
  client::AttentionClient after_client(testing::ChannelTo(server->port()));
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        auto serving = grpc::health::v1::HealthCheckResponse::UNKNOWN;
        return !after_client.CheckHealth("", &serving, testing::WithTimeout(1000)).ok();
      },
      seconds(10)));
  EXPECT_TRUE(ExitedWithZero(server->process().WaitForExit(seconds(60))));
}

// A one-shot gate: Wait blocks until Open.
class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

// How a call under load is made.
enum class CallKind { kUnary, kStream, kStreamHeldBack };

// AttendStreamBlocks with request's blocks produced on demand; the last block waits for `gate`,
// so the call is still receiving input when the gate opens.
grpc::Status StreamHeldBack(client::AttentionClient& client, const v1::AttendRequest& request,
                            Gate& gate, v1::AttendResponse* response) {
  client::StreamPlan plan;
  if (grpc::Status planned = client::MakeStreamPlan(request, /*block_tokens=*/1024, &plan);
      !planned.ok()) {
    return planned;
  }
  int64_t next = 0;
  auto next_block = [&](v1::TokenBlock* block) {
    if (next >= plan.header.seq_len()) return false;
    if (next + plan.block_tokens >= plan.header.seq_len()) gate.Wait();
    *block = client::MakeTokenBlock(request, plan, next);
    next += plan.block_tokens;
    return true;
  };
  client::OutputAssembler assembler(plan.header);
  auto on_answer = [&](const v1::AttendStreamResponse& message) { return assembler.Add(message); };
  const grpc::Status status =
      client.AttendStreamBlocks(plan.header, next_block, on_answer, testing::WithTimeout(300000));
  return status.ok() ? assembler.Finish(response) : status;
}

// With a grace period the refusal of a new call is deterministic, also on the connection that
// carries the call in flight: UNAVAILABLE from the service, naming the drain, counted as a
// refusal; never CANCELLED by a transport that has stopped taking streams.
TEST(DrainTest, DuringTheGraceNewCallsOnTheLiveConnectionAreRefusedUnavailable) {
  std::unique_ptr<testing::SpawnedServer> server =
      SpawnServer(/*drain_timeout_ms=*/120000, /*drain_grace_ms=*/5000);
  ASSERT_NE(server, nullptr);
  auto channel = testing::ChannelTo(server->port());
  client::AttentionClient client(channel);
  LongCallInFlight call(client);
  ASSERT_TRUE(testing::WaitFor([&] { return InFlight(*server, 1); }, seconds(60)));
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server->process().pid(), SIGTERM), 0);

  // Readiness goes NOT_SERVING first; liveness and the connection stay up through the grace.
  EXPECT_TRUE(ReadinessTurnsNotServing(client, seconds(4)));
  std::mt19937 rng(std::random_device{}());
  const v1::AttendRequest late_request = testing::RandomRequest({}, rng);
  v1::AttendResponse late_response;
  const grpc::Status unary = client.Attend(late_request, &late_response, Once(5000));
  const grpc::Status streamed = client.AttendStream(late_request, &late_response, Once(5000));
  v1::GetServerInfoResponse info;
  const grpc::Status info_status = client.GetServerInfo(&info, Once(5000));
  // The refusal says that nothing was read or computed, so that clients may send it again.
  grpc::ClientContext context;
  const grpc::Status marked =
      v1::AttentionService::NewStub(channel)->Attend(&context, late_request, &late_response);
  EXPECT_TRUE(client::RefusedUnread(marked, context)) << marked.error_message();
  const double refused_after_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count();
  ASSERT_LT(refused_after_s, 4.5) << "the checks ran past the grace; they prove nothing";
  for (const grpc::Status& late : {unary, streamed, info_status}) {
    EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE) << late.error_message();
    EXPECT_NE(late.error_message().find("draining"), std::string::npos) << late.error_message();
  }
  std::optional<std::string> text = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_requests_rejected_total{reason=\"unavailable\"}"), 4.0);

  call.thread.join();
  EXPECT_TRUE(call.status.ok()) << call.status.error_message();
  EXPECT_EQ(call.response.output().data().size(), call.request.query().data().size());
  EXPECT_TRUE(ExitedWithZero(server->process().WaitForExit(seconds(60))));
}

// Occurrences of `needle` in text.
int Count(const std::string& text, const std::string& needle) {
  int found = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++found;
  }
  return found;
}

// A rolling update: the replica a client is connected to drains (SIGTERM, 1.5 s of grace) while
// another one serves. The calls it refuses meanwhile are sent again by the client after a backoff
// (client/retry.h), each on a connection of its own, and once the drained replica has stopped
// listening they reach the other one: the caller sees the right output and none of the
// refusals. pick_first over the two addresses (the draining one first while it listens) stands
// for a load balancer.
TEST(DrainTest, CallsRefusedByADrainingReplicaAreSentAgainAndServedByTheNextOne) {
  std::unique_ptr<testing::SpawnedServer> draining =
      SpawnServer(/*drain_timeout_ms=*/120000, /*drain_grace_ms=*/1500);
  std::unique_ptr<testing::SpawnedServer> next = SpawnServer(/*drain_timeout_ms=*/120000);
  ASSERT_NE(draining, nullptr);
  ASSERT_NE(next, nullptr);
  // As da-client makes it: retries on connections of their own.
  const std::string target =
      absl::StrCat("ipv4:127.0.0.1:", draining->port(), ",127.0.0.1:", next->port());
  client::AttentionClient client({client::MakeChannel(target)},
                                 client::FreshChannels(target, client::ConnectionOptions{}));
  std::mt19937 rng(std::random_device{}());
  v1::AttendRequest request = testing::RandomRequest({.seq_len = 512}, rng);
  const std::string expected = testing::InProcessOutput(request, 2);
  v1::AttendResponse response;
  request.set_request_id("before");
  ASSERT_TRUE(client.Attend(request, &response, testing::WithTimeout(30000)).ok());
  std::optional<std::string> text = testing::HttpGet(draining->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  ASSERT_EQ(testing::MetricValue(*text, "da_requests_total{code=\"OK\",method=\"Attend\"}"), 1.0)
      << "the first call did not go to the first address";

  ASSERT_EQ(kill(draining->process().pid(), SIGTERM), 0);
  client::AttentionClient direct(testing::ChannelTo(draining->port()));
  ASSERT_TRUE(ReadinessTurnsNotServing(direct, seconds(10)));
  request.set_request_id("unary");
  grpc::Status status = client.Attend(request, &response, testing::WithTimeout(30000));
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.output().data() == expected) << "unary: output differs";
  EXPECT_TRUE(ExitedWithZero(draining->process().WaitForExit(seconds(60)))) << draining->Log();
  // Its refusals, logged as they were given, before the call went to the next replica.
  const std::string log = draining->Log();
  EXPECT_GE(Count(log, "request id=unary method=Attend shape=- code=UNAVAILABLE"), 1) << log;
  EXPECT_EQ(Count(log, "code=OK"), 0) << log;  // Logged at warn: only the refusals.

  // The next calls find the channel on the next replica at once.
  request.set_request_id("streamed");
  status = client.AttendStream(request, &response, testing::WithTimeout(30000),
                               {.block_tokens = 128, .parallel_streams = 2});
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(response.output().data() == expected) << "streamed: output differs";
  text = testing::HttpGet(next->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_requests_total{code=\"OK\",method=\"Attend\"}"), 1.0);
  EXPECT_EQ(testing::MetricValue(*text, "da_requests_total{code=\"OK\",method=\"AttendStream\"}"),
            2.0);
}

// A call made after a drained server sent its GOAWAY, before the client read it: a sync client
// reads nothing between calls, so the call goes out on that connection, and the server's gRPC,
// shutting down, drops it unstarted (CANCELLED "CANCELLED", grpc/grpc#41785). The client sends it
// again (client/retry.h, RefusedUnread), and it reaches the next replica.
TEST(DrainTest, ACallThatCrossesTheGoawayIsSentAgainAndServedByTheNextReplica) {
  if (!kNoBackupPoller) GTEST_SKIP() << "runs in drain_goaway_test, without the backup poller";
  std::unique_ptr<testing::SpawnedServer> draining =
      SpawnServer(/*drain_timeout_ms=*/120000, /*drain_grace_ms=*/0, "info");
  std::unique_ptr<testing::SpawnedServer> next = SpawnServer(/*drain_timeout_ms=*/120000);
  ASSERT_NE(draining, nullptr);
  ASSERT_NE(next, nullptr);
  const std::string target =
      absl::StrCat("ipv4:127.0.0.1:", draining->port(), ",127.0.0.1:", next->port());
  client::AttentionClient client(client::MakeChannel(target));
  // The control: a connection of its own (a distinct channel argument), its call made once.
  client::ConnectionOptions control_options;
  control_options.channel_id = 1;
  client::AttentionClient control(client::MakeChannel(target, control_options));
  std::mt19937 rng(std::random_device{}());
  const v1::AttendRequest request = testing::RandomRequest({.seq_len = 512}, rng);
  v1::AttendResponse response;
  ASSERT_TRUE(client.Attend(request, &response, testing::WithTimeout(30000)).ok());
  ASSERT_TRUE(control.Attend(request, &response, testing::WithTimeout(30000)).ok());

  ASSERT_EQ(kill(draining->process().pid(), SIGTERM), 0);
  ASSERT_TRUE(testing::WaitFor(
      [&] { return draining->Log().find("closing the connections") != std::string::npos; },
      seconds(30)));
  std::this_thread::sleep_for(milliseconds(200));  // The GOAWAYs are on their way, or there.
  // Made once, the control's call goes out on the connection the server has shut down, and is
  // dropped unstarted: the case is really there.
  const grpc::Status dropped = control.Attend(request, &response, Once(30000));
  EXPECT_EQ(dropped.error_code(), grpc::StatusCode::CANCELLED) << dropped.error_message();
  EXPECT_EQ(dropped.error_message(), "CANCELLED");
  const grpc::Status status = client.Attend(request, &response, testing::WithTimeout(30000));
  ASSERT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  EXPECT_TRUE(response.output().data() == testing::InProcessOutput(request, 2));
  const std::optional<std::string> text = testing::HttpGet(next->metrics_port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(testing::MetricValue(*text, "da_requests_total{code=\"OK\",method=\"Attend\"}"), 1.0);
  EXPECT_TRUE(ExitedWithZero(draining->process().WaitForExit(seconds(60)))) << draining->Log();
}

TEST(DrainTest, SigtermUnderLoadFinishesEveryCallInFlightWithTheRightOutput) {
  // Generous: the drain must end because the work is done, never because this ran out.
  constexpr int64_t kDrainTimeoutMs = 240000;
  std::unique_ptr<testing::SpawnedServer> server = SpawnServer(kDrainTimeoutMs);
  ASSERT_NE(server, nullptr);
  auto channel = testing::ChannelTo(server->port());
  client::AttentionClient client(channel);

  // Eight calls of a few hundred milliseconds of compute each on two cores (4 heads of 8192
  // tokens, 24 MiB of q, k, v), each with its own random input; the engine runs them one after
  // another, so most of them are still queued or computing when SIGTERM arrives. In fp32, so that
  // the compute does not depend on the CPU's bf16 kernel: AUTO's bf16 on AMX tiles (3-4x faster)
  // finished the first calls before the last were in flight, and the signal was never sent.
  const std::vector<CallKind> kinds = {
      CallKind::kUnary,  CallKind::kStream, CallKind::kStreamHeldBack, CallKind::kUnary,
      CallKind::kStream, CallKind::kUnary,  CallKind::kStreamHeldBack, CallKind::kStream};
  std::mt19937 rng(std::random_device{}());
  std::vector<v1::AttendRequest> requests;
  for (size_t i = 0; i < kinds.size(); ++i) {
    requests.push_back(testing::RandomRequest({.seq_len = 8192,
                                               .heads = 4,
                                               .kv_heads = 2,
                                               .head_dim = 64,
                                               .patterns = {{2048, 1}, {4096, 2}},
                                               .causal = i % 2 == 1},
                                              rng));
    requests.back().mutable_spec()->set_precision(v1::PRECISION_FP32);
  }

  testing::HealthWatch readiness(channel, kServiceName);
  ASSERT_TRUE(readiness.WaitForLatest(grpc::health::v1::HealthCheckResponse::SERVING, seconds(60)));

  Gate held_back;
  std::vector<grpc::Status> statuses(kinds.size());
  std::vector<v1::AttendResponse> responses(kinds.size());
  std::vector<std::chrono::steady_clock::time_point> finished(kinds.size());
  std::vector<std::thread> calls;
  std::atomic<int> done{0};  // Calls answered.
  for (size_t i = 0; i < kinds.size(); ++i) {
    calls.emplace_back([&, i] {
      switch (kinds[i]) {
        case CallKind::kUnary:
          statuses[i] = client.Attend(requests[i], &responses[i], testing::WithTimeout(300000));
          break;
        case CallKind::kStream:
          statuses[i] =
              client.AttendStream(requests[i], &responses[i], testing::WithTimeout(300000));
          break;
        case CallKind::kStreamHeldBack:
          statuses[i] = StreamHeldBack(client, requests[i], held_back, &responses[i]);
          break;
      }
      finished[i] = std::chrono::steady_clock::now();
      ++done;
    });
  }
  // Every call accepted by the server (held-back streams included) before the signal: in flight,
  // or, on a loaded machine where a call's input took longer to send than another's compute,
  // already answered (its bytes are still checked below). `done` is read before the server's
  // count, so a call that ends in between is missed, never counted twice, and the next poll sees
  // it.
  const bool all_in_flight = testing::WaitFor(
      [&] {
        const int answered = done.load();
        return InFlight(*server, static_cast<int>(kinds.size()) - answered);
      },
      seconds(120));
  const auto signalled = std::chrono::steady_clock::now();
  const int killed = all_in_flight ? kill(server->process().pid(), SIGTERM) : -1;
  // Whatever happened, let the held-back streams finish sending so every thread can end.
  auto release = [&] {
    held_back.Open();
    for (std::thread& call : calls) call.join();
  };
  if (!all_in_flight || killed != 0) {
    release();
    FAIL() << "calls in flight never reached " << kinds.size() << " (or kill failed)\n"
           << server->Log();
  }

  // Readiness turns NOT_SERVING, then the Watch ends: the drain has begun.
  EXPECT_TRUE(
      readiness.WaitForLatest(grpc::health::v1::HealthCheckResponse::NOT_SERVING, seconds(30)));
  const std::optional<grpc::Status> watch_end = readiness.WaitForEnd(seconds(30));
  ASSERT_TRUE(watch_end.has_value());
  EXPECT_EQ(watch_end->error_code(), grpc::StatusCode::UNAVAILABLE) << watch_end->error_message();

  // New calls are refused with UNAVAILABLE by the service, on a fresh connection and on the one
  // carrying the calls in flight: gRPC's shutdown (its GOAWAY, the listener closed) waits until
  // the calls in flight, the held-back streams among them, have ended and their answers reached
  // the client. Nothing is computed for them.
  std::mt19937 late_rng(std::random_device{}());
  const v1::AttendRequest late_request = testing::RandomRequest({}, late_rng);
  client::AttentionClient late_client(testing::ChannelTo(server->port()));
  v1::AttendResponse late_response;
  grpc::Status late = late_client.Attend(late_request, &late_response, Once(10000));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE)
      << "fresh connection: " << late.error_code() << " " << late.error_message();
  EXPECT_FALSE(late_response.has_output());
  late = client.Attend(late_request, &late_response, Once(10000));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE)
      << "connection of the calls in flight: " << late.error_message();
  EXPECT_NE(late.error_message().find("draining"), std::string::npos) << late.error_message();

  // The held-back streams still get to send their last block, after the signal.
  release();
  int finished_after_signal = 0;
  for (size_t i = 0; i < kinds.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "call " << i << " kind " << static_cast<int>(kinds[i]));
    ASSERT_TRUE(statuses[i].ok()) << statuses[i].error_code() << ": " << statuses[i].error_message()
                                  << " (ended "
                                  << std::chrono::duration<double>(finished[i] - signalled).count()
                                  << " s after the signal)\n"
                                  << server->Log();
    EXPECT_TRUE(responses[i].output().data() == testing::InProcessOutput(requests[i], 2))
        << "output differs from the in-process engine's";
    if (finished[i] > signalled) ++finished_after_signal;
  }
  // The drain did the work: the held-back streams at least completed after the signal.
  EXPECT_GE(finished_after_signal, 2);
  // Then gRPC's shutdown: the client reads its GOAWAY and the channel leaves READY.
  EXPECT_TRUE(testing::WaitFor(
      [&] { return channel->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY; },
      seconds(30)));

  const std::optional<int> exit_status =
      server->process().WaitForExit(milliseconds(kDrainTimeoutMs));
  EXPECT_TRUE(ExitedWithZero(exit_status)) << server->Log();
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, milliseconds(kDrainTimeoutMs));
}

TEST(DrainTest, DrainDeadlineCancelsWorkStillRunningAndExitsZero) {
  std::unique_ptr<testing::SpawnedServer> server = SpawnServer(/*drain_timeout_ms=*/200);
  ASSERT_NE(server, nullptr);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  // 2.2e12 FLOPs, over five seconds at two cores' fp32 peak: only cancellation can end it within
  // the bound below.
  const v1::AttendRequest request = testing::LongRequest(131072);
  grpc::Status in_flight_status;
  std::thread call([&] {
    v1::AttendResponse response;
    in_flight_status = client.Attend(request, &response, testing::WithTimeout(300000));
  });
  // And a stream whose last block waits until the server has exited: still receiving input.
  std::mt19937 rng(std::random_device{}());
  const v1::AttendRequest streamed = testing::RandomRequest(
      {.seq_len = 4096, .heads = 2, .kv_heads = 2, .head_dim = 32, .patterns = {{1024, 1}}}, rng);
  Gate last_block;
  grpc::Status stream_status;
  std::thread stream([&] {
    v1::AttendResponse response;
    stream_status = StreamHeldBack(client, streamed, last_block, &response);
  });
  ASSERT_TRUE(testing::WaitFor([&] { return InFlight(*server, 2); }, seconds(60)));
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(server->process().pid(), SIGTERM), 0);

  EXPECT_TRUE(ExitedWithZero(server->process().WaitForExit(seconds(5))));
  last_block.Open();
  call.join();
  stream.join();
  EXPECT_FALSE(in_flight_status.ok());
  EXPECT_FALSE(stream_status.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, seconds(5));
  // Both are logged as cut off by the drain, not as cancelled by their clients.
  const std::string log = server->Log();
  EXPECT_NE(log.find("error=\"cut off by the server's drain (--drain-timeout-ms ran out): "),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("error=\"cut off by the server's drain (--drain-timeout-ms ran out) after "),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("the client cancelled"), std::string::npos) << log;
}

}  // namespace
}  // namespace da::server
