"""The shared server runtime on real gRPC servers bound to port 0 (real stage servicers, a local store)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    tensor_pb2,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from services.common.server import create_server
from services.common.settings import Settings
from services.common.store import LocalTensorStore
from services.denoiser import server as denoiser_server
from services.text_encoder import server as text_encoder_server
from services.vae import server as vae_server

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_MSG = 1 << 20


@pytest.fixture
def stage_server(tmp_path: Path):
    settings = Settings(local_store_dir=tmp_path / "store", token=TOKEN, cache_dir=tmp_path / "cache")
    store = LocalTensorStore(settings.local_store_dir)
    bindings = [m.binding(settings, store) for m in (text_encoder_server, denoiser_server, vae_server)]
    server, port = create_server(bindings, port=0, token=TOKEN, max_message_bytes=MAX_MSG)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel, tmp_path
    channel.close()
    server.stop(0)


def test_health_serving_without_token(stage_server):
    _, channel, _ = stage_server
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "diffmesh.v1.TextEncoder", "diffmesh.v1.Denoiser", "diffmesh.v1.Vae"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_services_without_token(stage_server):
    _, channel, _ = stage_server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "diffmesh.v1.TextEncoder",
        "diffmesh.v1.Denoiser",
        "diffmesh.v1.Vae",
        "grpc.health.v1.Health",
    } <= names


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)])
def test_missing_or_wrong_token_is_unauthenticated(stage_server, metadata):
    _, channel, _ = stage_server
    stub = text_encoder_pb2_grpc.TextEncoderStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(
            text_encoder_pb2.EncodeTextRequest(model="m", prompts=["p"]), metadata=metadata, timeout=5
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in (e.value.details() or "")
    # streaming RPCs are guarded too
    with pytest.raises(grpc.RpcError) as e:
        list(
            denoiser_pb2_grpc.DenoiserStub(channel).Denoise(
                denoiser_pb2.DenoiseRequest(), metadata=metadata, timeout=5
            )
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_oversize_message_is_resource_exhausted(stage_server):
    _, channel, _ = stage_server
    big = tensor_pb2.Tensor(
        inline=tensor_pb2.InlineTensor(dtype="U8", shape=[2 * MAX_MSG], data=b"\0" * (2 * MAX_MSG))
    )
    req = vae_pb2.VaeDecodeRequest(model="m", latents=big)
    with pytest.raises(grpc.RpcError) as e:
        vae_pb2_grpc.VaeStub(channel).Decode(req, metadata=AUTH, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_requests_get_their_codes_and_the_server_stays_up(stage_server):
    _, channel, tmp_path = stage_server
    te = text_encoder_pb2_grpc.TextEncoderStub(channel)
    cases = [
        (
            text_encoder_pb2.EncodeTextRequest(model="", prompts=["p"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model",
        ),
        (text_encoder_pb2.EncodeTextRequest(model="m"), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
        (
            text_encoder_pb2.EncodeTextRequest(model=str(tmp_path / "nope"), prompts=["p"]),
            grpc.StatusCode.NOT_FOUND,
            "nope",
        ),
        (
            text_encoder_pb2.EncodeTextRequest(model="gopher://x", prompts=["p"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scheme",
        ),
    ]
    for req, code, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            te.Encode(req, metadata=AUTH, timeout=5)
        assert e.value.code() == code, (req, e.value.details())
        assert needle in e.value.details()
    dn = denoiser_pb2_grpc.DenoiserStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        list(
            dn.Denoise(
                denoiser_pb2.DenoiseRequest(model="m", steps=0, width=64, height=64), metadata=AUTH, timeout=5
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps=0" in e.value.details()
    # a model directory whose transformer class no loader knows -> NOT_FOUND naming the class
    model = tmp_path / "model" / "transformer"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"_class_name": "MysteryTransformer"}')
    req = denoiser_pb2.DenoiseRequest(model=str(model.parent), steps=2, width=64, height=64)
    req.positive["prompt_embeds"].inline.CopyFrom(
        tensor_pb2.InlineTensor(dtype="F32", shape=[1], data=b"\0" * 4)
    )
    with pytest.raises(grpc.RpcError) as e:
        list(dn.Denoise(req, metadata=AUTH, timeout=5))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "MysteryTransformer" in e.value.details()
    # a ref whose object is not there -> NOT_FOUND; a ref of another store -> INVALID_ARGUMENT
    ref = tensor_pb2.TensorRef(
        uri=(tmp_path / "store" / "runs/x/y/z").as_uri(), dtype="F32", shape=[1], byte_size=4
    )
    with pytest.raises(grpc.RpcError) as e:
        vae_pb2_grpc.VaeStub(channel).Decode(
            vae_pb2.VaeDecodeRequest(model="m", latents=tensor_pb2.Tensor(ref=ref)), metadata=AUTH, timeout=5
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_in_flight_calls():
    script = Path(__file__).with_name("slow_stage.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), TOKEN, "10"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],
    )
    try:
        port = int(proc.stdout.readline())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        events: list = []
        errors: list = []

        def call() -> None:
            try:
                events.extend(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=8), metadata=AUTH, timeout=30))
            except grpc.RpcError as e:
                errors.append(e)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the call is in flight (about 2 of 8 steps done)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:  # new calls are refused while draining
            list(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=1), metadata=AUTH, timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        t.join(30)
        assert not errors, errors
        assert events[-1].result.steps_run == 8
        assert [e.progress.step for e in events[:-1]] == list(range(1, 9))
        assert proc.wait(30) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
