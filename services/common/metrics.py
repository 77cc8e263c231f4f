"""Prometheus metrics of a service process, and the HTTP endpoint that serves them (`/metrics`).

One registry per process (`REGISTRY`, not prometheus_client's global default one): the metrics below are
module-level objects registered in it once, so any number of servers in one process (tests, a server with
several bindings) share them without clashing, told apart by their `service` label. The endpoint serves
`REGISTRY` plus any collectors its server is given (the orchestrator's registry, see orchestrator/metrics.py,
which may not import this module). Counters are process-lifetime totals, as Prometheus expects.

    diffmesh_rpc_duration_seconds{service,method,code}  histogram  every diffmesh RPC, to its last message
    diffmesh_rpc_in_flight{service,method}               gauge      RPCs being handled now
    diffmesh_rpc_queued{service}                         gauge      RPCs accepted, waiting for a worker thread
    diffmesh_denoise_step_seconds{service,model}         histogram  one sampling step of the denoiser
    diffmesh_store_bytes_total{direction}                counter    tensor bytes written (put) / read (get)
    diffmesh_store_seconds{direction}                    histogram  one store put / get of a tensor's bytes
    diffmesh_models_loaded{service}                      gauge      model components in the service's cache
    diffmesh_model_bytes{service,model}                  gauge      parameter + buffer bytes of each of them

plus the process collectors (`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# No `*_created` series beside every counter and histogram (prometheus_client's default; a process-wide
# switch): they double the page and Prometheus does not need them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

# From a few ms (a store hop, a small encode) to the length of a long video denoise.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STORE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RPC_SECONDS = Histogram(
    "diffmesh_rpc_duration_seconds",
    "Time a diffmesh RPC took, from the handler's start to its last message, by status code",
    ["service", "method", "code"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
RPC_IN_FLIGHT = Gauge(
    "diffmesh_rpc_in_flight",
    "diffmesh RPCs being handled now",
    ["service", "method"],
    registry=REGISTRY,
)
RPC_QUEUED = Gauge(
    "diffmesh_rpc_queued",
    "RPCs the server accepted that wait for a free worker thread (the service's queue depth)",
    ["service"],
    registry=REGISTRY,
)
DENOISE_STEP_SECONDS = Histogram(
    "diffmesh_denoise_step_seconds",
    "Time of one denoising step (the first step includes the loop's setup)",
    ["service", "model"],
    buckets=_STEP_SECONDS,
    registry=REGISTRY,
)
STORE_BYTES = Counter(
    "diffmesh_store_bytes",
    "Tensor bytes moved through the tensor store (put: written, get: read)",
    ["direction"],
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "diffmesh_store_seconds",
    "Time of one store transfer of a tensor's bytes (put: write, get: read)",
    ["direction"],
    buckets=_STORE_SECONDS,
    registry=REGISTRY,
)
MODELS_LOADED = Gauge(
    "diffmesh_models_loaded",
    "Model components loaded in the service's model cache",
    ["service"],
    registry=REGISTRY,
)
MODEL_BYTES = Gauge(
    "diffmesh_model_bytes",
    "Parameter and buffer bytes of a loaded model component (wherever they live: device, host or mapped)",
    ["service", "model"],
    registry=REGISTRY,
)

for _direction in ("put", "get"):  # both series exist from the start, at zero
    STORE_BYTES.labels(_direction)
    STORE_SECONDS.labels(_direction)

_models_lock = threading.Lock()


# -- what the services record ------------------------------------------------------------------------------


def observe_store(direction: str, nbytes: int, seconds: float) -> None:
    STORE_BYTES.labels(direction).inc(nbytes)
    STORE_SECONDS.labels(direction).observe(seconds)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers of a model object: an nn.Module, or an adapter holding modules and
    tensors in its attributes (one level deep, lists and dicts included). A tensor held twice counts once."""
    import torch  # lazily: the server runtime itself does not need torch

    seen: set[tuple[str, int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        nbytes = t.numel() * t.element_size()
        key = (str(t.device), t.data_ptr() if t.device.type != "meta" else id(t), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes

    def visit(value: Any) -> None:
        if isinstance(value, torch.nn.Module):
            for t in (*value.parameters(), *value.buffers()):
                add(t)
        elif isinstance(value, torch.Tensor):
            add(value)
        elif isinstance(value, dict):
            for v in value.values():
                if isinstance(v, torch.nn.Module | torch.Tensor):
                    visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                if isinstance(v, torch.nn.Module | torch.Tensor):
                    visit(v)

    if isinstance(obj, torch.nn.Module | torch.Tensor):
        visit(obj)
    else:
        for value in getattr(obj, "__dict__", {}).values():
            visit(value)
    return total


_model_bytes: dict[tuple[str, str], int] = {}


def model_loaded(service: str, model: str, obj: Any) -> int:
    """Count a model component loaded into a service's cache; returns its bytes (for model_evicted)."""
    try:
        nbytes = tensor_bytes(obj)
    except Exception:  # a model object we cannot measure is still served
        log.warning("cannot measure the tensors of %s model %s", service, model, exc_info=True)
        nbytes = 0
    with _models_lock:
        MODELS_LOADED.labels(service).inc()
        total = _model_bytes[service, model] = _model_bytes.get((service, model), 0) + nbytes
        MODEL_BYTES.labels(service, model).set(total)
    return nbytes


def model_evicted(service: str, model: str, nbytes: int) -> None:
    with _models_lock:
        MODELS_LOADED.labels(service).dec()
        total = _model_bytes.get((service, model), 0) - nbytes
        if total > 0:
            _model_bytes[service, model] = total
            MODEL_BYTES.labels(service, model).set(total)
        else:  # no copy of it left in this process: drop the series
            _model_bytes.pop((service, model), None)
            with contextlib.suppress(KeyError):
                MODEL_BYTES.remove(service, model)


# -- gRPC: per-RPC duration, code, in-flight; the queue of the server's worker pool ----------------------------

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def service_label(full_name: str) -> str:
    """'diffmesh.v1.TextEncoder' -> 'text_encoder' (the stage names the services use)."""
    return _CAMEL.sub("_", full_name.rsplit(".", 1)[-1]).lower()


def _split(method: str) -> tuple[str, str]:
    """'/diffmesh.v1.Denoiser/Denoise' -> ('denoiser', 'Denoise')."""
    service, _, name = method.lstrip("/").partition("/")
    return service_label(service), name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: sees every diffmesh RPC with its final code (UNAUTHENTICATED from the token check
    and the codes the error interceptor maps included). Health and reflection are not recorded."""

    def __init__(self, skip_prefixes: Sequence[str] = ()) -> None:
        self._skip = tuple(skip_prefixes)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._skip):
            return handler
        service, name = _split(method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _timed_unary(handler.unary_unary, service, name),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _timed_stream(handler.unary_stream, service, name),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    return (code if isinstance(code, grpc.StatusCode) else default).name


def _timed_unary(behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        in_flight = RPC_IN_FLIGHT.labels(service, method)
        in_flight.inc()
        started = time.perf_counter()
        code = None
        try:
            return behavior(request, context)
        except BaseException:
            code = _code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            in_flight.dec()
            RPC_SECONDS.labels(service, method, code or _code(context, grpc.StatusCode.OK)).observe(
                time.perf_counter() - started
            )

    return unary


def _timed_stream(behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Iterator[Any]]:
    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        in_flight = RPC_IN_FLIGHT.labels(service, method)
        in_flight.inc()
        started = time.perf_counter()
        code = None
        try:
            yield from behavior(request, context)
        except GeneratorExit:  # the client went away (cancelled, deadline) before the stream ended
            code = grpc.StatusCode.CANCELLED.name
            raise
        except BaseException:
            code = _code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            in_flight.dec()
            RPC_SECONDS.labels(service, method, code or _code(context, grpc.StatusCode.OK)).observe(
                time.perf_counter() - started
            )

    return stream


class CountingExecutor(futures.ThreadPoolExecutor):
    """The server's worker pool, counting the calls that wait for a thread (`diffmesh_rpc_queued`)."""

    def __init__(self, service: str, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._queued = RPC_QUEUED.labels(service)

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        queued = self._queued
        queued.inc()
        started = threading.Event()

        def run():  # type: ignore[no-untyped-def]
            started.set()
            queued.dec()
            return fn(*args, **kwargs)

        try:
            future = super().submit(run)
        except BaseException:
            queued.dec()
            raise
        # A call cancelled before it ran (shutdown(cancel_futures=True)) leaves the queue too.
        future.add_done_callback(lambda _f: None if started.is_set() else queued.dec())
        return future


# -- the endpoint ------------------------------------------------------------------------------------------


class _Registries:
    """Several registries (or collectors) served as one."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = tuple(collectors)

    def collect(self) -> Iterator[Any]:
        for c in self._collectors:
            yield from c.collect()


class MetricsEndpoint:
    """`GET /metrics` on its own thread; stop() shuts it down and frees the port."""

    def __init__(self, host: str, port: int, extra: Sequence[Collector] = ()) -> None:
        registry = _Registries((REGISTRY, *extra)) if extra else REGISTRY
        self._httpd, self._thread = start_http_server(port, host, registry)  # type: ignore[arg-type]
        self.host = host
        self.port: int = self._httpd.server_port
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
