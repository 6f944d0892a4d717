// KeyValueStore: the rendezvous store ranks use to meet (the NCCL id, Gloo's pairs).
//
// OWNED BY THE GLOO BRANCH (issue #6): this copy carries exactly the declaration agreed for the
// parallel work so that the NCCL backend builds on its own; the lead reconciles it when merging.
#pragma once

#include <chrono>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace da::dist {

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  virtual absl::StatusOr<std::string> Get(const std::string& key,
                                          std::chrono::milliseconds timeout) = 0;
};

}  // namespace da::dist
