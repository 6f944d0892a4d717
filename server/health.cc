#include "server/health.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/attention_service.h"

namespace da::server {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call. Writes are one at a time (the callback API allows one outstanding write): a
// status that changes while a write is in flight is kept as `next_` and sent when it completes, so
// the latest status always goes out. End() finishes the call once the writes are flushed.
class Health::WatchReactor final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  WatchReactor(Health* health, std::string service)
      : health_(health), service_(std::move(service)) {}

  const std::string& service() const { return service_; }

  void Send(ServingStatus status) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finish_called_ || ending_) return;
    // Every change of any condition publishes to every watcher: send only what is news to this
    // one, as the protocol asks.
    if (status == last_status_) return;
    last_status_ = status;
    if (writing_) {
      next_ = status;
      has_next_ = true;
      return;
    }
    WriteLocked(status);
  }

  // Ends the call with `status` once the writes already asked for have been sent.
  void End(grpc::Status status) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finish_called_ || ending_) return;
    ending_ = true;
    end_status_ = std::move(status);
    if (!writing_ && !has_next_) FinishLocked(end_status_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mutex_);
    writing_ = false;
    if (!ok) {  // The call is broken or cancelled: nothing more will reach the client.
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "health watch write failed"));
      return;
    }
    if (has_next_) {
      has_next_ = false;
      WriteLocked(next_);
    } else if (ending_) {
      FinishLocked(end_status_);
    }
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mutex_);
    FinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    health_->Unregister(this);
    delete this;
  }

 private:
  void WriteLocked(ServingStatus status) {
    if (finish_called_) return;
    response_.set_status(status);
    writing_ = true;
    StartWrite(&response_);
  }

  void FinishLocked(grpc::Status status) {
    if (finish_called_) return;
    finish_called_ = true;
    Finish(std::move(status));
  }

  Health* health_;
  const std::string service_;
  std::mutex mutex_;
  HealthCheckResponse response_;  // The message in flight; untouched while writing_.
  bool writing_ = false;
  bool has_next_ = false;
  ServingStatus next_ = HealthCheckResponse::UNKNOWN;
  ServingStatus last_status_ = HealthCheckResponse::UNKNOWN;  // The latest status sent or queued.
  bool ending_ = false;
  grpc::Status end_status_;
  bool finish_called_ = false;
};

Health::Health(const std::vector<engine::DeviceInfo>& devices) {
  for (const engine::DeviceInfo& device : devices) device_order_.push_back(device.id);
}

Health::~Health() {
  // gRPC has shut down by now (this outlives the server), so every call is finishing; OnDone
  // still touches this object until it unregisters.
  std::unique_lock<std::mutex> lock(mutex_);
  watchers_done_.wait(lock, [&] { return watchers_.empty(); });
}

void Health::SetWarm(bool warm) {
  std::lock_guard<std::mutex> lock(mutex_);
  warm_ = warm;
  PublishLocked();
}

void Health::SetDeviceUp(const std::string& device_id, bool up, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (std::find(device_order_.begin(), device_order_.end(), device_id) == device_order_.end()) {
    return;
  }
  if (up) {
    down_reasons_.erase(device_id);
  } else {
    down_reasons_[device_id] = reason.empty() ? "down" : reason;
  }
  PublishLocked();
}

void Health::SetGroup(bool whole, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  group_whole_ = whole;
  group_reason_ = whole ? "" : (reason.empty() ? "not whole" : reason);
  PublishLocked();
}

void Health::SetTlsFiles(bool good, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  tls_files_good_ = good;
  tls_files_reason_ = good ? "" : (reason.empty() ? "bad files" : reason);
  PublishLocked();
}

void Health::BeginDrain() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (draining_) return;
  draining_ = true;
  PublishLocked();
  for (WatchReactor* watcher : watchers_) {
    watcher->End(
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining: the server is shutting down"));
  }
}

Health::ServingStatus Health::Status(const std::string& service) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return StatusLocked(service);
}

std::string Health::NotReadyReason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return NotReadyReasonLocked();
}

std::vector<std::pair<std::string, bool>> Health::DevicesUp() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<std::string, bool>> devices;
  for (const std::string& id : device_order_) devices.emplace_back(id, !down_reasons_.count(id));
  return devices;
}

Health::ServingStatus Health::StatusLocked(const std::string& service) const {
  if (service.empty()) return HealthCheckResponse::SERVING;
  if (service == kServiceName) {
    return NotReadyReasonLocked().empty() ? HealthCheckResponse::SERVING
                                          : HealthCheckResponse::NOT_SERVING;
  }
  return HealthCheckResponse::SERVICE_UNKNOWN;
}

std::string Health::NotReadyReasonLocked() const {
  // Draining first: it is final, and what an operator watching a shutdown wants to read.
  if (draining_) return "draining";
  if (device_order_.empty()) return "no device discovered";
  if (!down_reasons_.empty()) {
    const auto& [id, reason] = *down_reasons_.begin();
    return absl::StrCat("device ", id, " down: ", reason);
  }
  if (!group_whole_) return absl::StrCat("group: ", group_reason_);
  if (!tls_files_good_) return absl::StrCat("tls: ", tls_files_reason_);
  if (!warm_) return "warming up";
  return "";
}

void Health::PublishLocked() {
  for (WatchReactor* watcher : watchers_) watcher->Send(StatusLocked(watcher->service()));
}

void Health::Unregister(WatchReactor* watcher) {
  std::lock_guard<std::mutex> lock(mutex_);
  watchers_.erase(watcher);
  if (watchers_.empty()) watchers_done_.notify_all();
}

grpc::ServerUnaryReactor* Health::Check(grpc::CallbackServerContext* context,
                                        const HealthCheckRequest* request,
                                        HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const ServingStatus status = Status(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::NOT_FOUND,
                     absl::StrCat("unknown service '", request->service(),
                                  "'; known: '' (liveness) and '", kServiceName, "' (readiness)")));
    return reactor;
  }
  response->set_status(status);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* Health::Watch(grpc::CallbackServerContext*,
                                                             const HealthCheckRequest* request) {
  auto* watcher = new WatchReactor(this, request->service());
  std::lock_guard<std::mutex> lock(mutex_);
  watchers_.insert(watcher);
  watcher->Send(StatusLocked(watcher->service()));
  if (draining_) {
    watcher->End(
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining: the server is shutting down"));
  }
  return watcher;
}

}  // namespace da::server
