"""The composition root: the only orchestrator module that imports `services`.

It runs stage servicers in this process behind the same client interface the gRPC clients implement (the
`--local` mode, library use, tests), and builds the gRPC server of any stage for `diffmesh serve`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from orchestrator import metrics as orchestrator_metrics
from orchestrator.clients import CallOptions
from orchestrator.errors import StageError
from orchestrator.jobs.service import jobs_from_env
from orchestrator.journal import Journal
from orchestrator.objects import DirObjects, Objects, S3Objects
from orchestrator.runner import Emit, Runner
from orchestrator.server import SERVICE as ORCHESTRATOR_SERVICE
from orchestrator.server import OrchestratorServicer
from orchestrator.settings import OrchestratorSettings
from protos import orchestrator_pb2, orchestrator_pb2_grpc
from services.audio import server as audio_server
from services.common.errors import status_code
from services.common.server import REQUEST_ID_KEY, Binding, Server, create_server
from services.common.settings import Settings
from services.common.store import TensorStore, open_store
from services.common.tls import TlsFiles
from services.denoiser import server as denoiser_server
from services.text_encoder import server as text_encoder_server
from services.vae import server as vae_server

STAGE_BINDINGS: dict[str, Callable[[Settings, TensorStore], Binding]] = {
    "text_encoder": text_encoder_server.binding,
    "denoiser": denoiser_server.binding,
    "vae": vae_server.binding,
    "audio": audio_server.binding,
}


class _AbortError(Exception):
    pass


class InProcessContext:
    """The part of grpc.ServicerContext our servicers use, for calls that never leave the process."""

    def __init__(self, opts: CallOptions) -> None:
        self._metadata = ((REQUEST_ID_KEY, opts.request_id),)
        limits = [t for t in (opts.timeout_s, opts.attempt_timeout_s) if t is not None]
        self._deadline = time.monotonic() + min(limits) if limits else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.cancelled = threading.Event()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def is_active(self) -> bool:
        return not self.cancelled.is_set() and (self._deadline is None or time.monotonic() < self._deadline)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise _AbortError(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details


class InProcessStage:
    """A stage client that calls the servicer directly; errors come out as StageError, as over gRPC."""

    endpoint = "inproc"

    def __init__(self, stage: str, servicer: Any) -> None:
        self.stage = stage
        self.servicer = servicer

    def _error(self, exc: Exception, ctx: InProcessContext) -> StageError:
        if isinstance(exc, _AbortError):
            return StageError(ctx.code() or grpc.StatusCode.UNKNOWN, str(exc), self.stage, self.endpoint)
        return StageError(status_code(exc), str(exc), self.stage, self.endpoint)

    def unary(self, method: str, req: Any, opts: CallOptions) -> Any:
        ctx = InProcessContext(opts)
        try:
            return getattr(self.servicer, method)(req, ctx)
        except Exception as e:
            raise self._error(e, ctx) from e

    def stream(self, method: str, req: Any, opts: CallOptions) -> Iterator[Any]:
        ctx = InProcessContext(opts)
        events = getattr(self.servicer, method)(req, ctx)
        try:
            yield from events
        except Exception as e:
            raise self._error(e, ctx) from e
        finally:
            ctx.cancelled.set()  # a consumer that stops early cancels the work
            events.close()

    # the client interface of orchestrator.clients
    def encode(self, req: Any, opts: CallOptions) -> Any:
        return self.unary("Encode", req, opts)

    def decode(self, req: Any, opts: CallOptions) -> Any:
        return self.unary("Decode", req, opts)

    def encode_image(self, req: Any, opts: CallOptions) -> Any:
        return self.unary("EncodeImage", req, opts)

    def denoise(self, req: Any, opts: CallOptions) -> Iterator[Any]:
        return self.stream("Denoise", req, opts)


def in_process_clients(settings: Settings, store: TensorStore | None = None) -> dict[str, InProcessStage]:
    store = store or open_store(settings)
    return {
        stage: InProcessStage(stage, make(settings, store).servicer) for stage, make in STAGE_BINDINGS.items()
    }


def journal_of(settings: Settings, lease_s: float = 30.0) -> Journal:
    """The request journal in the stages' store: the same bucket (or local directory) and credentials."""
    if settings.store == "s3":
        s3 = settings.s3
        objects: Objects = S3Objects(
            s3.endpoint,
            s3.bucket,
            s3.access_key,
            s3.secret_key,
            secure=s3.secure,
            region=s3.region,
            timeout_s=s3.timeout_s,
            retries=s3.retries,
        )
    else:
        objects = DirObjects(settings.local_store_dir)
    return Journal(objects, lease_s)


def in_process_orchestrator(settings: Settings, model_roots: tuple[Path, ...] = ()) -> OrchestratorServicer:
    """The whole engine in this process: the same graphs, no network, a local (or configured) store."""
    return OrchestratorServicer(
        Runner(in_process_clients(settings)),
        model_roots or settings.model_roots,
        settings.cache_dir,
        journal=journal_of(settings, OrchestratorSettings.from_env().journal_lease_s),
    )


def as_stage_error(exc: Exception) -> StageError:
    """Any exception of the in-process path as the StageError (code, message) the gRPC server would send."""
    if isinstance(exc, StageError):
        return exc
    code = status_code(exc)
    if code is grpc.StatusCode.INTERNAL:  # our own process: say what broke (the server only logs it)
        return StageError(code, f"internal error in Generate: {type(exc).__name__}: {exc}")
    return StageError(code, str(exc))


def in_process_generate(
    settings: Settings | None = None, model_roots: tuple[Path, ...] = ()
) -> Callable[[orchestrator_pb2.GenerateRequest, Emit, threading.Event], orchestrator_pb2.GenerateResult]:
    """`generate(request, emit, cancelled)` in this process (behind `orchestrator.client.Client.in_process`);
    settings default to the environment. Every failure, building the engine included, is a StageError."""
    try:
        orch = in_process_orchestrator(settings or Settings.from_env(), model_roots)
    except StageError:
        raise
    except Exception as e:
        raise as_stage_error(e) from e

    def generate(
        request: orchestrator_pb2.GenerateRequest, emit: Emit, cancelled: threading.Event
    ) -> orchestrator_pb2.GenerateResult:
        try:
            return orch.generate(request, emit, cancelled=cancelled)
        except StageError:
            raise
        except Exception as e:
            raise as_stage_error(e) from e

    return generate


def serve_binding(stage: str) -> tuple[Binding, Settings]:
    """The binding `diffmesh serve <stage>` runs, built from the environment."""
    settings = Settings.from_env()
    if stage == "orchestrator":
        from orchestrator.clients import grpc_clients

        orch = OrchestratorSettings.from_env()
        clients = grpc_clients(orch.endpoints, orch.token, orch.retries, orch.stage_tls)
        runner = Runner(clients, orch.stage_timeout_s)
        servicer = OrchestratorServicer(
            runner,
            orch.model_roots,
            settings.cache_dir,
            jobs_from_env(),
            journal_of(settings, orch.journal_lease_s),
        )
        return Binding(
            ORCHESTRATOR_SERVICE, orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, servicer
        ), settings
    return STAGE_BINDINGS[stage](settings, open_store(settings)), settings


def start_stage_server(
    stage: str,
    host: str,
    port: int,
    tls: TlsFiles | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
) -> tuple[Server, int]:
    """`diffmesh serve <stage>`: its server started; with `metrics_port` (0: any free port, then
    `server.metrics_port`), Prometheus metrics on `metrics_host` (default `host`), the orchestrator's included."""
    binding, settings = serve_binding(stage)
    return create_server(
        [binding],
        host=host,
        port=port,
        token=settings.token,
        max_message_bytes=settings.max_message_bytes,
        # stage services admit DIFFMESH_MAX_CONCURRENCY at once and queue DIFFMESH_MAX_QUEUE; the orchestrator
        # (which only waits on them) is not limited
        max_running=None if stage == "orchestrator" else settings.max_concurrency,
        max_queue=getattr(settings, "max_queue", 16),
        tls=tls,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        metrics_collectors=[orchestrator_metrics.REGISTRY] if stage == "orchestrator" else [],
    )
