// /metrics after real traffic: scraped over HTTP from a server with an exposer on a kernel-chosen
// port, checked by `promtool check metrics`, and holding the expected series; and the probes
// answering while connections that send nothing are open.
#include "server/metrics.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "client/attention_client.h"
#include "server/server.h"
#include "server/test_util.h"

namespace da::server {
namespace {

int PromtoolCheck(const std::string& text, std::string* output) {
  return testing::PromtoolCheck(DA_PROMTOOL, text, output);
}

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(MetricsTest, ScrapeAfterTrafficPassesPromtoolAndCountsRequests) {
  ServerOptions options = testing::LoopbackOptions();
  options.metrics_address = "127.0.0.1:0";
  std::unique_ptr<Server> server = testing::StartServer(options);
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->metrics_port(), 0);
  client::AttentionClient client(testing::ChannelTo(server->port()));

  std::mt19937 rng(std::random_device{}());
  const v1::AttendRequest request =
      testing::RandomRequest({.batch = 2, .seq_len = 50, .heads = 4, .kv_heads = 2}, rng);
  v1::WarmUpRequest warm_up;
  *warm_up.add_shapes() = testing::HeaderFor(request);
  v1::WarmUpResponse warmed;
  ASSERT_TRUE(client.WarmUp(warm_up, &warmed).ok());
  v1::AttendResponse response;
  ASSERT_TRUE(client.Attend(request, &response).ok());
  ASSERT_TRUE(client.Attend(request, &response).ok());
  ASSERT_TRUE(client.AttendStream(request, &response).ok());
  v1::AttendRequest invalid = request;
  invalid.mutable_spec()->clear_segment_lengths();
  invalid.mutable_spec()->clear_dilation_rates();
  ASSERT_EQ(client.Attend(invalid, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GetServerInfoResponse info;
  ASSERT_TRUE(client.GetServerInfo(&info).ok());

  // At least 0.2 CPU s of this process's own (process_cpu_seconds_total counts 10 ms ticks).
  const std::clock_t spin_start = std::clock();
  volatile double sink = 0;
  while (std::clock() - spin_start < CLOCKS_PER_SEC / 5) sink = sink + 1;
  const std::optional<std::string> scraped = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(scraped.has_value());
  const std::string& text = *scraped;

  std::string promtool_output;
  EXPECT_EQ(PromtoolCheck(text, &promtool_output), 0) << promtool_output << "\n" << text;

  EXPECT_TRUE(Contains(text, "da_requests_total{code=\"OK\",method=\"Attend\"} 2")) << text;
  // What is running, and the standard process metrics, with values this process can check.
  EXPECT_TRUE(Contains(text, "da_build_info{features=\"")) << text;
  EXPECT_TRUE(Contains(text, "\",revision=\"")) << text;
  EXPECT_TRUE(Contains(text, "\",version=\"" + info.version() + "\"} 1")) << text;
  EXPECT_GE(testing::MetricValue(text, "process_cpu_seconds_total").value_or(0), 0.2) << text;
  const double rss = testing::MetricValue(text, "process_resident_memory_bytes").value_or(0);
  EXPECT_GT(rss, 10 << 20) << text;  // This test process, server and all.
  EXPECT_GE(testing::MetricValue(text, "process_virtual_memory_bytes").value_or(0), rss) << text;
  EXPECT_GE(testing::MetricValue(text, "process_open_fds").value_or(0), 3) << text;
  EXPECT_GT(testing::MetricValue(text, "process_max_fds").value_or(0), 3) << text;
  const double started = testing::MetricValue(text, "process_start_time_seconds").value_or(0);
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_LE(started, now + 2) << text;
  EXPECT_GT(started, now - 3600) << text;  // Started within the hour (this test just began).
  EXPECT_TRUE(Contains(text, "da_requests_total{code=\"INVALID_ARGUMENT\",method=\"Attend\"} 1"))
      << text;
  EXPECT_TRUE(Contains(text, "da_requests_total{code=\"OK\",method=\"AttendStream\"} 1")) << text;
  EXPECT_TRUE(Contains(text, "da_requests_total{code=\"OK\",method=\"GetServerInfo\"} 1")) << text;
  EXPECT_TRUE(Contains(text, "da_request_duration_seconds_count{method=\"Attend\"} 3")) << text;
  EXPECT_TRUE(Contains(text, "da_request_duration_seconds_bucket{method=\"Attend\",le=\"600\"}"))
      << text;
  // Three successful runs of batch 2 x 50 tokens.
  EXPECT_TRUE(Contains(text, "da_tokens_total 300")) << text;
  EXPECT_TRUE(Contains(text, "da_in_flight_requests 0")) << text;
  EXPECT_TRUE(Contains(text, "da_queue_duration_seconds_count 3")) << text;
  EXPECT_TRUE(Contains(text, "da_compute_duration_seconds_count 3")) << text;
  // Out: three outputs of 2 x 50 x 4 x 16 fp32 = 25600 bytes each.
  EXPECT_TRUE(Contains(text, "da_request_bytes_total{direction=\"out\"} 76800")) << text;

  // The warm-up built the one plan (a miss); the three runs found it.
  EXPECT_TRUE(Contains(text, "da_requests_total{code=\"OK\",method=\"WarmUp\"} 1")) << text;
  for (const char* family : {"da_plan_cache_hits_total", "da_plan_cache_misses_total",
                             "da_plan_cache_builds_total", "da_plan_cache_evictions_total"}) {
    EXPECT_TRUE(Contains(text, std::string("# TYPE ") + family + " counter")) << text;
  }
  for (const char* family :
       {"da_plan_cache_bytes", "da_plan_cache_entries", "da_plan_cache_capacity_bytes"}) {
    EXPECT_TRUE(Contains(text, std::string("# TYPE ") + family + " gauge")) << text;
  }
  EXPECT_TRUE(Contains(text, "# TYPE da_plan_build_duration_seconds histogram")) << text;
  EXPECT_TRUE(Contains(text, "\nda_plan_cache_hits_total 3\n")) << text;
  EXPECT_TRUE(Contains(text, "\nda_plan_cache_misses_total 1\n")) << text;
  EXPECT_TRUE(Contains(text, "\nda_plan_cache_builds_total 1\n")) << text;
  EXPECT_TRUE(Contains(text, "\nda_plan_cache_entries 1\n")) << text;
  EXPECT_TRUE(Contains(text, "\nda_plan_build_duration_seconds_count 1\n")) << text;
  EXPECT_EQ(testing::MetricValue(text, "da_plan_cache_bytes"), warmed.results(0).plan_bytes());
  EXPECT_EQ(testing::MetricValue(text, "da_plan_cache_capacity_bytes"), double{1 << 30});

  // Devices: the CPU, up, with its memory, busy for at least the compute the runs reported.
  EXPECT_TRUE(Contains(text, "# TYPE da_device_info gauge")) << text;
  EXPECT_TRUE(Contains(text, "# TYPE da_device_busy_seconds_total counter")) << text;
  EXPECT_TRUE(Contains(text, "da_device_info{capability=\"")) << text;
  EXPECT_TRUE(Contains(text, "device=\"cpu:0\",kind=\"cpu\",name=\"")) << text;
  EXPECT_EQ(testing::MetricValue(text, "da_device_up{device=\"cpu:0\"}"), 1) << text;
  EXPECT_GT(testing::MetricValue(text, "da_device_memory_bytes{device=\"cpu:0\"}").value_or(0), 0)
      << text;
  const std::optional<double> busy =
      testing::MetricValue(text, "da_device_busy_seconds_total{device=\"cpu:0\"}");
  ASSERT_TRUE(busy.has_value()) << text;
  EXPECT_GE(*busy, response.info().compute_time_us() / 1e6);
  const std::optional<double> compute_sum =
      testing::MetricValue(text, "da_compute_duration_seconds_sum");
  ASSERT_TRUE(compute_sum.has_value()) << text;
  // Busy time covers each run from compute start to return; the compute histogram excludes only
  // plan lookups, so the two agree to within a few milliseconds.
  EXPECT_GE(*busy, *compute_sum * 0.999) << text;
  EXPECT_LT(*busy, *compute_sum + 0.05) << text;
}

// The HTTP server gives each connection a thread until its request arrives: connections that send
// nothing (a stuck scraper, a port scan) must neither take every thread nor keep theirs for long,
// or /livez goes unanswered and the orchestrator restarts a healthy server.
TEST(MetricsTest, SilentConnectionsDoNotHoldBackTheProbes) {
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create("127.0.0.1:0");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  const int port = (*metrics)->port();
  std::vector<int> silent;
  for (int i = 0; i < 6; ++i) {
    silent.push_back(testing::ConnectLoopback(port));
    ASSERT_GE(silent.back(), 0);
  }
  // Accepted in order, so the probe comes after every silent connection.
  std::future<std::optional<std::string>> live =
      std::async(std::launch::async, [port] { return testing::HttpGet(port, "/livez"); });
  const bool answered = live.wait_for(std::chrono::seconds(2)) == std::future_status::ready;
  EXPECT_TRUE(answered) << "/livez unanswered for 2 s behind 6 silent connections";

  // The server closes a silent connection after its request timeout (3 s): recv sees the end (or
  // an error answer) within 10 s, where SO_RCVTIMEO would make it fail with EAGAIN.
  const timeval bound{.tv_sec = 10, .tv_usec = 0};
  ASSERT_EQ(setsockopt(silent[0], SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof(bound)), 0);
  char byte = 0;
  const ssize_t received = recv(silent[0], &byte, 1, 0);
  EXPECT_GE(received, 0) << "a silent connection still open after 10 s: " << std::strerror(errno);
  for (int fd : silent) close(fd);  // Frees the threads they hold, should the probe still wait.
  EXPECT_EQ(live.get(), "ok\n");
}

TEST(MetricsTest, PromtoolRejectsABrokenExposition) {
  // The check above can fail: promtool does flag a counter without the _total suffix.
  std::string output;
  EXPECT_NE(PromtoolCheck("# HELP da_bad Bad.\n# TYPE da_bad counter\nda_bad 1\n", &output), 0)
      << output;
}

// The certificate expiry exists only once a TLS watcher has set it (a server without TLS never
// does), and then passes promtool.
TEST(MetricsTest, TlsCertificateExpiryIsExportedOnceSet) {
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create("");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_FALSE(Contains((*metrics)->Scrape(), "da_tls_certificate_expiry_timestamp_seconds"));
  (*metrics)->SetTlsCertificateExpiry(1798761600);  // 2027-01-01T00:00:00Z.
  (*metrics)->SetTlsCertificateExpiry(1830297600);  // Renewed: 2028-01-01T00:00:00Z.
  const std::string text = (*metrics)->Scrape();
  EXPECT_EQ(testing::MetricValue(text, "da_tls_certificate_expiry_timestamp_seconds"), 1830297600)
      << text;
  std::string promtool_output;
  EXPECT_EQ(PromtoolCheck(text, &promtool_output), 0) << promtool_output << "\n" << text;
}

}  // namespace
}  // namespace da::server
