#include "engine/dist/gloo_store_adapter.h"

#include "absl/strings/str_cat.h"
#include "gloo/common/error.h"

namespace da::dist::internal {

using Clock = std::chrono::steady_clock;

GlooStoreAdapter::GlooStoreAdapter(KeyValueStore& store, std::string prefix,
                                   std::chrono::milliseconds timeout)
    : store_(store), prefix_(std::move(prefix)), timeout_(timeout) {}

void GlooStoreAdapter::Fail(absl::Status status) {
  if (error_.ok()) error_ = status;
  throw gloo::IoException(std::string(status.message()));
}

void GlooStoreAdapter::set(const std::string& key, const std::vector<char>& data) {
  absl::Status status =
      store_.Set(absl::StrCat(prefix_, "/", key), std::string(data.begin(), data.end()));
  if (!status.ok()) Fail(status);
}

std::vector<char> GlooStoreAdapter::get(const std::string& key) {
  auto cached = fetched_.find(key);
  if (cached == fetched_.end()) {
    wait({key}, timeout_);
    cached = fetched_.find(key);
  }
  return std::vector<char>(cached->second.begin(), cached->second.end());
}

void GlooStoreAdapter::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void GlooStoreAdapter::wait(const std::vector<std::string>& keys,
                            const std::chrono::milliseconds& timeout) {
  const auto deadline = Clock::now() + timeout;
  for (const std::string& key : keys) {
    if (fetched_.count(key) > 0) continue;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    auto value =
        store_.Get(absl::StrCat(prefix_, "/", key), std::max(left, std::chrono::milliseconds(0)));
    if (!value.ok()) Fail(value.status());
    fetched_[key] = *std::move(value);
  }
}

}  // namespace da::dist::internal
