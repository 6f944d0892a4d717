#include "server/send_queue.h"

#include <dirent.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace da::server {
namespace {

constexpr absl::string_view kListenState = "0A";  // TCP_LISTEN, as the tables print it.

// The inodes of this process's sockets: /proc/self/fd/N -> "socket:[inode]".
std::set<uint64_t> OwnSocketInodes() {
  std::set<uint64_t> inodes;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return inodes;
  while (const dirent* entry = readdir(dir)) {
    char target[64];
    const std::string path = absl::StrCat("/proc/self/fd/", entry->d_name);
    const ssize_t n = readlink(path.c_str(), target, sizeof(target) - 1);
    if (n <= 0) continue;
    absl::string_view link(target, static_cast<size_t>(n));
    uint64_t inode = 0;
    if (absl::ConsumePrefix(&link, "socket:[") && absl::ConsumeSuffix(&link, "]") &&
        absl::SimpleAtoi(link, &inode)) {
      inodes.insert(inode);
    }
  }
  closedir(dir);
  return inodes;
}

}  // namespace

absl::StatusOr<std::vector<SocketQueue>> SocketQueuesInTable(std::string_view table_text, int port,
                                                             const std::set<uint64_t>* own) {
  // Debian's Abseil has a string_view of its own.
  const absl::string_view table(table_text.data(), table_text.size());
  std::vector<SocketQueue> queues;
  bool header = true;
  for (absl::string_view line : absl::StrSplit(table, '\n', absl::SkipWhitespace())) {
    if (header) {  // "  sl  local_address rem_address   st tx_queue rx_queue tr ... inode"
      header = false;
      continue;
    }
    // "0: 0100007F:C383 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000 0 0 12345 ..."
    const std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    const size_t colon = fields.size() > 9 ? fields[1].rfind(':') : absl::string_view::npos;
    const size_t queues_colon = fields.size() > 9 ? fields[4].find(':') : absl::string_view::npos;
    uint32_t local_port = 0;
    uint64_t tx_queue = 0;
    uint64_t inode = 0;
    if (colon == absl::string_view::npos || queues_colon == absl::string_view::npos ||
        !absl::SimpleHexAtoi(fields[1].substr(colon + 1), &local_port) ||
        !absl::SimpleHexAtoi(fields[4].substr(0, queues_colon), &tx_queue) ||
        !absl::SimpleAtoi(fields[9], &inode)) {
      return absl::InternalError(absl::StrCat("cannot parse the socket table line '", line, "'"));
    }
    if (static_cast<int>(local_port) != port || fields[3] == kListenState || inode == 0) continue;
    if (own != nullptr && own->count(inode) == 0) continue;
    queues.push_back({inode, static_cast<int64_t>(tx_queue)});
  }
  return queues;
}

absl::StatusOr<std::vector<SocketQueue>> ServerSocketQueues(int port) {
  const std::set<uint64_t> own = OwnSocketInodes();
  std::vector<SocketQueue> all;
  int read = 0;
  for (const char* path : {"/proc/self/net/tcp", "/proc/self/net/tcp6"}) {
    std::ifstream file(path);
    if (!file) continue;
    std::stringstream text;
    text << file.rdbuf();
    absl::StatusOr<std::vector<SocketQueue>> queues = SocketQueuesInTable(text.str(), port, &own);
    if (!queues.ok()) return queues.status();
    all.insert(all.end(), queues->begin(), queues->end());
    ++read;
  }
  if (read == 0) {
    return absl::UnavailableError("neither /proc/self/net/tcp nor /proc/self/net/tcp6 can be read");
  }
  return all;
}

}  // namespace da::server
