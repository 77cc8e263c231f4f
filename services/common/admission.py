"""Admission control of a server: at most `max_running` RPCs run at once, at most `max_queue` wait (first come,
first served); one more gets RESOURCE_EXHAUSTED naming the queue. Waiting ends with the RPC's deadline or its
cancellation. Streaming RPCs whose binding gives a `queued_event(position, queue_size)` factory tell their
caller the queue position while they wait (e.g. DenoiseEvent.queued). Health and reflection are never queued.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.common.errors import Cancelled, DeadlineExceeded, ResourceExhausted

QueuedEvent = Callable[[int, int], Any]  # (position, queue size) -> a response message
POLL_S = 0.25


class Admission:
    def __init__(self, service: str, max_running: int, max_queue: int) -> None:
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"max_running={max_running} must be >= 1 and max_queue={max_queue} >= 0")
        self.service, self.max_running, self.max_queue = service, max_running, max_queue
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: list[object] = []

    def wait(self, context: grpc.ServicerContext) -> Iterator[tuple[int, int]]:
        """Take a slot, yielding (position, queue size) whenever the position changes while waiting; the slot
        is held once the iterator is exhausted (give it back with `release`)."""
        with self._cond:
            if self._running < self.max_running and not self._waiting:
                self._running += 1
                return
            if len(self._waiting) >= self.max_queue:
                raise ResourceExhausted(
                    f"{self.service} is busy: {self._running} requests running and {len(self._waiting)} queued "
                    f"(queue size {self.max_queue}, DIFFMESH_MAX_QUEUE); retry later"
                )
            ticket = object()
            self._waiting.append(ticket)
        reported = None
        try:
            while True:
                with self._cond:
                    position = self._waiting.index(ticket)
                    if position == 0 and self._running < self.max_running:
                        self._waiting.pop(0)
                        self._running += 1
                        self._cond.notify_all()
                        return
                    size = len(self._waiting)
                if (position, size) != reported:
                    reported = (position, size)
                    yield reported
                if not context.is_active():
                    remaining = context.time_remaining()
                    if remaining is not None and remaining <= 0:
                        raise DeadlineExceeded(f"{self.service}: the deadline passed in the queue")
                    raise Cancelled(f"{self.service}: cancelled while queued")
                with self._cond:
                    self._cond.wait(POLL_S)
        finally:
            with self._cond:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Runs every diffmesh RPC through `admission`; `queued_events` maps full method names of streaming RPCs
    to their queue-position event factory."""

    def __init__(
        self, admission: Admission, open_prefixes: tuple[str, ...], queued_events: dict[str, QueuedEvent]
    ):
        self.admission = admission
        self.open_prefixes = open_prefixes
        self.queued_events = queued_events

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        admission = self.admission
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                for _ in admission.wait(context):
                    pass
                try:
                    return inner(request, context)
                finally:
                    admission.release()

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream
            event = self.queued_events.get(method)

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                for position, size in admission.wait(context):
                    if event is not None:
                        yield event(position, size)
                try:
                    yield from inner_stream(request, context)
                finally:
                    admission.release()

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
