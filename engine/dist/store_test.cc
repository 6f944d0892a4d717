// Tests of the coordinator store: in-process, and across real processes on loopback.
#include "engine/dist/store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/dist/multi_process_test_util.h"
#include "engine/dist/socket_io.h"
#include "engine/dist/store_auth.h"

namespace da::dist {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::RankFlags;

std::string RandomBytes(uint64_t seed, size_t bytes) {
  std::mt19937_64 rng(seed);
  std::string out(bytes, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

int64_t MsSince(Clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
}

std::unique_ptr<CoordinatorStoreServer> StartServer(const CoordinatorStoreOptions& options = {}) {
  auto server = CoordinatorStoreServer::Start("127.0.0.1:0", options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

std::string Address(const CoordinatorStoreServer& server) {
  return absl::StrCat("127.0.0.1:", server.port());
}

// A connection that speaks no protocol, as a hostile or broken peer would.
int ConnectRaw(const CoordinatorStoreServer& server) {
  auto fd = internal::ConnectTcp({"127.0.0.1", server.port()}, Clock::now() + milliseconds(2000));
  EXPECT_TRUE(fd.ok()) << fd.status();
  return fd.ok() ? *fd : -1;
}

// True when the server ends the connection (end of stream or reset) within timeout.
bool ClosedByServerWithin(int fd, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  char byte = 0;
  while (Clock::now() < deadline) {
    pollfd waiting = {fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    if (poll(&waiting, 1, static_cast<int>(left.count()) + 1) <= 0) continue;
    const ssize_t n = recv(fd, &byte, 1, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return true;
  }
  return false;
}

int64_t ProcessCpuMs() {
  timespec now{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
  return int64_t{now.tv_sec} * 1000 + now.tv_nsec / 1'000'000;
}

TEST(CoordinatorStoreTest, SetThenGetReturnsTheValueAndOverwrites) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->port(), 0);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string value = RandomBytes(1, 1 << 20);  // Binary, with zero bytes, 1 MiB.
  ASSERT_TRUE((*store)->Set("big", value).ok());
  auto got = (*store)->Get("big", milliseconds(1000));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, value);
  ASSERT_TRUE((*store)->Set("big", "second").ok());
  EXPECT_EQ(*(*store)->Get("big", milliseconds(1000)), "second");
  ASSERT_TRUE((*store)->Set("empty", "").ok());
  EXPECT_EQ(*(*store)->Get("empty", milliseconds(1000)), "");
}

// "0.0.0.0" (every interface, as rank 0 listens) takes IPv6 clients too where the host has IPv6:
// a cluster whose names resolve only to IPv6 addresses can form its group.
TEST(CoordinatorStoreTest, EveryInterfaceMeansIPv6AndIPv4Alike) {
  const int probe = socket(AF_INET6, SOCK_STREAM, 0);
  sockaddr_in6 loopback{};
  loopback.sin6_family = AF_INET6;
  loopback.sin6_addr = in6addr_loopback;
  const bool has_ipv6 = probe >= 0 && bind(probe, reinterpret_cast<const sockaddr*>(&loopback),
                                           sizeof(loopback)) == 0;
  if (probe >= 0) close(probe);
  if (!has_ipv6) GTEST_SKIP() << "no IPv6 loopback on this host";
  auto server = CoordinatorStoreServer::Start("0.0.0.0:0");
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  for (const std::string host : {"[::1]", "127.0.0.1"}) {
    auto store = ConnectCoordinatorStore(host + ":" + std::to_string(port), milliseconds(2000));
    ASSERT_TRUE(store.ok()) << host << ": " << store.status();
    ASSERT_TRUE((*store)->Set("from " + host, host).ok()) << host;
    EXPECT_EQ(*(*store)->Get("from " + host, milliseconds(1000)), host);
  }
}

TEST(CoordinatorStoreTest, GetOfAMissingKeyTimesOutNamingKeyAndTimeout) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok()) << store.status();
  const auto start = Clock::now();
  auto got = (*store)->Get("never/set", milliseconds(250));
  const int64_t elapsed_ms = MsSince(start);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
  EXPECT_NE(got.status().message().find("never/set"), std::string::npos) << got.status();
  EXPECT_NE(got.status().message().find("250 ms"), std::string::npos) << got.status();
  EXPECT_GE(elapsed_ms, 250);
  EXPECT_LT(elapsed_ms, 1500);
  // The connection stays usable after a timed-out Get.
  ASSERT_TRUE((*store)->Set("after", "x").ok());
  EXPECT_EQ(*(*store)->Get("after", milliseconds(1000)), "x");
}

TEST(CoordinatorStoreTest, GetWaitsForASetFromAnotherClient) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto waiter = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  auto setter = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(waiter.ok() && setter.ok());
  absl::StatusOr<std::string> got;
  std::thread thread([&] { got = (*waiter)->Get("late", milliseconds(5000)); });
  const std::string value = RandomBytes(2, 333);
  ASSERT_TRUE((*setter)->Set("late", value).ok());
  thread.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, value);
}

TEST(CoordinatorStoreTest, StoppingTheServerEndsAWaitingGetWithUnavailable) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Set("ready", "1").ok());
  absl::StatusOr<std::string> got;
  const auto start = Clock::now();
  std::thread thread([&] { got = (*store)->Get("never", milliseconds(20000)); });
  server.reset();
  thread.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  EXPECT_LT(MsSince(start), 5000);
  // Later calls fail fast too: nobody is listening any more.
  EXPECT_EQ((*store)->Set("x", "y").code(), absl::StatusCode::kUnavailable);
}

TEST(CoordinatorStoreTest, ConnectToNobodyIsUnavailableAfterTheTimeout) {
  int port = 0;
  {
    auto server = StartServer();  // Find a port that is free once the server is gone.
    ASSERT_NE(server, nullptr);
    port = server->port();
  }
  const auto start = Clock::now();
  auto store = ConnectCoordinatorStore(absl::StrCat("127.0.0.1:", port), milliseconds(300));
  EXPECT_EQ(store.status().code(), absl::StatusCode::kUnavailable) << store.status();
  EXPECT_NE(store.status().message().find("300 ms"), std::string::npos) << store.status();
  EXPECT_GE(MsSince(start), 250);
  EXPECT_LT(MsSince(start), 2000);
  EXPECT_EQ(ConnectCoordinatorStore("no-port", milliseconds(10)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CoordinatorStoreTest, ConnectionsOverTheCapAreClosedAtOnceWhileTheOthersWork) {
  auto server = StartServer({.max_connections = 2});
  ASSERT_NE(server, nullptr);
  auto first = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  auto second = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(first.ok() && second.ok());
  // Served, so both hold their places before the third comes.
  ASSERT_TRUE((*first)->Set("first", "1").ok());
  ASSERT_TRUE((*second)->Set("second", "2").ok());
  const int third = ConnectRaw(*server);
  ASSERT_GE(third, 0);
  const auto start = Clock::now();
  EXPECT_TRUE(ClosedByServerWithin(third, milliseconds(5000)));
  EXPECT_LT(MsSince(start), 2000);
  close(third);
  EXPECT_EQ(*(*first)->Get("second", milliseconds(1000)), "2");
  EXPECT_EQ(*(*second)->Get("first", milliseconds(1000)), "1");
  // A place a client gives up is free again (once the server has seen it go).
  first->reset();
  auto later = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(later.ok());
  absl::Status set = absl::UnknownError("not tried");
  for (const auto deadline = Clock::now() + milliseconds(5000);
       !set.ok() && Clock::now() < deadline;) {
    set = (*later)->Set("later", "3");  // Reconnects after a refused attempt.
  }
  EXPECT_TRUE(set.ok()) << set;
  EXPECT_EQ(*(*second)->Get("later", milliseconds(1000)), "3");
}

TEST(CoordinatorStoreTest, AFrameHeaderWithoutItsBodyIsClosedAfterTheIoTimeout) {
  auto server = StartServer({.io_timeout = milliseconds(300)});
  ASSERT_NE(server, nullptr);
  const int stalled = ConnectRaw(*server);
  ASSERT_GE(stalled, 0);
  std::string header;
  internal::PutU32(header, 32u << 20);  // Announces 32 MiB, sends none of it.
  ASSERT_TRUE(
      internal::WriteAll(stalled, header.data(), header.size(), Clock::now() + milliseconds(1000))
          .ok());
  const auto start = Clock::now();
  // Others are served meanwhile.
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Set("k", "v").ok());
  EXPECT_EQ(*(*store)->Get("k", milliseconds(1000)), "v");
  EXPECT_TRUE(ClosedByServerWithin(stalled, milliseconds(5000)));
  EXPECT_GE(MsSince(start), 250);
  EXPECT_LT(MsSince(start), 3000);
  close(stalled);
  EXPECT_EQ(*(*store)->Get("k", milliseconds(1000)), "v");
}

TEST(CoordinatorStoreTest, ASetOverTheByteBudgetIsRefusedUntilDeletePrefixFreesRoom) {
  auto server = StartServer({.max_bytes = 1000});
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Set("a/1", std::string(397, 'x')).ok());  // 400 bytes with its key.
  ASSERT_TRUE((*store)->Set("a/2", std::string(397, 'y')).ok());  // 800 held.
  const absl::Status refused = (*store)->Set("b/1", std::string(297, 'z'));
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("'b/1' (300 bytes) refused: the store holds 800 bytes of its "
                                   "limit of 1000"),
            std::string::npos)
      << refused;
  // An overwrite counts its new size only: 800 - 400 + 100.
  ASSERT_TRUE((*store)->Set("a/1", std::string(97, 'x')).ok());
  EXPECT_EQ((*store)->Set("b/1", std::string(498, 'z')).code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE((*store)->DeletePrefix("a/").ok());
  EXPECT_TRUE((*store)->Set("b/1", std::string(997, 'z')).ok());
  EXPECT_EQ((*store)->Set("b/2", "").code(), absl::StatusCode::kResourceExhausted);
}

TEST(CoordinatorStoreTest, DeletePrefixRemovesExactlyTheKeysUnderThePrefix) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  for (const char* key : {"s/g1/open", "s/g1/gloo/rank_0", "s/g1", "s/g12/open", "s/g0", "t"}) {
    ASSERT_TRUE((*store)->Set(key, key).ok());
  }
  ASSERT_TRUE((*store)->DeletePrefix("s/g1/").ok());
  for (const char* deleted : {"s/g1/open", "s/g1/gloo/rank_0"}) {
    EXPECT_EQ((*store)->Get(deleted, milliseconds(50)).status().code(),
              absl::StatusCode::kDeadlineExceeded)
        << deleted;
  }
  for (const char* kept : {"s/g1", "s/g12/open", "s/g0", "t"}) {
    auto got = (*store)->Get(kept, milliseconds(0));
    ASSERT_TRUE(got.ok()) << kept << ": " << got.status();
    EXPECT_EQ(*got, kept);
  }
  EXPECT_TRUE((*store)->DeletePrefix("nothing/").ok());
  // A deleted key can be set again.
  ASSERT_TRUE((*store)->Set("s/g1/open", "again").ok());
  EXPECT_EQ(*(*store)->Get("s/g1/open", milliseconds(0)), "again");
}

// With no descriptor left, accept fails while the pending connection keeps the listening socket
// readable; the server must rest between attempts rather than spin, and serve the connection
// once descriptors are back.
TEST(CoordinatorStoreTest, AcceptFailingForWantOfDescriptorsDoesNotSpin) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &saved), 0);
  const int client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(client, 0);
  // socket() took the lowest free descriptor, so with the limit just above it none is left.
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(client) + 1;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &tight), 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(server->port()));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const int connected = connect(client, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  // A window of time to measure the CPU the server burns in, not a wait for a condition.
  const int64_t cpu_before_ms = ProcessCpuMs();
  std::this_thread::sleep_for(milliseconds(500));
  const int64_t cpu_ms = ProcessCpuMs() - cpu_before_ms;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_EQ(connected, 0) << std::strerror(errno);
  ASSERT_EQ(fcntl(client, F_SETFL, O_NONBLOCK), 0);  // For the deadlines of the reads below.
  EXPECT_LT(cpu_ms, 100) << "the accept loop spins";
  // Descriptors are back: the waiting connection is greeted, then served.
  auto hello = internal::ReadFrame(client, 64, Clock::now() + milliseconds(5000));
  ASSERT_TRUE(hello.ok()) << hello.status();
  EXPECT_EQ(*hello, std::string("DAS1\0", 5));  // No secret.
  std::string request(1, '\x02');  // GET "k", timeout 0: the server answers "timed out".
  internal::PutString(request, "k");
  internal::PutI64(request, 0);
  ASSERT_TRUE(internal::WriteFrame(client, request, Clock::now() + milliseconds(2000)).ok());
  auto reply = internal::ReadFrame(client, 16, Clock::now() + milliseconds(5000));
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(*reply, std::string(1, '\x01'));
  close(client);
}

TEST(StoreAuthTest, HmacSha256MatchesRfc4231OverItsParts) {
  // RFC 4231, test case 2; the data split into parts gives the digest of their concatenation.
  const std::string expected(
      "\x5b\xdc\xc1\x46\xbf\x60\x75\x4e\x6a\x04\x24\x26\x08\x95\x75\xc7"
      "\x5a\x00\x3f\x08\x9d\x27\x39\x83\x9d\xec\x58\xb9\x64\xec\x38\x43",
      32);
  EXPECT_EQ(internal::HmacSha256("Jefe", {"what do ya want for nothing?"}), expected);
  EXPECT_EQ(internal::HmacSha256("Jefe", {"what do ya ", "", "want for nothing?"}), expected);
  EXPECT_NE(internal::HmacSha256("Jeff", {"what do ya want for nothing?"}), expected);
  // Only whole digests compare equal: a failed HMAC's empty digest matches nothing, itself
  // included, so a failure on either side refuses rather than trusts.
  EXPECT_TRUE(internal::SameDigest(expected, expected));
  EXPECT_FALSE(internal::SameDigest("", ""));
  EXPECT_FALSE(internal::SameDigest("short", "short"));
}

TEST(StoreAuthTest, ATaggerAcceptsEachFrameOnceInOrderAndNothingAltered) {
  internal::FrameTagger client(std::string(32, 'k'), /*server_end=*/false);
  internal::FrameTagger server(std::string(32, 'k'), /*server_end=*/true);
  std::string first = "first";
  first += client.NextSendTag({"fir", "st"});
  std::string second = "second";
  second += client.NextSendTag({second});
  std::string altered = second;
  altered[0] = 'S';
  EXPECT_FALSE(server.CheckReceived(altered));  // Altered.
  std::string early = second;
  EXPECT_FALSE(server.CheckReceived(early));  // Out of order.
  std::string replayed = first;
  ASSERT_TRUE(server.CheckReceived(first));
  EXPECT_EQ(first, "first");
  EXPECT_FALSE(server.CheckReceived(replayed));  // Once only.
  ASSERT_TRUE(server.CheckReceived(second));
  EXPECT_EQ(second, "second");
  // A client's frame reflected back to a client is refused: only the direction differs from a
  // server's frame 0 (the same key and number), and the direction is in the tag.
  internal::FrameTagger sender(std::string(32, 'k'), /*server_end=*/false);
  std::string reflected = "third";
  reflected += sender.NextSendTag({reflected});
  internal::FrameTagger other_client(std::string(32, 'k'), /*server_end=*/false);
  std::string back = reflected;
  EXPECT_FALSE(other_client.CheckReceived(back));
  internal::FrameTagger a_server(std::string(32, 'k'), /*server_end=*/true);
  std::string forward = reflected;
  EXPECT_TRUE(a_server.CheckReceived(forward));  // The same frame, the right way.
  std::string short_frame = "x";
  EXPECT_FALSE(server.CheckReceived(short_frame));
}

TEST(StoreAuthTest, KeepAliveIsTurnedOnWithItsPeriods) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(internal::EnableKeepAlive(fd).ok());
  auto option = [&](int level, int name) {
    int value = -1;
    socklen_t length = sizeof(value);
    EXPECT_EQ(getsockopt(fd, level, name, &value, &length), 0);
    return value;
  };
  EXPECT_EQ(option(SOL_SOCKET, SO_KEEPALIVE), 1);
  EXPECT_EQ(option(IPPROTO_TCP, TCP_KEEPIDLE), 60);
  EXPECT_EQ(option(IPPROTO_TCP, TCP_KEEPINTVL), 10);
  EXPECT_EQ(option(IPPROTO_TCP, TCP_KEEPCNT), 6);
  close(fd);
}

const std::string kSecret = "0123456789abcdef0123456789abcdef";

TEST(CoordinatorStoreTest, ASharedSecretLetsInOnlyClientsThatKnowIt) {
  auto server = StartServer({.secret = kSecret});
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000), kSecret);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string large = RandomBytes(7, 3 << 20);  // Several reads and writes each way.
  ASSERT_TRUE((*store)->Set("k", large).ok());
  ASSERT_TRUE((*store)->Set("small", "v").ok());
  EXPECT_EQ(*(*store)->Get("k", milliseconds(1000)), large);
  EXPECT_EQ(*(*store)->Get("small", milliseconds(1000)), "v");
  EXPECT_EQ((*store)->Get("absent", milliseconds(10)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE((*store)->DeletePrefix("sm").ok());
  EXPECT_EQ(server->refused_clients(), 0);

  // Refusals come at once, not after the connect timeout, and say what to fix.
  const auto start = Clock::now();
  auto none = ConnectCoordinatorStore(Address(*server), milliseconds(10000));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnauthenticated) << none.status();
  EXPECT_NE(none.status().message().find("has a shared secret and this rank has none: every "
                                         "rank needs the same --coordinator-secret-file"),
            std::string::npos)
      << none.status();
  auto other = ConnectCoordinatorStore(Address(*server), milliseconds(10000),
                                       "fedcba9876543210fedcba9876543210");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kUnauthenticated) << other.status();
  EXPECT_NE(other.status().message().find("refused this rank's shared secret"), std::string::npos)
      << other.status();
  EXPECT_LT(MsSince(start), 2000);
  EXPECT_EQ(server->refused_clients(), 1);

  // A secret on the client only is refused too: the coordinator could not prove itself.
  auto open_server = StartServer();
  ASSERT_NE(open_server, nullptr);
  auto only_client = ConnectCoordinatorStore(Address(*open_server), milliseconds(2000), kSecret);
  EXPECT_EQ(only_client.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(only_client.status().message().find("has no shared secret and this rank has one"),
            std::string::npos)
      << only_client.status();
  // Secrets shorter than 128 bits are refused on both sides.
  auto weak = CoordinatorStoreServer::Start("127.0.0.1:0", {.secret = "short"});
  EXPECT_EQ(weak.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(weak.status().message().find("holds 5 bytes; a secret needs 16 to 4096"),
            std::string::npos)
      << weak.status();
  EXPECT_EQ(ConnectCoordinatorStore(Address(*server), milliseconds(100), "short").status().code(),
            absl::StatusCode::kInvalidArgument);
  // The authenticated client still works, and its value was never touched.
  EXPECT_EQ(*(*store)->Get("k", milliseconds(1000)), large);
}

// A peer that connects and never answers the hello gives its place back after the handshake's
// timeout, not the I/O timeout.
TEST(CoordinatorStoreTest, APeerThatNeverAnswersTheHelloIsClosedAfterTheHandshakeTimeout) {
  auto server = StartServer({.secret = kSecret, .handshake_timeout = milliseconds(300)});
  ASSERT_NE(server, nullptr);
  const int silent = ConnectRaw(*server);
  ASSERT_GE(silent, 0);
  const auto start = Clock::now();
  EXPECT_TRUE(ClosedByServerWithin(silent, milliseconds(5000)));
  EXPECT_GE(MsSince(start), 250);
  EXPECT_LT(MsSince(start), 3000);  // The I/O timeout is 30 s.
  close(silent);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000), kSecret);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE((*store)->Set("k", "v").ok());
}

// Performs the client's handshake on a raw connection, returning its session key.
std::string RawHandshake(int fd, const std::string& secret) {
  auto hello = internal::ReadFrame(fd, 64, Clock::now() + milliseconds(2000));
  EXPECT_TRUE(hello.ok() && hello->size() == 37) << hello.status();
  if (!hello.ok() || hello->size() != 37) return "";
  const std::string server_nonce = hello->substr(5);
  const std::string client_nonce(32, 'n');
  EXPECT_TRUE(internal::WriteFrame(
                  fd, client_nonce + internal::StoreClientProof(secret, server_nonce, client_nonce),
                  Clock::now() + milliseconds(2000))
                  .ok());
  auto answer = internal::ReadFrame(fd, 64, Clock::now() + milliseconds(2000));
  EXPECT_TRUE(answer.ok() && answer->size() == 33 && (*answer)[0] == 0) << answer.status();
  return internal::StoreSessionKey(secret, server_nonce, client_nonce);
}

std::string SetRequest(const std::string& key, const std::string& value) {
  std::string request(1, '\x01');
  internal::PutString(request, key);
  internal::PutString(request, value);
  return request;
}

TEST(CoordinatorStoreTest, AFrameWithoutItsTagOrReplayedClosesTheConnectionUnserved) {
  auto server = StartServer({.secret = kSecret});
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000), kSecret);
  ASSERT_TRUE(store.ok()) << store.status();
  const auto deadline = [] { return Clock::now() + milliseconds(2000); };

  // No handshake at all: a request in place of the client's proof.
  const int bare = ConnectRaw(*server);
  ASSERT_GE(bare, 0);
  ASSERT_TRUE(internal::ReadFrame(bare, 64, deadline()).ok());  // The hello.
  ASSERT_TRUE(internal::WriteFrame(bare, SetRequest("bare", "x"), deadline()).ok());
  EXPECT_TRUE(ClosedByServerWithin(bare, milliseconds(5000)));
  close(bare);

  // A good handshake, then a frame whose tag is wrong.
  const int forged = ConnectRaw(*server);
  ASSERT_GE(forged, 0);
  const std::string key = RawHandshake(forged, kSecret);
  ASSERT_FALSE(key.empty());
  internal::FrameTagger tagger(key, /*server_end=*/false);
  std::string good = SetRequest("tagged", "1");
  good += tagger.NextSendTag({good});
  ASSERT_TRUE(internal::WriteFrame(forged, good, deadline()).ok());
  auto reply = internal::ReadFrame(forged, 64, deadline());
  ASSERT_TRUE(reply.ok()) << reply.status();
  // The reply is tagged as the server's first frame.
  internal::FrameTagger server_side(key, /*server_end=*/true);
  std::string expected_reply(1, '\0');
  expected_reply += server_side.NextSendTag({std::string(1, '\0')});
  EXPECT_EQ(*reply, expected_reply);
  // The same frame again (a replay) is not the client's second.
  ASSERT_TRUE(internal::WriteFrame(forged, good, deadline()).ok());
  EXPECT_TRUE(ClosedByServerWithin(forged, milliseconds(5000)));
  close(forged);

  // A tampered value under a tag made for another.
  const int tampered = ConnectRaw(*server);
  ASSERT_GE(tampered, 0);
  const std::string key2 = RawHandshake(tampered, kSecret);
  internal::FrameTagger tagger2(key2, /*server_end=*/false);
  std::string frame = SetRequest("tampered", "honest");
  const std::string tag = tagger2.NextSendTag({frame});
  frame = SetRequest("tampered", "wicked") + tag;
  ASSERT_TRUE(internal::WriteFrame(tampered, frame, deadline()).ok());
  EXPECT_TRUE(ClosedByServerWithin(tampered, milliseconds(5000)));
  close(tampered);

  EXPECT_EQ(*(*store)->Get("tagged", milliseconds(1000)), "1");
  for (const char* unset : {"bare", "tampered"}) {
    EXPECT_EQ((*store)->Get(unset, milliseconds(50)).status().code(),
              absl::StatusCode::kDeadlineExceeded)
        << unset;
  }
}

// A listener that greets like a coordinator with a secret but cannot prove it (an impostor
// reached through a wrong address or a poisoned name), or does not speak the protocol at all.
TEST(CoordinatorStoreTest, AClientRefusesACoordinatorThatCannotProveTheSecretOrIsNoStore) {
  auto listen_fd = internal::ListenTcp({"127.0.0.1", 0});
  ASSERT_TRUE(listen_fd.ok()) << listen_fd.status();
  const int port = *internal::LocalPort(*listen_fd);
  std::thread impostor([fd = *listen_fd] {
    for (int i = 0; i < 2; ++i) {
      pollfd waiting = {fd, POLLIN, 0};
      if (poll(&waiting, 1, 5000) <= 0) return;
      const int client = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) return;
      const auto deadline = Clock::now() + milliseconds(2000);
      if (i == 0) {
        (void)internal::WriteFrame(client, std::string("DAS1\x01", 5) + std::string(32, 's'),
                                   deadline);
        (void)internal::ReadFrame(client, 64, deadline);
        (void)internal::WriteFrame(client, std::string(1, '\0') + std::string(32, 'p'), deadline);
      } else {
        const std::string http = "HTTP/1.1 400 Bad Request\r\n\r\n";
        (void)internal::WriteAll(client, http.data(), http.size(), deadline);
      }
      pollfd hang_up = {client, POLLIN, 0};
      (void)poll(&hang_up, 1, 5000);  // Until the client hangs up (or gives up on us).
      close(client);
    }
  });
  const std::string address = absl::StrCat("127.0.0.1:", port);
  auto fooled = ConnectCoordinatorStore(address, milliseconds(2000), kSecret);
  EXPECT_EQ(fooled.status().code(), absl::StatusCode::kUnauthenticated) << fooled.status();
  EXPECT_NE(fooled.status().message().find("could not prove it knows this rank's shared secret"),
            std::string::npos)
      << fooled.status();
  auto not_a_store = ConnectCoordinatorStore(address, milliseconds(300));
  EXPECT_EQ(not_a_store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(not_a_store.status().message().find("did not greet as a da coordinator store"),
            std::string::npos)
      << not_a_store.status();
  impostor.join();
  close(*listen_fd);
}

// Child ranks: each publishes a random value, then reads every other rank's and checks it.
int RunRank(const RankFlags& flags) {
  auto store = ConnectCoordinatorStore(flags.coordinator, milliseconds(5000));
  if (!store.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", flags.rank, store.status().ToString().c_str());
    return 2;
  }
  auto key = [&](int rank) { return absl::StrCat(flags.prefix, "/value/", rank); };
  auto value = [&](int rank) { return RandomBytes(flags.seed * 100 + rank, 1000 + 17 * rank); };
  if (absl::Status s = (*store)->Set(key(flags.rank), value(flags.rank)); !s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", flags.rank, s.ToString().c_str());
    return 3;
  }
  for (int peer = 0; peer < flags.size; ++peer) {
    auto got = (*store)->Get(key(peer), milliseconds(10000));
    if (!got.ok() || *got != value(peer)) {
      std::fprintf(stderr, "rank %d: key of rank %d: %s\n", flags.rank, peer,
                   got.ok() ? "wrong value" : got.status().ToString().c_str());
      return 4;
    }
  }
  // The parent releases the ranks once it has read every value.
  auto answer = (*store)->Get(absl::StrCat(flags.prefix, "/answer"), milliseconds(10000));
  return answer.ok() && *answer == "done" ? 0 : 5;
}

TEST(CoordinatorStoreTest, ProcessesMeetThroughTheCoordinator) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto store = ConnectCoordinatorStore(Address(*server), milliseconds(2000));
  ASSERT_TRUE(store.ok());
  RankFlags flags;
  flags.size = 4;
  flags.coordinator = Address(*server);
  flags.prefix = testing::UniquePrefix("store");
  flags.seed = std::random_device{}();
  std::vector<pid_t> pids;
  for (int rank = 0; rank < flags.size; ++rank) {
    flags.rank = rank;
    pids.push_back(testing::SpawnRank(flags));
    ASSERT_GT(pids.back(), 0);
  }
  // The parent reads what the children set, then releases them.
  for (int rank = 0; rank < flags.size; ++rank) {
    auto got = (*store)->Get(absl::StrCat(flags.prefix, "/value/", rank), milliseconds(10000));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, RandomBytes(flags.seed * 100 + rank, 1000 + 17 * rank));
  }
  ASSERT_TRUE((*store)->Set(absl::StrCat(flags.prefix, "/answer"), "done").ok());
  for (int rank = 0; rank < flags.size; ++rank) {
    EXPECT_EQ(testing::WaitForExit(pids[rank], milliseconds(10000)), 0) << "rank " << rank;
  }
}

}  // namespace
}  // namespace da::dist

int main(int argc, char** argv) {
  return da::dist::testing::RankOrTestMain(argc, argv, da::dist::RunRank);
}
