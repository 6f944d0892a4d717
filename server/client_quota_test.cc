// Per-client caps on stream memory: each client holds at most the cap, a refusal names the client,
// the numbers and the flag, and released shares make room again.
#include "server/client_quota.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "server/request_record.h"

namespace da::server {
namespace {

TEST(ClientQuotaTest, EachClientHoldsAtMostTheCapAndOthersAreUnaffected) {
  ClientQuota quota(1000);
  absl::StatusOr<ClientQuota::Share> a1 = quota.Reserve("ipv4:10.0.0.1", 600);
  ASSERT_TRUE(a1.ok()) << a1.status();
  absl::StatusOr<ClientQuota::Share> a2 = quota.Reserve("ipv4:10.0.0.1", 500);
  ASSERT_FALSE(a2.ok());
  EXPECT_EQ(a2.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a2.status().message(),
            "client ipv4:10.0.0.1 asks for 500 more bytes of stream windows but holds 600 of its "
            "1000 (--max-client-stream-bytes); let its other streams finish first");
  EXPECT_EQ(RejectionReason(a2.status()), "client_memory");
  // Another client has a cap of its own.
  absl::StatusOr<ClientQuota::Share> b = quota.Reserve("ipv4:10.0.0.2", 1000);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 600);
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.2"), 1000);
  // A released share (moved first: the move carries it) makes room.
  ClientQuota::Share moved = *std::move(a1);
  moved.Reset();
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 0);
  EXPECT_TRUE(quota.Reserve("ipv4:10.0.0.1", 1000).ok());
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 0);  // The temporary share was released.
}

TEST(ClientQuotaTest, AShrunkShareKeepsOnlyWhatItWasShrunkTo) {
  ClientQuota quota(1000);
  absl::StatusOr<ClientQuota::Share> share = quota.Reserve("ipv4:10.0.0.1", 900);
  ASSERT_TRUE(share.ok()) << share.status();
  share->ShrinkTo(2000);  // Never grows.
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 900);
  share->ShrinkTo(100);
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 100);
  EXPECT_TRUE(quota.Reserve("ipv4:10.0.0.1", 900).ok());
  EXPECT_FALSE(quota.Reserve("ipv4:10.0.0.1", 901).ok());
  share->Reset();
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 0);
}

// A window over the whole cap can never be admitted, however many streams end: the refusal
// says so and names what shrinks the window, instead of advising to wait.
TEST(ClientQuotaTest, AWindowOverTheWholeCapIsRefusedSayingWhatToChange) {
  ClientQuota quota(1000);
  absl::StatusOr<ClientQuota::Share> share = quota.Reserve("ipv4:10.0.0.1", 1001);
  ASSERT_FALSE(share.ok());
  EXPECT_EQ(share.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(share.status().message(),
            "client ipv4:10.0.0.1 asks for 1001 bytes for one stream's window, more than the 1000 "
            "a client may hold in all (--max-client-stream-bytes), so this stream can never be "
            "admitted: make the window smaller (fewer tokens per chunk with a smaller "
            "--stream-min-chunk-tokens, a smaller --stream-pipeline-depth or --max-message-bytes) "
            "or raise --max-client-stream-bytes");
  EXPECT_EQ(RejectionReason(share.status()), "client_memory");
  EXPECT_EQ(quota.held_bytes("ipv4:10.0.0.1"), 0);
  // Exactly the cap fits.
  EXPECT_TRUE(quota.Reserve("ipv4:10.0.0.1", 1000).ok());
}

TEST(ClientQuotaTest, ZeroCapMeansNoCap) {
  ClientQuota quota(0);
  absl::StatusOr<ClientQuota::Share> share = quota.Reserve("token 0000abcd", int64_t{1} << 50);
  EXPECT_TRUE(share.ok()) << share.status();
}

}  // namespace
}  // namespace da::server
