#include "engine/dist/store_auth.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"

namespace da::dist::internal {
namespace {

std::string Number(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(value >> (8 * i));
  return out;
}

struct MacDeleter {
  void operator()(EVP_MAC* mac) const { EVP_MAC_free(mac); }
};
struct MacContextDeleter {
  void operator()(EVP_MAC_CTX* context) const { EVP_MAC_CTX_free(context); }
};

}  // namespace

absl::Status CheckStoreSecret(absl::string_view secret, absl::string_view what) {
  if (secret.empty() ||
      (secret.size() >= kMinStoreSecretBytes && secret.size() <= kMaxStoreSecretBytes)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      what, " holds ", secret.size(), " bytes; a secret needs ", kMinStoreSecretBytes, " to ",
      kMaxStoreSecretBytes, " (e.g. the 64 characters of `openssl rand -hex 32`)"));
}

absl::StatusOr<std::string> StoreRandomBytes(size_t bytes) {
  std::string out(bytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(bytes)) != 1) {
    return absl::InternalError("the random generator (OpenSSL RAND_bytes) failed");
  }
  return out;
}

std::string HmacSha256(absl::string_view key, absl::Span<const absl::string_view> parts) {
  // The fetched algorithm and a context per call: a few microseconds, against frames that cross
  // a network.
  std::unique_ptr<EVP_MAC, MacDeleter> mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  std::unique_ptr<EVP_MAC_CTX, MacContextDeleter> context(
      mac == nullptr ? nullptr : EVP_MAC_CTX_new(mac.get()));
  char digest_name[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest_name, 0),
                         OSSL_PARAM_construct_end()};
  std::string out(kStoreMacBytes, '\0');
  size_t length = 0;
  bool ok = context != nullptr &&
            EVP_MAC_init(context.get(), reinterpret_cast<const unsigned char*>(key.data()),
                         key.size(), params) == 1;
  for (absl::string_view part : parts) {
    ok = ok && EVP_MAC_update(context.get(), reinterpret_cast<const unsigned char*>(part.data()),
                              part.size()) == 1;
  }
  ok = ok && EVP_MAC_final(context.get(), reinterpret_cast<unsigned char*>(out.data()), &length,
                           out.size()) == 1;
  // OpenSSL's HMAC-SHA256 fails only without memory or without its default provider. The empty
  // digest it then gives matches nothing (SameDigest takes digests of kStoreMacBytes only), so
  // the connection is refused rather than trusted, on whichever side failed.
  if (!ok || length != kStoreMacBytes) return std::string();
  return out;
}

std::string StoreClientProof(absl::string_view secret, absl::string_view server_nonce,
                             absl::string_view client_nonce) {
  return HmacSha256(secret, {"da-store client", server_nonce, client_nonce});
}

std::string StoreServerProof(absl::string_view secret, absl::string_view server_nonce,
                             absl::string_view client_nonce) {
  return HmacSha256(secret, {"da-store server", server_nonce, client_nonce});
}

std::string StoreSessionKey(absl::string_view secret, absl::string_view server_nonce,
                            absl::string_view client_nonce) {
  return HmacSha256(secret, {"da-store session", server_nonce, client_nonce});
}

bool SameDigest(absl::string_view a, absl::string_view b) {
  return a.size() == kStoreMacBytes && b.size() == kStoreMacBytes &&
         CRYPTO_memcmp(a.data(), b.data(), kStoreMacBytes) == 0;
}

FrameTagger::FrameTagger(std::string session_key, bool server_end)
    : key_(std::move(session_key)),
      send_direction_(server_end ? 's' : 'c'),
      receive_direction_(server_end ? 'c' : 's') {}

std::string FrameTagger::Tag(char direction, uint64_t number,
                             absl::Span<const absl::string_view> body_parts) const {
  const std::string head = std::string(1, direction) + Number(number);
  std::vector<absl::string_view> parts = {head};
  parts.insert(parts.end(), body_parts.begin(), body_parts.end());
  return HmacSha256(key_, parts);
}

std::string FrameTagger::NextSendTag(absl::Span<const absl::string_view> body_parts) {
  return Tag(send_direction_, sent_++, body_parts);
}

bool FrameTagger::CheckReceived(std::string& frame) {
  if (frame.size() < kStoreMacBytes) return false;
  const absl::string_view body(frame.data(), frame.size() - kStoreMacBytes);
  const absl::string_view tag(frame.data() + body.size(), kStoreMacBytes);
  if (!SameDigest(tag, Tag(receive_direction_, received_, {body}))) return false;
  ++received_;
  frame.resize(body.size());
  return true;
}

}  // namespace da::dist::internal
