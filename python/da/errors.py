"""Errors of da's client: one exception class per gRPC status the server answers with, carrying
the code and the server's message. Inputs the server would refuse are refused locally with the
same exceptions before anything is sent."""

import grpc


class Error(Exception):
    """A call failed; `code` is the grpc.StatusCode, `message` what the server (or this client)
    said."""

    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):
        # Pickled by its arguments (for multiprocessing and concurrent.futures across
        # processes), not by the formatted text that Exception keeps.
        return type(self), (self.code, self.message)


class InvalidArgument(Error, ValueError):
    """Bad shapes, dtypes, patterns or byte counts (the message names the field, value, limit)."""


class ResourceExhausted(Error):
    """Too large for the server's memory or limits, or its queue is full."""


class DeadlineExceeded(Error, TimeoutError):
    """The call's timeout passed."""


class Unavailable(Error):
    """The server cannot be reached, is draining, or lost a rank; retrying may help."""


class Unauthenticated(Error):
    """The bearer token is missing or wrong."""


class PermissionDenied(Error):
    """The token may not do this, e.g. a priority above the client's cap (Limits.max_priority)."""


class Cancelled(Error):
    """The call was cancelled."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error):
    """The exception for a grpc.RpcError (Error for codes without a class of their own)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return _BY_CODE.get(code, Error)(code, details or "")


def invalid(message):
    """InvalidArgument raised locally, before anything is sent."""
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, message)
