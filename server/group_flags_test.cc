// The multi-process flags' checks: every refusal names the flag, its value and the limit.
#include "server/group_flags.h"

#include <gtest/gtest.h>

#include <fstream>

namespace da::server {
namespace {

GroupFlags Good() {
  GroupFlags flags;
  flags.world_size = 3;
  flags.rank = 1;
  flags.coordinator = "rank0.example:29500";
  return flags;
}

void ExpectRefused(const GroupFlags& flags, const std::string& part) {
  const absl::Status status = ValidateGroupFlags(flags);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find(part), std::string::npos) << status << " lacks: " << part;
}

TEST(GroupFlagsTest, AcceptsOneProcessAndAGoodGroup) {
  EXPECT_TRUE(ValidateGroupFlags(GroupFlags()).ok());
  EXPECT_TRUE(ValidateGroupFlags(Good()).ok());
  GroupFlags rank0 = Good();
  rank0.rank = 0;
  rank0.coordinator = "127.0.0.1:0";  // Rank 0 may pick any free port.
  EXPECT_TRUE(ValidateGroupFlags(rank0).ok());
}

TEST(GroupFlagsTest, RefusesEachBadFlagNamingValueAndLimit) {
  GroupFlags f = Good();
  f.world_size = 0;
  ExpectRefused(f, "--world-size is 0; must be in [1, 1024]");
  f.world_size = 5000;
  ExpectRefused(f, "--world-size is 5000; must be in [1, 1024]");
  f = Good();
  f.rank = 3;
  ExpectRefused(f, "--rank is 3; must be in [0, 3) (below --world-size 3)");
  f.rank = -1;
  ExpectRefused(f, "--rank is -1");
  f = Good();
  f.coordinator = "";
  ExpectRefused(f, "--coordinator HOST:PORT is required with --world-size 3");
  f.coordinator = "rank0";
  ExpectRefused(f, "--coordinator is 'rank0'; expected HOST:PORT with PORT in [0, 65535]");
  f.coordinator = "rank0:70000";
  ExpectRefused(f, "--coordinator is 'rank0:70000'");
  f.coordinator = "rank0:0";
  ExpectRefused(f, "port 0 (any free port) is for rank 0 only");
  f = Good();
  f.collective_timeout_ms = 0;
  ExpectRefused(f, "--collective-timeout-ms is 0; must be in [1, 3600000]");
  f = Good();
  f.heartbeat_ms = 30000;
  ExpectRefused(f, "--heartbeat-ms is 30000; must be in [1, --collective-timeout-ms 30000)");
  f.heartbeat_ms = 0;
  ExpectRefused(f, "--heartbeat-ms is 0");
  f = Good();
  f.data_plane = "rdma";
  ExpectRefused(f, "--data-plane is 'rdma'; must be none, nccl or gloo-staged");
  f = Good();
  f.data_plane_device = -1;
  ExpectRefused(f, "--data-plane-device is -1; must be >= 0");
  f = Good();
  f.coordinator_port_file = "/tmp/port";
  ExpectRefused(f, "--coordinator-port-file is for rank 0");
  f = Good();
  f.rank_address = "";
  ExpectRefused(f, "--rank-address is empty");
}

TEST(GroupFlagsTest, TheSecretFileIsReadWithoutTrailingWhitespaceAndItsLengthChecked) {
  GroupFlags f = Good();
  auto none = ReadCoordinatorSecret(f);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, "");  // No flag: no secret.
  const std::string dir = ::testing::TempDir();
  auto write = [&](const std::string& name, const std::string& text) {
    const std::string path = dir + "/" + name;
    std::ofstream(path, std::ios::binary) << text;
    return path;
  };
  f.coordinator_secret_file = write("secret_good", " 0123456789abcdef 0123\r\n\n");
  auto good = ReadCoordinatorSecret(f);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(*good, " 0123456789abcdef 0123");  // Leading and inner whitespace are kept.
  auto expect_refused = [&](const std::string& part) {
    auto read = ReadCoordinatorSecret(f);
    EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument) << read.status();
    EXPECT_NE(read.status().message().find(part), std::string::npos)
        << read.status() << " lacks: " << part;
  };
  f.coordinator_secret_file = write("secret_short", "fifteen-bytes!!\n");
  expect_refused("--coordinator-secret-file " + f.coordinator_secret_file +
                 " holds 15 bytes (trailing whitespace aside); a secret needs 16 to 4096");
  f.coordinator_secret_file = write("secret_long", std::string(5000, 'x'));
  expect_refused("holds over 4096 bytes");
  f.coordinator_secret_file = write("secret_blank", "\n\n");
  expect_refused("holds 0 bytes");
  f.coordinator_secret_file = dir + "/no_such_secret";
  expect_refused("--coordinator-secret-file " + f.coordinator_secret_file +
                 ": cannot be read (No such file or directory)");
}

}  // namespace
}  // namespace da::server
