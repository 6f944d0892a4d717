// Early-return helpers for absl::Status and absl::StatusOr, and DA_CHECK for programmer errors.
//
//   DA_RETURN_IF_ERROR(spec.Validate());
//   DA_ASSIGN_OR_RETURN(auto plan, planner.Build(shape));
//
// DA_CHECK aborts with the failed condition; it is never used for request data.
//
//   return Prefixed(status, "shapes[2]: ");  // Same code and payloads, message prefixed.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace da {

// `status` with `prefix` before its message, its code and payloads (the engine's refusal reason)
// kept.
inline absl::Status Prefixed(const absl::Status& status, absl::string_view prefix) {
  absl::Status named(status.code(), absl::StrCat(prefix, status.message()));
  status.ForEachPayload(
      [&](absl::string_view url, const absl::Cord& payload) { named.SetPayload(url, payload); });
  return named;
}

}  // namespace da

#define DA_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::absl::Status da_status_ = (expr);      \
    if (!da_status_.ok()) return da_status_; \
  } while (0)

#define DA_STATUS_CONCAT_INNER_(a, b) a##b
#define DA_STATUS_CONCAT_(a, b) DA_STATUS_CONCAT_INNER_(a, b)

#define DA_ASSIGN_OR_RETURN(lhs, expr) \
  DA_ASSIGN_OR_RETURN_IMPL_(DA_STATUS_CONCAT_(da_statusor_, __LINE__), lhs, expr)

#define DA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                              \
  if (!statusor.ok()) return statusor.status();        \
  lhs = std::move(statusor).value()

#define DA_CHECK(cond)                                                                 \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: DA_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)
