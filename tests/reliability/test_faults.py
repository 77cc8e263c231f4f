"""Faults injected into `diffmesh up`'s real processes (SeaweedFS S3 + one gRPC server per stage):

- kill -9 of the denoiser mid-request: the orchestrator retries the stage; once the denoiser is restarted the
  request completes with the undisturbed run's image;
- kill -9 of the VAE before its stage: the denoiser runs once (its own RPC counter says so), the decode waits
  for the restarted VAE, the image is the undisturbed one;
- the S3 server stopped: UNAVAILABLE naming the store within the request's deadline; after a restart on its
  port and data, requests succeed again;
- an object corrupted in the store: DATA_LOSS, never decoded.
"""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from minio import Minio
from PIL import Image
from tiny_flux import make_tiny_flux

from orchestrator.client import Client, ClientError
from orchestrator.stack.local_stack import down, restart, up
from protos import orchestrator_pb2, vae_pb2, vae_pb2_grpc
from services.common.settings import S3Settings, Settings
from services.common.store import open_store

RETRIES = "12"  # the orchestrator's retries of a stage (backoff 0.25 s doubling): enough for a restart


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    make_tiny_flux(root / "flux", seed=0)
    state = up(root / "stack", timeout=120, extra_env={"DIFFMESH_RETRIES": RETRIES})
    yield state, root / "flux"
    down(state.path.parent)


def request(model: Path, steps: int) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model=str(model), prompt="a red circle", seed=9, steps=steps, width=64, height=64, guidance=3.5
    )


def pixels(result: orchestrator_pb2.GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0])).convert("RGB"))


def kill9(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)  # each service leads its own session


def denoise_calls(state) -> float:
    """The denoiser's own count of Denoise RPCs that ended OK (its Prometheus endpoint)."""
    url = f"http://{state.data['services']['denoiser']['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = (
        r'^diffmesh_rpc_duration_seconds_count\{(?=[^}]*method="Denoise")(?=[^}]*code="OK")[^}]*\} (\S+)$'
    )
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def run_in_thread(client: Client, req, events: list) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go() -> None:
        try:
            out["gen"] = client.run(req, events.append)
        except ClientError as e:
            out["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the request to get there")
        time.sleep(0.01)


def test_denoiser_killed_mid_request_completes_after_restart(faulty):
    state, model = faulty
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        req = request(model, steps=300)
        undisturbed = pixels(client.run(req).result)
        events: list = []
        thread, out = run_in_thread(client, req, events)
        wait_for(lambda: any(e.WhichOneof("event") == "progress" and e.progress.step >= 3 for e in events))
        kill9(state.data["services"]["denoiser"]["pid"])
        restart(state, "denoiser")
        thread.join(240)
    assert "error" not in out, out.get("error")
    assert np.array_equal(pixels(out["gen"].result), undisturbed)
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps.count(1) >= 2  # the denoise stage started over on the restarted service


def test_vae_killed_before_decode_leaves_the_denoising_done_once(faulty):
    state, model = faulty
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        req = request(model, steps=6)
        undisturbed = pixels(client.run(req).result)
        before = denoise_calls(state)
        kill9(state.data["services"]["vae"]["pid"])
        events: list = []
        thread, out = run_in_thread(client, req, events)
        wait_for(lambda: any(e.WhichOneof("event") == "progress" and e.progress.step == 6 for e in events))
        time.sleep(0.5)  # the decode call meets the dead VAE and backs off
        restart(state, "vae")
        thread.join(240)
    assert "error" not in out, out.get("error")
    assert np.array_equal(pixels(out["gen"].result), undisturbed)
    assert denoise_calls(state) - before == 1


def test_s3_stopped_is_unavailable_in_time_and_restart_recovers(faulty):
    state, model = faulty
    os.killpg(state.data["s3"]["pid"], signal.SIGTERM)
    wait_for(lambda: not _answers(state.data["s3"]["endpoint"]), timeout=30)
    try:
        with Client(state.endpoints["orchestrator"], state.token, timeout_s=8) as client:
            started = time.monotonic()
            with pytest.raises(ClientError) as err:
                client.run(request(model, steps=2))
            elapsed = time.monotonic() - started
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        assert "S3" in err.value.message or "store" in err.value.message, err.value.message
        assert elapsed < 8.0
    finally:
        restart(state, "s3")
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=120) as client:
        assert client.run(request(model, steps=2)).result.images


def test_corrupt_object_is_data_loss_never_decoded(faulty):
    state, _ = faulty
    s3 = state.data["s3"]
    settings = Settings(
        store="s3",
        s3=S3Settings(endpoint=s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"]),
    )
    store = open_store(settings)
    ref = store.put_tensor("runs/faults/test/latents", torch.randn(1, 16, 8, 8), inline=False)
    bucket, key = ref.ref.uri.removeprefix("s3://").split("/", 1)
    raw = Minio(s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"], secure=False)
    data = bytearray(raw.get_object(bucket, key).read())
    data[100] ^= 0xFF  # one flipped byte, same length
    raw.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    with grpc.insecure_channel(state.endpoints["vae"]) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Decode(
                vae_pb2.VaeDecodeRequest(model="unused", latents=ref),
                metadata=[("authorization", f"Bearer {state.token}")],
                timeout=60,
            )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
    assert "sha256" in err.value.details() or "checksum" in err.value.details()


def _answers(endpoint: str) -> bool:
    import socket

    host, port = endpoint.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0
