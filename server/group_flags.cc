#include "server/group_flags.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace da::server {

absl::Status ValidateGroupFlags(const GroupFlags& f) {
  if (f.world_size < 1 || f.world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("--world-size is ", f.world_size, "; must be in [1, ", kMaxWorldSize, "]"));
  }
  if (f.rank < 0 || f.rank >= f.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("--rank is ", f.rank, "; must be in [0, ",
                                                   f.world_size, ") (below --world-size ",
                                                   f.world_size, ")"));
  }
  if (f.world_size == 1) return absl::OkStatus();  // One process: the other flags are unused.
  if (f.coordinator.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--coordinator HOST:PORT is required with --world-size ", f.world_size,
                     " (rank 0 listens at PORT, the other ranks connect to HOST:PORT)"));
  }
  const size_t colon = f.coordinator.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(f.coordinator.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator is '", f.coordinator, "'; expected HOST:PORT with PORT in [0, 65535]"));
  }
  if (port == 0 && f.rank != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator is '", f.coordinator, "'; port 0 (any free port) is for rank 0 only, rank ",
        f.rank, " must name rank 0's port"));
  }
  if (f.collective_timeout_ms < 1 || f.collective_timeout_ms > kMaxCollectiveTimeoutMs) {
    return absl::InvalidArgumentError(absl::StrCat("--collective-timeout-ms is ",
                                                   f.collective_timeout_ms, "; must be in [1, ",
                                                   kMaxCollectiveTimeoutMs, "]"));
  }
  if (f.heartbeat_ms < 1 || f.heartbeat_ms >= f.collective_timeout_ms) {
    return absl::InvalidArgumentError(absl::StrCat("--heartbeat-ms is ", f.heartbeat_ms,
                                                   "; must be in [1, --collective-timeout-ms ",
                                                   f.collective_timeout_ms, ")"));
  }
  if (f.rank_address.empty()) {
    return absl::InvalidArgumentError(
        "--rank-address is empty; name an address of this host the other ranks can reach");
  }
  if (f.data_plane != "none" && f.data_plane != "nccl" && f.data_plane != "gloo-staged") {
    return absl::InvalidArgumentError(
        absl::StrCat("--data-plane is '", f.data_plane, "'; must be none, nccl or gloo-staged"));
  }
  if (f.data_plane_device < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--data-plane-device is ", f.data_plane_device, "; must be >= 0"));
  }
  if (!f.coordinator_port_file.empty() && f.rank != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--coordinator-port-file is for rank 0 (the rank that listens); this is rank ", f.rank));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadCoordinatorSecret(const GroupFlags& flags) {
  if (flags.coordinator_secret_file.empty()) return std::string();
  const std::string flag =
      absl::StrCat("--coordinator-secret-file ", flags.coordinator_secret_file);
  std::ifstream file(flags.coordinator_secret_file, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot be read (", std::strerror(errno), ")"));
  }
  // Read at most one byte past the limit: a large file is refused without being held.
  std::string secret(kMaxCoordinatorSecretBytes + 1, '\0');
  file.read(secret.data(), static_cast<std::streamsize>(secret.size()));
  if (file.bad()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot be read"));
  }
  secret.resize(static_cast<size_t>(file.gcount()));
  const size_t end = secret.find_last_not_of(" \t\r\n");
  secret.resize(end == std::string::npos ? 0 : end + 1);
  if (secret.size() < kMinCoordinatorSecretBytes || secret.size() > kMaxCoordinatorSecretBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " holds ", secret.size() > kMaxCoordinatorSecretBytes ? "over " : "",
        std::min(secret.size(), kMaxCoordinatorSecretBytes), " bytes (trailing whitespace aside); ",
        "a secret needs ", kMinCoordinatorSecretBytes, " to ", kMaxCoordinatorSecretBytes,
        ", the same on every rank (e.g. `openssl rand -hex 32 > FILE`)"));
  }
  return secret;
}

}  // namespace da::server
