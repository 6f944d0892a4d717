// Gloo's rendezvous::Store on top of a KeyValueStore (internal to engine/dist).
//
// Gloo's interface reports failures by throwing; the adapter throws gloo::IoException and keeps
// the underlying absl::Status, so MakeGlooCommunicator can return the store's own error (which
// names the key and the timeout) rather than Gloo's text.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/dist/store.h"
#include "gloo/rendezvous/store.h"

namespace da::dist::internal {

class GlooStoreAdapter : public gloo::rendezvous::Store {
 public:
  // Keys become "<prefix>/<key>"; `timeout` bounds get() and the timeout-less wait().
  GlooStoreAdapter(KeyValueStore& store, std::string prefix, std::chrono::milliseconds timeout);

  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

  // The first failure, OK if none.
  const absl::Status& error() const { return error_; }

 private:
  [[noreturn]] void Fail(absl::Status status);

  KeyValueStore& store_;
  const std::string prefix_;
  const std::chrono::milliseconds timeout_;
  std::map<std::string, std::string> fetched_;  // Values already read by wait().
  absl::Status error_;
};

}  // namespace da::dist::internal
