#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <exception>

#include "absl/strings/str_cat.h"
#include "server/status_conversion.h"

namespace da::server {
namespace {

// 1 ms to 10 min: a tiny unary call up to a billion-token stream.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1,     2.5,    5,     10,   30,    60,   120, 300,  600};
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  requests_ = &prometheus::BuildCounter()
                   .Name("da_requests_total")
                   .Help("RPCs finished, by method and gRPC status code.")
                   .Register(*registry_);
  request_duration_ = &prometheus::BuildHistogram()
                           .Name("da_request_duration_seconds")
                           .Help("Server-side RPC latency, from the first byte read to the answer.")
                           .Register(*registry_);
  queue_duration_ = &prometheus::BuildHistogram()
                         .Name("da_queue_duration_seconds")
                         .Help("Time engine runs waited in the queue before compute started.")
                         .Register(*registry_)
                         .Add({}, LatencyBuckets());
  compute_duration_ = &prometheus::BuildHistogram()
                           .Name("da_compute_duration_seconds")
                           .Help("Compute time of successful engine runs.")
                           .Register(*registry_)
                           .Add({}, LatencyBuckets());
  tokens_ = &prometheus::BuildCounter()
                 .Name("da_tokens_total")
                 .Help("Tokens (batch * seq_len) of successfully computed requests.")
                 .Register(*registry_)
                 .Add({});
  auto& bytes = prometheus::BuildCounter()
                    .Name("da_request_bytes_total")
                    .Help("Tensor bytes received (in) and sent (out).")
                    .Register(*registry_);
  bytes_in_ = &bytes.Add({{"direction", "in"}});
  bytes_out_ = &bytes.Add({{"direction", "out"}});
  in_flight_ = &prometheus::BuildGauge()
                    .Name("da_in_flight_requests")
                    .Help("Attention RPCs accepted and not yet answered.")
                    .Register(*registry_)
                    .Add({});
  for (const char* method : {"Attend", "AttendStream", "GetServerInfo"}) {
    request_duration_->Add({{"method", method}}, LatencyBuckets());
  }
}

Metrics::~Metrics() = default;

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& listen_address) {
  std::unique_ptr<Metrics> metrics(new Metrics());
  if (listen_address.empty()) return metrics;
  try {
    metrics->exposer_ = std::make_unique<prometheus::Exposer>(listen_address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", listen_address, ": ", e.what()));
  }
  metrics->exposer_->RegisterCollectable(metrics->registry_);
  std::vector<int> ports = metrics->exposer_->GetListeningPorts();
  if (!ports.empty()) metrics->port_ = ports.front();
  return metrics;
}

void Metrics::RequestStarted() { in_flight_->Increment(); }

void Metrics::RequestEnded() { in_flight_->Decrement(); }

void Metrics::RequestFinished(std::string_view method, grpc::StatusCode code,
                              double total_seconds) {
  requests_->Add({{"method", std::string(method)}, {"code", StatusCodeName(code)}}).Increment();
  request_duration_->Add({{"method", std::string(method)}}, LatencyBuckets())
      .Observe(total_seconds);
}

void Metrics::RunFinished(double queue_seconds, double compute_seconds, int64_t tokens) {
  queue_duration_->Observe(queue_seconds);
  compute_duration_->Observe(compute_seconds);
  tokens_->Increment(static_cast<double>(tokens));
}

void Metrics::AddBytes(int64_t bytes_in, int64_t bytes_out) {
  bytes_in_->Increment(static_cast<double>(bytes_in));
  bytes_out_->Increment(static_cast<double>(bytes_out));
}

std::string Metrics::Scrape() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace da::server
