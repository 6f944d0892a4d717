// Per-client caps on the stream memory one client may hold, so that one client (by its token when
// tokens are on, else by its peer address) cannot take the whole admission budget and lock every
// other client out of streaming.
//
//   ClientQuota quota(/*cap_bytes=*/int64_t{1} << 30);
//   DA_ASSIGN_OR_RETURN(ClientQuota::Share share,
//                       quota.Reserve(ClientKeyOf(context, by_token), window_bytes));
//   ...  // Held until `share` is destroyed.
//
// Thread safe. The quota must outlive its shares.
#pragma once

#include <grpcpp/server_context.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"

namespace da::server {

// Who a call comes from, for per-client limits: with by_token, "token <TokenFingerprint>" (64 bits
// of the SHA-256, never the token itself) of the call's bearer token as the authenticator reads it
// (BearerTokenOf: the scheme in any case, whitespace around the token dropped), so that one token
// is one client however it is written; else, or without a bearer token, the peer's address without
// its port ("ipv4:10.0.0.5"), so that every connection of one host is one client.
std::string ClientKeyOf(const grpc::ServerContextBase& context, bool by_token);

class ClientQuota {
 public:
  // cap_bytes 0: no cap.
  explicit ClientQuota(int64_t cap_bytes) : cap_bytes_(cap_bytes) {}

  // Bytes one client holds until destroyed. Movable, not copyable.
  class Share {
   public:
    Share() = default;
    Share(ClientQuota* quota, std::string client, int64_t bytes)
        : quota_(quota), client_(std::move(client)), bytes_(bytes) {}
    Share(Share&& other) noexcept { *this = std::move(other); }
    Share& operator=(Share&& other) noexcept;
    ~Share() { Reset(); }
    void Reset();
    // Gives back all but `bytes` now (nothing where it holds no more than that).
    void ShrinkTo(int64_t bytes);

   private:
    ClientQuota* quota_ = nullptr;
    std::string client_;
    int64_t bytes_ = 0;
  };

  // RESOURCE_EXHAUSTED (reject reason "client_memory") naming the client, the bytes asked, the
  // bytes it holds and the cap, when the client would pass the cap; when `bytes` alone is over
  // the cap (so waiting for its other streams cannot help), saying what would shrink the window.
  absl::StatusOr<Share> Reserve(const std::string& client, int64_t bytes);

  int64_t cap_bytes() const { return cap_bytes_; }
  int64_t held_bytes(const std::string& client) const;

 private:
  void Release(const std::string& client, int64_t bytes);

  const int64_t cap_bytes_;
  mutable std::mutex mu_;
  std::map<std::string, int64_t> held_;  // Only clients holding bytes.
};

}  // namespace da::server
