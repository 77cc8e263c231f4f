"""Runs a family's stage graph: calls each stage's client in order and moves only TensorRefs between them.

Values flowing between stages are protobuf messages (Tensor / TensorMap refs, PNG bytes); the runner never
sees a tensor. It emits StageEvents around every stage and forwards the stages' progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from orchestrator.clients import CallOptions
from orchestrator.errors import StageError
from orchestrator.graph import Graph
from protos import common_pb2, orchestrator_pb2

Emit = Callable[[orchestrator_pb2.GenerateEvent], None]


@dataclass
class RunContext:
    request_id: str
    params: Any  # the resolved generation parameters of the family (a dataclass)
    emit: Emit
    deadline: float | None = None  # time.monotonic() value
    timings: list[common_pb2.StageTiming] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the caller goes away

    def check_cancelled(self, where: str) -> None:
        if self.cancelled.is_set():
            raise StageError(grpc.StatusCode.CANCELLED, f"request {self.request_id} cancelled", where)

    def call_options(self, stage_timeout_s: float | None = None) -> CallOptions:
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)
        limits = [t for t in (remaining, stage_timeout_s) if t is not None]
        timeout = min(limits) if limits else None

        def on_retry(msg: str) -> None:
            kind = orchestrator_pb2.StageEvent.RETRIED
            self.emit(
                orchestrator_pb2.GenerateEvent(stage=orchestrator_pb2.StageEvent(kind=kind, message=msg))
            )

        return CallOptions(request_id=self.request_id, timeout_s=timeout, on_retry=on_retry)


class Runner:
    def __init__(self, clients: Mapping[str, Any], stage_timeout_s: float | None = None) -> None:
        self.clients = dict(clients)
        self.stage_timeout_s = stage_timeout_s

    def run(self, graph: Graph, values: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
        """Run every stage; return the graph's result values."""
        order = graph.check_request([k for k, v in values.items() if v is not None])
        state = {k: v for k, v in values.items() if v is not None}
        for stage in order:
            ctx.check_cancelled(stage.name)
            client = self.clients.get(stage.service)
            if client is None:
                raise StageError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no {stage.service} service configured (set DIFFMESH_{stage.service.upper()})",
                    stage.name,
                )
            endpoint = getattr(client, "endpoint", "inproc")
            ctx.emit(_stage_event(stage.name, orchestrator_pb2.StageEvent.STARTED, endpoint))
            started = time.perf_counter()
            inputs = {k: state[k] for k in (*stage.inputs, *stage.optional_inputs) if k in state}
            outputs = stage.run(client, inputs, ctx)
            missing = [o for o in stage.outputs if o not in outputs]
            if missing:
                raise StageError(
                    grpc.StatusCode.INTERNAL, f"stage did not produce {missing}", stage.name, endpoint
                )
            state.update(outputs)
            seconds = time.perf_counter() - started
            ctx.timings.append(common_pb2.StageTiming(stage=stage.name, seconds=seconds, endpoint=endpoint))
            ctx.emit(_stage_event(stage.name, orchestrator_pb2.StageEvent.FINISHED, endpoint, seconds))
        return {k: state[k] for k in graph.result}


def _stage_event(name: str, kind: int, endpoint: str, seconds: float = 0.0) -> orchestrator_pb2.GenerateEvent:
    return orchestrator_pb2.GenerateEvent(
        stage=orchestrator_pb2.StageEvent(stage=name, kind=kind, endpoint=endpoint, seconds=seconds)
    )
