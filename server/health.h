// grpc.health.v1.Health for da-server, and the rules that decide what it reports.
//
//   Health health(engine->devices());
//   builder.RegisterService(&health);
//   health.SetWarm(true);                          // Warm-up plans built (or none to build).
//   health.SetDeviceUp("cpu:0", false, "self-check failed: ...");
//   health.SetGroup(false, "rank 2 missing; ...");  // Multi-process: the shard group's state.
//   health.SetTlsFiles(false, "--tls-key ...: ...");  // TLS: the files fail the start-up checks.
//   health.BeginDrain();                           // Shutdown: readiness off, watches end.
//
// Services: liveness ("") and readiness (kServiceName, "da.v1.AttentionService"); Check on any
// other name is NOT_FOUND, Watch on one reports SERVICE_UNKNOWN.
//
// Rules:
// - Liveness is SERVING for as long as the server answers: the process is sound. A failed
//   self-check, a device down, bad TLS files, warm-up or draining never turn it off (a restart
//   would not help them, and during a drain the process is healthy and busy finishing work).
// - Readiness is SERVING only when all of these hold: the server is warm (SetWarm), at least one
//   device was discovered and every device is up (SetDeviceUp), the shard group (multi-process
//   serving, engine/shard_group.h) is whole (SetGroup; a single process has no group and is
//   always whole), the TLS files pass the start-up checks (SetTlsFiles; without TLS they always
//   do), and the server is not draining (BeginDrain). It starts NOT_SERVING (not warm).
// - Check answers the current status. Watch sends the current status at once, then every change
//   (intermediate changes may be coalesced, the latest always arrives). BeginDrain sends the final
//   statuses, then ends every Watch call with UNAVAILABLE ("draining") and ends any Watch call
//   that starts later the same way after its one status: an open Watch (gRPC client-side health
//   checking keeps one per connection) never holds up the drain.
//
// Thread safety: every method may be called from any thread. The object must outlive the
// grpc::Server it is registered in.
#pragma once

#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "engine/device.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace da::server {

class Health final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Every device starts up (it was discovered); readiness starts off until SetWarm(true).
  explicit Health(const std::vector<engine::DeviceInfo>& devices);
  ~Health() override;

  void SetWarm(bool warm);
  // Marks a discovered device up or down; reason says why it is down (logged by the caller,
  // kept for NotReadyReason). An id that was not discovered is ignored.
  void SetDeviceUp(const std::string& device_id, bool up, const std::string& reason = "");
  // The shard group is whole, or not and why ("rank 2 missing; waiting for it to join
  // generation 5"); NotReadyReason reports "group: <reason>".
  void SetGroup(bool whole, const std::string& reason = "");
  // The TLS files pass the start-up checks, or not and why (the flag, the file and what is
  // wrong; TlsFileWatcher); NotReadyReason reports "tls: <reason>".
  void SetTlsFiles(bool good, const std::string& reason = "");
  // Readiness NOT_SERVING for good; every Watch call gets its last status and ends.
  void BeginDrain();

  ServingStatus Status(const std::string& service) const;
  // Why readiness is NOT_SERVING ("warming up", "device cpu:0 down: ...", "group: ...",
  // "tls: ...", "draining"); empty when it is SERVING.
  std::string NotReadyReason() const;
  // Every discovered device with its state, in discovery order.
  std::vector<std::pair<std::string, bool>> DevicesUp() const;

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class WatchReactor;

  ServingStatus StatusLocked(const std::string& service) const;
  std::string NotReadyReasonLocked() const;
  // Sends the current statuses to every watcher (after any change).
  void PublishLocked();
  void Unregister(WatchReactor* watcher);

  mutable std::mutex mutex_;
  bool warm_ = false;
  bool draining_ = false;
  std::vector<std::string> device_order_;
  std::map<std::string, std::string> down_reasons_;  // Devices down, with why.
  bool group_whole_ = true;
  std::string group_reason_;
  bool tls_files_good_ = true;
  std::string tls_files_reason_;
  std::set<WatchReactor*> watchers_;
  std::condition_variable watchers_done_;  // The destructor waits for every Watch to be done.
};

}  // namespace da::server
