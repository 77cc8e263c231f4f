"""The runtime every service shares: `create_server(...) -> (server, port)`.

Health (grpc.health.v1) and reflection on every server, both answering without a token; a bearer-token
check on every diffmesh RPC; domain errors turned into status codes by one interceptor (the table lives in
`errors`); message size limits; graceful stop on SIGTERM (health goes NOT_SERVING, new calls are refused,
in-flight calls drain for up to `grace` seconds). With `metrics_port`, a Prometheus `/metrics` endpoint beside
it (services/common/metrics.py), stopped with the server; every RPC's duration and code are recorded either way.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.admission import Admission, AdmissionInterceptor, QueuedEvent
from services.common.errors import InvalidArgument, status_code
from services.common.store import check_key_part
from services.common.tls import ReloadingCredentials, TlsFiles

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Percent-encoded status details stay well under grpc's 8 KiB soft limit on received metadata.
MAX_DETAILS_BYTES = 4096
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Binding:
    """One service on a server: its full name, the generated `add_*_to_server`, and the servicer."""

    name: str  # e.g. "diffmesh.v1.Denoiser"
    add: Callable[[Any, grpc.Server], None]
    servicer: Any
    # streaming methods' queue-position events while admission control holds them: method name -> factory
    queued_events: dict[str, QueuedEvent] = field(default_factory=dict)


def request_id(context: grpc.ServicerContext) -> str:
    """The caller's `x-request-id` (validated), or a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:  # it names the request's objects in the store: the rule of a key part
            return check_key_part(REQUEST_ID_KEY, value)
    return uuid.uuid4().hex


def _abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary or handler.stream_stream:
        raise NotImplementedError("diffmesh has no client-streaming RPCs")
    return grpc.unary_unary_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer
    )


class AuthInterceptor(grpc.ServerInterceptor):
    """Every RPC but health and reflection needs `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return handler
        reason = "missing bearer token" if not got else "invalid bearer token"
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, reason)


def capped_details(details: str | bytes, limit: int = MAX_DETAILS_BYTES) -> str:
    """Status details that fit any client's metadata limit once grpc percent-encodes them (every byte outside
    printable ASCII takes three): a message that quotes a huge value is cut, saying how long it was."""
    text = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
    size = 0
    for i, ch in enumerate(text):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "replace"))
        if size > limit:
            return f"{text[:i]}... ({len(text)} characters in all)"
    return text


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes do not parse as the method's message; its handler answers INVALID_ARGUMENT."""

    error: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, returning `_Undecodable` instead of raising (grpc would answer INTERNAL)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:
            return _Undecodable(f"{type(e).__name__}: {e}")

    return parse


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"{method}: the request is not a valid protobuf message of its type ({request.error})"
        )


def _map_errors(behavior: Callable[..., Any], streaming: bool, method: str) -> Callable[..., Any]:
    def fail(exc: Exception, context: grpc.ServicerContext) -> None:
        if context.code() is not None:  # the handler aborted itself
            context.set_details(capped_details(context.details() or b""))
            raise exc
        code = status_code(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
            context.abort(code, f"internal error in {method}: {type(exc).__name__}")
        context.abort(code, capped_details(str(exc)))

    if streaming:

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                _check_decoded(request, method)
                yield from behavior(request, context)
            except Exception as exc:
                fail(exc, context)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_decoded(request, method)
            return behavior(request, context)
        except Exception as exc:
            fail(exc, context)

    return unary


class ErrorInterceptor(grpc.ServerInterceptor):
    """Domain errors -> their status code; anything else -> INTERNAL, logged. The server stays up. A request
    whose bytes do not parse is INVALID_ARGUMENT (grpc itself would answer INTERNAL)."""

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _map_errors(handler.unary_unary, False, method),
                _tolerant(handler.request_deserializer),
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _map_errors(handler.unary_stream, True, method),
                _tolerant(handler.request_deserializer),
                handler.response_serializer,
            )
        return handler


class Server:
    """A started gRPC server with its health servicer; stop() is graceful."""

    def __init__(
        self,
        server: grpc.Server,
        health_servicer: health.HealthServicer,
        names: Sequence[str],
        metrics_endpoint: metrics.MetricsEndpoint | None = None,
    ):
        self.grpc = server
        self.health = health_servicer
        self.names = tuple(names)
        self.metrics = metrics_endpoint
        self._stopped = threading.Event()

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the `/metrics` endpoint; None when it is off."""
        return None if self.metrics is None else self.metrics.port

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.names):
            self.health.set(name, status)

    def stop(self, grace: float | None = 10.0) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace` seconds, then stop."""
        self.set_serving(False)
        self.grpc.stop(grace).wait()
        if self.metrics is not None:  # after the drain: the last calls are scraped until now
            self.metrics.stop()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def serve_until_signal(self, grace: float = 30.0) -> None:
        """Block until SIGTERM / SIGINT, then stop gracefully (the container entrypoint's main loop)."""

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %s: draining for up to %.0fs", signal.Signals(signum).name, grace)
            threading.Thread(target=self.stop, args=(grace,), daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not self._stopped.wait(0.5):
            pass


def create_server(
    bindings: Sequence[Binding],
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    token: str | None = None,
    max_message_bytes: int = 64 << 20,
    max_workers: int = 16,
    max_concurrent_rpcs: int | None = None,
    max_running: int | None = None,
    max_queue: int = 16,
    tls: TlsFiles | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    metrics_collectors: Sequence[Any] = (),
) -> tuple[Server, int]:
    """Build, bind and start a server for `bindings`; port 0 picks a free port (returned).

    `metrics_port` (None: off; 0: a free port, see `Server.metrics_port`) serves Prometheus metrics over plain
    HTTP on `metrics_host` (default: `host`): this process's registry plus `metrics_collectors`.
    `max_running` (None: no limit) RPCs run at once and `max_queue` more wait (services.common.admission);
    the worker pool grows to hold them all, so the queue is ours, never grpc's."""
    interceptors: list[grpc.ServerInterceptor] = [metrics.MetricsInterceptor(_OPEN_PREFIXES)]
    if token:
        interceptors.append(AuthInterceptor(token))
    interceptors.append(ErrorInterceptor())
    names = [b.name for b in bindings]
    if max_running is not None:
        admission = Admission("+".join(metrics.service_label(n) for n in names), max_running, max_queue)
        events = {f"/{b.name}/{method}": event for b in bindings for method, event in b.queued_events.items()}
        interceptors.append(AdmissionInterceptor(admission, _OPEN_PREFIXES, events))
        max_workers = max(max_workers, max_running + max_queue + 4)  # + health checks and refusals
    server = grpc.server(
        metrics.CountingExecutor(
            "+".join(metrics.service_label(n) for n in names), max_workers, thread_name_prefix="rpc"
        ),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for b in bindings:
        b.add(b.servicer, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = ReloadingCredentials(tls).credentials  # a rotated certificate is served without a restart
        bound = server.add_secure_port(address, creds)
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    endpoint = None
    if metrics_port is not None:
        try:
            endpoint = metrics.MetricsEndpoint(metrics_host or host, metrics_port, metrics_collectors)
        except OSError as e:
            server.stop(None)
            raise OSError(
                f"cannot bind the metrics endpoint {metrics_host or host}:{metrics_port}: {e}"
            ) from e
    server.start()
    wrapped = Server(server, health_servicer, names, endpoint)
    wrapped.set_serving(True)
    return wrapped, bound
