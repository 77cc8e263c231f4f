"""Domain errors and the one table that maps them to gRPC status codes (DESIGN §6).

Services raise these; the server's error interceptor turns them into the status code of the table, with the
message as details. Anything else raised by a handler becomes INTERNAL and is logged: a bad request never
takes a server down.
"""

from __future__ import annotations

import grpc


class DiffmeshError(Exception):
    """Base of every error a request can end in. The message names the offending value."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(DiffmeshError):
    """A field is out of range or malformed: name the field, the value and the allowed range."""


class NotFound(DiffmeshError):
    """An unknown model, family, LoRA, job or store key: name it and what exists."""


class DataLoss(DiffmeshError):
    """A stored object whose size, checksum or shape is not what its reference says."""


class Unavailable(DiffmeshError):
    """The store or a peer stage cannot be reached: name the endpoint. Retried with backoff."""


class ResourceExhausted(DiffmeshError):
    """Over a limit (queue, memory, message size): name the limit."""


class Unauthenticated(DiffmeshError):
    """Missing or wrong token. Never echo the token."""


class Cancelled(DiffmeshError):
    """The client cancelled; raised at the next step boundary."""


class DeadlineExceeded(DiffmeshError):
    """The request's deadline passed before the work finished."""


class FailedPrecondition(DiffmeshError):
    """The request is valid but the system is not in a state to run it (e.g. a job already finished)."""


class AlreadyExists(DiffmeshError):
    """Something with this name exists already (e.g. a running local stack, a job id)."""


STATUS_CODES: dict[type[DiffmeshError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    DataLoss: grpc.StatusCode.DATA_LOSS,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Cancelled: grpc.StatusCode.CANCELLED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
}

for _cls, _code in STATUS_CODES.items():
    _cls.code = _code

_BY_CODE: dict[grpc.StatusCode, type[DiffmeshError]] = {code: cls for cls, code in STATUS_CODES.items()}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code for an exception: the table for domain errors, INTERNAL for anything else."""
    if isinstance(exc, DiffmeshError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def from_status(code: grpc.StatusCode, message: str) -> DiffmeshError:
    """The domain error for a gRPC status (the inverse of the table); unknown codes give DiffmeshError."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = DiffmeshError(message)
        err.code = code
        return err
    return cls(message)
