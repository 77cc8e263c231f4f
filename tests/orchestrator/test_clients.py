"""Stage clients: gRPC and in-process behave the same; UNAVAILABLE is retried with backoff, then reported."""

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
from protos import denoiser_pb2, orchestrator_pb2, text_encoder_pb2
from services.common.server import create_server
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
