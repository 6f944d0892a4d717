// The coordinator store's shared secret (store.h): a handshake that proves to each end that the
// other knows the secret without sending it, and a tag on every frame after it, so that a peer
// without the secret can neither read-and-write the store nor forge, replay or reorder a frame of
// a connection it did not open. It does not hide what the store holds (rank addresses, the NCCL
// id): confidentiality is the network's (docs/DISTRIBUTED.md, "Trust").
//
//   server -> client  hello:   "DAS1" | u8 auth (0 or 1) | server nonce (32 bytes, when auth)
//   client -> server  (auth)   client nonce (32) | HMAC(secret, "da-store client" | sn | cn)
//   server -> client  (auth)   u8 0 | HMAC(secret, "da-store server" | sn | cn)   or u8 1 (refused)
//   every frame after it:      body | HMAC(key, direction | u64 number | body), with
//                              key = HMAC(secret, "da-store session" | sn | cn), direction 'c' or
//                              's', frames numbered from 0 each way.
// HMAC is HMAC-SHA256 (OpenSSL); nonces come from OpenSSL's RAND_bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace da::dist::internal {

inline constexpr absl::string_view kStoreHelloMagic = "DAS1";
inline constexpr size_t kStoreNonceBytes = 32;
inline constexpr size_t kStoreMacBytes = 32;
// A secret's length limits: at least 128 bits (e.g. `openssl rand -hex 32`, 64 characters).
inline constexpr size_t kMinStoreSecretBytes = 16;
inline constexpr size_t kMaxStoreSecretBytes = 4096;

// INVALID_ARGUMENT naming `what`, the length and the limits for a secret that is neither empty
// (no authentication) nor within them.
absl::Status CheckStoreSecret(absl::string_view secret, absl::string_view what);

// `bytes` random bytes; INTERNAL when the generator fails.
absl::StatusOr<std::string> StoreRandomBytes(size_t bytes);

// HMAC-SHA256 over the parts in order (32 bytes); empty if OpenSSL fails, which SameDigest never
// matches.
std::string HmacSha256(absl::string_view key, absl::Span<const absl::string_view> parts);

// The handshake's values (see the file comment).
std::string StoreClientProof(absl::string_view secret, absl::string_view server_nonce,
                             absl::string_view client_nonce);
std::string StoreServerProof(absl::string_view secret, absl::string_view server_nonce,
                             absl::string_view client_nonce);
std::string StoreSessionKey(absl::string_view secret, absl::string_view server_nonce,
                            absl::string_view client_nonce);

// Whether a and b are the same digest of kStoreMacBytes, in time that does not depend on where
// they differ; false for any other size (an empty, failed digest included).
bool SameDigest(absl::string_view a, absl::string_view b);

// One end of one authenticated connection: tags the frames it sends and checks the frames it
// receives, each way numbered from 0. Not thread-safe (a connection's frames go one at a time).
class FrameTagger {
 public:
  FrameTagger(std::string session_key, bool server_end);
  // The tag to append to the next frame sent, whose body is the parts in order.
  std::string NextSendTag(absl::Span<const absl::string_view> body_parts);
  // Checks that `frame` ends in the next received frame's tag and strips it; false (frame
  // unchanged) when it is too short or the tag does not match.
  bool CheckReceived(std::string& frame);

 private:
  std::string Tag(char direction, uint64_t number,
                  absl::Span<const absl::string_view> body_parts) const;

  std::string key_;
  char send_direction_;
  char receive_direction_;
  uint64_t sent_ = 0;
  uint64_t received_ = 0;
};

}  // namespace da::dist::internal
