"""errors: one table from domain errors to gRPC codes, and its inverse (DESIGN §6)."""

from __future__ import annotations

import grpc
import pytest

from services.common import errors
from services.common.errors import (
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    DiffmeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_status,
    status_code,
)

TABLE: list[tuple[type[DiffmeshError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (DataLoss, grpc.StatusCode.DATA_LOSS),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
]


def test_table_is_complete_and_one_to_one() -> None:
    assert dict(TABLE) == errors.STATUS_CODES
    codes = list(errors.STATUS_CODES.values())
    assert len(set(codes)) == len(codes)  # invertible
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, DiffmeshError) and obj is not DiffmeshError
    }
    assert defined == set(errors.STATUS_CODES)  # every domain error has a row


@pytest.mark.parametrize(("cls", "code"), TABLE, ids=[c.__name__ for c, _ in TABLE])
def test_domain_error_maps_to_its_code(cls: type[DiffmeshError], code: grpc.StatusCode) -> None:
    exc = cls("field steps=0: allowed 1..1000")
    assert isinstance(exc, DiffmeshError)
    assert cls.code is code
    assert exc.code is code
    assert status_code(exc) is code
    assert str(exc) == "field steps=0: allowed 1..1000"


@pytest.mark.parametrize(("cls", "code"), TABLE, ids=[c.__name__ for c, _ in TABLE])
def test_from_status_inverts_the_table(cls: type[DiffmeshError], code: grpc.StatusCode) -> None:
    exc = from_status(code, "the message")
    assert type(exc) is cls
    assert exc.code is code
    assert str(exc) == "the message"
    assert status_code(from_status(status_code(cls("x")), "x")) is code  # round trip both ways


def test_subclass_of_a_domain_error_keeps_its_code() -> None:
    class ModelNotFound(NotFound):
        pass

    assert status_code(ModelNotFound("flux-9")) is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("v"),
        KeyError("k"),
        RuntimeError("r"),
        ZeroDivisionError(),
        OSError("disk"),
        DiffmeshError("base"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_is_internal(exc: BaseException) -> None:
    assert status_code(exc) is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED]
)
def test_from_status_unknown_code_is_a_plain_diffmesh_error_keeping_the_code(code: grpc.StatusCode) -> None:
    exc = from_status(code, "boom")
    assert type(exc) is DiffmeshError
    assert exc.code is code
    assert status_code(exc) is code
    assert str(exc) == "boom"
    assert DiffmeshError.code is grpc.StatusCode.INTERNAL  # the instance attribute did not leak to the class
