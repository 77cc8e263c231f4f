"""Runs a family's stage graph: calls each stage's client in order and moves only TensorRefs between them.

Values flowing between stages are protobuf messages (Tensor / TensorMap refs, PNG bytes); the runner never
sees a tensor. It emits StageEvents around every stage and forwards the stages' progress. A resumed request
(orchestrator/journal.py) skips the stages whose outputs an earlier run recorded, with a RESUMED event each.

Timings: each stage adds a StageTiming (its name, the seconds the orchestrator waited for it, the endpoint it
called) to the result, and, when the stage's service reported its own time (the `timing` of its responses,
passed on with `RunContext.report`), a second one named `<stage>.service` with that time and the replica
that ran it: the difference is transport, store hops and queueing. Each stage's duration also goes to the
`diffmesh_stage_duration_seconds` histogram (orchestrator/metrics.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from orchestrator import metrics
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
    stage_timeout_s: float | None = (
        None  # one attempt of a stage call (the Runner's, DIFFMESH_STAGE_TIMEOUT_S)
    )
    timings: list[common_pb2.StageTiming] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the caller goes away
    reported: list[common_pb2.StageTiming] = field(default_factory=list)  # of the stage running now
    # a resumed request (orchestrator/journal.py): the outputs of stages that finished before, not run again
    resumed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    resumed_from: str = ""  # where those outputs came from, for the RESUMED events
    # called after each stage that ran: (stage, its outputs, seconds, endpoint); the journal records them
    on_stage_done: Callable[[str, Mapping[str, Any], float, str], None] | None = None

    def report(self, timing: common_pb2.StageTiming) -> None:
        """A stage service's own timing of one call (e.g. DenoiseResult.timing); several calls of one stage
        are summed into its `<stage>.service` timing."""
        if timing.ByteSize():
            self.reported.append(timing)

    def check_cancelled(self, where: str) -> None:
        if self.cancelled.is_set():
            raise StageError(grpc.StatusCode.CANCELLED, f"request {self.request_id} cancelled", where)

    def call_options(self) -> CallOptions:
        """The options of one stage call: the request's time left (all attempts) and the stage timeout (one
        attempt: a stage that overruns it is retried while the request has time)."""
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

        def on_retry(msg: str) -> None:
            kind = orchestrator_pb2.StageEvent.RETRIED
            self.emit(
                orchestrator_pb2.GenerateEvent(stage=orchestrator_pb2.StageEvent(kind=kind, message=msg))
            )

        return CallOptions(
            request_id=self.request_id,
            timeout_s=remaining,
            attempt_timeout_s=self.stage_timeout_s,
            on_retry=on_retry,
        )


class Runner:
    def __init__(self, clients: Mapping[str, Any], stage_timeout_s: float | None = None) -> None:
        self.clients = dict(clients)
        self.stage_timeout_s = stage_timeout_s

    def run(self, graph: Graph, values: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
        """Run every stage; return the graph's result values."""
        order = graph.check_request([k for k, v in values.items() if v is not None])
        if ctx.stage_timeout_s is None:
            ctx.stage_timeout_s = self.stage_timeout_s
        state = {k: v for k, v in values.items() if v is not None}
        # resumed: a stage whose record was lost is run again only if a stage still to run needs its outputs
        unneeded = _unneeded(order, graph.result, ctx.resumed) - _unneeded(order, graph.result, {})
        for stage in order:
            ctx.check_cancelled(stage.name)
            done = ctx.resumed.get(stage.name)
            if (done is not None and all(o in done for o in stage.outputs)) or stage.name in unneeded:
                state.update(done or {})
                event = _stage_event(stage.name, orchestrator_pb2.StageEvent.RESUMED, "journal")
                event.stage.message = (
                    f"outputs recorded by an earlier run ({ctx.resumed_from})"
                    if stage.name not in unneeded
                    else "not run: the stages after it finished in an earlier run"
                )
                ctx.emit(event)
                continue
            client = self.clients.get(stage.service)
            if client is None:
                raise StageError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no {stage.service} service configured (set DIFFMESH_{stage.service.upper()})",
                    stage.name,
                )
            endpoint = getattr(client, "endpoint", "inproc")
            ctx.emit(_stage_event(stage.name, orchestrator_pb2.StageEvent.STARTED, endpoint))
            ctx.reported.clear()
            started = time.perf_counter()
            inputs = {k: state[k] for k in (*stage.inputs, *stage.optional_inputs) if k in state}
            try:
                outputs = stage.run(client, inputs, ctx)
                missing = [o for o in stage.outputs if o not in outputs]
                if missing:
                    raise StageError(
                        grpc.StatusCode.INTERNAL, f"stage did not produce {missing}", stage.name, endpoint
                    )
            except BaseException as e:
                code = getattr(e, "code", None)  # StageError, or a domain error of the services (duck-typed)
                name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL.name
                metrics.STAGE_FAILURES.labels(stage.name, endpoint, name).inc()
                raise
            state.update(outputs)
            seconds = time.perf_counter() - started
            if ctx.on_stage_done is not None:
                ctx.on_stage_done(stage.name, outputs, seconds, endpoint)
            metrics.STAGE_SECONDS.labels(stage.name, endpoint).observe(seconds)
            ctx.timings.append(common_pb2.StageTiming(stage=stage.name, seconds=seconds, endpoint=endpoint))
            if ctx.reported:
                ctx.timings.append(_service_timing(stage.name, ctx.reported, endpoint))
            ctx.emit(_stage_event(stage.name, orchestrator_pb2.StageEvent.FINISHED, endpoint, seconds))
        return {k: state[k] for k in graph.result}


def _unneeded(order: list, result: tuple[str, ...] | list[str], resumed: Mapping[str, Mapping]) -> set[str]:
    """The stages whose outputs neither the result nor any stage left to run reads (walked from the end)."""
    needed, unneeded = set(result), set()
    for stage in reversed(order):
        done = resumed.get(stage.name)
        if done is not None and all(o in done for o in stage.outputs):
            continue  # its outputs come from the journal
        if needed.isdisjoint(stage.outputs):
            unneeded.add(stage.name)
            continue
        needed.update(stage.inputs, stage.optional_inputs)
    return unneeded


def _service_timing(
    stage: str, reported: list[common_pb2.StageTiming], endpoint: str
) -> common_pb2.StageTiming:
    replicas = sorted({t.endpoint for t in reported if t.endpoint})
    return common_pb2.StageTiming(
        stage=f"{stage}.service",
        seconds=sum(t.seconds for t in reported),
        endpoint=",".join(replicas) or endpoint,
    )


def _stage_event(name: str, kind: int, endpoint: str, seconds: float = 0.0) -> orchestrator_pb2.GenerateEvent:
    return orchestrator_pb2.GenerateEvent(
        stage=orchestrator_pb2.StageEvent(stage=name, kind=kind, endpoint=endpoint, seconds=seconds)
    )
