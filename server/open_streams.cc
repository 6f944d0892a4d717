#include "server/open_streams.h"

#include <grpc/grpc.h>
#include <grpc/support/alloc.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace da::server {
namespace {

using nlohmann::json;

// Channelz prints 64-bit counters and ids as JSON strings ("17"); a missing one is 0.
absl::StatusOr<int64_t> Count(const json& object, const char* name) {
  if (!object.is_object())
    return absl::InternalError(absl::StrCat("channelz: no object for ", name));
  const auto it = object.find(name);
  if (it == object.end()) return 0;
  int64_t value = 0;
  if (it->is_string() && absl::SimpleAtoi(it->get_ref<const std::string&>(), &value)) {
    return value;
  }
  if (it->is_number_integer()) return it->get<int64_t>();
  return absl::InternalError(absl::StrCat("channelz: ", name, " is ", it->dump()));
}

absl::StatusOr<json> Parse(std::string_view text) {
  json document = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded()) return absl::InternalError("channelz: not valid JSON");
  if (!document.is_object()) {
    return absl::InternalError(
        absl::StrCat("channelz: not a JSON object: ", std::string(text.substr(0, 200))));
  }
  return document;
}

// Member `name` of `object` when it is an object, else an empty object.
const json& Object(const json& object, const char* name) {
  static const json* const kEmpty = new json(json::object());
  if (!object.is_object()) return *kEmpty;
  const auto it = object.find(name);
  return it != object.end() && it->is_object() ? *it : *kEmpty;
}

// The ids of a listing's entries (entry[ref][id], or entry[id] without ref) and its "end".
absl::StatusOr<ChannelzPage> Page(std::string_view text, const char* list, const char* ref,
                                  const char* id) {
  absl::StatusOr<json> document = Parse(text);
  if (!document.ok()) return document.status();
  ChannelzPage page;
  const auto end = document->find("end");
  page.end = end != document->end() && end->is_boolean() && end->get<bool>();
  const auto entries = document->find(list);
  if (entries == document->end()) return page;
  if (!entries->is_array()) {
    return absl::InternalError(absl::StrCat("channelz: ", list, " is not a list"));
  }
  for (const json& entry : *entries) {
    absl::StatusOr<int64_t> value = Count(ref == nullptr ? entry : Object(entry, ref), id);
    if (!value.ok()) return value.status();
    if (*value <= 0) {
      return absl::InternalError(absl::StrCat("channelz: an entry of ", list, " has no ", id));
    }
    page.ids.push_back(*value);
  }
  return page;
}

// Channelz's answers are gpr_malloc'ed C strings (null when the id is unknown).
struct GprFree {
  void operator()(char* p) const { gpr_free(p); }
};
using GprString = std::unique_ptr<char, GprFree>;

}  // namespace

absl::StatusOr<ChannelzPage> ParseServerList(std::string_view json_text) {
  return Page(json_text, "server", "ref", "serverId");
}

absl::StatusOr<ChannelzPage> ParseSocketList(std::string_view json_text) {
  return Page(json_text, "socketRef", nullptr, "socketId");
}

absl::StatusOr<ChannelzSocket> ParseSocket(std::string_view json_text) {
  absl::StatusOr<json> document = Parse(json_text);
  if (!document.ok()) return document.status();
  const json& socket = Object(*document, "socket");
  const json& data = Object(socket, "data");
  absl::StatusOr<int64_t> started = Count(data, "streamsStarted");
  absl::StatusOr<int64_t> succeeded = Count(data, "streamsSucceeded");
  absl::StatusOr<int64_t> failed = Count(data, "streamsFailed");
  for (const auto* count : {&started, &succeeded, &failed}) {
    if (!count->ok()) return count->status();
  }
  ChannelzSocket out;
  out.started = *started;
  out.ended = *succeeded + *failed;
  const json& address = Object(Object(socket, "local"), "tcpip_address");
  const auto port = address.find("port");
  if (port != address.end() && port->is_number_integer()) out.port = port->get<int>();
  return out;
}

absl::StatusOr<std::vector<ConnectionStreams>> OpenServerStreams(int port,
                                                                 const std::set<int64_t>* skip) {
  std::vector<int64_t> servers;
  for (int64_t start = 0;;) {
    GprString text(grpc_channelz_get_servers(start));
    if (text == nullptr) break;
    absl::StatusOr<ChannelzPage> page = ParseServerList(text.get());
    if (!page.ok()) return page.status();
    servers.insert(servers.end(), page->ids.begin(), page->ids.end());
    if (page->end || page->ids.empty()) break;
    start = page->ids.back() + 1;
  }
  if (servers.empty()) {
    return absl::FailedPreconditionError("channelz lists no gRPC server (is it turned off?)");
  }
  std::vector<ConnectionStreams> out;
  for (const int64_t server : servers) {
    for (int64_t start = 0;;) {
      GprString text(grpc_channelz_get_server_sockets(server, start, 100));
      if (text == nullptr) break;  // The server has gone meanwhile.
      absl::StatusOr<ChannelzPage> page = ParseSocketList(text.get());
      if (!page.ok()) return page.status();
      for (const int64_t id : page->ids) {
        if (skip != nullptr && skip->count(id) != 0) continue;
        GprString socket_text(grpc_channelz_get_socket(id));
        if (socket_text == nullptr) continue;  // Closed meanwhile.
        absl::StatusOr<ChannelzSocket> socket = ParseSocket(socket_text.get());
        if (!socket.ok()) return socket.status();
        if (socket->port == port) out.push_back({id, socket->started, socket->ended});
      }
      if (page->end || page->ids.empty()) break;
      start = page->ids.back() + 1;
    }
  }
  return out;
}

}  // namespace da::server
