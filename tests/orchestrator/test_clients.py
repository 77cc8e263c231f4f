"""Stage clients: gRPC and in-process behave the same; UNAVAILABLE, and an attempt over the stage timeout, are
retried with backoff within the request's deadline, then reported."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from orchestrator.clients import CallOptions, GrpcDenoiser, GrpcTextEncoder
from orchestrator.errors import StageError
from orchestrator.graph import Graph, Stage
from orchestrator.local import in_process_clients, in_process_orchestrator
from orchestrator.runner import RunContext, Runner
from orchestrator.stack.s3server import free_port
from protos import denoiser_pb2, denoiser_pb2_grpc, orchestrator_pb2, text_encoder_pb2
from services.common.server import Binding, create_server
from services.common.settings import Settings
from services.common.store import LocalTensorStore
from services.denoiser import server as denoiser_server
from services.text_encoder import server as text_encoder_server

TOKEN = "tok"


@pytest.fixture
def both(tmp_path: Path):
    """The same stages over gRPC (port 0) and in-process, sharing one settings object."""
    settings = Settings(local_store_dir=tmp_path / "store", token=TOKEN, cache_dir=tmp_path / "cache")
    store = LocalTensorStore(settings.local_store_dir)
    bindings = [text_encoder_server.binding(settings, store), denoiser_server.binding(settings, store)]
    server, port = create_server(bindings, token=TOKEN)
    endpoint = f"127.0.0.1:{port}"
    remote = {"text_encoder": GrpcTextEncoder(endpoint, TOKEN), "denoiser": GrpcDenoiser(endpoint, TOKEN)}
    yield remote, in_process_clients(settings, store), tmp_path
    for c in remote.values():
        c.close()
    server.stop(0)


def outcome(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(StageError) as e:
        fn()
    return e.value.code, e.value.message


def test_same_errors_over_grpc_and_in_process(both):
    remote, local, tmp_path = both
    opts = CallOptions(request_id="req-1", timeout_s=10)
    requests = [
        text_encoder_pb2.EncodeTextRequest(model="", prompts=["a"]),
        text_encoder_pb2.EncodeTextRequest(model=str(tmp_path / "missing"), prompts=["a"]),
        text_encoder_pb2.EncodeTextRequest(model="m", prompts=["x" * 30_000]),
    ]
    for req in requests:
        got = {
            name: outcome(lambda c=c, req=req: c["text_encoder"].encode(req, opts))
            for name, c in (("grpc", remote), ("local", local))
        }
        assert got["grpc"] == got["local"], got
    bad = denoiser_pb2.DenoiseRequest(model="m", steps=5, width=64, height=64, batch_size=99)
    got = {
        name: outcome(lambda c=c: list(c["denoiser"].denoise(bad, opts)))
        for name, c in (("grpc", remote), ("local", local))
    }
    assert got["grpc"] == got["local"]
    assert got["grpc"][0] == grpc.StatusCode.INVALID_ARGUMENT and "batch_size=99" in got["grpc"][1]


def test_unavailable_is_retried_with_backoff_then_reported():
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    client = GrpcTextEncoder(endpoint, TOKEN, retries=2, backoff_s=0.05)
    retries: list[str] = []
    started = time.monotonic()
    code, _ = outcome(
        lambda: client.encode(
            text_encoder_pb2.EncodeTextRequest(model="m", prompts=["a"]),
            CallOptions("r", timeout_s=2, on_retry=retries.append),
        )
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert len(retries) == 2 and endpoint in retries[0]
    assert time.monotonic() - started < 10
    client.close()


def test_runner_reports_the_failing_stage(both):
    remote, local, tmp_path = both

    def encode(client, values, ctx):
        req = text_encoder_pb2.EncodeTextRequest(model=values["model"], prompts=[values["prompt"]])
        return {"positive": client.encode(req, ctx.call_options()).outputs}

    graph = Graph(
        "t",
        (Stage("encode_prompt", "text_encoder", ("model", "prompt"), ("positive",), encode),),
        ("positive",),
    )
    for clients in (remote, local):
        events: list = []
        ctx = RunContext(request_id="r1", params=None, emit=events.append)
        with pytest.raises(StageError) as e:
            Runner(clients).run(graph, {"model": str(tmp_path / "none"), "prompt": "a cat"}, ctx)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.stage == "text_encoder"
        assert events[0].stage.stage == "encode_prompt"
        assert events[0].stage.kind == orchestrator_pb2.StageEvent.STARTED


def test_generate_for_an_unknown_family_is_not_found(tmp_path: Path):
    orch = in_process_orchestrator(Settings(local_store_dir=tmp_path / "s", cache_dir=tmp_path / "c"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "MysteryPipeline"}')
    with pytest.raises(StageError) as e:
        orch.generate(orchestrator_pb2.GenerateRequest(model=str(model), prompt="a"), lambda ev: None)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "MysteryPipeline" in e.value.message
    with pytest.raises(StageError) as e:
        orch.generate(orchestrator_pb2.GenerateRequest(model=str(model), request_id="../x"), lambda ev: None)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


class _Stalling(denoiser_pb2_grpc.DenoiserServicer):
    """A test stage: its next `stalls` Denoise calls hang for `stall_s` (a stuck replica), later ones answer
    at once."""

    def __init__(self, stalls: int, stall_s: float) -> None:
        self.calls = 0
        self.stalls = stalls
        self.stall_s = stall_s

    def Denoise(self, request, context):
        self.calls += 1
        if self.stalls > 0:
            self.stalls -= 1
            time.sleep(self.stall_s)
        yield denoiser_pb2.DenoiseEvent(result=denoiser_pb2.DenoiseResult(steps_run=request.steps))


def test_an_attempt_over_the_stage_timeout_is_retried_within_the_request_deadline():
    stage = _Stalling(stalls=1, stall_s=3.0)
    binding = Binding("diffmesh.v1.Denoiser", denoiser_pb2_grpc.add_DenoiserServicer_to_server, stage)
    server, port = create_server([binding], token=TOKEN)
    client = GrpcDenoiser(f"127.0.0.1:{port}", TOKEN, retries=2, backoff_s=0.05)
    try:
        retries: list[str] = []
        opts = CallOptions("r", timeout_s=30, attempt_timeout_s=0.5, on_retry=retries.append)
        events = list(client.denoise(denoiser_pb2.DenoiseRequest(steps=4), opts))
        assert events[-1].result.steps_run == 4 and stage.calls == 2
        assert len(retries) == 1 and "no answer within 0.5 s" in retries[0]

        # the request's own deadline is not retried: it is the caller's limit
        stage.stalls = 1
        retries.clear()
        opts = CallOptions("r", timeout_s=0.5, attempt_timeout_s=10, on_retry=retries.append)
        code, _ = outcome(lambda: list(client.denoise(denoiser_pb2.DenoiseRequest(steps=4), opts)))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and not retries

        # every attempt over the stage timeout: reported as such, with the attempts made
        stage.stalls = 10
        code, message = outcome(
            lambda: list(
                client.denoise(
                    denoiser_pb2.DenoiseRequest(steps=4),
                    CallOptions("r", timeout_s=30, attempt_timeout_s=0.3),
                )
            )
        )
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "stage timeout of 0.3 s, 3 attempts" in message
    finally:
        client.close()
        server.stop(0)
