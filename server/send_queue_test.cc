// The drain's delivery check: the bytes a port's connections hold for their peers.
#include "server/send_queue.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace da::server {
namespace {

int64_t Sum(const absl::StatusOr<std::vector<SocketQueue>>& queues) {
  if (!queues.ok()) return -1;
  int64_t total = 0;
  for (const SocketQueue& queue : *queues) total += queue.unacknowledged;
  return total;
}

TEST(SendQueueTest, CountsTheServersSideOfThePortsOwnConnectionsOnly) {
  // Port 0xC383 = 50051. The listening socket (0A), a client's socket connected to the port
  // (remote port 50051), a closed socket (inode 0), another port's connection and, given the
  // process's inodes, another process's connection do not count.
  const std::string header =
      "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
      "timeout inode\n";
  const std::string table =
      header +
      "   0: 00000000:C383 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 100 1\n"
      "   1: 0100007F:C383 0100007F:D2F0 01 00000010:00000000 01:00000014 00000000 0 0 101 1\n"
      "   2: 0100007F:C383 0100007F:D2F2 08 00000100:00000000 01:00000014 00000000 0 0 102 1\n"
      "   3: 0100007F:D2F0 0100007F:C383 01 00004000:00000000 00:00000000 00000000 0 0 103 1\n"
      "   4: 0100007F:1F90 0100007F:D2F4 01 00000200:00000000 00:00000000 00000000 0 0 104 1\n"
      "   5: 0100007F:C383 0100007F:D2F6 04 00001000:00000000 01:00000014 00000000 0 0 0 1\n";
  EXPECT_EQ(Sum(SocketQueuesInTable(table, 50051, nullptr)), 0x10 + 0x100);
  const std::set<uint64_t> own = {100, 102, 104};
  EXPECT_EQ(Sum(SocketQueuesInTable(table, 50051, &own)), 0x100);
  EXPECT_EQ(Sum(SocketQueuesInTable(table, 8080, nullptr)), 0x200);
  EXPECT_EQ(Sum(SocketQueuesInTable(table, 1234, nullptr)), 0);
  absl::StatusOr<std::vector<SocketQueue>> two = SocketQueuesInTable(table, 50051, nullptr);
  ASSERT_TRUE(two.ok());
  ASSERT_EQ(two->size(), 2u);
  EXPECT_EQ((*two)[0].inode, 101u);
  // IPv6 addresses are 32 hex digits before the port.
  const std::string table6 =
      header +
      "   0: 0000000000000000FFFF00000100007F:C383 0000000000000000FFFF00000100007F:E9FE 01 "
      "00000007:00000000 00:00000000 00000000 0 0 200 1\n";
  EXPECT_EQ(Sum(SocketQueuesInTable(table6, 50051, nullptr)), 7);
  EXPECT_FALSE(SocketQueuesInTable(table + "   6: garbage\n", 50051, nullptr).ok());
}

// A real connection on loopback: bytes the peer does not read stay unacknowledged once its
// receive buffer is full, and none are left once it has read them all.
TEST(SendQueueTest, ARealConnectionsUnreadBytesCountUntilThePeerReadsThem) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(listener, 1), 0);
  socklen_t length = sizeof(address);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length), 0);
  const int port = ntohs(address.sin_port);

  const int client = socket(AF_INET, SOCK_STREAM, 0);
  const int small = 64 << 10;  // A small receive buffer fills quickly.
  setsockopt(client, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  ASSERT_EQ(connect(client, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  const int served = accept(listener, nullptr, nullptr);
  ASSERT_GE(served, 0);
  absl::StatusOr<std::vector<SocketQueue>> before = ServerSocketQueues(port);
  ASSERT_TRUE(before.ok()) << before.status();
  // The accepted socket only: the client's has the port as its remote port.
  ASSERT_EQ(before->size(), 1u);
  EXPECT_EQ(Sum(before), 0);

  // Write from the server's side until the kernel takes no more.
  fcntl(served, F_SETFL, fcntl(served, F_GETFL) | O_NONBLOCK);
  const std::vector<char> chunk(1 << 20, 'x');
  int64_t written = 0;
  for (;;) {
    const ssize_t n = send(served, chunk.data(), chunk.size(), MSG_NOSIGNAL);
    if (n <= 0) break;
    written += n;
  }
  const int64_t held = Sum(ServerSocketQueues(port));
  EXPECT_GT(held, 0) << "written " << written;
  EXPECT_LE(held, written);

  // The peer reads everything: nothing is left unacknowledged.
  std::vector<char> sink(1 << 20);
  int64_t read_bytes = 0;
  while (read_bytes < written) {
    const ssize_t n = recv(client, sink.data(), sink.size(), 0);
    ASSERT_GT(n, 0);
    read_bytes += n;
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  int64_t after = Sum(ServerSocketQueues(port));
  while (after != 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    after = Sum(ServerSocketQueues(port));
  }
  EXPECT_EQ(after, 0);
  close(served);
  close(client);
  close(listener);
}

}  // namespace
}  // namespace da::server
