// Prometheus metrics of the server, exposed on /metrics by prometheus-cpp.
//
//   DA_ASSIGN_OR_RETURN(auto metrics, Metrics::Create("0.0.0.0:9464"));
//   metrics->RequestStarted();
//   metrics->RequestFinished("Attend", grpc::StatusCode::OK, 0.012);
//   metrics->RequestEnded();
//
// Names follow Prometheus conventions: da_ prefix, base units (seconds, bytes), counters end in
// _total. Thread safe.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace prometheus {
class Counter;
class Exposer;
template <typename T>
class Family;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace da::server {

class Metrics {
 public:
  // listen_address "host:port" (port 0 picks a free one); empty: no HTTP endpoint.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen_address);
  ~Metrics();

  // The bound HTTP port, 0 when not exposed.
  int port() const { return port_; }

  // An attention RPC entered / left the server (da_in_flight_requests).
  void RequestStarted();
  void RequestEnded();
  // Any RPC's outcome and latency.
  void RequestFinished(std::string_view method, grpc::StatusCode code, double total_seconds);
  // A completed engine run: its queue and compute times and its batch * seq_len.
  void RunFinished(double queue_seconds, double compute_seconds, int64_t tokens);
  void AddBytes(int64_t bytes_in, int64_t bytes_out);

  // The text exposition format, as /metrics serves it.
  std::string Scrape() const;

 private:
  Metrics();

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Family<prometheus::Histogram>* request_duration_ = nullptr;
  prometheus::Histogram* queue_duration_ = nullptr;
  prometheus::Histogram* compute_duration_ = nullptr;
  prometheus::Counter* tokens_ = nullptr;
  prometheus::Counter* bytes_in_ = nullptr;
  prometheus::Counter* bytes_out_ = nullptr;
  prometheus::Gauge* in_flight_ = nullptr;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace da::server
