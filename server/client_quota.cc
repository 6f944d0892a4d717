#include "server/client_quota.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/request_record.h"
#include "server/security.h"

namespace da::server {

std::string ClientKeyOf(const grpc::ServerContextBase& context, bool by_token) {
  if (by_token) {
    auto it = context.client_metadata().find("authorization");
    if (it != context.client_metadata().end()) {
      // The token as the authenticator read it, not the metadata as sent: "bearer  t" is the
      // same client as "Bearer t".
      const std::optional<absl::string_view> token =
          BearerTokenOf(absl::string_view(it->second.data(), it->second.length()));
      if (token.has_value()) return absl::StrCat("token ", TokenFingerprint(*token));
    }
  }
  const std::string peer = context.peer();
  const size_t colon = peer.rfind(':');
  // "ipv4:10.0.0.5:51234" -> "ipv4:10.0.0.5"; a peer without a port ("unix:...") stays whole.
  if (colon == std::string::npos || colon + 1 == peer.size() ||
      peer.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
    return peer;
  }
  return peer.substr(0, colon);
}

ClientQuota::Share& ClientQuota::Share::operator=(Share&& other) noexcept {
  if (this != &other) {
    Reset();
    quota_ = std::exchange(other.quota_, nullptr);
    client_ = std::move(other.client_);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void ClientQuota::Share::Reset() {
  if (quota_ != nullptr && bytes_ > 0) quota_->Release(client_, bytes_);
  quota_ = nullptr;
  bytes_ = 0;
}

void ClientQuota::Share::ShrinkTo(int64_t bytes) {
  bytes = std::max<int64_t>(bytes, 0);
  if (quota_ == nullptr || bytes >= bytes_) return;
  quota_->Release(client_, bytes_ - bytes);
  bytes_ = bytes;
}

absl::StatusOr<ClientQuota::Share> ClientQuota::Reserve(const std::string& client, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t& held = held_[client];
  if (cap_bytes_ > 0 && bytes > cap_bytes_ - held) {
    const int64_t holding = held;
    if (held == 0) held_.erase(client);
    if (bytes > cap_bytes_) {
      // Waiting cannot help: the window alone is over the cap.
      return WithServerRejectReason(
          absl::ResourceExhaustedError(absl::StrFormat(
              "client %s asks for %d bytes for one stream's window, more than the %d a client may "
              "hold in all (--max-client-stream-bytes), so this stream can never be admitted: "
              "make the window smaller (fewer tokens per chunk with a smaller "
              "--stream-min-chunk-tokens, a smaller --stream-pipeline-depth or "
              "--max-message-bytes) or raise --max-client-stream-bytes",
              client, bytes, cap_bytes_)),
          "client_memory");
    }
    return WithServerRejectReason(
        absl::ResourceExhaustedError(absl::StrFormat(
            "client %s asks for %d more bytes of stream windows but holds %d of its %d "
            "(--max-client-stream-bytes); let its other streams finish first",
            client, bytes, holding, cap_bytes_)),
        "client_memory");
  }
  held += bytes;
  return Share(this, client, bytes);
}

int64_t ClientQuota::held_bytes(const std::string& client) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = held_.find(client);
  return it == held_.end() ? 0 : it->second;
}

void ClientQuota::Release(const std::string& client, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = held_.find(client);
  if (it == held_.end()) return;
  it->second -= bytes;
  if (it->second <= 0) held_.erase(it);
}

}  // namespace da::server
