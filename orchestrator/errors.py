"""The orchestrator's one error type: a gRPC status from a stage (or from its own checks), carried as is.

The domain -> code table lives with the services (services/common/errors.py); the orchestrator only passes
codes through, adding which stage and endpoint they came from.
"""

from __future__ import annotations

import grpc


class StageError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, stage: str = "", endpoint: str = "") -> None:
        self.code = code
        self.message = message
        self.stage = stage
        self.endpoint = endpoint
        where = f"{stage} at {endpoint}: " if stage and endpoint else (f"{stage}: " if stage else "")
        super().__init__(f"{where}{message}")


def invalid(message: str) -> StageError:
    return StageError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> StageError:
    return StageError(grpc.StatusCode.NOT_FOUND, message)
