// The one place where an engine status becomes a gRPC status.
//
//   reactor->Finish(ToGrpcStatus(engine_status));
//
// absl and gRPC share their code numbers, so the code is kept and the message passed through.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace da::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

// The canonical name of a gRPC code ("OK", "INVALID_ARGUMENT", ...), used as a metrics label.
std::string StatusCodeName(grpc::StatusCode code);

}  // namespace da::server
